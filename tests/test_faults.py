"""SIGKILL of a search and four writers on one sqlite store."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from .conftest import ROOT, client
from .test_search import _assert_budget_exact, _cli, load


def test_sigkill_leaves_ghosts_that_the_next_start_clears(tmp_path: Path) -> None:
    args = _cli(tmp_path, "model=rf", "search_space.model.n_estimators.low=200",
                "search_space.model.n_estimators.high=300", "search.n_trials=3")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "s.journal"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            trials = load(journal, "cli").trials if journal.exists() else []
        except KeyError:  # the file exists, the study not yet
            trials = []
        if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    ghosts = [r for r in c.search_runs([exp_id]) if r.info.status == "RUNNING"]
    assert ghosts  # the killed process could not clean up
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_budget_exact(tmp_path, 3)
    statuses = {r.info.run_id: r.info.status for r in c.search_runs([exp_id])}
    trial_ghosts = [g for g in ghosts if g.data.tags.get("expforge.role") == "trial"]
    assert all(statuses[g.info.run_id] == "KILLED" for g in trial_ghosts)


WRITER = """
import sys
from expforge.tracking import TrackingSettings, connect, tracked_run, log_params
import mlflow
settings = TrackingSettings(uri=sys.argv[1], experiment="writers", artifact_root=sys.argv[2])
exp = connect(settings)
for i in range(25):
    with tracked_run(exp, run_name=f"w{sys.argv[3]}-{i}", tags={"writer": sys.argv[3]}):
        log_params({f"p{k}": str(k) for k in range(10)})
        mlflow.log_metrics({f"m{k}": float(k) for k in range(5)})
"""


def test_four_processes_write_one_sqlite_store_without_loss(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from expforge.tracking import TrackingSettings, connect

    connect(TrackingSettings(uri=uri, experiment="writers", artifact_root=str(tmp_path)))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(tmp_path), str(w)],
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for w in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not any("database is locked" in e for e in errors)
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("writers").experiment_id], max_results=500)
    assert len(runs) == 100 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(len(r.data.params) == 10 and len(r.data.metrics) == 5 for r in runs)
