"""An Optuna study in which every trial is a full expforge run under one parent run.

Shape of a search::

    coordinator: fork the writer -> load data once -> check space -> fork workers
                 -> open study + parent run -> (progress) -> top trials, plots, best on the parent
    worker k:    loop { budget left? -> ask -> run_one(child run) -> tell }
    writer:      load MLflow, open the store -> create and write the runs of every client

Workers are processes, not threads (MLflow's active run is per thread, the GIL serialises
fits). They are forked before MLflow or a storage connection exists, so nothing with a socket
or a database handle crosses a fork, and the loaded dataset is shared copy-on-write. The
writer process (``tracking.ProcessRunWriter``) does the store's work for all of them, so no
other process of the search loads MLflow. With one worker the trials run in-process.
``search.n_trials`` is the study's total budget: trials COMPLETE or PRUNED count, and a
trial only starts while fewer than ``n_trials`` are finished or running, so several workers
and later resumes never overshoot it.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expforge import config as config_mod
from expforge import start_up_done
from expforge.data import Dataset, load_data
from expforge.errors import ConfigError, ExpforgeError, SearchError
from expforge.metrics import direction_of
from expforge.runner import (
    Objective,
    RunContext,
    attach_model,
    config_texts,
    fitted_model,
    objective_of,
    record_of,
    run_one,
    submit_figures,
)
from expforge.space import Param, apply_params, grid_of, parse_space, suggest
from expforge.tracking import (
    ProcessRunWriter,
    RunRecord,
    RunWriter,
    TrackingSettings,
    connect,
    ended,
    interrupts_deferred,
    load_store_code,
    set_tags,
    write_record,
)

__all__ = ["SearchResult", "SearchSettings", "run_search"]

_STUDY_ROLE = "study"
_RUN_ATTR = "mlflow_run_id"
_PID_ATTR = "expforge.pid"
_HOST_ATTR = "expforge.host"
_SKIPPED_ATTR = "expforge.skipped"
_PARENT_ATTR = "mlflow_parent_run_id"
_METRICS_ATTR = "expforge.metrics"  # all of a trial's metrics, to rewrite a lost run
_LOG_MODELS = ("all", "best", "none")


@dataclass(frozen=True)
class SearchResult:
    parent_run_id: str
    best_value: float | None
    study_name: str


@dataclass(frozen=True)
class SearchSettings:
    """``cfg.search`` as checked plain values."""

    n_trials: int
    timeout: float | None
    study_name: str
    storage: str
    n_workers: int
    objectives: tuple[Objective, ...]
    sampler: dict[str, Any]
    pruner: dict[str, Any] | None
    report_every: int
    log_models: str
    max_failure_ratio: float
    heartbeat_interval: int | None
    grace_period: int | None
    top_k: int
    plots: bool
    seed: int = 0
    allowed_targets: tuple[str, ...] = config_mod.ALLOWED_TARGETS

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


def settings_of(plain: Mapping[str, Any], task: str) -> SearchSettings:
    """Check ``cfg.search`` and fill in the derived defaults (study name, storage)."""
    s = plain["search"]
    n_trials = _positive_int("search.n_trials", s.get("n_trials"))
    n_workers = _positive_int("search.n_workers", s.get("n_workers", 1))
    report_every = _positive_int("search.report_every", s.get("report_every", 10))
    timeout = s.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"search.timeout={timeout} is invalid; give seconds > 0 or null")
    log_models = s.get("log_models", "best")
    if log_models not in _LOG_MODELS:
        raise ConfigError(
            f"search.log_models={log_models} is invalid; choose one of: {', '.join(_LOG_MODELS)}"
        )
    ratio = float(s.get("max_failure_ratio", 0.5))
    if not 0 <= ratio < 1:
        raise ConfigError(
            f"search.max_failure_ratio={ratio} is invalid; give a share in [0, 1) (failed trials "
            "do not use the budget, so 1 would retry a failing config forever)"
        )
    metrics, directions = s.get("metrics"), s.get("directions")
    if directions and not metrics:
        raise ConfigError(
            f"search.directions={directions} needs search.metrics (one metric per direction); "
            "for one objective set metric=... and direction=..."
        )
    if metrics:
        directions = directions or [direction_of(m) for m in metrics]
        if len(directions) != len(metrics):
            raise ConfigError(
                f"search.directions={directions} must have one direction per search.metrics "
                f"entry ({len(metrics)})"
            )
        pairs = zip(metrics, directions, strict=True)
        objectives = tuple(Objective(str(m), str(d)) for m, d in pairs)
        for o in objectives:
            if o.direction not in ("minimize", "maximize"):
                raise ConfigError(
                    f"search.directions={directions}: {o.direction} is not minimize or maximize"
                )
    else:
        objectives = (objective_of(plain, task),)
    experiment = plain["tracking"]["experiment"]
    study_name = s.get("study_name") or (
        f"{experiment}-{plain['data']['name']}-{plain['model'].get('name', 'model')}"
    )
    storage = str(s.get("storage") or Path("studies", f"{_slug(study_name)}.journal"))
    if "://" not in storage:  # a journal file: relative paths start at the project root
        storage = str(Path(plain["paths"]["root"], storage).resolve())
    if n_workers > 1 and str(storage).startswith("sqlite"):
        raise ConfigError(
            f"search.storage={storage} with search.n_workers={n_workers}: SQLite is not safe for "
            "parallel workers; use a journal file (search.storage=studies/<name>.journal, the "
            "default) or PostgreSQL (search.storage=postgresql://...)"
        )
    pruner = s.get("pruner")
    return SearchSettings(
        n_trials=n_trials,
        timeout=timeout,
        study_name=str(study_name),
        storage=str(storage),
        n_workers=n_workers,
        objectives=objectives,
        sampler=dict(s.get("sampler") or {"_target_": "optuna.samplers.TPESampler"}),
        pruner=dict(pruner) if pruner else None,
        report_every=report_every,
        log_models=str(log_models),
        max_failure_ratio=ratio,
        heartbeat_interval=s.get("heartbeat_interval"),
        grace_period=s.get("grace_period"),
        top_k=int(s.get("top_k", 10)),
        plots=bool(s.get("plots", True)),
        seed=int(plain.get("seed", 0)),
        allowed_targets=config_mod.allowed_targets(plain),
    )


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value} is invalid; give a whole number >= 1")
    return value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "study"


# -- the entry point -----------------------------------------------------------------------


def run_search(
    plain: Mapping[str, Any],
    context: RunContext | None = None,
    sweep_parent_run_id: str | None = None,
) -> SearchResult:
    """``python run.py search=optuna``: run the study to its budget.

    In a multirun sweep the study's parent run hangs under the sweep's parent run.
    """
    import sys

    context = context or RunContext()
    root = Path(plain["paths"]["root"])
    tracking = TrackingSettings.from_config(plain["tracking"])
    # Where MLflow is loaded already (inside a multirun), this process may hold pooled
    # database connections, which must never cross a fork.
    fork = "mlflow" not in sys.modules
    # Started first: it loads MLflow and opens the store while this process loads the data.
    # Otherwise each process writes its own runs (its client is made where it is used).
    writer = (_writer_process(plain) if fork else None) or RunWriter(tracking.uri)
    try:
        start_up_done()  # the data is loaded with the collector on (see there); a spawned
        # worker, which ran run.py's start again, turns it on at its first fit
        dataset = load_data(plain["data"], int(plain["seed"]), root)
        settings = settings_of(plain, dataset.task)
        params = parse_space(plain.get("search_space"), plain)
        _sampler(settings, params, 0)  # a bad sampler or pruner fails before anything starts
        _pruner(settings)
    except BaseException:
        writer.close()
        raise
    job = _Job(plain, context, dataset, settings, params, tracking, writer,
               sweep_parent_run_id=sweep_parent_run_id)
    try:
        if settings.n_workers == 1:
            return _coordinate(job, [])
        if fork and not isinstance(writer, ProcessRunWriter):
            # The workers write their own runs: they inherit MLflow's code instead of each
            # loading it (~1.5 s).
            load_store_code(tracking.uri)
        workers = _start_workers(job, fork)
        return _coordinate(job, workers)
    finally:
        job.writer.close()


def _writer_process(plain: Mapping[str, Any]) -> RunWriter | None:
    """With two cores or more, the store's work is done by a process of its own, forked
    before this process loads MLflow, which then no process of the search does (~2 s of
    imports and opening the store, done by the writer while this process loads the data).
    Forked workers are its clients too: they fork sooner (MLflow's code is not loaded
    first) and write their runs through it, with no store of their own to open."""
    if (os.cpu_count() or 1) < 2:
        return None
    n_workers = _positive_int("search.n_workers", plain["search"].get("n_workers", 1))
    return ProcessRunWriter(str(plain["tracking"]["uri"]),
                            clients=1 + n_workers if n_workers > 1 else 1)


@dataclass
class _Job:
    """Everything a worker needs; inherited by forked workers, sent to spawned ones."""

    plain: Mapping[str, Any]
    context: RunContext
    dataset: Dataset
    settings: SearchSettings
    params: list[Param]
    tracking: TrackingSettings
    writer: RunWriter  # a writer process (see _writer_process), or this process's own
    parent_run_id: str = ""
    experiment_id: str = ""
    sweep_parent_run_id: str | None = None


@dataclass
class _Worker:
    process: Any
    channel: Any
    reaped: bool = False


def _start_workers(job: _Job, fork: bool) -> list[_Worker]:
    """Start the workers before this process opens any store connection.

    Forked workers share the loaded data (and code) copy-on-write. Where ``fork`` is False
    (connections may exist) they are spawned instead and receive the data through a pipe.
    """
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    workers: list[_Worker] = []
    for index in range(job.settings.n_workers):
        receive, send = ctx.Pipe(duplex=False)
        # The coordinator's ends, which the worker closes: if the coordinator dies before it
        # sends the parent run, the worker hears the end of the pipe instead of waiting.
        ends = [send, *(w.channel for w in workers)]
        process = ctx.Process(target=_worker_main, args=(job, index, receive, ends),
                              name=f"expforge-worker-{index}", daemon=False)
        process.start()
        receive.close()
        workers.append(_Worker(process, send))
    job.writer.clients_started()
    return workers


def _worker_main(job: _Job, index: int, channel: Any, coordinator_ends: list[Any]) -> None:
    """A forked worker: wait for the parent run, then take trials until the budget is spent."""
    import sys

    for end in coordinator_ends:
        end.close()

    # Forked workers write through the search's writer process, each as a client of its own.
    # Otherwise a worker writes its own runs: a spawned one loads MLflow's code (~1.5 s)
    # while the coordinator opens the store and the parent run; a forked one has it already.
    # (A writer process per worker was measured: with two workers on two cores, its
    # start-up cost more than it saved.)
    job.writer = job.writer.for_client(index + 1)
    try:
        if not isinstance(job.writer, ProcessRunWriter):
            load_store_code(job.tracking.uri)
        message = channel.recv()
    except (EOFError, KeyboardInterrupt):
        sys.exit(1)
    if message is None:
        sys.exit(0)
    job.parent_run_id, job.experiment_id = message
    import signal

    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGTERM, _raise_interrupt)  # a spawned worker inherits no handler
    # OpenMP pools (hgb, numpy) get the worker's share of the cores, like model.n_jobs does.
    threadpool_limits(limits=max(1, (os.cpu_count() or 1) // job.settings.n_workers))
    try:
        if not isinstance(job.writer, ProcessRunWriter):  # the writer process has connected
            job.writer.connect(job.tracking)
        study = _open_study(job.settings, job.params, index, job.tracking)
        objective = _optimize(job, study, index, progress=None)
        with interrupts_deferred():
            objective.flush_best()
    except ExpforgeError as exc:
        print(f"error: worker {index}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _coordinate(job: _Job, workers: list[_Worker]) -> SearchResult:
    """Open the store, the study and its parent run; run the trials (here or in the workers);
    end the study. Where a writer process runs, this process never loads MLflow: every store
    request goes through ``job.writer``."""
    settings = job.settings
    released = False
    store = job.writer
    try:
        from expforge.plots import prepare

        # This process loads the plots' code while a writer process opens the store.
        plots = settings.plots or (settings.log_models == "best" and job.tracking.log_plots)
        early = plots and isinstance(store, ProcessRunWriter)
        job.experiment_id = store.connect(job.tracking, meanwhile=prepare if early else None)
        if settings.log_models == "best" and not settings.multi_objective:
            store.warm_up()
        study = _open_study(settings, job.params, 0, job.tracking)
        _reap_orphans(study, job)
        parent_id, resumed = _parent_run(job, study)
        job.parent_run_id = parent_id
        with ended(store, parent_id):
            if not resumed:
                _log_parent_config(job)
            for w in workers:
                w.channel.send((parent_id, job.experiment_id))
            released = True
            with _Progress(settings, study) as progress:
                objective = None
                if workers:
                    _watch(job, study, workers, progress)
                else:
                    objective = _optimize(job, study, 0, progress)
            with interrupts_deferred():  # this process's own writes (see there)
                best = _finish(job, study, parent_id, objective)
    finally:
        if not released:  # a waiting worker must hear that there is nothing to do
            for w in workers:
                w.channel.send(None)
        _stop_workers(workers)
    return SearchResult(parent_id, best, settings.study_name)


# -- the optimisation loop -----------------------------------------------------------------


def _optimize(job: _Job, study: Any, index: int, progress: _Progress | None) -> _Objective:
    """Take trials until the study's budget is spent, the timeout passes or too many fail.

    Returns the objective, which holds the worker's best model (``flush_best``)."""
    settings = job.settings
    deadline = time.monotonic() + settings.timeout if settings.timeout else math.inf
    writer = job.writer
    objective = _Objective(job, study, index, writer)
    callbacks = [_update_parent(job, writer), _report_failure]
    if progress is not None:
        callbacks.append(progress.callback)
    interrupted = False
    try:
        _loop(job, study, objective, callbacks, deadline)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:  # every run handed over is written, also on Ctrl-C
        writer.flush()  # run_search closes its writer process
        if interrupted:
            # Ctrl-C can land where a trial's run was created but not yet handed over
            # (waiting for its id, say): this process's trials are failed and their runs
            # still RUNNING ended KILLED. Best effort: the interrupt goes on regardless.
            with contextlib.suppress(Exception):
                _reap_orphans(study, job, pid=os.getpid())
    _check_failures(settings, _counts(study), study)
    return objective


def _loop(job: _Job, study: Any, objective: _Objective, callbacks: list[Any],
          deadline: float) -> None:
    settings = job.settings
    recovered = time.monotonic()
    while time.monotonic() < deadline:
        counts = _counts(study)
        if counts.done >= settings.n_trials:
            break
        if counts.taken >= settings.n_trials:
            # The last slots are running elsewhere. Wait: if their worker dies, heartbeats (RDB)
            # or the dead-process check (this host) fail them and the slot is ours to retry.
            # The study is read every 0.05 s (a few ms each), so that this worker ends soon
            # after the last trial.
            time.sleep(0.05)
            if time.monotonic() - recovered >= 1.0:
                _recover_stale(study, job)
                recovered = time.monotonic()
            continue
        _check_failures(settings, counts, study)
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            callbacks=callbacks,
            gc_after_trial=False,
            show_progress_bar=False,
        )


def _recover_stale(study: Any, job: _Job) -> None:
    import optuna

    optuna.storages.fail_stale_trials(study)
    _reap_orphans(study, job)


class _Objective:
    """One trial = suggest -> a child run via run_one -> the objective value(s)."""

    def __init__(self, job: _Job, study: Any, index: int, writer: RunWriter) -> None:
        self.job, self.study, self.index, self.writer = job, study, index, writer
        self.threads = max(1, (os.cpu_count() or 1) // job.settings.n_workers)
        settings = job.settings
        # log_models=best: the worker keeps its best fitted model in memory and logs it once,
        # at its end, if it still is the study's best (see flush_best); logging a model and its
        # plots at every improvement cost ~0.5 s each.
        self.defer = settings.log_models == "best" and not settings.multi_objective
        self.log_each = settings.log_models == "all" or (
            settings.log_models == "best" and settings.multi_objective)
        self.best: tuple[float, str, Any] | None = None
        if self.log_each:  # its runs are logged here, not by the writer: MLflow points there
            connect(job.tracking)
        # The study's command line is on the parent run; a trial's own overrides are its params.
        self.context = RunContext(choices=job.context.choices)

    def __call__(self, trial: Any) -> Any:
        import optuna

        job, settings = self.job, self.job.settings
        trial.set_user_attr(_PID_ATTR, os.getpid())
        trial.set_user_attr(_HOST_ATTR, socket.gethostname())
        if _rank(self.study, trial.number) >= settings.n_trials:
            # Another worker took the last slot between our check and our ask.
            trial.set_user_attr(_SKIPPED_ATTR, "budget reached")
            raise _BudgetReached(f"the budget of {settings.n_trials} trials is spent")
        cfg = _trial_config(job, trial.number,
                            suggest(trial, job.params, job.plain, job.dataset.task))
        tags = {
            "optuna.study_name": settings.study_name,
            "optuna.trial_number": str(trial.number),
            "optuna.trial_state": "RUNNING",
            "expforge.role": "trial",
        }
        # Runs that log a model (log_models=all) are written as a single run does; the others
        # through the writer (created at the start, written in one go at the end).
        writer = None if self.log_each else self.writer
        reporter = None
        if not settings.multi_objective and settings.pruner is not None:
            reporter = _TrialReporter(trial, settings.objectives[0].metric,
                                      settings.report_every, tag_run=writer is None)
        run_ids: list[str] = []

        def started(run_id: str) -> None:  # on the reply thread of a writer process
            run_ids.append(run_id)
            trial.set_user_attr(_RUN_ATTR, run_id)

        def end_tags(error: BaseException | None) -> dict[str, str]:
            if error is None:
                return {"optuna.trial_state": "COMPLETE"}
            if isinstance(error, optuna.TrialPruned) and reporter is not None:
                return {"optuna.trial_state": "PRUNED", "pruned": "true",
                        "pruned_step": str(reporter.pruned_at)}
            return {"optuna.trial_state": "FAIL"}

        try:
            result, model = run_one(
                cfg,
                self.context,
                dataset=job.dataset,
                experiment_id=job.experiment_id,
                parent_run_id=job.parent_run_id,
                extra_tags=tags,
                n_jobs=self.threads,
                log_model_artifact=self.log_each,
                log_plot_artifacts=None if self.log_each else False,  # None: tracking.log_plots
                reporter=reporter,
                on_start=started,
                stop_early=(optuna.TrialPruned,),
                writer=writer,
                end_tags=end_tags,
            )
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            if run_ids and writer is None:
                set_tags(run_ids[0], {"optuna.trial_state": "FAIL"})
            if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                trial.set_user_attr("error", _one_line(exc))  # a verdict on the config
            raise
        values = tuple(_metric(result.metrics, o.metric) for o in settings.objectives)
        if writer is None:
            set_tags(result.run_id, {"optuna.trial_state": "COMPLETE"})
        trial.set_user_attr(_METRICS_ATTR, result.metrics)
        if self.defer and self._improves(values[0]):
            self.best = (values[0], result.run_id, model)
        return values if settings.multi_objective else values[0]

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        minimize = self.job.settings.objectives[0].direction == "minimize"
        return value < self.best[0] if minimize else value > self.best[0]

    def flush_best(self) -> bool:
        """Log the worker's best model (and plots) into its run if it is the study's best;
        whether it was."""
        if self.best is None:
            return False
        _, run_id, model = self.best
        try:
            if self.study.best_trial.user_attrs.get(_RUN_ATTR) != run_id:
                return False  # another worker or an earlier session holds the best
        except ValueError:
            return False
        attach_model(self.writer, run_id, model, self.job.dataset,
                     plots=self.job.tracking.log_plots)
        self.best = None
        return True


def _trial_config(job: _Job, number: int, chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config of trial ``number``: the study's, with the trial's parameters."""
    cfg = apply_params(job.plain, chosen)
    cfg["tracking"]["run_name"] = f"{job.settings.study_name}-trial-{number}"
    return cfg


class _BudgetReached(Exception):
    """A worker asked for a trial after the last slot was taken."""


class _TrialReporter:
    """Reports the val objective to Optuna; prunes and tags the child run when told to."""

    def __init__(self, trial: Any, metric: str, every: int, tag_run: bool = True) -> None:
        self.trial, self.metric, self.every, self.tag_run = trial, metric, every, tag_run
        self.pruned_at: int | None = None

    def __call__(self, step: int, value: float) -> None:
        import optuna

        if math.isnan(value):
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            run_id = self.trial.user_attrs.get(_RUN_ATTR) if self.tag_run else None
            if run_id:
                set_tags(run_id, {"pruned": "true", "pruned_step": step,
                                  "optuna.trial_state": "PRUNED"})
            raise optuna.TrialPruned(f"pruned at step {step}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:1000]


def _metric(metrics: Mapping[str, float], name: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"search.metrics lists {name}, which the runs do not log; choose one of: "
            f"{', '.join(sorted(metrics))}"
        )
    return float(metrics[name])


@dataclass(frozen=True)
class _Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    last_error: str = ""

    @property
    def done(self) -> int:
        return self.complete + self.pruned

    @property
    def taken(self) -> int:
        return self.done + self.running


def _counts(study: Any) -> _Counts:
    from optuna.trial import TrialState

    c = {TrialState.COMPLETE: 0, TrialState.PRUNED: 0, TrialState.FAIL: 0, TrialState.RUNNING: 0}
    last_error = ""
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            continue  # not a verdict on the config: budget races, Ctrl-C, dead workers
        if t.state in c:
            c[t.state] += 1
        if t.state == TrialState.FAIL and t.user_attrs.get("error"):
            last_error = t.user_attrs["error"]
    return _Counts(c[TrialState.COMPLETE], c[TrialState.PRUNED], c[TrialState.FAIL],
                   c[TrialState.RUNNING], last_error)


def _rank(study: Any, number: int) -> int:
    """How many trials before ``number`` hold a budget slot (finished or running)."""
    from optuna.trial import TrialState

    holding = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=holding) if t.number < number)


def _check_failures(settings: SearchSettings, counts: _Counts, study: Any) -> None:
    finished = counts.done + counts.failed
    if finished >= 4 and counts.failed / finished > settings.max_failure_ratio:
        detail = f"; last error: {counts.last_error}" if counts.last_error else ""
        raise SearchError(
            f"search.max_failure_ratio={settings.max_failure_ratio} exceeded: {counts.failed} of "
            f"{finished} trials failed{detail} (the failed child runs hold the tracebacks)"
        )


def _watch(job: _Job, study: Any, workers: list[_Worker], progress: _Progress) -> None:
    """Follow forked workers; a worker that dies has its trial failed so the slot is retried."""
    from multiprocessing.connection import wait

    while any(w.process.is_alive() for w in workers):
        wait([w.process.sentinel for w in workers if not w.reaped], timeout=0.5)
        progress.refresh()
        for w in workers:
            if not w.process.is_alive() and not w.reaped:
                w.reaped = True
                if w.process.exitcode not in (0, None):
                    _reap_orphans(study, job, pid=w.process.pid, rewrite=False)
    progress.refresh()
    codes = [w.process.exitcode for w in workers]
    counts = _counts(study)
    if counts.taken < job.settings.n_trials and all(c != 0 for c in codes):
        _check_failures(job.settings, counts, study)
        raise SearchError(
            f"every worker stopped (exit codes {codes}) with {counts.done} of "
            f"{job.settings.n_trials} trials done; see the messages above"
        )


def _stop_workers(workers: list[_Worker]) -> None:
    """Workers still running (this process was interrupted) get SIGTERM: they end KILLED."""
    import signal

    for w in workers:
        w.process.join(timeout=0.1)
        if w.process.is_alive():
            os.kill(w.process.pid, signal.SIGTERM)
    for w in workers:
        w.process.join(timeout=60)


# -- study and storage ---------------------------------------------------------------------


def _storage(settings: SearchSettings, tracking: TrackingSettings) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    url = settings.storage
    if "://" not in url:
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("postgresql", "mysql")):
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            failed_trial_callback=_FailedTrialRun(tracking.uri),
            engine_kwargs={"pool_pre_ping": True},
        )
    return optuna.storages.RDBStorage(url)


class _FailedTrialRun:
    """Heartbeat callback: the trial of a vanished worker is FAIL, so is its run."""

    def __init__(self, tracking_uri: str) -> None:
        self.store = RunWriter(tracking_uri)  # connects when first needed

    def __call__(self, study: Any, trial: Any) -> None:
        _end_trial_run(self.store, study, trial, "FAILED")


def _open_study(settings: SearchSettings, params: list[Param], index: int,
                tracking: TrackingSettings) -> Any:
    import optuna

    # Failed trials are reported in one line each (_report_failure), not with Optuna's traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        storage = _storage(settings, tracking)
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=storage,
            sampler=_sampler(settings, params, index),
            pruner=_pruner(settings),
            directions=settings.directions,
            load_if_exists=True,
        )
        existing = len(study.get_trials(deepcopy=False))
        if existing:  # a resume: a sampler seeded as before would replay the first trials
            study.sampler = _sampler(settings, params, index, offset=existing)
        return study
    except ValueError as exc:  # directions differ from the stored study
        raise SearchError(
            f"search.study_name={settings.study_name}: {exc}; pick another study name"
        ) from None
    except Exception as exc:
        if isinstance(exc, ExpforgeError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SearchError(
            f"search.storage={config_mod.mask_uri(settings.storage)} cannot be opened: {first}"
        ) from None


def _instantiate(key: str, spec: Mapping[str, Any], allowed: tuple[str, ...],
                 **extra: Any) -> Any:
    from hydra.utils import instantiate

    target = config_mod.check_target(f"{key}._target_", spec.get("_target_"), allowed)
    try:
        return instantiate({**spec, **extra}, _convert_="all")
    except Exception as exc:
        cause = exc.__cause__ or exc
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ConfigError(
            f"{key}._target_={target} cannot be built ({first}); use e.g. "
            "optuna.samplers.TPESampler, RandomSampler, CmaEsSampler, GridSampler, NSGAIISampler"
        ) from None


def _sampler(settings: SearchSettings, params: list[Param], index: int, offset: int = 0) -> Any:
    """The configured sampler; worker ``index`` and a resume after ``offset`` trials get their
    own seed, so parallel workers do not mirror each other and a resume does not replay."""
    spec = dict(settings.sampler)
    extra: dict[str, Any] = {}
    if "seed" in spec and spec["seed"] is not None:
        spec["seed"] = int(spec["seed"]) + index + 1009 * offset
    if str(spec.get("_target_", "")).endswith("GridSampler") and "search_space" not in spec:
        extra["search_space"] = grid_of(params)
    return _instantiate("search.sampler", spec, settings.allowed_targets, **extra)


def _pruner(settings: SearchSettings) -> Any:
    if settings.pruner is None:
        import optuna

        return optuna.pruners.NopPruner()
    return _instantiate("search.pruner", settings.pruner, settings.allowed_targets)


def _reap_orphans(study: Any, job: _Job, pid: int | None = None, rewrite: bool = True) -> None:
    """RUNNING trials left by dead processes of this host (SIGKILL), or with ``pid`` by that
    process (an interrupt): FAIL, their runs written again (``_repair_runs``), or without
    ``rewrite`` only ended KILLED. A failed trial's run is tagged FAIL in any case: an
    interrupt can land after the trial handed its finished run over, before Optuna heard
    of the trial's end."""
    from optuna.trial import TrialState

    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
              if _left_by(t, pid) and _set_failed(study, t)]
    if rewrite:
        _repair_runs(study, job, pid)
    for t in failed:
        _end_trial_run(job.writer, study, t, "KILLED")


def _left_by(trial: Any, pid: int | None) -> bool:
    """The trial belongs to process ``pid``; without one, to a dead process of this host."""
    return _of_dead_process(trial) if pid is None else trial.user_attrs.get(_PID_ATTR) == pid


def _of_dead_process(trial: Any) -> bool:
    pid = trial.user_attrs.get(_PID_ATTR)
    return bool(trial.user_attrs.get(_HOST_ATTR) == socket.gethostname() and pid
                and not _alive(int(pid)))


def _repair_runs(study: Any, job: _Job, pid: int | None = None) -> None:
    """Runs that a killed process left unwritten: its trials are over, their runs RUNNING
    and without contents. Each is written again from its trial (config and params, the
    metrics Optuna kept) and ended FINISHED, or KILLED for a trial that did not finish.

    Trials of dead processes of this host; with ``pid``, those of that process (see
    ``_left_by``)."""
    from optuna.trial import TrialState

    by_number = job.writer.call(_running_trial_runs, job.experiment_id,
                                job.settings.study_name)
    if not by_number:
        return
    for t in study.get_trials(deepcopy=False):
        run_id = by_number.get(str(t.number))
        if run_id is None or t.state == TrialState.RUNNING:
            continue
        if _left_by(t, pid):
            _rewrite_run(job, t, run_id)


def _running_trial_runs(client: Any, experiment_id: str, study_name: str) -> dict[str, str]:
    """``{trial number: run id}`` of the study's trial runs still RUNNING (in the store)."""
    running = client.search_runs(
        [experiment_id],
        f"tags.`optuna.study_name` = '{study_name}' and "
        "tags.`expforge.role` = 'trial' and attributes.status = 'RUNNING'",
    )
    return {r.data.tags.get("optuna.trial_number"): r.info.run_id for r in running}


def _rewrite_run(job: _Job, trial: Any, run_id: str) -> None:
    from optuna.trial import TrialState

    finished = trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
    end = RunRecord(run_id, status="FINISHED" if finished else "KILLED",
                    tags={"optuna.trial_state": trial.state.name if finished else "FAIL",
                          "expforge.rewritten": "true"})
    # Written whole if nothing was (its writer was killed with it): params, config and inputs
    # of the trial's config, and the metrics Optuna kept.
    whole = record_of(_trial_config(job, trial.number, trial.params), RunContext(),
                      job.dataset)
    whole.run_id, whole.status, whole.tags = run_id, end.status, end.tags
    whole.metrics = dict(trial.user_attrs.get(_METRICS_ATTR) or {})
    with contextlib.suppress(Exception):  # the run is gone, or another process wrote it
        job.writer.call(_rewrite_in_store, whole, end)


def _rewrite_in_store(client: Any, whole: RunRecord, end: RunRecord) -> None:
    """``whole`` if the run has no params yet, else only ``end``: a run that has its params
    was written and lacks only its end (killed while the best model was logged); the study's
    config may have changed since (more trials), and MLflow refuses to change a param."""
    write_record(client, end if client.get_run(end.run_id).data.params else whole)


def _set_failed(study: Any, trial: Any) -> bool:
    """Mark a RUNNING trial FAIL; False when someone else finished it first."""
    from optuna.trial import TrialState

    try:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except Exception:
        return False
    return True


def _end_trial_run(store: RunWriter, study: Any, trial: Any, status: str) -> None:
    """End the run of a trial that failed with its process. A process killed after its
    run was created but before the id reached the trial leaves a run that only its tags
    name: then the study's RUNNING run with the trial's number is ended."""
    with contextlib.suppress(Exception):
        store.call(_end_trial_run_in_store, study.study_name,
                   study.user_attrs.get(_PARENT_ATTR, ""), trial.number,
                   trial.user_attrs.get(_RUN_ATTR, ""), status)


def _end_trial_run_in_store(client: Any, study_name: str, parent_run_id: str, number: int,
                            run_id: str, status: str) -> None:
    if run_id:
        _end_run_in_store(client, run_id, status)
    elif parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        running = _running_trial_runs(client, experiment_id, study_name)
        if str(number) in running:
            _end_run_in_store(client, running[str(number)], status)


def _end_run_in_store(client: Any, run_id: str, status: str) -> None:
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)
    client.set_tag(run_id, "optuna.trial_state", "FAIL")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the parent run ------------------------------------------------------------------------


def _parent_run(job: _Job, study: Any) -> tuple[str, bool]:
    """The study's parent run: reused on resume and by other machines, else created."""
    settings = job.settings
    tags = {
        "expforge.role": _STUDY_ROLE,
        "optuna.study_name": settings.study_name,
        "optuna.storage": config_mod.mask_uri(settings.storage),
        "objective.metric": settings.objectives[0].metric,
        "objective.direction": settings.objectives[0].direction,
        **({"mlflow.parentRunId": job.sweep_parent_run_id} if job.sweep_parent_run_id else {}),
        **{k: v for k, v in job.context.choices.items() if k in ("model", "data", "search")},
        **job.tracking.tags,
    }
    run_id, resumed = job.writer.call(_parent_in_store, job.experiment_id,
                                      study.user_attrs.get(_PARENT_ATTR), settings.study_name,
                                      tags)
    if not resumed or run_id != study.user_attrs.get(_PARENT_ATTR):
        study.set_user_attr(_PARENT_ATTR, run_id)
    return run_id, resumed


def _parent_in_store(client: Any, experiment_id: str, existing: str | None, study_name: str,
                     tags: dict[str, str]) -> tuple[str, bool]:
    """``existing`` if it is an active run, else a new parent run; whether it was reused."""
    if existing:
        try:
            if client.get_run(existing).info.lifecycle_stage == "active":
                return existing, True
        except Exception:
            pass  # the run is gone (deleted or another store): start a new parent
    run = client.create_run(experiment_id, tags=tags, run_name=study_name)
    # Workers starting together may each create a parent: all keep the earliest one.
    rivals = client.search_runs(
        [experiment_id],
        f"tags.`optuna.study_name` = '{study_name}' and "
        f"tags.`expforge.role` = '{_STUDY_ROLE}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time ASC"],
    )
    rivals = [r for r in rivals if r.info.lifecycle_stage == "active"]
    winner = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
        return winner, True
    return run.info.run_id, False


def _log_parent_config(job: _Job) -> None:
    masked = config_mod.mask_secrets(dict(job.plain))
    job.writer.write(RunRecord(job.parent_run_id, status=None,
                               params=config_mod.param_values(masked, exclude=("hydra",)),
                               texts=config_texts(masked, job.context)))


def _report_failure(study: Any, trial: Any) -> None:
    import sys

    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL and "error" in trial.user_attrs:
        print(f"trial {trial.number} failed: {trial.user_attrs['error']}", file=sys.stderr)


def _update_parent(job: _Job, writer: RunWriter) -> Callable[[Any, Any], None]:
    """After each trial: the parent run's best so far (params, value, trial number)."""
    from optuna.trial import TrialState

    def callback(study: Any, trial: Any) -> None:
        if trial.state != TrialState.COMPLETE or job.settings.multi_objective:
            return
        try:
            best = study.best_trial
        except ValueError:
            return
        if best.number != trial.number:
            return
        metric = job.settings.objectives[0].metric
        writer.write(RunRecord(
            job.parent_run_id, status=None, step=trial.number,
            metrics={f"best_{metric}": float(best.value)},
            tags={"best_trial": str(best.number),
                  "best_run_id": str(best.user_attrs.get(_RUN_ATTR, "")),
                  **{f"best.{k}": str(v) for k, v in best.params.items()}},
        ))

    return callback


def _finish(job: _Job, study: Any, parent_id: str, objective: _Objective | None) -> float | None:
    """The best model, top trials, Optuna's plots and the final counts on the parent; a table
    on screen. A writer process logs the model while this process draws the plots."""
    from expforge.plots import study_figures

    settings = job.settings
    writer = job.writer
    # Runs of processes killed during the study (another machine's heartbeat may have failed
    # their trials before they were linked to their runs): written or ended, not RUNNING.
    with contextlib.suppress(Exception):
        _reap_orphans(study, job)
    counts = _counts(study)
    logged = objective is not None and objective.flush_best()
    if not logged:
        _log_lost_best_model(job, study)
    table = _top_trials(study, settings)
    writer.write(RunRecord(
        parent_id, status=None,
        metrics={"n_complete": counts.complete, "n_pruned": counts.pruned,
                 "n_failed": counts.failed},
        texts={} if table is None else {"top_trials.csv": table.to_csv(index=False)}))
    if settings.plots and counts.complete >= 2:
        submit_figures(writer, parent_id, study_figures(study, settings.objectives[0].metric,
                                                         settings.multi_objective))
    _print_report(study, settings, counts, table, parent_id)
    if settings.multi_objective or counts.complete == 0:
        return None
    return float(study.best_value)


def _log_lost_best_model(job: _Job, study: Any) -> None:
    """log_models=best: the best trial's model, when the session that ran the trial was killed
    before its end, where it logs the model. Fitted again from the trial's config (seeded, so
    the same model), as ``python register.py`` would otherwise promote a worse one."""
    settings = job.settings
    if settings.log_models != "best" or settings.multi_objective:
        return
    try:
        best = study.best_trial
    except ValueError:
        return  # no complete trial
    run_id = best.user_attrs.get(_RUN_ATTR)
    if not run_id or job.writer.call(_has_model, job.experiment_id, run_id):
        return
    model = fitted_model(_trial_config(job, best.number, best.params), job.dataset)
    attach_model(job.writer, run_id, model, job.dataset, plots=job.tracking.log_plots)


def _has_model(client: Any, experiment_id: str, run_id: str) -> bool:
    return bool(client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'",
        max_results=1))


def _top_trials(study: Any, settings: SearchSettings) -> Any:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not trials:
        return None
    import pandas as pd

    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "run_id": t.user_attrs.get(_RUN_ATTR, "")}
        for o, v in zip(settings.objectives, t.values, strict=True):
            row[o.metric] = v
        row.update(t.params)
        rows.append(row)
    frame = pd.DataFrame(rows)
    first = settings.objectives[0]
    frame = frame.sort_values(first.metric, ascending=first.direction == "minimize")
    return frame.head(settings.top_k).reset_index(drop=True)


def _print_report(study: Any, settings: SearchSettings, counts: _Counts, table: Any,
                  parent_id: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if table is not None:
        shown = Table(title=f"top trials of {settings.study_name}", title_justify="left")
        for col in table.columns:  # model.max_depth -> max_depth keeps the table narrow
            shown.add_column(str(col).rsplit(".", 1)[-1], justify="right")
        for _, row in table.iterrows():
            shown.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v)[:8] for v in row))
        console.print(shown)
    console.print(
        f"study {settings.study_name}: {counts.complete} complete, {counts.pruned} pruned, "
        f"{counts.failed} failed of {settings.n_trials}; parent run {parent_id}"
    )


class _Progress:
    """A live bar: trials done/pruned/failed of the budget, best value and its trial."""

    def __init__(self, settings: SearchSettings, study: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.settings, self.study = settings, study
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                            transient=False)
        self.task = self.bar.add_task(settings.study_name, total=settings.n_trials, status="")

    def __enter__(self) -> _Progress:
        self.bar.start()
        self.refresh()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.refresh()
        self.bar.stop()

    def callback(self, study: Any, trial: Any) -> None:
        self.refresh()

    def refresh(self) -> None:
        counts = _counts(self.study)
        status = f"pruned {counts.pruned} failed {counts.failed}"
        if not self.settings.multi_objective and counts.complete:
            try:
                best = self.study.best_trial
                status += f" best {best.value:.5g} (trial {best.number})"
            except ValueError:
                pass
        self.bar.update(self.task, completed=min(counts.done, self.settings.n_trials),
                        status=status)
