"""The sweep's parent run: made before the jobs, it ends with their table and the best job."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import open_dict

from expforge.config import to_plain
from expforge.runner import run_one
from expforge.sweep import ENV_PARENT, SweepParent

from .conftest import CONF, ROOT, browser_page, client, compose, rendered_figures


def test_a_sweep_parent_holds_its_jobs_and_the_best_of_them(store, tmp_path: Path) -> None:
    common = [f"tracking.uri={store['uri']}", f"tracking.artifact_root={store['artifacts']}",
              "tracking.experiment=sweep-parent", "model=rf", "model.n_estimators=10",
              f"paths.outputs={tmp_path}"]
    # What Hydra hands the callback: the config with its own section, and the sweep's
    # overrides as the command line gave them.
    with initialize_config_dir(str(CONF), version_base="1.3"):
        config = hydra_compose("config", overrides=common, return_hydra_config=True)
    with open_dict(config):
        config.hydra.overrides.task.append("model.max_depth=2,8")
    callback = SweepParent()
    callback.on_multirun_start(config)
    parent = os.environ[ENV_PARENT]
    results = []
    for depth in (2, 8):
        cfg = to_plain(compose(*common, f"model.max_depth={depth}"))
        results.append(run_one(cfg, parent_run_id=parent, log_model=False,
                               log_plots=False)[0])
    callback.on_multirun_end(config)
    assert ENV_PARENT not in os.environ
    c = client(store["uri"])
    run = c.get_run(parent)
    best = min(results, key=lambda r: r.value)
    assert run.info.status == "FINISHED" and run.data.tags["expforge.role"] == "sweep"
    assert run.data.tags["best_run_id"] == best.run_id
    assert run.data.metrics["best_val_rmse"] == best.value
    assert "jobs.csv" in {a.path for a in c.list_artifacts(parent)}
    jobs = c.get_run(results[0].run_id)
    assert jobs.data.tags["mlflow.parentRunId"] == parent

    # The sweep report: its jobs best first, the swept key as a column and a figure's param.
    assert "sweep_report.html" in {a.path for a in c.list_artifacts(parent)}
    page = next(tmp_path.glob("multirun/*/*/sweep_report.html"))
    with browser_page(offline=True) as p:
        p.goto(page.as_uri())
        figures = rendered_figures(p)
        headers = p.locator("table.leaderboard thead th").all_inner_texts()
        rows = [r.split("\t") for r in p.locator("table.leaderboard tbody tr").all_inner_texts()]
    assert figures and all(f["shown"] for f in figures)
    assert "Parallel coordinates" in [f["alt"] for f in figures]
    depth = headers.index("model.max_depth")
    assert [r[0] for r in rows] == [best.run_id, *(r.run_id for r in results
                                                   if r.run_id != best.run_id)]
    assert sorted(r[depth] for r in rows) == ["2", "8"]


def test_a_crashed_multirun_run_again_with_reuse_trains_only_what_is_missing(
        tmp_path: Path) -> None:
    """Four jobs, the command killed once one has finished (three more left, so that a busy
    machine does not finish them all before the kill lands); the same command with
    tracking.reuse=true trains the others, and its sweep parent lists all four."""
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, str(ROOT / "run.py"), "-m", "model=linear",
            "data=diabetes,breast_cancer", "seed=1,2", "tracking.log_plots=false",
            "tracking.log_model=false", f"tracking.uri={uri}",
            f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    c = client(uri)

    def finished_jobs() -> list:
        exp = c.get_experiment_by_name("expforge") if Path(tmp_path, "mlflow.db").exists() \
            else None
        if exp is None:
            return []
        return [r for r in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
                if "expforge.role" not in r.data.tags]

    deadline = time.monotonic() + 120
    while not finished_jobs() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    kept = {r.info.run_id for r in finished_jobs()}
    assert 1 <= len(kept) < 4, first.stderr.read()[-2000:] if first.stderr else ""

    again = subprocess.run([*args, "tracking.reuse=true"], capture_output=True, text=True,
                           timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("reused run ") == len(kept)
    jobs = finished_jobs()
    assert len(jobs) == 4 and kept <= {r.info.run_id for r in jobs}  # none trained twice
    exp = c.get_experiment_by_name("expforge")
    sweeps = c.search_runs([exp.experiment_id], "tags.`expforge.role` = 'sweep'",
                           order_by=["attributes.start_time DESC"])
    import io

    import pandas as pd

    table = pd.read_csv(io.StringIO(Path(c.download_artifacts(
        sweeps[0].info.run_id, "jobs.csv", str(tmp_path))).read_text()))
    assert len(table) == 4 and sorted(table["reused"]) == [False] * (4 - len(kept)) + [
        True] * len(kept)
    assert sweeps[0].info.status == "FINISHED" and sweeps[1].info.status != "RUNNING"


def test_a_multirun_whose_winner_fails_the_gate_exits_2(tmp_path: Path) -> None:
    """register.enabled=true on a sweep: the sweep and its jobs are recorded, the gate
    refuses the winner, the command exits 2 (as register.py does) and nothing is registered."""
    from .conftest import run_cli

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_cli("-m", "model=linear", "seed=1,2", "tracking.log_plots=false",
                   "register.enabled=true",
                   "register.criteria=[{metric: val_rmse, threshold: 1, higher_is_better: false}]",
                   f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path}/art",
                   f"paths.outputs={tmp_path}/out")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not promoted: the winner failed the gate; champion is unchanged" in done.stdout
    c = client(uri)
    exp = c.get_experiment_by_name("expforge")
    sweep, = c.search_runs([exp.experiment_id], "tags.`expforge.role` = 'sweep'")
    assert sweep.info.status == "FINISHED" and "best_run_id" in sweep.data.tags
    assert not c.search_registered_models()
