"""Committed experiments compose and run in a fast mode; sweeps hang under one parent."""

from __future__ import annotations

from pathlib import Path

import pytest

from expforge.cli import run_job

from .conftest import ROOT, client, compose, run_cli

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


def store_overrides(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]


def test_every_experiment_composes_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    assert {"xgb_breast_cancer", "rf_vs_xgb_diabetes", "nyc_taxi_duration",
            "synthetic_scale"} <= set(EXPERIMENTS)
    monkeypatch.chdir(tmp_path)
    for name in EXPERIMENTS:
        cfg = compose(f"experiment={name}")
        assert cfg.tracking.experiment != "expforge", name  # each has its own experiment
    taxi = compose("experiment=nyc_taxi_duration")
    assert taxi.data.name == "nyc_taxi" and taxi.model.name == "rf"
    assert taxi.register.top_n == 5 and taxi.register.select_by == "test_rmse"
    assert set(taxi.search_space.model) == {"max_depth", "n_estimators", "min_samples_split",
                                            "min_samples_leaf"}
    scale = compose("experiment=synthetic_scale")
    assert scale.data.n_samples == 1_000_000 and scale.model.name == "xgb"


FAST = {
    "xgb_breast_cancer": ["search.n_trials=2", "search_space.model.n_estimators.high=100"],
    "nyc_taxi_duration": ["search.n_trials=3", "search.plots=false"],
    "synthetic_scale": ["search.n_trials=2", "search.n_workers=1", "data.n_samples=3000",
                        "model.n_estimators=20", "search_space.model.n_estimators.high=100"],
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_experiment_runs_in_fast_mode(name: str, tmp_path: Path, taxi_files) -> None:
    extra = [f"search.storage={tmp_path}/s.journal", *FAST[name]]
    if name == "nyc_taxi_duration":
        extra += [f"data.{k}_path={v}" for k, v in taxi_files.items()]
    cfg = compose(f"experiment={name}", *store_overrides(tmp_path), *extra)
    best = run_job(cfg)
    assert best is not None
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    runs = c.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    if cfg.register.enabled:  # both gates (ROC AUC >= 0.95; none for the taxi) pass
        versions = c.search_model_versions(f"name = '{cfg.register.model_name}'")
        assert len(versions) == 1
    if name == "nyc_taxi_duration":  # top-5 re-evaluation on the test month, then registered
        reeval = c.get_experiment_by_name(f"{cfg.tracking.experiment}-best-models")
        assert len(c.search_runs([reeval.experiment_id])) == 3
        (version,) = c.search_model_versions("name = 'nyc-taxi-regressor'")
        assert c.get_model_version_by_alias("nyc-taxi-regressor", "champion").version == \
            version.version


def _sweep_layout(tmp_path: Path, n_jobs: int, experiment: str = "expforge") -> list:
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("expforge.role") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    jobs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(jobs) == n_jobs and {r.info.status for r in runs} == {"FINISHED"}
    assert "jobs.csv" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    best = {k: v for k, v in parent.data.tags.items() if k.startswith("best_run_id")}
    assert best and set(best.values()) <= {r.info.run_id for r in jobs}
    return jobs


def test_committed_comparison_runs_as_a_sweep(tmp_path: Path) -> None:
    done = run_cli("-m", "experiment=rf_vs_xgb_diabetes", "tracking.log_plots=false",
                   *store_overrides(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = _sweep_layout(tmp_path, 2, "diabetes-rf-vs-xgb")
    assert sorted(r.data.tags["model"] for r in jobs) == ["rf", "xgb"]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers_put_every_job_under_one_sweep_parent(tmp_path: Path, launcher: str) -> None:
    extra = (["hydra.launcher.n_jobs=2"] if launcher == "joblib"
             else ["hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"])
    done = run_cli("-m", f"hydra/launcher={launcher}", *extra, "model=linear",
                   "data=diabetes,wine", "tracking.log_plots=false", *store_overrides(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = _sweep_layout(tmp_path, 2)
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = [r for r in c.search_runs([jobs[0].info.experiment_id])
                 if r.data.tags.get("expforge.role") == "sweep"]
    # diabetes (val_rmse) and wine (val_log_loss) are not compared with each other
    assert {"best_run_id.val_rmse", "best_run_id.val_log_loss"} <= set(parent.data.tags)
