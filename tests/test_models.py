"""A model config becomes a Pipeline of preprocessing and the estimator, or one clear line."""

from __future__ import annotations

import pytest

from expforge.config import to_plain
from expforge.errors import ConfigError, ModelError
from expforge.models import build_model

from .conftest import compose


@pytest.mark.parametrize(("model", "task", "estimator"), [
    ("rf", "regression", "RandomForestRegressor"), ("rf", "binary", "RandomForestClassifier"),
    ("xgb", "regression", "XGBRegressor"), ("xgb", "multiclass", "XGBClassifier"),
    ("linear", "regression", "Ridge"), ("linear", "binary", "LogisticRegression"),
    ("hgb", "regression", "HistGradientBoostingRegressor"),
])
def test_each_model_builds_its_estimator_for_the_task(model: str, task: str,
                                                      estimator: str) -> None:
    cfg = to_plain(compose(f"model={model}"))["model"]
    pipeline = build_model(cfg, task, ("a", "b"), ("c",), n_jobs=3)
    assert type(pipeline.steps[-1][1]).__name__ == estimator
    if "n_jobs" in cfg:  # model.n_jobs: null takes the worker's share of the cores
        assert pipeline.steps[-1][1].get_params()["n_jobs"] == 3


def test_a_misspelt_parameter_names_the_key_and_the_nearest_one() -> None:
    cfg = to_plain(compose("model=rf", "+model.max_dept=3"))["model"]
    with pytest.raises(ModelError, match=r"model.max_dept=3 is not a parameter of "
                                         r"RandomForestRegressor \(model=rf\); did you mean "
                                         r"max_depth\?"):
        build_model(cfg, "regression", ("a",), ())


def test_an_unknown_encoding_and_a_target_outside_the_allow_list() -> None:
    cfg = to_plain(compose("model=linear", "model.preprocessing.categorical=hash"))["model"]
    with pytest.raises(ConfigError, match=r"model.preprocessing.categorical=hash is not an "
                                          r"encoding; choose one of: onehot, ordinal"):
        build_model(cfg, "regression", ("a",), ("c",))
    cfg = to_plain(compose("model=rf", "model.regressor._target_=os.system"))["model"]
    with pytest.raises(ConfigError, match=r"is not an allowed target"):
        build_model(cfg, "regression", ("a",), ())
