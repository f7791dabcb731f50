from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from expforge.errors import RegistryError
from expforge.registry import register_best
from expforge.runner import run_one
from expforge.search import run_search

from .conftest import client, free_port, run_cli, wait_for_http


def _search(plain, tmp_path: Path, name: str, max_depth: str) -> tuple[dict, str]:
    cfg = plain("search=optuna", "model=rf", "search.n_trials=3", f"search.study_name={name}",
                f"search.storage={tmp_path}/s.journal", "search.plots=false")
    cfg["search_space"] = {"model.max_depth": max_depth,
                           "model.n_estimators": "int(interval(10, 20))"}
    return cfg, run_search(cfg).parent_run_id


def _reg(cfg: dict, **kw) -> dict:
    return {"alias": "champion", "model_name": cfg["tracking"]["experiment"] + "-m", **kw}


def test_register_tags_alias_idempotent_and_previous(plain, store, tmp_path: Path) -> None:
    cfg, parent = _search(plain, tmp_path, "weak", "choice(1)")
    first = register_best(_reg(cfg), cfg["tracking"])
    c = client(store["uri"])
    name = first.model_name
    v1 = c.get_model_version_by_alias(name, "champion")
    assert first.created and str(v1.version) == first.version == "1"
    winner = first.winner
    assert v1.run_id == winner.run_id
    assert c.get_run(winner.run_id).data.tags["mlflow.parentRunId"] == parent
    assert v1.tags["source_run_id"] == winner.run_id
    assert float(v1.tags["metric.val_rmse"]) == pytest.approx(winner.metrics["val_rmse"])
    assert v1.tags["config_hash"] and v1.tags["dataset_digest"]
    assert "git_commit" in v1.tags
    assert "Best val_rmse" in v1.description
    # the best trial of the study wins
    children = c.search_runs([winner.run.info.experiment_id],
                             f"tags.mlflow.parentRunId = '{parent}'")
    assert winner.metrics["val_rmse"] == min(r.data.metrics["val_rmse"] for r in children)

    again = register_best(_reg(cfg), cfg["tracking"])
    assert not again.created and "already is" in again.note
    assert len(c.search_model_versions(f"name = '{name}'")) == 1

    cfg2, _ = _search(plain, tmp_path, "strong", "int(interval(4, 8))")
    better = register_best(_reg(cfg2, must_beat_champion=True), cfg2["tracking"])
    assert better.created and better.version == "2"
    assert str(c.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(c.get_model_version_by_alias(name, "previous").version) == "1"


def test_failing_criterion_blocks_promotion(plain, store, tmp_path: Path) -> None:
    cfg, _ = _search(plain, tmp_path, "gate", "int(interval(2, 6))")
    reg = _reg(cfg, criteria=[{"metric": "val_rmse", "threshold": 1.0,
                               "higher_is_better": False}])
    report = register_best(reg, cfg["tracking"])
    assert not report.passed and report.version is None
    assert "val_rmse" in report.gate[0] and "FAIL by" in report.gate[0]
    c = client(store["uri"])
    assert c.search_model_versions(f"name = '{report.model_name}'") == []


def test_top_n_reevaluation_logs_runs_and_selects_by_test(plain, store, tmp_path: Path) -> None:
    cfg = plain("search=optuna", "model=rf", "search.n_trials=4", "search.study_name=topn",
                f"search.storage={tmp_path}/s.journal", "search.plots=false",
                "search.log_models=all")
    cfg["search_space"] = {"model.n_estimators": "int(interval(5, 15))"}
    run_search(cfg)
    report = register_best(_reg(cfg, top_n=3, select_by="test_rmse"), cfg["tracking"])
    assert report.metric == "test_rmse" and len(report.reevaluated) == 3
    c = client(store["uri"])
    exp = c.get_experiment_by_name(cfg["tracking"]["experiment"] + "-best-models")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 3 and all("test_rmse" in r.data.metrics for r in runs)
    best_test = min(runs, key=lambda r: r.data.metrics["test_rmse"])
    assert best_test.data.tags["source_run_id"] == report.winner.run_id


def test_registry_errors(plain, store) -> None:
    cfg = plain("model=linear")
    with pytest.raises(RegistryError, match="does not exist"):
        register_best(_reg(cfg), cfg["tracking"])
    run_one(cfg, log_model=False, log_plots=False)
    with pytest.raises(RegistryError, match="has a logged model"):
        register_best(_reg(cfg), cfg["tracking"])
    run_one(cfg, log_plots=False)
    with pytest.raises(RegistryError, match=r"register.metric=val_auc is not logged.*val_rmse"):
        register_best(_reg(cfg, metric="val_auc"), cfg["tracking"])
    with pytest.raises(RegistryError, match="no FINISHED candidate runs"):
        register_best(_reg(cfg, filter="params.model.name = 'xgb'"), cfg["tracking"])
    with pytest.raises(RegistryError, match=r"^register.parent_run_id=nope is not a run"):
        register_best(_reg(cfg, parent_run_id="nope"), cfg["tracking"])
    # A value that is not true or false, or not a number, names its key (YAML's maybe, or a
    # quoted "false", used to pass as true).
    for reg, line in [
        ({"must_beat_champion": "maybe"}, "register.must_beat_champion=maybe is invalid"),
        ({"criteria": [{"metric": "val_rmse", "threshold": 60, "higher_is_better": "false"}]},
         "register.criteria[0].higher_is_better=false is invalid; give true or false"),
        ({"criteria": [{"metric": "val_rmse", "threshold": "abc"}]},
         "register.criteria[0].threshold=abc is invalid; give a number"),
        ({"alias": "v3"}, "register.alias=v3 is reserved by MLflow"),
        ({"alias": "bad alias"}, "register.alias=bad alias is invalid"),
    ]:
        with pytest.raises(RegistryError, match=re.escape(line)):
            register_best(_reg(cfg, **reg), cfg["tracking"])


def test_champion_via_cli_loads_in_fresh_process_and_serves(tmp_path: Path) -> None:
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
             f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]
    # (a choice of floats: matplotlib's INFO lines about categorical units go to the job log)
    done = run_cli("search=optuna", "model=xgb", "search.n_trials=2", "register.enabled=true",
                   f"search.storage={tmp_path}/s.journal", "model.n_estimators=20",
                   "search_space.model.n_estimators.high=100",
                   'search_space.model.learning_rate="choice(0.1, 0.3)"', *store)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "champion -> v1" in done.stdout  # (register.py itself: tests/test_errors.py)
    assert "matplotlib" not in done.stdout + done.stderr
    # The same study again (no new trial) with a gate it fails: exit 2, as register.py's.
    blocked = run_cli("search=optuna", "model=xgb", "search.n_trials=2", "register.enabled=true",
                      f"search.storage={tmp_path}/s.journal", "model.n_estimators=20",
                      "search_space.model.n_estimators.high=100", "search.plots=false",
                      'search_space.model.learning_rate="choice(0.1, 0.3)"',
                      "register.criteria=[{metric: val_rmse, threshold: 1, "
                      "higher_is_better: false}]", *store)
    assert blocked.returncode == 2, blocked.stderr[-3000:]
    assert "not promoted: the winner failed the gate; champion is unchanged" in blocked.stdout
    alone = run_cli("register.criteria=[{metric: val_rmse, threshold: 1, "
                    "higher_is_better: false}]", *store, script="register.py")
    assert alone.returncode == 2, alone.stderr[-3000:]
    assert "not promoted: the winner failed the gate" in alone.stdout
    # The command closed its store: the -wal file is folded into mlflow.db and gone.
    assert sorted(p.name for p in tmp_path.glob("mlflow.db*")) == ["mlflow.db"]
    uri = "models:/expforge-model@champion"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"  # registry follows it
    script = (
        "import sys, mlflow; from sklearn.datasets import load_diabetes\n"
        f"m = mlflow.pyfunc.load_model({uri!r})\n"
        "print(len(m.predict(load_diabetes(as_frame=True).data.head(4))))\n"
        "assert not [k for k in sys.modules if k.startswith('expforge')]\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], env=env, cwd="/",
                            capture_output=True, text=True, timeout=120, check=False)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "4", loaded.stderr[-2000:]

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs uvicorn from PATH
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    mlflow_bin = str(Path(bin_dir) / "mlflow")
    server = subprocess.Popen(
        [mlflow_bin, "models", "serve", "-m", uri, "--env-manager", "local", "-p", str(port),
         "-h", "127.0.0.1"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=120)
        from sklearn.datasets import load_diabetes

        rows = load_diabetes(as_frame=True).data.head(2)
        body = json.dumps({"dataframe_split": rows.to_dict(orient="split")}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
        assert len(answer["predictions"]) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_two_register_commands_at_once_give_one_version(tmp_path: Path) -> None:
    """Two `register.py` started together on the same runs (two CI jobs, say) end on one
    version holding the alias, and both exit 0."""
    from expforge.config import to_plain

    from .conftest import ROOT, compose

    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
             f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]
    run_one(to_plain(compose(*store[:2], "model=linear")), log_plots=False)
    c = client(store[0].split("=", 1)[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for pair in range(3):
        name = f"race-{pair}"
        commands = [subprocess.Popen(
            [sys.executable, str(ROOT / "register.py"), *store, f"register.model_name={name}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
        for command in commands:
            _, err = command.communicate(timeout=120)
            assert command.returncode == 0, err[-2000:]
            assert "Traceback" not in err
        versions = c.search_model_versions(f"name = '{name}'")
        assert [v.version for v in versions] == [
            c.get_model_version_by_alias(name, "champion").version], pair
