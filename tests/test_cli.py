"""``python run.py ...`` as a user types it, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from .conftest import ROOT, client, run_cli


def store_args(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/mlartifacts", f"paths.outputs={tmp_path}/out"]


def all_runs(tmp_path: Path) -> list:
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    ids = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(ids)


def test_default_run_prints_summary_and_records_one_run(tmp_path: Path) -> None:
    """register.enabled=true on a single run registers that run, if it passes the gate."""
    done = run_cli(*store_args(tmp_path), "model.n_estimators=20", "register.enabled=true",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val_rmse" in done.stdout and "open the UI: mlflow ui --backend-store-uri" in \
        done.stdout
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert f"winner: run {run.info.run_id}" in done.stdout
    assert "registered expforge-model version 1; champion -> v1" in done.stdout
    assert run.data.tags["model"] == "rf" and run.data.tags["data"] == "diabetes"
    assert run.info.run_id in done.stdout
    # artifacts sit beside the store, not in the working directory or the Hydra folder
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)
    assert not (tmp_path / "mlruns").exists()


def test_two_model_multirun_gives_one_run_per_job(tmp_path: Path) -> None:
    done = run_cli("-m", "model=linear,xgb", "data=wine", "tracking.log_plots=false",
                   *store_args(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = all_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("expforge.role") == "sweep"]
    jobs = [r for r in runs if r is not parent]
    assert sorted(r.data.tags["model"] for r in jobs) == ["linear", "xgb"]
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_help_and_cfg_job_behave_as_in_hydra(tmp_path: Path) -> None:
    done = run_cli("--help")
    assert done.returncode == 0 and "model: hgb, linear, rf, xgb" in done.stdout
    # The fast --help prints exactly what Hydra's own --help prints, overrides applied.
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    for script, args in (("run", ["model=xgb", "--help"]), ("register", ["--help"])):
        ours = run_cli(*args, script=f"{script}.py")
        source = (ROOT / f"{script}.py").read_text()
        plain_hydra = source[:source.index('if __name__ == "__main__":')] + "main()\n"
        (tmp_path / f"{script}.py").write_text(plain_hydra)  # the same app, Hydra's --help
        hydra = subprocess.run([sys.executable, f"{script}.py", *args], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120, check=False)
        assert ours.returncode == hydra.returncode == 0, hydra.stderr
        assert ours.stdout == hydra.stdout
    done = run_cli("--cfg", "job", "model=xgb", "model.max_depth=3")
    assert done.returncode == 0 and "max_depth: 3" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data=tabular", "data.path={csv}", "data.target=label", "data.task=regression"],
         "error: data.target=label is not numeric"),
        (["model.max_depth=-4"], "error: model.max_depth=-4 is rejected by model=rf"),
    ],
    ids=["text-regression", "bad-param"],  # the other rows: tests/test_errors.py
)
def test_bad_input_is_one_line_and_nonzero(tmp_path: Path, args: list[str], message: str) -> None:
    csv = tmp_path / "d.csv"
    pd.DataFrame({"a": range(20), "label": ["x", "y"] * 10}).to_csv(csv, index=False)
    done = run_cli(*(a.format(csv=csv) for a in args), *store_args(tmp_path))
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    if (tmp_path / "mlflow.db").exists():
        assert all(r.info.status != "RUNNING" for r in all_runs(tmp_path))
    if "rejected" in message:
        assert [r.info.status for r in all_runs(tmp_path)] == ["FAILED"]


def test_full_traceback_with_hydra_full_error(tmp_path: Path) -> None:
    done = run_cli("data=tabular", "data.path=missing.csv", "data.target=y",
                   *store_args(tmp_path), env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr
