"""``python run.py search=optuna``: the command's side of a study.

    command:  open the store (a writer process: forked first) -> load the data once ->
              check the space -> fork workers -> open the study and its parent run ->
              (its own trials, or watch the workers) -> finish on the parent run
    worker k: loop { budget left? -> ask -> run_one (a child run) -> tell }
    writer:   load MLflow, open the store -> create and write every client's runs

Workers are processes, not threads (MLflow's client and the GIL serialise fits). They are
forked before any store connection exists, so nothing with a socket or a database handle
crosses a fork, and the loaded dataset is shared copy-on-write. docs/design.md has the
whole picture.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from expforge import config as config_mod
from expforge.cv import CVSettings, folds_of
from expforge.data import load_data
from expforge.process import interrupts_deferred, start_up_done
from expforge.runner import RunContext
from expforge.search.budget import TooManyFailures, counts
from expforge.search.fixed import with_fixed
from expforge.search.grid import hand_back_lost, is_point
from expforge.search.job import Job
from expforge.search.loop import optimize
from expforge.search.parent import Drawn, draw_report, finish, open_parent_run
from expforge.search.recovery import reap_orphans
from expforge.search.report import Progress
from expforge.search.settings import SearchSettings, settings_of
from expforge.search.space import Param, for_task, grid_of, parse_space, space_size
from expforge.search.study import open_study, pruner, sampler
from expforge.search.warm import check_enqueued, enqueue_first, warm_start_configs
from expforge.search.workers import Worker, start_workers, stop_workers, watch
from expforge.tracking import RunRecord, TrackingSettings, open_store

__all__ = ["SearchResult", "run_search"]


@dataclass(frozen=True)
class SearchResult:
    parent_run_id: str
    best_value: float | None
    study_name: str
    storage: str = ""  # the study's Optuna storage: a journal file's path or a URL


def run_search(plain: Mapping[str, Any], context: RunContext | None = None,
               sweep_parent_run_id: str | None = None) -> SearchResult:
    """Run the study to its budget. In a multirun sweep the study's parent run hangs under
    the sweep's parent run."""
    context = context or RunContext()
    plain, context = with_fixed(plain, context)  # a sweeper's fixed values in the space
    tracking = TrackingSettings.from_config(plain["tracking"])
    n_workers = int(config_mod.checked("search", plain["search"])["n_workers"])
    # Where MLflow is loaded already (inside a multirun), this process may hold pooled
    # database connections, which must never cross a fork.
    fork = "mlflow" not in sys.modules
    # Opened first: a writer process loads MLflow and opens the store while this process
    # loads the data.
    store = open_store(tracking, workers=n_workers)
    try:
        start_up_done()  # the data is loaded with the collector on
        cv = CVSettings.from_config(plain)
        dataset = load_data(plain["data"], int(plain["seed"]), Path(plain["paths"]["root"]),
                            keep=cv.columns() if cv else None)
        if cv is not None:  # folds that cannot be drawn fail here, not in every trial
            folds_of(cv, dataset, int(plain["seed"]))
        settings = settings_of(plain, dataset.task)
        params = parse_space(plain.get("search_space"), plain)
        searched = for_task(params, dataset.task)
        settings = _within_space(settings, searched)
        check_enqueued(settings.enqueue, params, searched, dataset.task)
        sampler(settings, 0)  # a bad sampler or pruner fails before anything starts
        pruner(settings)
    except BaseException:
        store.close()
        raise
    job = Job(plain, context, dataset, settings, params, tracking, store,
              sweep_parent_run_id=sweep_parent_run_id)
    try:
        workers: list[Worker] = []
        if settings.n_workers > 1:
            if fork:
                store.load_code()  # forked workers inherit it instead of each loading it
            workers = start_workers(job, fork)
        return _coordinate(job, workers)
    finally:
        job.store.close()


def _within_space(settings: SearchSettings, params: list[Param]) -> SearchSettings:
    """A finite space. GridSampler gets the grid of ``params`` (those the data's task
    suggests), unless its own ``search_space`` is given; the study stops once every point of
    it is tried (``budget.StopRules``). Any other sampler on a space smaller than the budget
    is told that it will repeat configs."""
    spec = settings.sampler
    if str(spec.get("_target_", "")).endswith("GridSampler"):
        given = spec.get("search_space")
        grid = {str(k): list(v) for k, v in given.items()} if given else grid_of(params)
        settings = replace(settings, grid=grid)
        points = settings.grid_size or 0
        if settings.n_trials > points:
            print(f"warning: search.n_trials={settings.n_trials} is more than the {points} "
                  "configs of the grid; the study stops once each of them is tried",
                  file=sys.stderr)
        return settings
    size = space_size(params)
    if size is None or settings.n_trials <= size:
        return settings
    print(f"warning: search.n_trials={settings.n_trials} is more than the {size} distinct "
          "configs of the search space, so trials will repeat configs; lower search.n_trials"
          " or widen the space", file=sys.stderr)
    return settings


def _try_first(job: Job, study: Any) -> None:
    """A new study: enqueue ``search.enqueue`` and the warm start's configs first. A grid
    resumed: enqueue the points that GridSampler lost (``grid.hand_back_lost``)."""
    settings = job.settings
    if study.get_trials(deepcopy=False):
        if settings.grid is not None and (again := hand_back_lost(study, settings.grid)):
            print(f"study {settings.study_name}: tries again {again} config(s) of the grid "
                  "whose trials were cut short")
        return  # resumed: enqueued once already
    given = list(settings.enqueue)
    warm = [] if not settings.warm_start_from else warm_start_configs(
        settings.warm_start_from, settings.warm_start_top_k, settings.warm_start_storage,
        settings.storage, job.tracking.uri, job.params)
    if settings.grid is not None:  # the grid tries its points anyway, in its own order
        grid = settings.grid
        points = sum(is_point(c, grid) for c in given + warm)
        given = [c for c in given if not is_point(c, grid)]
        warm = [c for c in warm if not is_point(c, grid)]
        if points:
            print(f"study {settings.study_name}: {points} of the configs to try first "
                  f"{'is a point' if points == 1 else 'are points'} of the grid, tried in "
                  "its turn")
    configs = given + warm
    if enqueue_first(study, configs):
        sources = [*([f"{len(given)} of search.enqueue"] if given else []),
                   *([f"{len(warm)} best of {settings.warm_start_from}"] if warm else [])]
        print(f"study {settings.study_name}: tries {len(configs)} "
              f"config{'s' if len(configs) > 1 else ''} first ({', '.join(sources)})")


@contextlib.contextmanager
def _stop_tagged(job: Job) -> Iterator[None]:
    """A study stopped by too many failures or an interrupt says so on its parent run
    (``stop_reason``; the other reasons are ``finish``'s)."""
    try:
        yield
    except (KeyboardInterrupt, TooManyFailures) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failures"
        with contextlib.suppress(Exception):
            job.store.write(RunRecord(job.parent_run_id, status=None,
                                      tags={"stop_reason": reason}))
        raise


def _draw_ahead(job: Job, study: Any, drawn: list[Drawn | None]) -> None:
    """The study report, drawn while the workers end. If drawing fails, ``finish`` draws it
    again, after the workers, and that error is the one the command reports."""
    with contextlib.suppress(Exception):
        drawn.append(draw_report(job, study))


def _coordinate(job: Job, workers: list[Worker]) -> SearchResult:
    """Open the store, the study and its parent run; run the trials (here or in the
    workers); finish the study."""
    settings = job.settings
    released = False
    drawn: list[Drawn | None] = []  # the study report, drawn while the workers end
    try:
        from expforge.plots import prepare, warm_up

        plots = settings.plots or (settings.log_models == "best" and job.tracking.log_plots)
        job.experiment_id = job.store.connect(job.tracking,
                                              meanwhile=prepare if plots else None)
        if settings.log_models == "best" and not settings.multi_objective:
            job.store.warm_up()
        study = open_study(settings, job.params, 0, job.store, job.experiment_id,
                           job.model_name)
        reap_orphans(study, job)
        _try_first(job, study)
        job.parent_run_id, _ = open_parent_run(job, study)
        done_before = counts(study).done
        with job.store.ended(job.parent_run_id), _stop_tagged(job):
            # search.timeout counts from here, when the trials can start, for every worker.
            if settings.timeout:
                job.deadline = time.time() + settings.timeout
            for w in workers:
                w.channel.send((job.parent_run_id, job.experiment_id, job.deadline))
            released = True
            with Progress(settings, study) as progress:
                objective = None
                if workers:
                    watch(job, study, workers, progress,
                          when_idle=warm_up if settings.plots else None,
                          when_over=lambda: _draw_ahead(job, study, drawn))
                else:
                    objective = optimize(job, study, progress)
            with interrupts_deferred():  # this process's own writes
                best = finish(job, study, objective, done_before, drawn.pop() if drawn else None)
    finally:
        for report in drawn:  # drawn, never handed to finish
            if report is not None:
                shutil.rmtree(report.folder, ignore_errors=True)
        if not released:  # a waiting worker must hear that there is nothing to do
            for w in workers:
                w.channel.send(None)
        stop_workers(workers)
    return SearchResult(job.parent_run_id, best, settings.study_name, settings.storage)
