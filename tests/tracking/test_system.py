"""``tracking.system_metrics=true``: every run records the machine's CPU and memory use through
MLflow's system-metrics monitor, a run shorter than its sampling interval too; off by
default."""

from __future__ import annotations

from pathlib import Path

import expforge

from ..conftest import client, run_cli

SYSTEM = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


def test_every_run_of_a_single_run_and_a_study_records_system_metrics(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = [f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path}/art",
             "tracking.log_plots=false"]
    quiet = expforge.run([*store, "model=linear"])
    single = expforge.run([*store, "model=linear", "tracking.system_metrics=true"])
    # Studies through the CLI: runs written by the writer process, and by two workers each
    # writing its own.
    for name, how in (("by-writer", []), ("inline", ["search.n_workers=2",
                                                     "tracking.writer=inline"])):
        done = run_cli("search=optuna", "model=linear", "search.n_trials=3",
                       "search.plots=false", "tracking.system_metrics=true", *how,
                       f"search.storage={tmp_path}/{name}.journal", *store,
                       f"paths.outputs={tmp_path}/out")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "system metrics" not in done.stdout + done.stderr  # MLflow's lines: not shown

    c = client(uri)
    assert not [k for k in c.get_run(quiet.run_id).data.metrics if k.startswith("system/")]
    study = [r for r in c.search_runs([single.experiment_id])
             if r.info.run_id not in (quiet.run_id, single.run_id)]
    assert len(study) == 8  # each study's parent and three trials
    for run in [c.get_run(single.run_id), *study]:
        assert run.info.status == "FINISHED"
        for key in SYSTEM:
            assert run.data.metrics.get(key, -1) >= 0, (run.info.run_name, key)
    assert c.get_run(single.run_id).data.metrics[SYSTEM[1]] > 0
