from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .conftest import client, run_cli


def _store(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]


def test_reproduce_gives_identical_metrics_then_warns_when_data_changed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "houses.csv"
    frame = pd.DataFrame({"size": rng.normal(size=200), "rooms": rng.integers(1, 6, 200),
                          "price": rng.normal(size=200)})
    frame.to_csv(data, index=False)
    args = ["data=tabular", f"data.path={data}", "data.target=price", "model=rf",
            "model.n_estimators=20", "model.n_jobs=1", "tracking.log_plots=false",
            "tracking.reuse=true"]  # recorded in its config: a reproduction trains anyway
    done = run_cli(*args, *_store(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    (original,) = c.search_runs([exp_id])
    assert original.data.tags["versions.scikit-learn"]

    again = run_cli(f"reproduce={original.info.run_id}", *_store(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "identical" in again.stdout and "dataset digest differs" not in again.stdout
    copy = next(r for r in c.search_runs([exp_id])
                if r.data.tags.get("reproduced_from") == original.info.run_id)
    for name, value in original.data.metrics.items():
        if name != "fit_time_s":
            assert copy.data.metrics[name] == value, name

    frame.loc[3, "size"] = 42.0
    frame.to_csv(data, index=False)
    from expforge.config import to_plain
    from expforge.reproduce import reproduce_run

    from .conftest import compose

    current = to_plain(compose(*_store(tmp_path)))
    changed = reproduce_run(original.info.run_id, current)
    assert any(w.startswith("dataset digest differs") for w in changed.warnings)
    assert changed.result.metrics["val_rmse"] != original.data.metrics["val_rmse"]


def test_reproducing_a_study_parent_is_refused_with_its_best_trial(tmp_path: Path) -> None:
    study = ["search=optuna", "model=linear", "search.n_trials=2", "search.plots=false",
             f"search.storage={tmp_path}/s.journal"]
    assert run_cli(*study, *_store(tmp_path)).returncode == 0
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    (parent,) = c.search_runs([exp_id], "tags.`expforge.role` = 'study'")
    best = parent.data.tags["best_run_id"]
    done = run_cli(f"reproduce={parent.info.run_id}", *_store(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: reproduce={parent.info.run_id} is the parent run of a study, not a run that "
        f"trained a model; give reproduce=<a child run id> (the best: reproduce={best}), or "
        "run the study's command again to repeat it"]
    assert len(c.search_runs([exp_id])) == 3  # nothing trained
