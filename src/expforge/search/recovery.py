"""After a crash: trials left RUNNING by dead processes are failed, their runs written again
from what Optuna kept, or ended.

Who calls what, and when, is in docs/design.md ("Failure and recovery"): the start and the
end of every study, a worker that dies, the last worker waiting for the last slots, Ctrl-C,
and the heartbeat of an RDB storage.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

from expforge.process import alive
from expforge.runner import RunContext, record_of
from expforge.search.job import HOST_ATTR, METRICS_ATTR, PID_ATTR, RUN_ATTR, Job
from expforge.tracking import RunRecord, Store

__all__ = ["FailedTrialRun", "end_trial_run", "heartbeats_used", "reap_orphans",
           "recover_stale", "tag_interrupted"]


def reap_orphans(study: Any, job: Job, pid: int | None = None, rewrite: bool = True) -> None:
    """RUNNING trials left by dead processes of this host (SIGKILL), or with ``pid`` by that
    process (an interrupt, a worker that died): FAIL, their runs written again, or without
    ``rewrite`` only ended KILLED. A failed trial's run is tagged FAIL in any case: an
    interrupt can land after the trial handed its finished run over, before Optuna heard
    of the trial's end."""
    from optuna.trial import TrialState

    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
              if _left_by(t, pid) and _set_failed(study, t)]
    if rewrite:
        _repair_runs(study, job, pid)
    for t in failed:
        end_trial_run(job.store, job.experiment_id, study, t, "KILLED")


def recover_stale(study: Any, job: Job) -> None:
    """Trials whose heartbeat stopped (RDB storage) or whose process of this host died."""
    import optuna

    with heartbeats_used():
        optuna.storages.fail_stale_trials(study)
    reap_orphans(study, job)


@contextlib.contextmanager
def heartbeats_used() -> Iterator[None]:
    """Optuna's heartbeats, without its warning that they are experimental (printed on every
    start of every worker): they are what fails the trials of a vanished machine."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        yield


def end_trial_run(store: Store, experiment_id: str, study: Any, trial: Any,
                  status: str) -> None:
    """End the run of a trial that failed with its process. A process killed after its run
    was created but before the id reached the trial leaves a run that only its tags name:
    then the study's RUNNING run with the trial's number is ended. Best effort."""
    with contextlib.suppress(Exception):
        run_id = trial.user_attrs.get(RUN_ATTR) or store.running_trial_runs(
            experiment_id, study.study_name).get(str(trial.number))
        if run_id:
            store.end_run(run_id, status, {"optuna.trial_state": "FAIL"})


def tag_interrupted(store: Store, experiment_id: str, study: Any, number: int | None) -> None:
    """After an interrupt, the run of this process's latest trial (``number``). An interrupt
    that lands in the objective after its run was handed over finished makes Optuna fail the
    trial itself, so ``reap_orphans`` (RUNNING trials) does not see it: its run, which says
    COMPLETE, is tagged FAIL like the trial."""
    from optuna.trial import TrialState

    if number is None:
        return
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is not None and trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
        end_trial_run(store, experiment_id, study, trial, "KILLED")


class FailedTrialRun:
    """The heartbeat's callback (RDB storage): the trial of a vanished worker is FAIL, so is
    its run."""

    def __init__(self, store: Store, experiment_id: str) -> None:
        self.store, self.experiment_id = store, experiment_id

    def __call__(self, study: Any, trial: Any) -> None:
        end_trial_run(self.store, self.experiment_id, study, trial, "FAILED")


def _left_by(trial: Any, pid: int | None) -> bool:
    """The trial belongs to process ``pid``; without one, to a dead process of this host."""
    if pid is not None:
        return bool(trial.user_attrs.get(PID_ATTR) == pid)
    owner = trial.user_attrs.get(PID_ATTR)
    return bool(trial.user_attrs.get(HOST_ATTR) == socket.gethostname() and owner
                and not alive(int(owner)))


def _set_failed(study: Any, trial: Any) -> bool:
    """Mark a RUNNING trial FAIL; False when someone else finished it first."""
    from optuna.trial import TrialState

    try:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except Exception:
        return False
    return True


def _repair_runs(study: Any, job: Job, pid: int | None) -> None:
    """Runs that a killed process left unwritten: their trials are over, the runs RUNNING
    and without contents. Each is written again from its trial (config and params, the
    metrics Optuna kept) and ended FINISHED, or KILLED for a trial that did not finish."""
    from optuna.trial import TrialState

    by_number = job.store.running_trial_runs(job.experiment_id, job.settings.study_name)
    if not by_number:
        return
    for t in study.get_trials(deepcopy=False):
        run_id = by_number.get(str(t.number))
        if run_id is None or t.state == TrialState.RUNNING or not _left_by(t, pid):
            continue
        finished = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        end = RunRecord(run_id, status="FINISHED" if finished else "KILLED",
                        tags={"optuna.trial_state": t.state.name if finished else "FAIL",
                              "expforge.rewritten": "true"})
        whole = record_of(job.trial_config(t.number, t.params), RunContext(), job.dataset)
        whole.run_id, whole.status, whole.tags = run_id, end.status, end.tags
        whole.metrics = dict(t.user_attrs.get(METRICS_ATTR) or {})
        with contextlib.suppress(Exception):  # the run is gone, or another process wrote it
            job.store.rewrite_run(whole, end)
