"""One trial: suggest -> a child run through ``run_one`` -> the objective value(s)."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

from expforge.errors import ConfigError, ExpforgeError, SearchError, TrackingError, first_line
from expforge.metrics import base_metric, better
from expforge.process import interrupts_allowed
from expforge.runner import (
    RunContext,
    attach_figures,
    attach_model,
    figures_split,
    model_figures,
    refits,
    run_one,
)
from expforge.search.budget import BudgetReached, Tally
from expforge.search.job import HOST_ATTR, METRICS_ATTR, PID_ATTR, RUN_ATTR, SKIPPED_ATTR, Job
from expforge.search.space import suggest

__all__ = ["TrialObjective", "TrialReporter"]


class TrialObjective:
    """The objective of a worker's trials; it keeps the worker's best model
    (``search.log_models=best``) until ``flush_best``."""

    def __init__(self, job: Job, study: Any) -> None:
        self.job, self.study = job, study
        self.tally = Tally(study)  # read before and after each trial (the loop, callbacks)
        settings = job.settings
        self.threads = max(1, (os.cpu_count() or 1) // settings.n_workers)
        # log_models=best: the best fitted model stays in memory and is logged once, at the
        # worker's end, if it still is the study's best (logging a model and its plots at
        # every improvement would cost far more than the trials).
        # cv.refit=false: no model to keep or log
        self.defer = (settings.log_models == "best" and not settings.multi_objective
                      and refits(job.plain))
        self.log_each = settings.log_models == "all" or (
            settings.log_models == "best" and settings.multi_objective)
        self.best: tuple[float, str, Any] | None = None
        # A trial that failed outside its model (the store, the writer, a config that does
        # not fit the study, a metric the runs do not log): not a verdict on the trial's
        # config, and every next trial would fail the same way; the loop stops the study.
        self.stop_error: ExpforgeError | None = None
        # The study's command line is on the parent run; a trial's own values are its params.
        self.context = RunContext(choices=job.context.choices)
        self.last: int | None = None  # the number of this process's latest trial

    def __call__(self, trial: Any) -> Any:
        import optuna

        try:
            return self._trial(trial)
        except (optuna.TrialPruned, BudgetReached, ModelFailed):
            raise
        except Exception as exc:  # see stop_error
            self.stop_error = exc if isinstance(exc, ExpforgeError) else SearchError(
                f"search.study_name={self.job.settings.study_name}: a trial failed outside "
                f"its model ({type(exc).__name__}: {first_line(exc)}); the study stops rather "
                "than fail every trial the same way")
            raise

    def _trial(self, trial: Any) -> Any:
        import optuna

        job, settings = self.job, self.job.settings
        self.last = trial.number
        trial.set_user_attr(PID_ATTR, os.getpid())
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        if self.tally.rank(trial.number) >= settings.n_trials:
            # Another worker took the last slot between our check and our ask.
            trial.set_user_attr(SKIPPED_ATTR, "budget reached")
            raise BudgetReached(f"the budget of {settings.n_trials} trials is spent")
        cfg = job.trial_config(trial.number,
                               suggest(trial, job.params, job.plain, job.dataset.task))
        tags = {
            "optuna.study_name": settings.study_name,
            "optuna.trial_number": str(trial.number),
            "optuna.trial_state": "RUNNING",
            "expforge.role": "trial",
        }
        reporter = None
        if not settings.multi_objective and settings.pruner is not None:
            # WilcoxonPruner compares trials fold by fold: it gets the folds' scores only
            wilcoxon = str(settings.pruner.get("_target_", "")).endswith("WilcoxonPruner")
            reporter = TrialReporter(trial, base_metric(settings.objective.metric),
                                     settings.report_every, folds_only=wilcoxon)

        def started(run_id: str) -> None:  # on the reply thread of a writer process
            trial.set_user_attr(RUN_ATTR, run_id)

        def end_tags(error: BaseException | None) -> dict[str, str]:
            if error is None:
                return {"optuna.trial_state": "COMPLETE"}
            if isinstance(error, optuna.TrialPruned) and reporter is not None:
                fold = {} if reporter.pruned_fold is None else {
                    "pruned_fold": str(reporter.pruned_fold)}
                return {"optuna.trial_state": "PRUNED", "pruned": "true",
                        "pruned_step": str(reporter.pruned_at), **fold}
            return {"optuna.trial_state": "FAIL"}

        try:
            with interrupts_allowed():  # the loop defers them around Optuna's bookkeeping
                result, model = run_one(
                    cfg,
                    self.context,
                    dataset=job.dataset,
                    store=job.store,
                    experiment_id=job.experiment_id,
                    parent_run_id=job.parent_run_id,
                    extra_tags=tags,
                    n_jobs=self.threads,
                    log_model=self.log_each,
                    log_plots=self.log_each and job.tracking.log_plots,
                    reporter=reporter,
                    on_start=started,
                    stop_early=(optuna.TrialPruned,),
                    end_tags=end_tags,
                )
        except (optuna.TrialPruned, TrackingError, KeyboardInterrupt, SystemExit):
            raise  # a TrackingError is the store's failure, not the config's: not counted
        except Exception as exc:
            trial.set_user_attr("error", first_line(exc)[:1000])  # a verdict on the config
            raise ModelFailed(exc) from exc
        values = tuple(_metric(result.metrics, o.metric) for o in settings.objectives)
        trial.set_user_attr(METRICS_ATTR, result.metrics)
        if self.defer and better(values[0], self.best[0] if self.best else None,
                                 settings.objective.direction):
            self.best = (values[0], result.run_id, model)
        return values if settings.multi_objective else values[0]

    def flush_best(self) -> bool:
        """Log the worker's best model (and plots) into its run if it is the study's best;
        whether it was."""
        if self.best is None:
            return False
        _, run_id, model = self.best
        try:
            if self.tally.best().user_attrs.get(RUN_ATTR) != run_id:
                return False  # another worker or an earlier session holds the best
        except ValueError:
            return False
        attach_model(self.job.store, run_id, model, self.job.dataset)
        if self.job.tracking.log_plots:
            attach_figures(self.job.store, run_id, model_figures(
                model, self.job.dataset, figures_split(self.job.plain)))
        self.best = None
        return True


class ModelFailed(Exception):
    """The trial's own config failed (its run ended FAILED): counted against the study's
    ``max_failure_ratio``, and the study goes on."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class TrialReporter:
    """Reports the val objective to Optuna as the model trains (and, in a cross-validation,
    each fold's score as it ends); prunes when told to."""

    def __init__(self, trial: Any, metric: str, every: int, folds_only: bool = False) -> None:
        self.trial, self.metric, self.every = trial, metric, every
        self.folds_only = folds_only
        self.fold: int | None = None
        self.pruned_at: int | None = None
        self.pruned_fold: int | None = None

    def __call__(self, step: int, value: float) -> None:
        import optuna

        if math.isnan(value):
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at, self.pruned_fold = step, self.fold
            where = "" if self.fold is None else f" (fold {self.fold})"
            raise optuna.TrialPruned(f"pruned at step {step}{where}")


def _metric(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"search.metrics lists {name}, which the runs do not log; choose one of: "
            f"{', '.join(sorted(metrics))}"
        )
    return float(metrics[name])
