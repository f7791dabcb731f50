"""Process policy: deferred interrupts, the error and exit-code wrapper, the collector."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys

import pytest

from expforge.errors import DataError
from expforge.process import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    guarded,
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


def test_the_collector_is_left_alone_where_it_runs() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    start_up_done()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
