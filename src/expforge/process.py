"""Process policy in one place: signals, the garbage collector, exit codes.

**Signals.** In every expforge process SIGTERM means what Ctrl-C means (a scheduler's stop
ends runs KILLED, not RUNNING): ``guarded`` turns it into ``KeyboardInterrupt`` for the
command, ``terminate_as_interrupt`` for a worker process. While a process writes to the store
itself, or Optuna records a trial, ``interrupts_deferred`` holds both signals until the write
is done (``interrupts_allowed`` lets them through inside it, around a trial's own work). A
search's writer process ignores Ctrl-C (``ignore_interrupts``): the terminal's SIGINT reaches
the whole process group, and the command decides when the writer ends.

**Garbage collector.** ``run.py`` imports with the collector off; ``start_up_done`` freezes
what the start-up loaded and turns it back on; ``freeze_loaded`` does the same in a writer
process; ``freeze_at_exit`` spares the interpreter's shutdown its walks of the heap. Where
the collector runs (expforge used as a library) nothing here changes it.

**Library logs.** Optuna's and MLflow's own lines (a study created, a trial finished, a
store's tables created) repeat what expforge prints: in a Hydra job they go to the job's log
file (``library_logs_to_job_log``), not to the console.

**Exit codes.** 0 done; 1 an ``ExpforgeError`` (one line on stderr); 2 the gate blocked
the promotion (``register.py``, or ``run.py`` with ``register.enabled=true``); 130
interrupted. ``docs/design.md`` explains the reasons.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from expforge.errors import ExpforgeError

__all__ = [
    "EXIT_ERROR",
    "EXIT_GATE",
    "EXIT_INTERRUPTED",
    "STOP_GRACE_S",
    "alive",
    "command_started",
    "exit_status",
    "freeze_at_exit",
    "freeze_loaded",
    "gate_blocked",
    "guarded",
    "ignore_interrupts",
    "interrupted_for",
    "interrupts_allowed",
    "interrupts_deferred",
    "library_logs_to_job_log",
    "name_process",
    "optuna_verbosity_kept",
    "quiet_optuna",
    "start_up_done",
    "stop",
    "terminate_as_interrupt",
]

EXIT_ERROR = 1
EXIT_GATE = 2
EXIT_INTERRUPTED = 130

# After Ctrl-C or SIGTERM, how long a wait for the store may still go on (the writes that
# end the runs KILLED) before the command stops without them.
STOP_GRACE_S = 10.0
_interrupted_at: float | None = None

T = TypeVar("T")

# The libraries whose log lines go to Hydra's job log instead of the console.
LIBRARY_LOGGERS = ("optuna", "mlflow", "alembic", "matplotlib")


def library_logs_to_job_log() -> None:
    """In a Hydra job: Optuna's, MLflow's and its migrations' log lines to the job's log file
    (``<output dir>/<job name>.log``, Hydra's file handler), not to the console. Called before
    MLflow is imported, so that MLflow leaves its loggers alone (in this process and those
    it starts); Optuna's own console handler comes off where a study opens
    (``quiet_optuna``)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    # MLflow's bars for the artifacts it downloads (register.top_n loads each model again)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = list(files)
        logger.propagate = False
        logger.setLevel(logging.INFO)


def quiet_optuna() -> None:
    """Optuna's lines only where ``library_logs_to_job_log`` sent them (its own console
    handler off); outside a Hydra job (no file to send them to), only its errors."""
    import optuna

    handlers = logging.getLogger("optuna").handlers
    if any(isinstance(h, logging.FileHandler) for h in handlers):
        optuna.logging.disable_default_handler()
    else:  # Optuna's own console handler alone (its import adds it), or none
        optuna.logging.set_verbosity(optuna.logging.ERROR)


@contextmanager
def optuna_verbosity_kept() -> Iterator[None]:
    """The caller's Optuna verbosity as it was after the block (``quiet_optuna`` lowers it
    where a study opens outside a Hydra job: a notebook's)."""
    loaded = sys.modules.get("optuna")
    verbosity = loaded.logging.get_verbosity() if loaded is not None else logging.INFO
    try:
        yield
    finally:
        if "optuna" in sys.modules:  # INFO: Optuna's own, where it was not loaded yet
            sys.modules["optuna"].logging.set_verbosity(verbosity)


def guarded(action: Callable[[], T], label: str = "") -> T:
    """Run ``action`` under expforge's error and signal policy: an ``ExpforgeError`` is one
    line on stderr and exit 1, Ctrl-C or SIGTERM exit 130. ``label`` names a worker process
    in its error lines; only the command itself (no label) says how to resume."""
    global _interrupted_at
    _interrupted_at = None
    previous = signal.getsignal(signal.SIGTERM)
    ours = previous in (signal.SIG_DFL, None)
    ours_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    if ours_int:
        signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        return action()
    except ExpforgeError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if interrupted_for() is not None:  # what failed is the end of an interrupted command
            if not label:
                print(f"interrupted: {exc}; runs it could not end show RUNNING until the same "
                      "command runs again, which ends them and resumes", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        print(f"error: {label}{exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        if not label:
            print("interrupted: runs ended KILLED; re-run the same command to resume",
                  file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if ours_int:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted_for() -> float | None:
    """Seconds since Ctrl-C or SIGTERM reached this process (under ``guarded``, or in a
    worker), None when none did."""
    return None if _interrupted_at is None else time.monotonic() - _interrupted_at


def terminate_as_interrupt() -> None:
    """SIGTERM raises ``KeyboardInterrupt`` in this process (a spawned worker inherits no
    handler; a forked one inherits the command's, which it must not rely on)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def ignore_interrupts() -> None:
    """Ctrl-C leaves this process alone (a writer process: the command ends it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def name_process(name: str) -> None:
    """``name`` for this process in ``top``, ``ps -o comm`` and ``pgrep`` (the kernel keeps
    15 bytes), where the system has ``/proc/self/comm`` (Linux); elsewhere nothing changes.
    A search's processes are otherwise all called ``python``."""
    try:
        with open("/proc/self/comm", "w", encoding="ascii") as comm:
            comm.write(name[:15])
    except OSError:
        pass


def stop(pid: int) -> None:
    """Ask process ``pid`` to stop as Ctrl-C would (its runs end KILLED)."""
    os.kill(pid, signal.SIGTERM)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_interrupt(signum: int, frame: Any) -> None:
    _note_interrupt()
    raise KeyboardInterrupt(f"signal {signum}")


def _note_interrupt() -> None:
    global _interrupted_at
    if _interrupted_at is None:
        _interrupted_at = time.monotonic()


class _Held:
    """The handler of a deferred signal: it only remembers that the signal came."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}  # the handlers it stands in for

    def __call__(self, signum: int, frame: Any) -> None:
        _note_interrupt()
        self.received.append(signum)
        if signum == signal.SIGINT and self.received.count(signum) > 1:
            raise KeyboardInterrupt("Ctrl-C twice")  # the user will not wait for the write


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the end of the block, then interrupt as usual.

    Around this process's own writes to the store: a signal that lands inside an SQLite write
    can leave the write's lock held by this process, and every later write (the run's KILLED
    end) then waits 20 s and fails. The main thread only (Python runs signal handlers there);
    a nested block belongs to the outer one; a process that ignores Ctrl-C (the writer
    process) has nothing to defer.
    """
    if (threading.current_thread() is not threading.main_thread()
            or isinstance(signal.getsignal(signal.SIGINT), _Held)
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):  # nothing to defer
        yield
        return
    held = _Held()
    held.previous = {s: signal.signal(s, held) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in held.previous.items():
            signal.signal(signum, handler)
    if held.received:
        raise KeyboardInterrupt(f"signal {held.received[0]}")


@contextmanager
def interrupts_allowed() -> Iterator[None]:
    """Inside ``interrupts_deferred``: Ctrl-C and SIGTERM interrupt at once again for the
    length of the block (one that came before it interrupts as it starts); elsewhere nothing
    changes. A worker's loop defers interrupts around Optuna's bookkeeping of a trial and
    allows them around the trial's own work (``search.loop``)."""
    held = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not isinstance(held, _Held):
        yield
        return
    for signum, handler in held.previous.items():
        signal.signal(signum, handler)
    try:
        if held.received:
            raise KeyboardInterrupt(f"signal {held.received[0]}")
        yield
    finally:
        for signum in held.previous:
            signal.signal(signum, held)


def start_up_done() -> None:
    """The command's start-up is over: its work begins (a study's data, a run's fit).

    ``run.py`` imports with the garbage collector off: its full collections would walk the
    growing heap again and again. What was loaded is frozen out of the collector's walks (a
    full collection during the trials would stall them), and the collector resumes. A study
    calls this before it loads its data, which it keeps for many trials; a single run at its
    fit. Elsewhere (expforge used as a library, whose caller may have turned the collector
    off itself) nothing changes.
    """
    if _COMMAND[0] and not gc.isenabled():
        freeze_loaded()


_COMMAND = [False]  # this process runs a command of run.py (``command_started``)
_GATE_BLOCKED = [False]  # the registration gate refused the winner (``gate_blocked``)


def gate_blocked() -> None:
    """The registration gate refused the winner: ``run.py`` or ``register.py`` exits 2 once
    Hydra has returned. A job or a Hydra callback does not exit itself, which would skip the
    callbacks' ends (``on_job_end``, ``on_run_end``, the others' ``on_multirun_end``)."""
    _GATE_BLOCKED[0] = True


def exit_status() -> int:
    """What a command exits with after Hydra returned (errors and interrupts exit sooner);
    it forgets a blocked gate once told."""
    blocked, _GATE_BLOCKED[0] = _GATE_BLOCKED[0], False
    return EXIT_GATE if blocked else 0


def command_started() -> None:
    """This process is ``run.py``'s command, which turned the collector off as it started
    (``start_up_done``); ``cli.run_job`` says so."""
    _COMMAND[0] = True


def freeze_loaded() -> None:
    """Keep what is loaded now out of the collector's walks, and let it run."""
    gc.freeze()
    gc.enable()


def freeze_at_exit() -> None:
    """Spare the interpreter's shutdown its repeated walks of the whole heap: at exit the
    young garbage is collected (its finalizers run) and the rest is frozen."""
    import atexit

    def collect_and_freeze() -> None:
        gc.collect(1)
        gc.freeze()

    atexit.register(collect_and_freeze)
