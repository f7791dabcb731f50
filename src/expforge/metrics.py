"""Score predictions: ``<split>_<metric>`` names, one dict per split."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from expforge.errors import ConfigError, ExpforgeError

__all__ = ["DIRECTIONS", "base_metric", "better", "check_direction", "cv_metric",
           "default_objective", "direction_of", "metric_names", "ranking_key", "score",
           "score_split"]

DIRECTIONS = ("minimize", "maximize")

REGRESSION = ("rmse", "mae", "r2")
CLASSIFICATION = ("accuracy", "f1", "roc_auc", "log_loss")
_HIGHER_IS_BETTER = {"r2", "accuracy", "f1", "roc_auc"}


def default_objective(task: str) -> tuple[str, str]:
    """The objective when ``metric=auto``: val_rmse for regression, val_log_loss otherwise.

    Log loss is a proper scoring rule that rewards calibrated probabilities, is smooth enough
    for TPE, and is what XGBoost reports per round, so pruning watches the same quantity.
    """
    return ("val_rmse", "minimize") if task == "regression" else ("val_log_loss", "minimize")


def metric_names(task: str, cv: bool = False) -> set[str]:
    """Every metric a run of ``task`` logs; with ``cv``, the folds' means and deviations
    (``cv_val_rmse_mean``) too."""
    names = REGRESSION if task == "regression" else CLASSIFICATION
    known = {f"{split}_{n}" for split in ("train", "val", "test") for n in names}
    if cv:
        known |= {f"cv_val_{n}_{stat}" for n in names for stat in ("mean", "std")}
    return known | {"fit_time_s"}


def cv_metric(metric: str) -> str:
    """The objective of a cross-validated run for ``metric``: the folds' mean of a val
    metric (``val_rmse`` -> ``cv_val_rmse_mean``); any other metric as it is."""
    return f"cv_{metric}_mean" if metric.startswith("val_") else metric


def base_metric(metric: str) -> str:
    """The per-split metric behind a name: ``cv_val_rmse_mean`` -> ``val_rmse``."""
    if metric.startswith("cv_") and metric.endswith(("_mean", "_std")):
        return metric[3:].rsplit("_", 1)[0]
    return metric


def direction_of(metric: str) -> str:
    """The natural direction of a metric name such as ``test_r2`` or ``cv_val_r2_mean``."""
    name = base_metric(metric).split("_", 1)[-1]
    return "maximize" if name in _HIGHER_IS_BETTER else "minimize"


def check_direction(key: str, value: object,
                    error: type[ExpforgeError] = ConfigError) -> str:
    """``value`` if it is a direction, else the one-line error naming ``key``."""
    if value not in DIRECTIONS:
        raise error(f"{key}={value} is not a direction; use minimize or maximize")
    return str(value)


def better(value: float, than: float | None, direction: str) -> bool:
    """Whether ``value`` improves on ``than`` in ``direction``; NaN never does, and anything
    else improves on nothing (``None`` or NaN)."""
    if math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value < than if direction == "minimize" else value > than


def ranking_key(value: float, direction: str) -> float:
    """Sorts best first (ascending), NaN last."""
    if math.isnan(value):
        return math.inf
    return value if direction == "minimize" else -value


def score_split(
    task: str, y_true: Any, y_pred: Any, proba: Any | None, n_classes: int = 0
) -> dict[str, float]:
    """Metrics of one split (names without the split prefix)."""
    from sklearn import metrics

    if task == "regression":  # plain numpy: sklearn's input checks cost more than the math
        y = np.asarray(y_true, dtype=np.float64)
        err = y - np.asarray(y_pred, dtype=np.float64)
        total = float(np.sum((y - y.mean()) ** 2))
        return {
            "rmse": float(math.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(err))),
            "r2": 1.0 - float(np.sum(err**2)) / total if total > 0 else float("nan"),
        }
    labels = list(range(n_classes))
    out = {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "f1": float(metrics.f1_score(y_true, y_pred, average="macro", labels=labels,
                                     zero_division=0)),
    }
    if proba is not None:
        proba = np.asarray(proba, dtype=float)
        proba = proba / proba.sum(axis=1, keepdims=True)  # float32 rows may not sum to 1
        out["log_loss"] = float(metrics.log_loss(y_true, proba, labels=labels))
        try:
            if task == "binary":
                out["roc_auc"] = float(metrics.roc_auc_score(y_true, proba[:, 1]))
            else:
                out["roc_auc"] = float(
                    metrics.roc_auc_score(y_true, proba, multi_class="ovr", labels=labels)
                )
        except ValueError:
            pass  # a split holding one class has no ROC curve
    return out


# Below this many cells the three splits are predicted in one call: per-call overhead (input
# checks, the forest's per-tree dispatch) costs more than the prediction itself. Above it the
# extra copy of the data is not worth it.
_STACK_CELLS = 2_000_000


def score(model: Any, dataset: Any, only: tuple[str, ...] | None = None, keep: str = "val",
          ) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics on every split (or the splits named in ``only``), and the predictions of split
    ``keep`` that the plots reuse."""
    result: dict[str, float] = {}
    kept: dict[str, Any] = {}
    n_classes = len(dataset.classes)
    splits = {name: split for name, split in dataset.splits.items()
              if only is None or name in only}
    outputs = _predict_stacked(model, dataset) if only is None and _stackable(dataset) else {
        name: _predict(model, dataset.task, split.X) for name, split in splits.items()}
    for split_name, split in splits.items():
        pred, proba = outputs[split_name]
        for name, value in score_split(dataset.task, split.y, pred, proba, n_classes).items():
            result[f"{split_name}_{name}"] = value
        if split_name == keep:
            kept = {"pred": pred, "proba": proba}
    return result, kept


def _stackable(dataset: Any) -> bool:
    return sum(s.X.size for s in dataset.splits.values()) <= _STACK_CELLS


def _predict(model: Any, task: str, X: Any) -> tuple[Any, Any]:
    if task == "regression":
        return model.predict(X), None
    proba = model.predict_proba(X)
    return np.argmax(proba, axis=1), proba


def _predict_stacked(model: Any, dataset: Any) -> dict[str, tuple[Any, Any]]:
    import pandas as pd

    splits = dataset.splits
    key = id(dataset)
    if _STACKED.get(key, (None,))[0] is not dataset:
        _STACKED.clear()  # one dataset at a time: a search scores the same one every trial
        _STACKED[key] = (dataset, pd.concat([s.X for s in splits.values()], ignore_index=True))
    pred, proba = _predict(model, dataset.task, _STACKED[key][1])
    out, start = {}, 0
    for name, split in splits.items():
        stop = start + len(split.X)
        out[name] = (pred[start:stop], None if proba is None else proba[start:stop])
        start = stop
    return out


_STACKED: dict[int, tuple[Any, Any]] = {}
