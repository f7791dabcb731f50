"""Many machines, simulated on one: a real `mlflow server` on PostgreSQL and Optuna's RDB
storage, three independent worker commands on one study, one of them killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import ROOT, free_port
from ..conftest import mlflow_server as start_mlflow_server

PG = "postgresql://postgres@127.0.0.1:5432"


def postgres_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not postgres_reachable(),
                                reason="no PostgreSQL on 127.0.0.1:5432 (trust auth, user "
                                       "postgres) to test scale-out against")


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture()
def databases() -> Iterator[dict[str, str]]:
    """Two fresh databases: MLflow's backend store and the Optuna storage."""
    names = {k: f"expforge_{k}_{uuid.uuid4().hex[:8]}" for k in ("mlflow", "optuna")}
    for name in names.values():
        _admin(f"CREATE DATABASE {name}")
    yield {k: f"{PG}/{v}" for k, v in names.items()}
    for name in names.values():
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture()
def mlflow_server(databases: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = start_mlflow_server(port, databases["mlflow"], tmp_path / "shared-artifacts")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_three_workers_one_killed_finish_the_budget(databases, mlflow_server,
                                                     tmp_path: Path) -> None:
    # Trials of ~0.5 s: the budget outlasts the first command until the third has joined.
    n_trials = 8
    args = [
        sys.executable, str(ROOT / "run.py"), "search=optuna", "model=rf",
        "search.study_name=fleet", f"search.storage={databases['optuna']}",
        f"search.n_trials={n_trials}", "search.heartbeat_interval=1", "search.grace_period=4",
        "search.plots=false", f"tracking.uri={mlflow_server}", "model.n_jobs=1",
        "search_space.model.n_estimators.low=200", "search_space.model.n_estimators.high=300",
        f"paths.outputs={tmp_path}/out",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # all three at once, as a scheduler starts them: the first creates the storage's schema
    workers = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(3)]

    import optuna

    storage = optuna.storages.RDBStorage(databases["optuna"])
    victim = workers[2]
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and not killed and victim.poll() is None:
        # kill worker 3 in the middle of a trial
        try:
            study = optuna.load_study(study_name="fleet", storage=storage)
        except KeyError:
            time.sleep(0.5)
            continue
        running = [t for t in study.get_trials(deepcopy=False)
                   if t.state == optuna.trial.TrialState.RUNNING
                   and t.user_attrs.get("expforge.pid") == victim.pid]
        if running:
            victim.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    assert killed, "worker 3 never started a trial"
    for w in workers[:2]:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
        # expforge's summary names the UI once; no MLflow link per run, no Optuna warning
        assert "View run" not in out, out[-2000:]
        assert "Warning" not in err, err[-2000:]
    victim.wait(timeout=10)

    study = optuna.load_study(study_name="fleet", storage=storage)
    states = [t.state for t in study.trials]
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                   optuna.trial.TrialState.PRUNED)]
    assert len(done) == n_trials
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.FAIL in states  # the killed worker's trial

    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("expforge")
    runs = client.search_runs([exp.experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    parents = [r for r in runs if r.data.tags.get("expforge.role") == "study"]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    ok = [r for r in kids if r.data.tags["optuna.trial_state"] in ("COMPLETE", "PRUNED")]
    numbers = [r.data.tags["optuna.trial_number"] for r in ok]
    assert len(numbers) == len(set(numbers)) == n_trials
    assert {t.user_attrs["mlflow_run_id"] for t in done} == {r.info.run_id for r in ok}
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    for t in failed:
        if "mlflow_run_id" in t.user_attrs:
            assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "FAILED"


def test_rounds_of_three_commands_started_together(mlflow_server, tmp_path: Path) -> None:
    """An array job's tasks start at the same moment: each round opens a new PostgreSQL
    storage (Optuna creates its schema) and a new experiment on the server (MLflow creates it
    and the study's parent run), three commands at once. All of them must succeed. (Without
    the schema lock, the first or second round failed; three keep the suite's time.)"""
    import mlflow
    import optuna

    client = mlflow.MlflowClient(mlflow_server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for round_ in range(3):
        name = f"expforge_round_{uuid.uuid4().hex[:8]}"
        _admin(f"CREATE DATABASE {name}")
        try:
            args = [sys.executable, str(ROOT / "run.py"), "search=optuna", "model=linear",
                    "search.study_name=array", f"search.storage={PG}/{name}",
                    "search.n_trials=3", "search.plots=false", "tracking.log_model=false",
                    "tracking.writer=inline", "tracking.log_plots=false",
                    f"tracking.uri={mlflow_server}", f"tracking.experiment={name}",
                    f"paths.outputs={tmp_path}/out"]
            commands = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True) for _ in range(3)]
            for c in commands:
                _, err = c.communicate(timeout=180)
                assert c.returncode == 0, f"round {round_}: {err[-2000:]}"
            study = optuna.load_study(study_name="array", storage=f"{PG}/{name}")
            assert [t.state.name for t in study.trials].count("COMPLETE") == 3
            runs = client.search_runs(
                [client.get_experiment_by_name(name).experiment_id])
            assert {r.info.status for r in runs} == {"FINISHED"}
            assert [r.data.tags.get("expforge.role") for r in runs].count("study") == 1
        finally:
            _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
