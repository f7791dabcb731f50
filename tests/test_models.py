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


def test_numeric_features_are_preprocessed_as_a_column_transformer_would() -> None:
    """Without categoricals the steps run on the whole frame (its columns are the numeric
    features, in order): the same predictions and feature names as the steps under a
    ColumnTransformer, missing values included."""
    import numpy as np
    import pandas as pd
    from sklearn.base import clone
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(60, 3)) * [1, 10, 100], columns=["a", "b", "c"])
    X.iloc[[3, 7], 1] = np.nan
    y = X["a"].fillna(0) + rng.normal(size=60)
    cfg = to_plain(compose("model=linear"))["model"]
    pipeline = build_model(cfg, "regression", ("a", "b", "c"), ())
    assert not isinstance(pipeline.steps[0][1], ColumnTransformer)
    steps = clone(pipeline.steps[0][1])
    under = Pipeline([("preprocess", ColumnTransformer([("num", steps, ["a", "b", "c"])],
                                                       verbose_feature_names_out=False)),
                      ("model", clone(pipeline.steps[-1][1]))])
    assert np.array_equal(pipeline.fit(X, y).predict(X), under.fit(X, y).predict(X))
    assert list(pipeline.steps[0][1].get_feature_names_out()) == ["a", "b", "c"]
