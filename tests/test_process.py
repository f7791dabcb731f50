"""Process policy: deferred interrupts, the error and exit-code wrapper, the collector."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from expforge.errors import DataError
from expforge.process import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    guarded,
    interrupts_allowed,
    interrupts_deferred,
    start_up_done,
)


@pytest.fixture(autouse=True)
def _interrupt_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests send Ctrl-C and SIGTERM to the test process itself, which remembers when
    one came (``process.interrupted_for``): forgotten after each, so that a later test's
    writer client, in the same test process, does not take it for a Ctrl-C 10 s ago and
    stop its writer (seen as a crashed xdist worker)."""
    import expforge.process

    monkeypatch.setattr(expforge.process, "_interrupted_at", None)


def test_ctrl_c_inside_a_store_write_waits_for_its_end() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        with interrupts_deferred():  # nested: the outer block decides
            os.kill(os.getpid(), signal.SIGTERM)
        done.append("the write")
    assert done == ["the write"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_a_second_ctrl_c_does_not_wait_for_the_write() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C twice"), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("held")
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the write")
    assert done == ["held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _study_that_is_interrupted_in_its_tell(path: str) -> Any:
    """A journal study on which Ctrl-C lands while Optuna records a trial's end."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    class CtrlCInTell(JournalStorage):
        def set_trial_state_values(self, trial_id: int, state: Any,
                                   values: Any = None) -> bool:
            if state.is_finished():
                os.kill(os.getpid(), signal.SIGINT)
            return bool(super().set_trial_state_values(trial_id, state, values))

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(storage=CtrlCInTell(JournalFileBackend(path)))


def test_ctrl_c_while_optuna_records_a_trial_waits_for_the_record(tmp_path) -> None:
    """As a worker's loop runs a trial (``search.loop``): Optuna 5 lost an interrupt that
    landed in its tell (an UnboundLocalError from ``_run_trial``, the trial left RUNNING)."""
    study = _study_that_is_interrupted_in_its_tell(str(tmp_path / "s.journal"))
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_trials_work_interrupts_at_once_and_the_trial_is_recorded_failed(
        tmp_path) -> None:
    import optuna

    study = optuna.create_study()
    done = []

    def objective(trial: Any) -> float:
        with interrupts_allowed():  # as TrialObjective runs the trial's fit
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the fit")
        return 0.0

    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        study.optimize(objective, n_trials=1)
    assert done == []
    assert [t.state.name for t in study.trials] == ["FAIL"]
    # One that came before the trial's work interrupts as the work starts.
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("held")
        with interrupts_allowed():
            done.append("the work")
    assert done == ["held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts_allowed():  # outside a deferred block: nothing changes
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_process_that_ignores_ctrl_c_has_nothing_to_defer() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_guarded_turns_errors_and_interrupts_into_lines_and_exit_codes(capsys) -> None:
    def fails() -> None:
        raise DataError("data.path=x.csv does not exist")

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as caught:
        guarded(fails, label="worker 1: ")
    assert caught.value.code == EXIT_ERROR
    assert capsys.readouterr().err == "error: worker 1: data.path=x.csv does not exist\n"
    with pytest.raises(SystemExit) as caught:
        guarded(interrupted)
    assert caught.value.code == EXIT_INTERRUPTED
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert guarded(lambda: 7) == 7


def test_sigterm_is_ctrl_c_under_guarded() -> None:
    script = ("import os, signal, time\n"
              "from expforge.process import guarded\n"
              "def work():\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "guarded(work)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == EXIT_INTERRUPTED, done.stderr
    assert "interrupted: runs ended KILLED" in done.stderr


def test_the_collector_is_left_alone_outside_run_pys_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """expforge as a library: on or off, as its caller (a notebook) set it. (``run.py``'s
    command turns it back on: tests/search/test_study.py, two workers.)"""
    from expforge import process

    monkeypatch.setattr(process, "_COMMAND", [False])  # an in-process run_job of a test
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    start_up_done()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()
    try:
        start_up_done()
        assert not gc.isenabled() and gc.get_freeze_count() == frozen
    finally:
        gc.enable()
