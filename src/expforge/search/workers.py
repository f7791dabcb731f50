"""Parallel workers: processes forked (or spawned) by the command, each taking trials until
the budget is spent; the command watches them and fails the trials of one that dies."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expforge.errors import SearchError
from expforge.process import (
    guarded,
    interrupts_deferred,
    name_process,
    stop,
    terminate_as_interrupt,
)
from expforge.search.budget import StopRules, check_failures, counts, since_of
from expforge.search.job import Job
from expforge.search.loop import optimize
from expforge.search.recovery import reap_orphans
from expforge.search.report import Progress
from expforge.search.study import open_study

__all__ = ["Worker", "start_workers", "stop_workers", "watch"]


@dataclass
class Worker:
    process: Any
    channel: Any  # the command's end of the pipe that brings the parent run
    reaped: bool = False


def start_workers(job: Job, fork: bool) -> list[Worker]:
    """Start the workers before this process opens any store connection.

    Forked workers share the loaded data (and code) copy-on-write. Where ``fork`` is False
    (connections may exist) they are spawned instead and receive the job through a pipe.
    """
    ctx: Any = multiprocessing.get_context("fork" if fork else "spawn")
    workers: list[Worker] = []
    for index in range(job.settings.n_workers):
        receive, send = ctx.Pipe(duplex=False)
        # The command's ends, which the worker closes: if the command dies before it sends
        # the parent run, the worker hears the end of the pipe instead of waiting.
        ends = [send, *(w.channel for w in workers)]
        process = ctx.Process(target=_worker_main, args=(job, index, receive, ends),
                              name=f"expforge-worker-{index}", daemon=False)
        process.start()
        receive.close()
        workers.append(Worker(process, send))
    job.store.clients_started()
    return workers


def _worker_main(job: Job, index: int, channel: Any, command_ends: list[Any]) -> None:
    """A worker: wait for the parent run, then take trials until the budget is spent."""
    name_process(f"expforge-work{index}")
    for end in command_ends:
        end.close()
    job.store = job.store.for_client(index + 1)
    try:
        job.store.load_code()  # while the command opens the store and the parent run
        message = channel.recv()
    except (EOFError, KeyboardInterrupt):
        sys.exit(1)
    if message is None:
        sys.exit(0)
    job.parent_run_id, job.experiment_id, job.deadline = message
    terminate_as_interrupt()
    from threadpoolctl import threadpool_limits

    # OpenMP pools (hgb, numpy) get the worker's share of the cores, like model.n_jobs does.
    threadpool_limits(limits=max(1, (os.cpu_count() or 1) // job.settings.n_workers))
    guarded(lambda: _work(job, index), label=f"worker {index}: ")


def _work(job: Job, index: int) -> None:
    study = open_study(job.settings, job.params, index, job.store, job.experiment_id,
                       job.model_name)
    objective = optimize(job, study, progress=None)
    with interrupts_deferred():
        objective.flush_best()


def watch(job: Job, study: Any, workers: list[Worker], progress: Progress,
          when_idle: Callable[[], None] | None = None,
          when_over: Callable[[], None] | None = None) -> None:
    """Follow the workers; a worker that dies has its trial failed so the slot is retried.
    Called once each, while the workers go on: ``when_idle`` when every slot of the budget
    is taken (a core is left idle as the last trials run), ``when_over`` when no trial runs
    and none will start (one worker logs the best model)."""
    from multiprocessing.connection import wait

    rules = StopRules(job.settings, progress.tally, since_of(job.settings, study))
    while any(w.process.is_alive() for w in workers):
        wait([w.process.sentinel for w in workers if not w.reaped], timeout=0.5)
        now = progress.refresh()
        if when_over is not None and now.running == 0 and rules.check(
                now, job.deadline) is not None:
            when_over()
            when_idle = when_over = None
        elif when_idle is not None and now.taken >= job.settings.n_trials:
            when_idle()
            when_idle = None
        for w in workers:
            if not w.process.is_alive() and not w.reaped:
                w.reaped = True
                if w.process.exitcode not in (0, None):
                    reap_orphans(study, job, pid=w.process.pid, rewrite=False)
    progress.refresh()
    codes = [w.process.exitcode for w in workers]
    now = counts(study)
    if now.taken < job.settings.n_trials and all(c != 0 for c in codes):
        check_failures(job.settings, now)
        raise SearchError(
            f"every worker stopped (exit codes {codes}) with {now.done} of "
            f"{job.settings.n_trials} trials done; see the messages above"
        )


def stop_workers(workers: list[Worker]) -> None:
    """Workers still running (this process was interrupted) are stopped: they end KILLED."""
    for w in workers:
        w.process.join(timeout=0.1)
        if w.process.is_alive():
            stop(w.process.pid)
    for w in workers:
        w.process.join(timeout=60)
