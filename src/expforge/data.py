"""Load a dataset described by ``cfg.data`` into train/val/test splits.

Every loader ends in the same ``Dataset``: features as a DataFrame with their types, the
target as a Series (class codes 0..K-1 for classification), and a digest of the data and the
split, computed once, so two runs on the same bytes and seed can be told apart from two that
are not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from expforge.errors import DataError, first_line

__all__ = ["ROW", "TASKS", "Dataset", "Split", "load_data"]

TASKS = ("regression", "binary", "multiclass")
_SKLEARN_DATASETS = ("diabetes", "breast_cancer", "wine")
_NYC_TAXI_COLUMNS = [
    "lpep_pickup_datetime",
    "lpep_dropoff_datetime",
    "PULocationID",
    "DOLocationID",
    "trip_distance",
]
# Asked for in ``keep``: each row's position in the data as read (files in split order).
ROW = "__row__"


@dataclass(frozen=True)
class Split:
    """One split: raw feature rows and the target; ``meta``, the columns that ``load_data``
    was asked to keep beside the features (cross-validation's groups or order)."""

    X: pd.DataFrame
    y: pd.Series
    meta: pd.DataFrame | None = None


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset; everything downstream reads only this."""

    name: str
    task: str
    target: str
    train: Split
    val: Split
    test: Split
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    source: str
    classes: tuple[str, ...] = ()
    digest: str = field(default="")

    @property
    def is_classification(self) -> bool:
        return self.task != "regression"

    @property
    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def load_data(cfg: Mapping[str, Any], seed: int, root: str | Path = ".",
              keep: Mapping[str, str] | None = None) -> Dataset:
    """Load ``cfg`` (the plain ``data`` config) with splits seeded by ``seed``.

    Relative file paths are resolved against ``root`` (the project root), never the working
    directory, so a Hydra output folder or a test's cwd does not change what is read.
    ``keep`` maps columns to hold in each split's ``meta`` (``ROW``: the row's position) to
    the config key that names them, for the error when the data has no such column.
    """
    loader, keep = cfg.get("loader"), dict(keep or {})
    if loader == "sklearn":
        frame, target, source = _load_sklearn(cfg)
        return _from_frame(cfg, frame, target, source, seed, _Kept(keep, f"data={cfg['name']}"))
    if loader == "synthetic":
        return _load_synthetic(cfg, seed, _Kept(keep, "data=synthetic"))
    if loader == "tabular":
        return _load_tabular(cfg, seed, Path(root), keep)
    if loader == "nyc_taxi":
        return _load_nyc_taxi(cfg, Path(root), keep)
    raise DataError(
        f"data.loader={loader} is not a loader; choose one of: nyc_taxi, sklearn, synthetic, "
        "tabular (conf/data/)"
    )


# -- loaders -------------------------------------------------------------------------------


def _load_sklearn(cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, str, str]:
    from sklearn import datasets

    name = cfg["name"]
    if name not in _SKLEARN_DATASETS:
        raise DataError(
            f"data.name={name} is not a built-in dataset; choose one of: "
            f"{', '.join(_SKLEARN_DATASETS)}"
        )
    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    return bunch.frame, "target", f"sklearn.datasets.load_{name}"


def _load_synthetic(cfg: Mapping[str, Any], seed: int, kept: _Kept) -> Dataset:
    task = cfg.get("task", "regression")
    _check_task(task)
    n_samples, n_features = int(cfg["n_samples"]), int(cfg["n_features"])
    n_informative = min(int(cfg["n_informative"]), n_features)
    if n_samples < 10 or n_features < 1:
        raise DataError(
            f"data.n_samples={n_samples}, data.n_features={n_features}: need at least 10 samples "
            "and 1 feature"
        )
    try:
        X, y, classes = _generate(cfg, task, seed, n_samples, n_features, n_informative)
    except ValueError as exc:
        raise DataError(f"data=synthetic cannot generate this data: {exc}; adjust "
                        "data.n_features, data.n_informative or data.n_classes") from None
    # float32 halves the footprint; build the frame from one block so no column is copied.
    columns = [f"f{i}" for i in range(n_features)]
    frame = pd.DataFrame(X.astype(np.float32, copy=False), columns=columns, copy=False)
    del X
    target = pd.Series(y.astype(np.float32 if task == "regression" else np.int64), name="target")
    source = (
        f"synthetic:{task}:n_samples={n_samples}:n_features={n_features}:"
        f"n_informative={n_informative}:noise={cfg['noise']}:seed={seed}"
    )
    parts = _split_indices(len(frame), cfg, seed, target if task != "regression" else None)
    return _finish(
        cfg["name"], task, "target", frame, target, parts, tuple(columns), (), source, classes,
        kept.of(frame),
    )


def _generate(cfg: Mapping[str, Any], task: str, seed: int, n_samples: int, n_features: int,
              n_informative: int) -> tuple[Any, Any, tuple[str, ...]]:
    from sklearn.datasets import make_classification, make_regression

    if task == "regression":
        X, y = make_regression(
            n_samples=n_samples,
            n_features=n_features,
            n_informative=n_informative,
            noise=float(cfg["noise"]),
            random_state=seed,
        )
        classes: tuple[str, ...] = ()
    else:
        n_classes = 2 if task == "binary" else int(cfg["n_classes"])
        X, y = make_classification(
            n_samples=n_samples,
            n_features=n_features,
            n_informative=max(n_informative, 2),
            n_redundant=0,
            n_classes=n_classes,
            flip_y=float(cfg["noise"]),
            random_state=seed,
        )
        classes = tuple(str(c) for c in range(n_classes))
    return X, y, classes


def _load_tabular(cfg: Mapping[str, Any], seed: int, root: Path,
                  keep: dict[str, str]) -> Dataset:
    target = cfg.get("target")
    if not target:
        raise DataError("data.target is not set; name the target column: data.target=<column>")
    paths = {k: cfg.get(f"{k}_path") for k in ("train", "val", "test")}
    if cfg.get("path"):
        frame = _read_table("data.path", cfg["path"], root)
        return _from_frame(cfg, frame, target, str(_resolve(cfg["path"], root)), seed,
                           _Kept(keep, f"data.path={cfg['path']}"))
    if all(paths.values()):
        frames = {k: _read_table(f"data.{k}_path", p, root) for k, p in paths.items()}
        source = ",".join(str(_resolve(str(p), root)) for p in paths.values())
        return _from_frames(cfg, frames, target, source,
                            _Kept(keep, f"data.train_path={paths['train']}"))
    raise DataError(
        "data.path is not set; give one file (data.path=...) or all of data.train_path, "
        "data.val_path and data.test_path"
    )


def _load_nyc_taxi(cfg: Mapping[str, Any], root: Path, keep: dict[str, str]) -> Dataset:
    frames = {}
    for split in ("train", "val", "test"):
        key = f"data.{split}_path"
        raw = _read_table(key, cfg[f"{split}_path"], root, columns=_NYC_TAXI_COLUMNS)
        frames[split] = _taxi_features(raw, cfg, key)
    source = ",".join(str(_resolve(cfg[f"{s}_path"], root)) for s in ("train", "val", "test"))
    spec = {**cfg, "task": "regression", "features": {"numeric": ["trip_distance"],
                                                      "categorical": ["PU_DO"]}}
    return _from_frames(spec, frames, "duration", source, _Kept(keep, "data=nyc_taxi"))


def _taxi_features(df: pd.DataFrame, cfg: Mapping[str, Any], key: str) -> pd.DataFrame:
    """The course homework's features: trip minutes in [min, max], PU_DO, trip_distance."""
    pickup = pd.to_datetime(df["lpep_pickup_datetime"])
    dropoff = pd.to_datetime(df["lpep_dropoff_datetime"])
    duration = (dropoff - pickup).dt.total_seconds() / 60.0
    keep = duration.between(float(cfg["min_duration"]), float(cfg["max_duration"]))
    if not keep.any():
        raise DataError(
            f"{key}: no trip lasts between {cfg['min_duration']} and {cfg['max_duration']} "
            "minutes; check the file or data.min_duration/data.max_duration"
        )
    df = df.loc[keep]
    pu_do = df["PULocationID"].astype("Int64").astype(str) + "_" + df["DOLocationID"].astype(
        "Int64"
    ).astype(str)
    return pd.DataFrame(
        {
            "PU_DO": pu_do.astype(object).to_numpy(),
            "trip_distance": df["trip_distance"].astype(float).to_numpy(),
            "duration": duration[keep].to_numpy(),
        }
    )


# -- frames to a Dataset -------------------------------------------------------------------


class _Kept:
    """The columns ``load_data`` keeps beside the features, read from a raw frame."""

    def __init__(self, keep: dict[str, str], where: str) -> None:
        self.keep, self.where = keep, where

    def of(self, frame: pd.DataFrame, start: int = 0) -> pd.DataFrame | None:
        if not self.keep:
            return None
        columns: dict[str, Any] = {}
        for column, key in self.keep.items():
            if column == ROW:
                columns[ROW] = np.arange(start, start + len(frame))
            elif column in frame.columns:
                columns[column] = frame[column].to_numpy()
            else:
                shown = ", ".join(map(str, frame.columns[:20]))
                raise DataError(f"{key}={column} is not a column of {self.where}; choose one "
                                f"of: {shown}")
        return pd.DataFrame(columns)


def _from_frame(
    cfg: Mapping[str, Any], frame: pd.DataFrame, target: str, source: str, seed: int,
    kept: _Kept,
) -> Dataset:
    y = _checked_target(frame, target, "data.path")
    task = _task(cfg, y)
    y, classes = _encode_target(y, task)
    numeric, categorical = _feature_types(cfg, frame, target)
    X = _prepare_features(frame, numeric, categorical)
    parts = _split_indices(len(X), cfg, seed, y if task != "regression" else None)
    return _finish(cfg["name"], task, target, X, y, parts, numeric, categorical, source, classes,
                   kept.of(frame))


def _from_frames(
    cfg: Mapping[str, Any], frames: Mapping[str, pd.DataFrame], target: str, source: str,
    kept: _Kept,
) -> Dataset:
    ys = {k: _checked_target(f, target, f"data.{k}_path") for k, f in frames.items()}
    task = _task(cfg, ys["train"])
    numeric, categorical = _feature_types(cfg, frames["train"], target)
    X = pd.concat(
        [_prepare_features(frames[k], numeric, categorical) for k in ("train", "val", "test")],
        ignore_index=True,
    )
    y_all, classes = _encode_target(
        pd.concat([ys[k] for k in ("train", "val", "test")], ignore_index=True), task
    )
    sizes = [len(frames[k]) for k in ("train", "val", "test")]
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]
    metas = [kept.of(frames[k], int(bounds[i])) for i, k in enumerate(("train", "val", "test"))]
    meta = None if metas[0] is None else pd.concat(metas, ignore_index=True)
    return _finish(
        cfg["name"], task, target, X, y_all, parts, numeric, categorical, source, classes, meta
    )


def _finish(
    name: str,
    task: str,
    target: str,
    X: pd.DataFrame,
    y: pd.Series,
    parts: list[np.ndarray],
    numeric: tuple[str, ...],
    categorical: tuple[str, ...],
    source: str,
    classes: tuple[str, ...],
    meta: pd.DataFrame | None = None,
) -> Dataset:
    splits = []
    for idx in parts:
        Xs = X.iloc[idx].reset_index(drop=True)
        ys = y.iloc[idx].reset_index(drop=True).rename(target)
        kept = None if meta is None else meta.iloc[idx].reset_index(drop=True)
        splits.append(Split(Xs, ys, kept))
    dataset = Dataset(
        name=name,
        task=task,
        target=target,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        numeric=numeric,
        categorical=categorical,
        source=source,
        classes=classes,
    )
    return _with_digest(dataset, parts)


def _with_digest(dataset: Dataset, parts: list[np.ndarray]) -> Dataset:
    """Hash the rows of every split in split order: the same bytes and split give one digest."""
    h = hashlib.sha256(f"{dataset.task}:{dataset.target}".encode())
    for split in dataset.splits.values():
        h.update(pd.util.hash_pandas_object(split.X, index=False).to_numpy().tobytes())
        h.update(pd.util.hash_pandas_object(split.y, index=False).to_numpy().tobytes())
    h.update(str([len(p) for p in parts]).encode())
    return Dataset(**{**dataset.__dict__, "digest": h.hexdigest()[:16]})


# -- helpers -------------------------------------------------------------------------------


def _resolve(path: str | Path, root: Path) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else root / p


def _read_table(
    key: str, path: str | Path | None, root: Path, columns: list[str] | None = None
) -> pd.DataFrame:
    if not path:
        raise DataError(f"{key} is not set; give the path of a .csv or .parquet file")
    file = _resolve(path, root)
    if file.exists() and not file.is_file():
        raise DataError(f"{key}={path} is a {'folder' if file.is_dir() else 'special file'}, "
                        f"not a data file ({file}); give the path of a .csv or .parquet file")
    if not file.is_file():
        raise DataError(
            f"{key}={path} does not exist (looked at {file}); fix the path "
            "(relative paths start at the project root)"
        )
    suffix = file.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(file, columns=columns)
        elif suffix in (".csv", ".txt", ".gz"):
            frame = pd.read_csv(file, usecols=columns)
        else:
            raise DataError(f"{key}={path}: unknown file type {suffix!r}; use .csv or .parquet")
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{key}={path} is empty; it needs a header and at least one row") from None
    except (ValueError, KeyError, OSError) as exc:
        raise DataError(f"{key}={path} cannot be read: {first_line(exc)}") from None
    if frame.empty:
        raise DataError(f"{key}={path} has no rows; it needs at least one row of data")
    return frame


def _checked_target(frame: pd.DataFrame, target: str, key: str) -> pd.Series:
    if target not in frame.columns:
        shown = ", ".join(map(str, frame.columns[:20]))
        raise DataError(
            f"data.target={target} is not a column of {key}; choose one of: {shown}"
        )
    y = frame[target]
    n_missing = int(y.isna().sum())
    if n_missing:
        raise DataError(
            f"data.target={target} has {n_missing} missing value(s) in {key}; drop or fill "
            "those rows before training"
        )
    return y


def _check_task(task: str | None) -> None:
    if task not in TASKS:
        raise DataError(f"data.task={task} is not a task; choose one of: {', '.join(TASKS)}")


def _task(cfg: Mapping[str, Any], y: pd.Series) -> str:
    """The configured task, or the one the target implies."""
    task = cfg.get("task")
    if task is not None:
        _check_task(task)
        if task == "regression" and not pd.api.types.is_numeric_dtype(y):
            raise DataError(
                f"data.target={y.name} is not numeric (dtype {y.dtype}), so it cannot be a "
                "regression target; set data.task=binary or data.task=multiclass"
            )
        return str(task)
    n_unique = y.nunique()
    if pd.api.types.is_bool_dtype(y) or n_unique == 2:
        return "binary"
    numeric = pd.api.types.is_numeric_dtype(y)
    is_integral = numeric and bool(np.all(np.mod(y.to_numpy(dtype=float), 1) == 0))
    if not numeric or (is_integral and n_unique <= 20):
        return "multiclass"
    return "regression"


def _encode_target(y: pd.Series, task: str) -> tuple[pd.Series, tuple[str, ...]]:
    """Regression targets as float; class labels as codes 0..K-1 (what XGBoost requires)."""
    if task == "regression":
        return y.astype(float), ()
    codes, uniques = pd.factorize(y, sort=True)
    if len(uniques) < 2:
        raise DataError(
            f"data.target={y.name} has a single class ({uniques[0] if len(uniques) else 'none'})"
            ", so there is nothing to classify; use data with at least two classes or set "
            "data.task=regression"
        )
    if task == "binary" and len(uniques) != 2:
        raise DataError(
            f"data.task=binary but data.target={y.name} has {len(uniques)} classes; "
            "set data.task=multiclass"
        )
    return pd.Series(codes, name=y.name, dtype=np.int64), tuple(str(u) for u in uniques)


def _feature_types(
    cfg: Mapping[str, Any], frame: pd.DataFrame, target: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    features = cfg.get("features") or {}
    numeric, categorical = features.get("numeric"), features.get("categorical")
    if numeric is None and categorical is None:
        numeric, categorical = [], []
        for col in frame.columns:
            if col == target:
                continue
            dtype = frame[col].dtype
            if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
                numeric.append(col)
            elif pd.api.types.is_datetime64_any_dtype(dtype):
                continue  # timestamps need feature engineering; not guessed
            else:
                categorical.append(col)
    numeric, categorical = list(numeric or []), list(categorical or [])
    missing = [c for c in numeric + categorical if c not in frame.columns]
    if missing:
        raise DataError(
            f"data.features names column(s) {', '.join(map(str, missing))} that the data does "
            f"not have; choose from: {', '.join(map(str, frame.columns[:20]))}"
        )
    if target in numeric or target in categorical:
        raise DataError(f"data.features lists the target {target}; remove it from the features")
    if not numeric and not categorical:
        raise DataError(
            f"the data has no usable feature besides the target {target} (datetime columns are "
            "not guessed); add columns or list them in data.features.numeric/categorical"
        )
    return tuple(map(str, numeric)), tuple(map(str, categorical))


def _prepare_features(
    frame: pd.DataFrame, numeric: tuple[str, ...], categorical: tuple[str, ...]
) -> pd.DataFrame:
    """Numeric columns as floats, categoricals as Python strings (NaN kept for imputation)."""
    out = {}
    for col in numeric:
        s = frame[col]
        if pd.api.types.is_bool_dtype(s):
            s = s.astype(np.float32)
        elif not pd.api.types.is_numeric_dtype(s):
            raise DataError(
                f"data.features.numeric lists {col}, which is not numeric (dtype {s.dtype}); "
                "move it to data.features.categorical"
            )
        out[col] = s if s.dtype in (np.float32, np.float64) else s.astype(np.float64)
    for col in categorical:
        s = frame[col]
        values = s.astype(object).to_numpy()
        mask = pd.isna(values)
        strings = np.where(mask, np.nan, s.astype(str).to_numpy(dtype=object))
        out[col] = pd.Series(strings, index=s.index, dtype=object)
    return pd.DataFrame(out, index=frame.index)


def _split_indices(
    n: int, cfg: Mapping[str, Any], seed: int, stratify: pd.Series | None
) -> list[np.ndarray]:
    from sklearn.model_selection import train_test_split

    split = cfg.get("split") or {}
    val, test = float(split.get("val", 0.2)), float(split.get("test", 0.2))
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise DataError(
            f"data.split.val={val}, data.split.test={test}: each must be in (0, 1) and their "
            "sum below 1 (e.g. data.split.val=0.2 data.split.test=0.2)"
        )
    idx = np.arange(n)
    strat = stratify.to_numpy() if stratify is not None else None
    try:
        rest, test_idx = train_test_split(idx, test_size=test, random_state=seed, stratify=strat)
        strat_rest = strat[rest] if strat is not None else None
        train_idx, val_idx = train_test_split(
            rest, test_size=val / (1 - test), random_state=seed, stratify=strat_rest
        )
    except ValueError as exc:
        raise DataError(f"cannot split {n} rows with data.split={dict(split)}: {exc}") from None
    return [np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)]
