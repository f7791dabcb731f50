"""One run: data -> model -> fit -> score -> log, recorded as one complete MLflow run."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from expforge import config as config_mod
from expforge import start_up_done, tracking
from expforge.data import Dataset, load_data
from expforge.errors import ConfigError, ModelError
from expforge.metrics import default_objective, direction_of, metric_names, score
from expforge.models import build_model, param_key
from expforge.tracking import (
    RunRecord,
    RunWriter,
    TrackingSettings,
    connect,
    describe_dataset,
    error_line,
    git_info,
    interrupts_deferred,
    log_datasets,
    log_figures,
    log_model,
    log_params,
    tracked_run,
    versions,
)

__all__ = [
    "Objective", "RunContext", "RunResult", "attach_model", "config_texts", "fit", "fitted_model",
    "objective_of", "record_of", "run_one", "submit_figures",
]

# Config sections that are not logged as params: hydra is runtime, the space belongs to search.
_UNLOGGED = ("hydra", "search_space")


class Reporter(Protocol):
    """Receives the validation objective during training; raises to stop (pruning)."""

    metric: str  # e.g. "val_rmse"
    every: int  # report every k boosting rounds / iterations

    def __call__(self, step: int, value: float) -> None: ...


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class RunContext:
    """What the entry point knows about the invocation (Hydra choices and overrides)."""

    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    experiment_id: str
    metrics: dict[str, float]
    objective: Objective
    value: float
    model_uri: str | None = None

    @property
    def tracking_uri(self) -> str:
        import mlflow

        return mlflow.get_tracking_uri()


def objective_of(plain: Mapping[str, Any], task: str) -> Objective:
    """The configured objective, or the task's default when ``metric=auto``."""
    metric, direction = plain.get("metric", "auto"), plain.get("direction", "auto")
    if metric in (None, "auto"):
        metric, default_direction = default_objective(task)
    else:
        default_direction = direction_of(str(metric))
    if direction in (None, "auto"):
        direction = default_direction
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"direction={direction} is not a direction; use minimize or maximize")
    known = metric_names(task)
    if metric not in known:
        raise ConfigError(
            f"metric={metric} is not computed for a {task} task; choose one of: "
            f"{', '.join(sorted(known))}"
        )
    return Objective(str(metric), str(direction))


def run_one(
    plain: Mapping[str, Any],
    context: RunContext | None = None,
    *,
    dataset: Dataset | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    n_jobs: int | None = None,
    log_model_artifact: bool | None = None,
    log_plot_artifacts: bool | None = None,
    reporter: Reporter | None = None,
    on_start: Callable[[str], None] | None = None,
    stop_early: tuple[type[BaseException], ...] = (),
    writer: RunWriter | None = None,
    end_tags: Callable[[BaseException | None], Mapping[str, str]] | None = None,
) -> tuple[RunResult, Any]:
    """Train and record one run of the resolved config ``plain``; return it and the model.

    The keyword arguments let a search reuse the loaded dataset and the store connection, hang
    the run under its parent, and report intermediate values for pruning (``stop_early``
    ends the run FINISHED). With a ``writer`` (a search's trials) the run is created when the
    fit starts and written in one go at its end (see ``RunWriter``); ``end_tags(error)`` adds
    the tags that depend on how the run ended. Models and plots are logged only without one.
    """
    context = context or RunContext()
    settings = TrackingSettings.from_config(plain["tracking"])
    root = Path(plain["paths"]["root"])
    # Bad data or model config fails here, before the store is touched: no run to clean up.
    if dataset is None:
        dataset = load_data(plain["data"], int(plain["seed"]), root)
    objective = objective_of(plain, dataset.task)
    model = _build(plain, dataset, n_jobs)
    if experiment_id is None:
        experiment_id = connect(settings)
    masked = config_mod.mask_secrets(plain)
    tags = {
        **{k: str(v) for k, v in context.choices.items() if k in ("model", "data", "search")},
        "config_hash": config_mod.config_hash(plain),
        "dataset_digest": dataset.digest,
        "task": dataset.task,
        "objective.metric": objective.metric,
        "objective.direction": objective.direction,
        **git_info(str(root)),
        **{f"versions.{k}": v for k, v in versions().items()},
        **config_mod.mask_secrets(settings.tags),
        **(extra_tags or {}),
    }
    run_name = settings.run_name or f"{plain['model'].get('name', 'model')}-{dataset.name}"
    want_model = settings.log_model if log_model_artifact is None else log_model_artifact
    want_plots = settings.log_plots if log_plot_artifacts is None else log_plot_artifacts

    if writer is not None:
        record = record_of(plain, context, dataset)
        created = writer.create_run(experiment_id, run_name, tags, parent_run_id, on_start)
        metrics = _run_deferred(writer, created, model, dataset, plain["model"], record,
                                reporter, stop_early, end_tags)
        return RunResult(record.run_id, experiment_id, metrics, objective,
                         float(metrics[objective.metric])), model

    import mlflow

    if settings.autolog:
        _autolog(enable=True, log_models=want_model)
    try:
        with tracked_run(experiment_id, run_name, tags, parent_run_id,
                         stop_early=stop_early) as run:
            run_id = run.info.run_id
            if on_start is not None:
                on_start(run_id)
            log_params(config_mod.param_values(masked, exclude=_UNLOGGED))
            for path, text in config_texts(masked, context).items():
                mlflow.log_text(text, path)
            log_datasets(run_id, dataset)
            fit_time = fit(model, dataset, plain["model"], reporter)
            metrics, val_outputs = score(model, dataset)
            metrics["fit_time_s"] = fit_time
            model_uri = None
            with interrupts_deferred():  # this process's own writes (see there)
                mlflow.log_metrics(metrics)
                if want_plots:
                    from expforge.plots import model_figures

                    log_figures(model_figures(model, dataset.task, dataset.classes,
                                              dataset.val.y, val_outputs))
                if want_model and not settings.autolog:
                    model_uri = log_model(model, dataset.train.X).model_uri
        result = RunResult(
            run_id=run_id,
            experiment_id=experiment_id,
            metrics=metrics,
            objective=objective,
            value=float(metrics[objective.metric]),
            model_uri=model_uri,
        )
        return result, model
    finally:
        if settings.autolog:
            _autolog(enable=False)


def record_of(plain: Mapping[str, Any], context: RunContext, dataset: Dataset) -> RunRecord:
    """A run's record before its work: params, config artifacts and dataset inputs."""
    masked = config_mod.mask_secrets(plain)
    return RunRecord("", params=config_mod.param_values(masked, exclude=_UNLOGGED),
                     texts=config_texts(masked, context), dataset=describe_dataset(dataset))


def config_texts(masked: Mapping[str, Any], context: RunContext) -> dict[str, str]:
    """The resolved config and the command line's overrides, as artifact texts."""
    texts = {"config.yaml": config_mod.to_yaml(masked)}
    if context.overrides:
        texts["overrides.yaml"] = config_mod.to_yaml(
            config_mod.mask_overrides(context.overrides))
    return texts


def _run_deferred(
    writer: RunWriter,
    created: Any,
    model: Any,
    dataset: Dataset,
    model_cfg: Mapping[str, Any],
    record: RunRecord,
    reporter: Reporter | None,
    stop_early: tuple[type[BaseException], ...],
    end_tags: Callable[[BaseException | None], Mapping[str, str]] | None,
) -> dict[str, float]:
    """Fit and score while the writer creates the run (``created``, a future of its id); hand
    the finished run to the writer.

    Like ``tracked_run``, every way out ends the run: FINISHED (also ``stop_early``), FAILED
    with the error tag and traceback, or KILLED; an interrupt waits for the pending writes.
    """
    error: BaseException | None = None
    try:
        fit_time = fit(model, dataset, model_cfg, reporter)
        record.metrics, _ = score(model, dataset)
        record.metrics["fit_time_s"] = fit_time
        return record.metrics
    except (KeyboardInterrupt, SystemExit) as exc:
        error, record.status = exc, "KILLED"
        raise
    except stop_early as exc:
        error = exc
        raise
    except BaseException as exc:
        error, record.status = exc, "FAILED"
        record.tags["error"] = error_line(exc)
        import traceback

        record.texts["error/traceback.txt"] = traceback.format_exc()
        raise
    finally:
        record.run_id = writer.wait(created)
        if end_tags is not None:
            record.tags.update(end_tags(error))
        record.end_time = int(time.time() * 1000)
        writer.write(record)
        if record.status == "KILLED":
            writer.flush()


def _autolog(enable: bool, log_models: bool = True) -> None:
    """MLflow's own sklearn and xgboost autologging, switched on for one run only."""
    import mlflow

    for flavor in (mlflow.sklearn, mlflow.xgboost):
        if enable:
            flavor.autolog(log_models=log_models, log_datasets=False, silent=True)
        else:
            flavor.autolog(disable=True, silent=True)


def fit(
    model: Any,
    dataset: Dataset,
    model_cfg: Mapping[str, Any],
    reporter: Reporter | None = None,
) -> float:
    """Fit the pipeline on the train split; return the fit time in seconds.

    With a ``reporter`` (pruning), iterative estimators report the validation objective as
    they train (see ``Reporter``).
    """
    start_up_done()
    start = time.perf_counter()
    try:
        if reporter is None:
            model.fit(dataset.train.X, dataset.train.y)
        else:
            _fit_reporting(model, dataset, reporter)
    except Exception as exc:
        rejected = _rejected_param(exc, model_cfg, dataset.task)
        if rejected is None:
            raise
        raise ModelError(rejected) from None
    return round(time.perf_counter() - start, 4)


def _fit_reporting(model: Any, dataset: Dataset, reporter: Reporter) -> None:
    """Fit step by step so that hopeless trials can be stopped early.

    XGBoost reports from a training callback (its own eval metric when it is the objective,
    else our metric on staged predictions); HistGradientBoosting grows by warm starts of
    ``every`` iterations. Other estimators fit at once and report nothing.
    """
    preprocess, estimator = model.steps[0][1], model.steps[-1][1]
    X_train = preprocess.fit_transform(dataset.train.X, dataset.train.y)
    X_val = preprocess.transform(dataset.val.X)
    y_train, y_val = dataset.train.y, dataset.val.y
    every = max(1, int(reporter.every))
    module = type(estimator).__module__
    if module.startswith("xgboost"):
        callback = _xgb_callback(reporter, every, dataset, X_val)
        estimator.set_params(callbacks=[callback])
        try:
            estimator.fit(X_train, y_train, eval_set=[(X_val, y_val)], verbose=False)
        finally:  # the callback holds the trial: it must not be pickled with the model
            estimator.set_params(callbacks=None)
    elif hasattr(estimator, "warm_start") and hasattr(estimator, "max_iter"):
        total = int(estimator.max_iter)
        estimator.set_params(warm_start=True)
        try:
            for stop in range(every, total + every, every):
                estimator.set_params(max_iter=min(stop, total))
                estimator.fit(X_train, y_train)
                reporter(min(stop, total), _val_objective(estimator, dataset, X_val, reporter))
        finally:
            estimator.set_params(warm_start=False, max_iter=total)
    else:  # nothing to stop early; reporting the final value would only prune a done trial
        estimator.fit(X_train, y_train)


def _val_objective(estimator: Any, dataset: Dataset, X_val: Any, reporter: Reporter,
                   **predict_kw: Any) -> float:
    from expforge.metrics import score_split

    if dataset.task == "regression":
        pred, proba = estimator.predict(X_val, **predict_kw), None
    else:
        proba = estimator.predict_proba(X_val, **predict_kw)
        pred = proba.argmax(axis=1)
    values = score_split(dataset.task, dataset.val.y, pred, proba, len(dataset.classes))
    return values.get(reporter.metric.split("_", 1)[-1], float("nan"))


def _xgb_callback(reporter: Reporter, every: int, dataset: Dataset, X_val: Any) -> Any:
    import xgboost as xgb

    native = {"val_rmse": "rmse", "val_log_loss": "mlogloss" if len(dataset.classes) > 2
              else "logloss"}.get(reporter.metric)

    class _Report(xgb.callback.TrainingCallback):  # type: ignore[misc]
        def after_iteration(self, booster: Any, epoch: int, evals_log: Any) -> bool:
            if (epoch + 1) % every:
                return False
            history = next(iter(evals_log.values()), {})
            if native in history:
                value = float(history[native][-1])
            else:
                value = _booster_objective(booster, epoch, dataset, X_val, reporter)
            reporter(epoch + 1, value)
            return False

    return _Report()


def _booster_objective(booster: Any, epoch: int, dataset: Dataset, X_val: Any,
                       reporter: Reporter) -> float:
    import numpy as np
    import xgboost as xgb

    from expforge.metrics import score_split

    raw = booster.predict(xgb.DMatrix(X_val), iteration_range=(0, epoch + 1))
    if dataset.task == "regression":
        pred, proba = raw, None
    else:
        proba = raw if raw.ndim == 2 else np.column_stack([1 - raw, raw])
        pred = proba.argmax(axis=1)
    values = score_split(dataset.task, dataset.val.y, pred, proba, len(dataset.classes))
    return values.get(reporter.metric.split("_", 1)[-1], float("nan"))


def _rejected_param(exc: Exception, model_cfg: Mapping[str, Any], task: str) -> str | None:
    """A one-line message when ``exc`` is the estimator rejecting a hyperparameter."""
    from sklearn.utils._param_validation import InvalidParameterError

    estimator = model_cfg.get("name", "model")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, InvalidParameterError):
        match = re.search(r"The '(\w+)' parameter", first)
        if match:
            key = param_key(model_cfg, task, match.group(1))
            node: Any = {"model": model_cfg}
            for part in key.split("."):
                node = node.get(part, "?") if isinstance(node, Mapping) else "?"
            return f"{key}={node} is rejected by model={estimator}: {first}"
        return f"model={estimator} rejects its configuration: {first}"
    if type(exc).__module__.startswith("xgboost"):
        return f"model={estimator} (XGBoost) rejects its configuration: {first}"
    return None


def fitted_model(plain: Mapping[str, Any], dataset: Dataset, n_jobs: int | None = None) -> Any:
    """The model of the resolved config ``plain``, fitted on the train split (no run)."""
    model = _build(plain, dataset, n_jobs)
    fit(model, dataset, plain["model"])
    return model


def _build(plain: Mapping[str, Any], dataset: Dataset, n_jobs: int | None) -> Any:
    return build_model(
        plain["model"], dataset.task, dataset.numeric, dataset.categorical,
        n_jobs=n_jobs or os.cpu_count() or 1, allowed=config_mod.allowed_targets(plain),
    )


def attach_model(writer: RunWriter, run_id: str, model: Any, dataset: Dataset,
                 plots: bool = True) -> None:
    """Log a fitted model (and its plots) into an ended run, through ``writer``: a writer
    process logs the model while this process draws the plots."""
    writer.submit(tracking.attach_model, run_id, model, dataset.train.X.head(5))
    if plots:
        from expforge.plots import model_figures

        _, val_outputs = score(model, dataset)
        figures = model_figures(model, dataset.task, dataset.classes, dataset.val.y,
                                val_outputs)
        submit_figures(writer, run_id, figures)


def submit_figures(writer: RunWriter, run_id: str, figures: dict[str, Any]) -> None:
    """Figures onto a run through ``writer``, as PNG files drawn here."""
    import shutil

    from expforge.plots import save_figures

    folder = save_figures(figures)
    try:
        writer.submit(tracking.log_files, run_id, folder)
    except BaseException:  # not handed over
        shutil.rmtree(folder, ignore_errors=True)
        raise
