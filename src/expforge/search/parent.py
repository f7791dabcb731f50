"""The study's parent run: opened (or joined) at the start, its best so far after each
trial, and at the end the best model, the top trials, Optuna's plots and the counts."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expforge import config as config_mod
from expforge.runner import (
    attach_figures,
    attach_model,
    config_texts,
    figures_split,
    fitted_model,
    model_figures,
    provenance_tags,
    refits,
)
from expforge.search.budget import StopRules, Tally, counts, record_stop, since_of
from expforge.search.job import PARENT_ATTR, RUN_ATTR, STUDY_ROLE, Job
from expforge.search.page import REPORT, write_report
from expforge.search.recovery import reap_orphans
from expforge.search.report import print_report, top_trials
from expforge.search.trial import TrialObjective
from expforge.tracking import RunRecord, describe_dataset, ui_command

__all__ = ["Drawn", "best_after_each_trial", "draw_report", "finish", "open_parent_run"]

REPORT_ROWS = 100  # the study report's leaderboard: the best trials, at most this many


def open_parent_run(job: Job, study: Any) -> tuple[str, bool]:
    """The study's parent run, reused on resume and by other machines, else created (its
    config logged); whether it was reused."""
    settings = job.settings
    tags = {
        "expforge.role": STUDY_ROLE,
        "optuna.study_name": settings.study_name,
        "optuna.storage": config_mod.mask_uri(settings.storage),
        "objective.metric": settings.objective.metric,
        "objective.direction": settings.objective.direction,
        **({"mlflow.parentRunId": job.sweep_parent_run_id} if job.sweep_parent_run_id else {}),
        **{k: v for k, v in job.context.choices.items() if k in ("model", "data", "search")},
        **provenance_tags(job.plain, job.dataset),
        **job.tracking.tags,
    }
    known = study.user_attrs.get(PARENT_ATTR)
    run_id, resumed = job.store.open_parent_run(job.experiment_id, known, settings.study_name,
                                                tags)
    if run_id != known:
        study.set_user_attr(PARENT_ATTR, run_id)
    if not resumed:
        masked = config_mod.mask_secrets(dict(job.plain))
        job.store.write(RunRecord(run_id, status=None,
                                  params=config_mod.param_values(masked, exclude=("hydra",)),
                                  texts=config_texts(masked, job.context),
                                  dataset=describe_dataset(job.dataset)))
    return run_id, resumed


def best_after_each_trial(job: Job, tally: Tally) -> Callable[[Any, Any], None]:
    """An Optuna callback for the study that ``tally`` reads: the parent run's best so far
    (value, trial number, params)."""
    from optuna.trial import TrialState

    def callback(study: Any, trial: Any) -> None:
        if trial.state != TrialState.COMPLETE or job.settings.multi_objective:
            return
        try:
            best = tally.best()
        except ValueError:
            return
        if best.number != trial.number:
            return
        job.store.write(RunRecord(
            job.parent_run_id, status=None, step=trial.number,
            metrics={f"best_{job.settings.objective.metric}": float(best.value)},
            tags={"best_trial": str(best.number),
                  "best_run_id": str(best.user_attrs.get(RUN_ATTR, "")),
                  **{f"best.{k}": str(v) for k, v in best.params.items()}},
        ))

    return callback


@dataclass
class Drawn:
    """The study's figures and report page, drawn into ``folder`` (not yet on the parent
    run), the best trials they show, and where the report can be opened."""

    folder: Path
    ranked: Any
    where: str


def draw_report(job: Job, study: Any) -> Drawn | None:
    """``search.plots``: Optuna's figures and the study report, drawn once the study's trials
    are over. With workers, the command draws them while the workers log the best model."""
    settings = job.settings
    if not settings.plots:
        return None
    from expforge.plots import save_figures, study_figures

    done = counts(study)
    ranked = top_trials(study, settings, limit=max(REPORT_ROWS, settings.top_k))
    metrics = [o.metric for o in settings.objectives]
    figures = study_figures(study, metrics) if done.complete >= 2 else {}
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in settings.objectives)
    facts = {
        "study": settings.study_name,
        "storage": config_mod.mask_uri(settings.storage),
        "objective": objectives,
        "trials": f"{done.complete} complete, {done.pruned} pruned, {done.failed} failed "
                  f"of {settings.n_trials}",
        "parent run": job.parent_run_id,
        "experiment": job.tracking.experiment,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if not settings.multi_objective and done.complete:
        best = study.best_trial
        facts["best"] = (f"{best.value:.6g} (trial {best.number}, run "
                         f"{best.user_attrs.get(RUN_ATTR, '?')})")
    folder = Path(save_figures(figures))
    try:
        page = write_report(folder, list(figures), f"Study {settings.study_name}", facts,
                            ranked)
        where = f"{REPORT} on the parent run"
        if job.context.output_dir:  # a copy in Hydra's output folder of the command
            copy = Path(job.context.output_dir, REPORT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(page, copy)
            where = str(copy)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Drawn(folder, ranked, where)


def finish(job: Job, study: Any, objective: TrialObjective | None,
           done_before: int = 0, drawn: Drawn | None = None) -> float | None:
    """The end of this command's part of the study: runs of processes killed meanwhile
    repaired, the best model logged, the top trials, plots, counts and the rule that stopped
    it on the parent run (and on the study), the table on screen; the best value (None for
    several objectives or none complete). ``done_before``: trials done when it started;
    ``drawn``: the report, if it was drawn already (``draw_report``)."""
    settings = job.settings
    try:
        # Another machine's heartbeat may have failed their trials before they were linked
        # to their runs: written or ended, not RUNNING.
        with contextlib.suppress(Exception):
            reap_orphans(study, job)
        done = counts(study)
        if not (objective is not None and objective.flush_best()):
            _log_lost_best_model(job, study)
        if drawn is None:
            drawn = draw_report(job, study)
    except BaseException:
        if drawn is not None:  # not handed over
            shutil.rmtree(drawn.folder, ignore_errors=True)
        raise
    ranked = drawn.ranked if drawn is not None else top_trials(
        study, settings, limit=max(REPORT_ROWS, settings.top_k))
    table = None if ranked is None else ranked.head(settings.top_k)
    stop = StopRules(settings, Tally(study), since_of(settings, study)).check(done, job.deadline)
    if stop is not None:
        record_stop(settings, study, stop)
    job.store.write(RunRecord(
        job.parent_run_id, status=None,
        metrics={"n_complete": done.complete, "n_pruned": done.pruned, "n_failed": done.failed},
        tags={"stop_reason": stop.reason} if stop is not None else {},
        texts={} if table is None else {"top_trials.csv": table.to_csv(index=False)}))
    if drawn is not None:
        job.store.attach_files(job.parent_run_id, str(drawn.folder))
    print_report(settings, done, table, job.parent_run_id,
                 drawn.where if drawn is not None else None,
                 ui_command(job.tracking.uri, job.experiment_id),
                 stop=stop, already=done.done == done_before)
    if settings.multi_objective or done.complete == 0:
        return None
    return float(study.best_value)


def _log_lost_best_model(job: Job, study: Any) -> None:
    """log_models=best: the best trial's model, when the session that ran the trial was killed
    before its end, where it logs the model. Fitted again from the trial's config (seeded: the
    same model), so that ``python register.py`` does not promote a worse one."""
    settings = job.settings
    if settings.log_models != "best" or settings.multi_objective:
        return
    try:
        best = study.best_trial
    except ValueError:
        return  # no complete trial
    run_id = best.user_attrs.get(RUN_ATTR)
    if not run_id or not refits(job.plain) or job.store.model_of(job.experiment_id, run_id):
        return
    cfg = job.trial_config(best.number, best.params)
    model = fitted_model(cfg, job.dataset)
    attach_model(job.store, run_id, model, job.dataset)
    if job.tracking.log_plots:
        attach_figures(job.store, run_id, model_figures(model, job.dataset, figures_split(cfg)))
