"""One run: data -> model -> fit -> score, recorded as one complete MLflow run.

Every run takes the same path through a ``tracking.Store``: created RUNNING when its fit
starts, written in one go when it ends (params, metrics, tags, config, dataset inputs, its
end), then given its model and plots. A single run opens a store of its own; a search's
trials pass theirs.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from expforge import config as config_mod
from expforge.cv import CVSettings, Folds, cross_validate, folds_of, pooled
from expforge.data import Dataset, load_data
from expforge.errors import ConfigError, ModelError, error_line, first_line
from expforge.metrics import (
    check_direction,
    cv_metric,
    default_objective,
    direction_of,
    metric_names,
    score,
)
from expforge.models import build_model, param_key
from expforge.process import start_up_done
from expforge.tracking import (
    RunRecord,
    Store,
    TrackingSettings,
    describe_dataset,
    git_info,
    open_store,
    versions,
)

__all__ = [
    "Objective",
    "RunContext",
    "RunResult",
    "attach_figures",
    "attach_model",
    "config_texts",
    "cross_validates",
    "figures_split",
    "fit",
    "fitted_model",
    "objective_of",
    "provenance_tags",
    "record_of",
    "refits",
    "run_one",
]

# Config sections that are not logged as params: hydra is runtime, the space belongs to search.
_UNLOGGED = ("hydra", "search_space")


class Reporter(Protocol):
    """Receives the validation objective during training; raises to stop (pruning)."""

    metric: str  # e.g. "val_rmse"
    every: int  # report every k boosting rounds / iterations
    fold: int | None  # the fold being fitted (set by a cross-validation), else None
    folds_only: bool  # in a cross-validation, report folds' scores and not boosting rounds

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
    output_dir: str | None = None  # Hydra's output folder of the job (None outside Hydra)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    experiment_id: str
    metrics: dict[str, float]
    objective: Objective
    value: float
    tracking_uri: str = ""
    model_uri: str | None = None
    reused: bool = False  # tracking.reuse found this FINISHED run: nothing was trained


def objective_of(plain: Mapping[str, Any], task: str) -> Objective:
    """The configured objective, or the task's default when ``metric=auto``; in a
    cross-validated run, a val metric's folds' mean (``cv_val_rmse_mean``)."""
    metric, direction = plain.get("metric", "auto"), plain.get("direction", "auto")
    if metric in (None, "auto"):
        metric, default_direction = default_objective(task)
    else:
        default_direction = direction_of(str(metric))
    if direction in (None, "auto"):
        direction = default_direction
    check_direction("direction", direction)
    cross_validated = cross_validates(plain)
    known = metric_names(task, cv=cross_validated)
    if metric not in known:
        hint = (f"; metric={metric} needs cross-validation (cv=kfold)"
                if metric in metric_names(task, cv=True) else "")
        raise ConfigError(
            f"metric={metric} is not computed for a {task} task; choose one of: "
            f"{', '.join(sorted(known))}{hint}"
        )
    metric = cv_metric(str(metric)) if cross_validated else metric
    return Objective(str(metric), str(direction))


def cross_validates(plain: Mapping[str, Any]) -> bool:
    """Whether the config ``plain`` cross-validates (``cv`` other than none)."""
    return str((plain.get("cv") or {}).get("name", "none")) != "none"


def refits(plain: Mapping[str, Any]) -> bool:
    """Whether a run of ``plain`` has a fitted model to log (not ``cv.refit=false``)."""
    return not cross_validates(plain) or bool((plain.get("cv") or {}).get("refit", True))


def figures_split(plain: Mapping[str, Any]) -> str:
    """The split a run's model plots are drawn on: val, or test for a cross-validated run,
    whose model is refitted on the val rows."""
    return "test" if cross_validates(plain) else "val"


def run_one(
    plain: Mapping[str, Any],
    context: RunContext | None = None,
    *,
    dataset: Dataset | None = None,
    store: Store | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    n_jobs: int | None = None,
    log_model: bool | None = None,
    log_plots: bool | None = None,
    reporter: Reporter | None = None,
    on_start: Callable[[str], None] | None = None,
    stop_early: tuple[type[BaseException], ...] = (),
    end_tags: Callable[[BaseException | None], Mapping[str, str]] | None = None,
) -> tuple[RunResult, Any]:
    """Train and record one run of the resolved config ``plain``; return it and the model.

    A search passes its loaded ``dataset``, its ``store`` and ``experiment_id``, the parent
    run, a ``reporter`` for pruning (``stop_early`` exceptions end the run FINISHED) and
    ``end_tags(error)``, the tags that depend on how the run ended. ``log_model`` and
    ``log_plots`` default to ``tracking.log_model`` and ``tracking.log_plots``.
    """
    context = context or RunContext()
    settings = TrackingSettings.from_config(plain["tracking"])
    root = Path(plain["paths"]["root"])
    # Bad data or model config fails here, before the store is touched: no run to clean up.
    cv = CVSettings.from_config(plain)
    if dataset is None:
        dataset = load_data(plain["data"], int(plain["seed"]), root,
                            keep=cv.columns() if cv else None)
    objective = objective_of(plain, dataset.task)
    folds = folds_of(cv, dataset, int(plain["seed"])) if cv else None
    has_model = cv is None or cv.refit  # cv.refit=false fits only the folds' copies
    model = _build(plain, dataset, n_jobs)
    own = store is None
    store = store or open_store(settings)
    try:
        if experiment_id is None:
            experiment_id = store.connect(settings)
        if settings.reuse and own:  # a single run or a sweep's job, never a trial
            found = _reused(plain, dataset, objective, settings, experiment_id, store,
                            parent_run_id)
            if found is not None:
                return found, None
        run_name = settings.run_name or f"{plain['model'].get('name', 'model')}-{dataset.name}"
        want_model = has_model and (settings.log_model if log_model is None else log_model)
        want_plots = has_model and (settings.log_plots if log_plots is None else log_plots)
        record = record_of(plain, context, dataset)
        created = store.create_run(experiment_id, run_name,
                                   _tags(plain, context, dataset, objective, settings,
                                         extra_tags),
                                   parent_run_id, on_start)
        autolog = settings.autolog and own
        outputs = _fit_recorded(store, created, model, dataset, plain["model"], record,
                                reporter, stop_early, end_tags,
                                autolog=(settings.uri, want_model) if autolog else None,
                                folds=folds)
        model_uri = None
        if want_model and not autolog:
            model_uri = attach_model(store, record.run_id, model, dataset)
        if want_plots:
            attach_figures(store, record.run_id,
                           _model_figures(model, dataset, outputs, figures_split(plain)))
    finally:
        if own:
            store.close()
    return RunResult(record.run_id, experiment_id, record.metrics, objective,
                     float(record.metrics[objective.metric]), settings.uri, model_uri), (
        model if has_model else None)


def _reused(plain: Mapping[str, Any], dataset: Dataset, objective: Objective,
            settings: TrackingSettings, experiment_id: str, store: Store,
            parent_run_id: str | None) -> RunResult | None:
    """``tracking.reuse=true``: the FINISHED run of the same config hash and dataset digest
    in this experiment, if there is one; a sweep's parent lists it among its jobs."""
    from expforge.tracking import queries, reader

    client = reader(settings.uri)
    twin = queries.finished_twin(client, experiment_id, config_mod.config_hash(plain),
                                 dataset.digest)
    if twin is None or objective.metric not in twin.data.metrics:
        return None
    if parent_run_id:
        store.write(RunRecord(parent_run_id, status=None,
                              tags={f"{queries.REUSED}{twin.info.run_id}": "true"}))
    metrics = {k: float(v) for k, v in twin.data.metrics.items()}
    model_uri = queries.logged_models(client, experiment_id, twin.info.run_id).get(
        twin.info.run_id)
    return RunResult(twin.info.run_id, experiment_id, metrics, objective,
                     metrics[objective.metric], settings.uri, model_uri, reused=True)


def _tags(plain: Mapping[str, Any], context: RunContext, dataset: Dataset,
          objective: Objective, settings: TrackingSettings,
          extra: Mapping[str, str] | None) -> dict[str, str]:
    return {
        **{k: str(v) for k, v in context.choices.items() if k in ("model", "data", "search")},
        **provenance_tags(plain, dataset),
        "objective.metric": objective.metric,
        "objective.direction": objective.direction,
        **config_mod.mask_secrets(settings.tags),
        **(extra or {}),
    }


def provenance_tags(plain: Mapping[str, Any], dataset: Dataset) -> dict[str, str]:
    """Where a run's result comes from: its config, data, git commit and package versions
    (on every run, parents of studies included)."""
    return {
        "config_hash": config_mod.config_hash(plain),
        "dataset_digest": dataset.digest,
        "task": dataset.task,
        **git_info(str(plain["paths"]["root"])),
        **{f"versions.{k}": v for k, v in versions().items()},
    }


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


def _fit_recorded(
    store: Store,
    created: Future[str],
    model: Any,
    dataset: Dataset,
    model_cfg: Mapping[str, Any],
    record: RunRecord,
    reporter: Reporter | None,
    stop_early: tuple[type[BaseException], ...],
    end_tags: Callable[[BaseException | None], Mapping[str, str]] | None,
    autolog: tuple[str, bool] | None = None,
    folds: Folds | None = None,
) -> dict[str, Any]:
    """Fit and score (on ``folds``, then refitted, when the run cross-validates) while the
    store creates the run (``created``, a future of its id); hand the finished run over in
    one record. The predictions the plots reuse (val, or test after a cross-validation).

    Every way out ends the run: FINISHED (also ``stop_early``), FAILED with the error tag and
    the traceback, or KILLED; an interrupt waits for the pending writes.
    """
    error: BaseException | None = None
    try:
        if autolog is not None:  # the fluent run that MLflow's autologging logs into
            from expforge.tracking.models import autologged

            logging: AbstractContextManager[None] = autologged(
                autolog[0], store.wait(created), log_models=autolog[1])
        else:
            logging = nullcontext()
        if folds is not None:  # autologging sees only the refit, the run's model
            fit_time, outputs = cross_validate(model, dataset, folds, model_cfg, record,
                                               reporter, refitting=logging)
        else:
            with logging:
                fit_time = fit(model, dataset, model_cfg, reporter)
            record.metrics, outputs = score(model, dataset)
        record.metrics["fit_time_s"] = fit_time
        return outputs
    except (KeyboardInterrupt, SystemExit) as exc:
        error, record.status = exc, "KILLED"
        raise
    except stop_early as exc:
        error = exc
        raise
    except BaseException as exc:
        error, record.status = exc, "FAILED"
        record.tags["error"] = error_line(exc)
        record.texts["error/traceback.txt"] = traceback.format_exc()
        raise
    finally:
        record.run_id = store.wait(created)
        if end_tags is not None:
            record.tags.update(end_tags(error))
        record.end_time = int(time.time() * 1000)
        store.write(record)
        if record.status == "KILLED":
            store.flush()


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
        if rejected is None and isinstance(exc, (ValueError, TypeError)):
            # the estimator refusing the data (infinite values, one class in a split, ...)
            rejected = (f"model={model_cfg.get('name', 'model')} cannot be fitted on "
                        f"data={dataset.name}: {first_line(exc).rstrip('.')}; check the data's "
                        "values (data.path, data.target) and the model's settings")
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
    elif fits_by_rounds(estimator):  # scikit-learn's histogram gradient boosting
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


def fits_by_rounds(estimator: Any) -> bool:
    """Whether ``_fit_reporting`` fits ``estimator`` round by round, with a report after each
    k rounds: XGBoost (a callback) and scikit-learn's histogram gradient boosting, whose
    ``warm_start`` adds the next trees as one fit would. Not any estimator with
    ``warm_start`` and ``max_iter``: LogisticRegression would restart its solver at each
    stop, end elsewhere than a run's single fit, and warn that it did not converge."""
    kind = type(estimator)
    return kind.__module__.startswith("xgboost") or kind.__name__.startswith(
        "HistGradientBoosting")


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

    class _Report(xgb.callback.TrainingCallback):
        def after_iteration(self, booster: Any, epoch: int, evals_log: Any) -> bool:
            if (epoch + 1) % every:
                return False
            history: dict[str, Any] = next(iter(evals_log.values()), {})
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
    first = first_line(exc)
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
    """The model of the resolved config ``plain``, fitted on the train split (no run); on the
    train and val rows for a cross-validated config, as its run's model is."""
    model = _build(plain, dataset, n_jobs)
    fit(model, pooled(dataset) if cross_validates(plain) else dataset, plain["model"])
    return model


def _build(plain: Mapping[str, Any], dataset: Dataset, n_jobs: int | None) -> Any:
    return build_model(
        plain["model"], dataset.task, dataset.numeric, dataset.categorical,
        n_jobs=n_jobs or os.cpu_count() or 1, allowed=config_mod.allowed_targets(plain),
    )


def attach_model(store: Store, run_id: str, model: Any, dataset: Dataset) -> str | None:
    """Log a fitted model into a run, with five raw rows as its input example; its URI where
    the store logs it at once."""
    return store.attach_model(run_id, model, dataset.train.X.head(5))


def attach_figures(store: Store, run_id: str, figures: dict[str, Any],
                   add: Callable[[Path], None] | None = None) -> None:
    """Figures onto a run, as PNG files drawn here (a writer process logs them);
    ``add(folder)`` first puts more files beside them (a page that shows them)."""
    import shutil

    from expforge.plots import save_figures

    folder = save_figures(figures)
    try:
        if add is not None:
            add(Path(folder))
        store.attach_files(run_id, folder)
    except BaseException:  # not handed over
        shutil.rmtree(folder, ignore_errors=True)
        raise


def model_figures(model: Any, dataset: Dataset, split: str = "val") -> dict[str, Any]:
    """The model's diagnostic plots on ``split`` (scored again; see ``figures_split``)."""
    _, outputs = score(model, dataset, only=(split,), keep=split)
    return _model_figures(model, dataset, outputs, split)


def _model_figures(model: Any, dataset: Dataset, outputs: dict[str, Any],
                   split: str = "val") -> dict[str, Any]:
    from expforge.plots import model_figures as draw

    return draw(model, dataset.task, dataset.classes, dataset.splits[split].y, outputs)
