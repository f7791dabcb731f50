"""Diagnostic figures of a fitted model on the validation split (matplotlib, Agg backend)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["model_figures", "prepare", "save_figures", "study_figures", "warm_up"]


def prepare() -> None:
    """Load what the plots need ahead of the first one: matplotlib (Agg) and Optuna's
    plotting module."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot
    import optuna.visualization.matplotlib  # noqa: F401


def warm_up() -> None:
    """Draw once ahead, where a core is idle: a process's first figure pays for the fonts,
    the PNG writer and fANOVA's imports, the next ones do not."""
    import io

    prepare()
    import matplotlib.pyplot as plt
    import optuna.importance  # noqa: F401  (fANOVA and the scikit-learn parts it needs)

    fig, ax = plt.subplots()
    ax.plot([0.0, 1.0], [0.0, 1.0], marker="o", label="warm-up")
    ax.set(title="warm-up", xlabel="x", ylabel="y")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def model_figures(model: Any, task: str, classes: tuple[str, ...], y_val: Any,
                  val_outputs: dict[str, Any]) -> dict[str, Any]:
    """``{"plots/<name>.png": Figure}``: importance, and per task the usual two diagnostics
    of the validation split (``val_outputs``: its ``pred`` and, for classifiers, ``proba``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    figures: dict[str, Any] = {}
    importance = _feature_importance(model)
    if importance is not None:
        figures["plots/feature_importance.png"] = _barh(*importance)
    y_val = np.asarray(y_val)
    if task == "regression":
        pred = np.asarray(val_outputs["pred"])
        figures["plots/predicted_vs_actual.png"] = _pred_vs_actual(y_val, pred)
        figures["plots/residuals.png"] = _residuals(y_val, pred)
    else:
        figures["plots/confusion_matrix.png"] = _confusion(y_val, val_outputs["pred"], classes)
        figures["plots/roc.png"] = _roc(y_val, val_outputs["proba"], classes)
    return figures


def _feature_importance(model: Any, top: int = 20) -> tuple[list[str], np.ndarray] | None:
    estimator = model.steps[-1][1]
    values = getattr(estimator, "feature_importances_", None)
    if values is None and hasattr(estimator, "coef_"):
        coef = np.atleast_2d(estimator.coef_)
        values = np.abs(coef).mean(axis=0)
    if values is None:
        return None
    try:
        names = list(model.steps[0][1].get_feature_names_out())
    except Exception:
        names = [f"f{i}" for i in range(len(values))]
    if len(names) != len(values):
        names = [f"f{i}" for i in range(len(values))]
    order = np.argsort(values)[::-1][:top][::-1]
    return [str(names[i]) for i in order], np.asarray(values)[order]


def _figure(height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, height), dpi=80)
    return fig, fig.subplots()


def _barh(names: list[str], values: np.ndarray) -> Any:
    fig, ax = _figure(max(3.0, 0.25 * len(names) + 1))
    ax.barh(range(len(names)), values)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("Feature importance")
    fig.tight_layout()
    return fig


def _pred_vs_actual(y: np.ndarray, pred: np.ndarray) -> Any:
    fig, ax = _figure()
    ax.scatter(y, pred, s=6, alpha=0.5)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set(xlabel="actual", ylabel="predicted", title="Predicted vs actual (val)")
    return fig


def _residuals(y: np.ndarray, pred: np.ndarray) -> Any:
    fig, ax = _figure()
    ax.scatter(pred, y - pred, s=6, alpha=0.5)
    ax.axhline(0, color="grey", lw=1)
    ax.set(xlabel="predicted", ylabel="actual - predicted", title="Residuals (val)")
    return fig


def _confusion(y: np.ndarray, pred: np.ndarray, classes: tuple[str, ...]) -> Any:
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y, pred, labels=list(range(len(classes))))
    fig, ax = _figure()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center")
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (val)")
    return fig


def _roc(y: np.ndarray, proba: np.ndarray, classes: tuple[str, ...]) -> Any:
    from sklearn.metrics import roc_curve

    fig, ax = _figure()
    columns = [1] if len(classes) == 2 else range(len(classes))
    for k in columns:
        if len(np.unique(y == k)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y == k, proba[:, k])
        ax.plot(fpr, tpr, label=f"class {classes[k]}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (val)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def study_figures(study: Any, metrics: Sequence[str]) -> dict[str, Any]:
    """``{"plots/<name>.png": Figure}``: Optuna's history, importance, slice and
    parallel-coordinate plots of ``study`` (the first of its objectives ``metrics``), and the
    Pareto front of two or three objectives."""
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    import optuna
    from optuna.visualization import matplotlib as vis

    target_name = metrics[0]
    target = (lambda t: t.values[0]) if len(metrics) > 1 else None
    # fANOVA as Optuna's default, with 16 trees of depth 16 instead of 64 of 64: a fraction
    # of the time, and the same ranking of the parameters that matter (benchmarks/README.md).
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=16, max_depth=16, seed=0)
    plots: dict[str, Any] = {
        "plots/optimization_history.png": vis.plot_optimization_history,
        "plots/param_importances.png": functools.partial(vis.plot_param_importances,
                                                         evaluator=evaluator),
        "plots/slice.png": vis.plot_slice,
        "plots/parallel_coordinate.png": vis.plot_parallel_coordinate,
    }
    if len(metrics) in (2, 3):
        plots["plots/pareto_front.png"] = lambda s, **_: vis.plot_pareto_front(
            s, target_names=list(metrics))
    figures = {}
    for path, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw(study, target=target, target_name=target_name)
            except Exception:
                continue  # e.g. importances need two params that vary
        fig = getattr(axes, "figure", None)
        if fig is None and hasattr(axes, "flat"):
            fig = axes.flat[0].figure
        if fig is not None:
            fig.set_size_inches(8, 5)
            figures[path] = fig
    return figures


def save_figures(figures: dict[str, Any]) -> str:
    """The figures as PNG files under a new private folder (``<folder>/<path>``), closed;
    the folder, for a run writer to log and remove (``tracking.log_files``). Interrupted
    (Ctrl-C while a command draws them), it leaves no folder behind."""
    import shutil
    import tempfile
    from pathlib import Path

    import matplotlib.pyplot as plt

    folder = tempfile.mkdtemp(prefix="expforge-figures-")  # mode 0700
    try:
        for path, fig in figures.items():
            target = Path(folder, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(target)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        for fig in figures.values():
            plt.close(fig)
    return folder
