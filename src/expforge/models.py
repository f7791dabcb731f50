"""Build the sklearn Pipeline (preprocessing + estimator) that a model config describes.

The pipeline holds only scikit-learn and XGBoost objects with plain Python arguments, so the
logged model loads and predicts raw rows in a process that never imports expforge.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from expforge.config import ALLOWED_TARGETS, check_target
from expforge.errors import ConfigError, ModelError, first_line

__all__ = [
    "META_KEYS", "build_model", "estimator_params", "param_key",
]

# Keys of a model config that describe the model rather than being estimator arguments.
META_KEYS = frozenset({"name", "regressor", "classifier", "preprocessing"})


def estimator_params(
    model_cfg: Mapping[str, Any], task: str, allowed: Iterable[str] = ALLOWED_TARGETS
) -> tuple[str, dict[str, Any]]:
    """The estimator's ``_target_`` and constructor arguments for ``task``."""
    role = "regressor" if task == "regression" else "classifier"
    spec = dict(model_cfg.get(role) or {})
    target = spec.pop("_target_", None)
    if not target:
        raise ConfigError(f"model.{role}._target_ is not set; name the estimator class")
    check_target(f"model.{role}._target_", target, allowed)
    params = {k: v for k, v in model_cfg.items() if k not in META_KEYS}
    params.update(spec)
    return str(target), params


def param_key(model_cfg: Mapping[str, Any], task: str, name: str) -> str:
    """The config key that sets estimator argument ``name``: model.x or model.regressor.x."""
    role = "regressor" if task == "regression" else "classifier"
    if name in (model_cfg.get(role) or {}):
        return f"model.{role}.{name}"
    return f"model.{name}"


def build_model(
    model_cfg: Mapping[str, Any],
    task: str,
    numeric: tuple[str, ...],
    categorical: tuple[str, ...],
    n_jobs: int | None = None,
    allowed: Iterable[str] = ALLOWED_TARGETS,
) -> Any:
    """A Pipeline of preprocessing chained with the configured estimator.

    ``n_jobs`` fills a ``model.n_jobs: null`` so parallel workers never oversubscribe cores.
    """
    from sklearn.pipeline import Pipeline

    target, params = estimator_params(model_cfg, task, allowed)
    if "n_jobs" in params and params["n_jobs"] is None and n_jobs is not None:
        params["n_jobs"] = n_jobs
    try:
        estimator = _construct(target, params)
    except Exception as exc:  # Hydra wraps the constructor's TypeError in its own error
        raise ModelError(_explain_bad_params(model_cfg, task, target, params, exc)) from None
    preprocess = build_preprocessor(model_cfg.get("preprocessing") or {}, numeric, categorical)
    return Pipeline([("preprocess", preprocess), ("model", estimator)])


def _construct(target: str, params: Mapping[str, Any]) -> Any:
    """``target(**params)``. Hydra's instantiate, slow for a call on every trial's path, only
    where a parameter is itself a config with a ``_target_``."""
    from hydra.utils import get_object, instantiate

    if any(_has_target(v) for v in params.values()):
        return instantiate({"_target_": target, **params}, _convert_="all")
    return get_object(target)(**params)


def _has_target(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_target(v) for v in value)
    return False


def build_preprocessor(
    spec: Mapping[str, Any], numeric: tuple[str, ...], categorical: tuple[str, ...]
) -> Any:
    """Impute, scale and encode by feature type, as the model needs."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import (
        FunctionTransformer,
        OneHotEncoder,
        OrdinalEncoder,
        StandardScaler,
    )

    impute = bool(spec.get("impute", True))
    if not categorical and not impute and not spec.get("scale_numeric", False):
        # Nothing to do: an identity step instead of a ColumnTransformer, which costs several
        # ms per fit and per predict (a search's short trials feel it).
        return FunctionTransformer(feature_names_out="one-to-one")
    steps: list[Any] = []
    if impute:
        steps.append(SimpleImputer(strategy="median", keep_empty_features=True))
    if spec.get("scale_numeric", False):
        steps.append(StandardScaler())
    if not categorical:
        # The features are the numeric columns, in this order (data.py builds them so): the
        # same steps on the whole frame, without a ColumnTransformer's selection and checks,
        # which cost a cheap model a third of its fit and predict (benchmarks/README.md).
        return make_pipeline(*steps)
    transformers = []
    if numeric:
        transformers.append(("num", make_pipeline(*steps) if steps else "passthrough",
                             list(numeric)))
    if categorical:
        encoding = spec.get("categorical", "ordinal")
        if encoding == "onehot":
            encoder: Any = OneHotEncoder(handle_unknown="ignore", min_frequency=1)
        elif encoding == "ordinal":
            encoder = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
        else:
            raise ConfigError(
                f"model.preprocessing.categorical={encoding} is not an encoding; "
                "choose one of: onehot, ordinal"
            )
        cat_steps: list[Any] = []
        if impute:
            cat_steps.append(SimpleImputer(strategy="most_frequent", keep_empty_features=True))
        cat_steps.append(encoder)
        transformers.append(("cat", make_pipeline(*cat_steps), list(categorical)))
    return ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=False)


def _explain_bad_params(model_cfg: Mapping[str, Any], task: str, target: str,
                        params: Mapping[str, Any], exc: Exception) -> str:
    name = model_cfg.get("name", "model")
    cls_name = target.rsplit(".", 1)[-1]
    try:
        from hydra._internal.utils import _locate

        accepted = set(inspect.signature(_locate(target)).parameters)
    except Exception:
        accepted = set()
    unknown = sorted(k for k in params if accepted and k not in accepted)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(accepted), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return (
            f"{param_key(model_cfg, task, key)}={params[key]} is not a parameter of {cls_name} "
            f"(model={name}); {hint}valid: {', '.join(sorted(accepted))}"
        )
    return f"{cls_name} (model={name}) cannot be built: {first_line(exc.__cause__ or exc)}"
