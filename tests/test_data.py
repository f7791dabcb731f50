from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expforge.data import load_data
from expforge.errors import DataError

from .conftest import compose


def data_cfg(*overrides: str) -> dict:
    from expforge.config import to_plain

    return to_plain(compose(*overrides))["data"]


@pytest.mark.parametrize(
    ("name", "task", "n_classes"),
    [("diabetes", "regression", 0), ("breast_cancer", "binary", 2), ("wine", "multiclass", 3)],
)
def test_builtin_datasets_split_and_task(name: str, task: str, n_classes: int) -> None:
    ds = load_data(data_cfg(f"data={name}"), seed=1)
    assert ds.task == task
    assert len(ds.classes) == n_classes
    sizes = [len(s.X) for s in ds.splits.values()]
    total = sum(sizes)
    assert abs(sizes[1] / total - 0.2) < 0.02 and abs(sizes[2] / total - 0.2) < 0.02
    if n_classes:  # stratified: every split holds every class
        for split in ds.splits.values():
            assert split.y.nunique() == n_classes


def test_digest_depends_on_data_and_seed(tmp_path: Path) -> None:
    cfg = data_cfg("data=diabetes")
    a, b, c = load_data(cfg, 1), load_data(cfg, 1), load_data(cfg, 2)
    assert a.digest == b.digest
    assert a.digest != c.digest
    frame = pd.DataFrame({"x": np.arange(50.0), "y": np.arange(50.0) * 2})
    frame.to_csv(tmp_path / "d.csv", index=False)
    tab = data_cfg("data=tabular", f"data.path={tmp_path / 'd.csv'}", "data.target=y")
    before = load_data(tab, 0).digest
    frame.loc[7, "x"] = 99.0  # one changed value, same shape
    frame.to_csv(tmp_path / "d.csv", index=False)
    assert load_data(tab, 0).digest != before


def test_synthetic_is_float32_and_seeded() -> None:
    cfg = data_cfg("data=synthetic", "data.n_samples=500", "data.n_features=7")
    ds = load_data(cfg, 3)
    assert ds.train.X.shape[1] == 7
    assert set(ds.train.X.dtypes) == {np.dtype("float32")}
    assert ds.digest == load_data(cfg, 3).digest
    clf = load_data(data_cfg("data=synthetic", "data.task=multiclass", "data.n_classes=4",
                             "data.n_samples=800"), 3)
    assert clf.task == "multiclass" and len(clf.classes) == 4


def test_tabular_csv_infers_task_and_feature_types(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "size": rng.normal(size=300),
        "city": rng.choice(["a", "b", None], 300),
        "when": pd.date_range("2020-01-01", periods=300, freq="D"),
        "label": rng.choice(["yes", "no"], 300),
    })
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    cfg = data_cfg("data=tabular", f"data.path={tmp_path / 't.csv'}", "data.target=label")
    ds = load_data(cfg, 0)
    assert ds.task == "binary" and ds.classes == ("no", "yes")
    assert ds.numeric == ("size",)
    assert "city" in ds.categorical and "label" not in ds.features
    parquet = load_data({**cfg, "path": str(tmp_path / "t.parquet")}, 0)
    assert parquet.task == "binary" and parquet.numeric == ("size",)


def test_tabular_three_files_keep_their_split(tmp_path: Path) -> None:
    paths = {}
    for split, n in (("train", 50), ("val", 20), ("test", 10)):
        pd.DataFrame({"x": np.arange(n, dtype=float), "y": np.arange(n) * 0.5}).to_parquet(
            tmp_path / f"{split}.parquet"
        )
        paths[split] = tmp_path / f"{split}.parquet"
    cfg = data_cfg("data=tabular", "data.target=y", *(f"data.{k}_path={v}"
                                                      for k, v in paths.items()))
    ds = load_data(cfg, 0)
    assert [len(s.X) for s in ds.splits.values()] == [50, 20, 10]
    assert ds.task == "regression"


def test_nyc_taxi_features_and_duration_filter(taxi_files: dict[str, Path]) -> None:
    cfg = data_cfg("data=nyc_taxi", *(f"data.{k}_path={v}" for k, v in taxi_files.items()))
    ds = load_data(cfg, 0)
    assert ds.numeric == ("trip_distance",) and ds.categorical == ("PU_DO",)
    assert ds.target == "duration"
    assert ds.train.y.between(1, 60).all()
    assert len(ds.train.X) < 400  # the 90-minute outliers were dropped
    assert ds.train.X["PU_DO"].str.match(r"^\d+_\d+$").all()


def _write(tmp_path: Path, frame: pd.DataFrame, name: str = "d.csv") -> str:
    frame.to_csv(tmp_path / name, index=False)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "data.path=.*does not exist"),
        ("empty", "data.path=.*is empty"),
        ("no_target", "data.target=price is not a column.*choose one of: a, b"),
        ("nan_target", "data.target=price has 1 missing value"),
        ("text_regression", "data.target=price is not numeric.*data.task=binary"),
        ("no_features", "no usable feature besides the target price"),
    ],
)
def test_bad_tabular_input_is_one_clear_error(tmp_path: Path, case: str, message: str) -> None:
    frames = {
        "no_target": pd.DataFrame({"a": [1, 2], "b": [3, 4]}),
        "nan_target": pd.DataFrame({"a": [1.0, 2.0, 3.0], "price": [1.0, None, 3.0]}),
        "text_regression": pd.DataFrame({"a": [1.0, 2.0], "price": ["x", "y"]}),
        "no_features": pd.DataFrame({"price": [1.0, 2.0, 3.0]}),
    }
    if case == "missing":
        path = str(tmp_path / "nope.csv")
    elif case == "empty":
        path = str(tmp_path / "empty.csv")
        Path(path).write_text("")
    else:
        path = _write(tmp_path, frames[case])
    overrides = ["data=tabular", f"data.path={path}", "data.target=price"]
    if case == "text_regression":
        overrides.append("data.task=regression")
    with pytest.raises(DataError, match=message):
        load_data(data_cfg(*overrides), 0)
