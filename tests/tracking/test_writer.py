"""The store's interface: the writer process records what the in-process store records, and
keeps its ordering rules when its callers are interrupted."""

from __future__ import annotations

import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from expforge.errors import TrackingError
from expforge.tracking import LocalStore, RunRecord, Store, TrackingSettings, describe_dataset
from expforge.tracking._writer import WriterClient

from ..conftest import client


def _settings(tmp_path: Path, name: str) -> TrackingSettings:
    return TrackingSettings(uri=f"sqlite:///{tmp_path}/{name}.db", experiment=name,
                            artifact_root=str(tmp_path / "art"))


def _model(trees: int = 5) -> tuple[Any, pd.DataFrame]:
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.pipeline import Pipeline

    X, y = load_diabetes(return_X_y=True, as_frame=True)
    model = Pipeline([("model", RandomForestRegressor(trees, random_state=0))]).fit(X, y)
    return model, X


@contextmanager
def _interrupt_after(seconds: float) -> Iterator[None]:
    """Ctrl-C in ``seconds``, as a user's would land in the middle of a wait."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _record_everything(store: Store, settings: TrackingSettings, dataset: Any) -> dict[str, str]:
    """Every operation of the interface, as a search uses them; the runs it made."""
    experiment = store.connect(settings)
    parent, resumed = store.open_parent_run(experiment, None, "study", {
        "expforge.role": "study", "optuna.study_name": "study"})
    assert not resumed
    assert store.open_parent_run(experiment, parent, "study", {
        "expforge.role": "study", "optuna.study_name": "study"}) == (parent, True)
    created: list[str] = []
    trial = store.wait(store.create_run(experiment, "study-trial-0", {
        "expforge.role": "trial", "optuna.study_name": "study", "optuna.trial_number": "0"},
        parent, on_created=created.append))
    assert created == [trial]
    ghost = store.wait(store.create_run(experiment, "study-trial-1", {
        "expforge.role": "trial", "optuna.study_name": "study", "optuna.trial_number": "1"},
        parent))
    assert store.running_trial_runs(experiment, "study") == {"0": trial, "1": ghost}
    store.write(RunRecord(trial, params={"model.max_depth": "3"}, metrics={"val_rmse": 55.0},
                          tags={"optuna.trial_state": "COMPLETE"},
                          texts={"config.yaml": "model: {max_depth: 3}\n"},
                          dataset=describe_dataset(dataset)))
    model, X = _model()
    store.attach_model(trial, model, X.head(5))
    folder = tempfile.mkdtemp()
    Path(folder, "plots").mkdir()
    Path(folder, "plots", "a.png").write_bytes(b"png")
    store.attach_files(parent, folder)
    whole = RunRecord(ghost, params={"model.max_depth": "4"}, metrics={"val_rmse": 56.0},
                      tags={"expforge.rewritten": "true"})
    store.rewrite_run(whole, RunRecord(ghost, tags={"never": "written"}))
    store.end_run(parent, "FINISHED", {"done": "yes"})
    store.flush()
    assert store.model_of(experiment, trial) is not None
    assert store.model_of(experiment, ghost) is None
    assert not Path(folder).exists()
    store.close()
    return {"parent": parent, "trial": trial, "ghost": ghost}


@pytest.mark.parametrize("kind", ["inline", "process"])
def test_both_stores_record_the_same_runs(kind: str, tmp_path: Path, plain) -> None:
    from expforge.data import load_data

    cfg = plain()
    dataset = load_data(cfg["data"], 0, cfg["paths"]["root"])
    settings = _settings(tmp_path, kind)
    store: Store = LocalStore(settings.uri) if kind == "inline" else WriterClient(settings.uri)
    runs = _record_everything(store, settings, dataset)
    c = client(settings.uri)
    trial = c.get_run(runs["trial"])
    assert trial.info.status == "FINISHED"
    assert trial.data.params == {"model.max_depth": "3"}
    assert trial.data.metrics == {"val_rmse": 55.0}
    assert trial.data.tags["mlflow.parentRunId"] == runs["parent"]
    assert "mlflow.user" in trial.data.tags  # the context tags of mlflow.start_run
    assert {d.dataset.name for d in trial.inputs.dataset_inputs} == {
        "diabetes-train", "diabetes-val", "diabetes-test"}
    assert {a.path for a in c.list_artifacts(runs["trial"])} >= {"config.yaml"}
    ghost = c.get_run(runs["ghost"])
    assert ghost.info.status == "FINISHED" and ghost.data.params == {"model.max_depth": "4"}
    assert "never" not in ghost.data.tags
    parent = c.get_run(runs["parent"])
    assert parent.info.status == "FINISHED" and parent.data.tags["done"] == "yes"
    assert [a.path for a in c.list_artifacts(runs["parent"], "plots")] == ["plots/a.png"]


def test_a_flush_cut_short_by_ctrl_c_leaves_the_writer_usable(tmp_path: Path) -> None:
    """Ctrl-C while waiting for a flush leaves its reply on the way; the next wait (close, at
    the end of the interrupted study) takes it in its stride instead of failing."""
    settings = _settings(tmp_path, "flush")
    writer = WriterClient(settings.uri)
    experiment = writer.connect(settings)
    run = writer.wait(writer.create_run(experiment, "slow", {}))
    model, X = _model(trees=200)
    writer.attach_model(run, model, X)  # the writer is busy for a while
    with pytest.raises(KeyboardInterrupt), _interrupt_after(0.05):
        writer.flush()
    writer.close()
    assert writer.exitcode == 0
    assert client(settings.uri).get_run(run).info.status == "FINISHED"


def test_a_request_given_up_by_an_interrupted_sender_takes_no_later_reply(
        tmp_path: Path) -> None:
    """Ctrl-C can land after a request was sent, before its reply came: the reply still
    comes, and must not answer the next request (replies name their request)."""
    settings = _settings(tmp_path, "ids")
    writer = WriterClient(settings.uri)
    experiment = writer.connect(settings)
    with_model = writer.wait(writer.create_run(experiment, "with-model", {}))
    without = writer.wait(writer.create_run(experiment, "without", {}))
    model, X = _model(trees=200)
    writer.attach_model(with_model, model, X)  # busy: the next reply comes late
    with pytest.raises(KeyboardInterrupt), _interrupt_after(0.05):
        writer.model_of(experiment, with_model)
    assert writer.model_of(experiment, without) is None
    assert writer.model_of(experiment, with_model) is not None
    writer.close()
    assert writer.exitcode == 0


def test_a_run_is_created_before_the_writes_queued_ahead_of_it(tmp_path: Path) -> None:
    """A trial waits for its run's id; the writes of ended runs do not hold it up: the
    writer creates runs before the writes that arrived ahead of them (it cannot cut short
    the one it is doing). Each client's writes stay in order, and what waits is done."""
    settings = _settings(tmp_path, "order")
    writer = WriterClient(settings.uri)
    experiment = writer.connect(settings)
    first = writer.wait(writer.create_run(experiment, "first", {}))
    model, X = _model(trees=30)
    writer.attach_model(first, model, X)  # MLflow's model logging loaded: equal work below
    writer.flush()
    for _ in range(4):  # the writer is busy while the next requests arrive
        writer.attach_model(first, model, X)
    writer.write(RunRecord(first, metrics={"m": 1.0}))
    start = time.monotonic()
    second = writer.wait(writer.create_run(experiment, "second", {}))
    created = time.monotonic() - start
    writer.flush()
    busy = time.monotonic() - start
    writer.close()
    print(f"created after {created:.2f} s of {busy:.2f} s")
    assert created < busy / 2, (created, busy)  # not after the models queued ahead of it
    c = client(settings.uri)
    assert c.get_run(first).data.metrics == {"m": 1.0}
    assert c.get_run(first).info.status == "FINISHED"
    assert c.get_run(second).info.status == "RUNNING"


def test_a_dead_writer_is_one_clear_error(tmp_path: Path) -> None:
    import os

    settings = _settings(tmp_path, "dead")
    writer = WriterClient(settings.uri)
    experiment = writer.connect(settings)
    os.kill(writer.pid, signal.SIGKILL)
    with pytest.raises(TrackingError, match=r"the run writer process \(pid \d+\) ended"):
        for _ in range(100):  # the pipe may take a moment to tell
            writer.wait(writer.create_run(experiment, "late", {}))
            time.sleep(0.05)


def test_an_interrupt_of_an_earlier_study_does_not_stop_a_later_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook: one study stopped by Ctrl-C, then another in the same process. The
    process remembers the interrupt; the second study's writer must not take it for its own
    and stop after ``STOP_GRACE_S``."""
    import os

    import expforge.process
    from expforge.process import interrupts_deferred
    from expforge.tracking._writer import client as writer_client

    monkeypatch.setattr(expforge.process, "_interrupted_at", None)
    monkeypatch.setattr(writer_client, "STOP_GRACE_S", 0.0)
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)  # the first study's Ctrl-C
    assert expforge.process.interrupted_for() is not None
    settings = _settings(tmp_path, "later")
    writer = WriterClient(settings.uri)
    experiment = writer.connect(settings)
    run = writer.wait(writer.create_run(experiment, "later", {}))
    writer.close()
    assert writer.exitcode == 0 and client(settings.uri).get_run(run).info.status == "RUNNING"
