"""A worker's loop: take trials until a stop rule holds (the budget, the target, the patience,
the command's timeout) or too many trials fail."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from expforge.process import interrupts_deferred
from expforge.search.budget import StopRules, check_failures, counts, since_of
from expforge.search.job import Job
from expforge.search.parent import best_after_each_trial
from expforge.search.recovery import reap_orphans, recover_stale, tag_interrupted
from expforge.search.report import Progress, report_failure
from expforge.search.trial import TrialObjective

__all__ = ["optimize"]


def optimize(job: Job, study: Any, progress: Progress | None) -> TrialObjective:
    """This process's trials; the objective, which holds its best model
    (``TrialObjective.flush_best``). Everything handed to the store is written before it
    returns, also on Ctrl-C."""
    settings = job.settings
    objective = TrialObjective(job, study)
    callbacks = [best_after_each_trial(job, objective.tally), report_failure]
    if progress is not None:
        callbacks.append(progress.callback)
    interrupted = False
    try:
        _loop(job, study, objective, callbacks)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        job.store.flush()
        if interrupted:
            # Ctrl-C can land where a trial's run was created but not yet handed over
            # (waiting for its id, say): this process's trials are failed and their runs
            # still RUNNING ended KILLED. Best effort: the interrupt goes on regardless.
            with contextlib.suppress(Exception):
                reap_orphans(study, job, pid=os.getpid())
            with contextlib.suppress(Exception):
                tag_interrupted(job.store, job.experiment_id, study, objective.last)
    check_failures(settings, counts(study))
    return objective


def _loop(job: Job, study: Any, objective: TrialObjective, callbacks: list[Any]) -> None:
    settings = job.settings
    rules = StopRules(settings, objective.tally, since_of(settings, study))
    recovered = time.monotonic()
    while True:
        now = objective.tally.counts()
        if rules.check(now, job.deadline) is not None:
            break
        if now.taken >= settings.n_trials:
            # The last slots are running elsewhere. Wait: if their worker dies, heartbeats
            # (RDB) or the dead-process check (this host) fail them and the slot is ours to
            # retry. The study is read often, so that this worker ends soon after the last
            # trial.
            time.sleep(0.05)
            if time.monotonic() - recovered >= 1.0:
                recover_stale(study, job)
                recovered = time.monotonic()
            continue
        check_failures(settings, now)
        # Optuna's asking, telling and callbacks are not interrupted: an interrupt inside
        # its tell left the trial RUNNING and surfaced as an UnboundLocalError (Optuna 5's
        # _run_trial). The trial's work takes interrupts at once (TrialObjective).
        with interrupts_deferred():
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks,
                           gc_after_trial=False, show_progress_bar=False)
        if objective.stop_error is not None:
            raise objective.stop_error
