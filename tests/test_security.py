from __future__ import annotations

from pathlib import Path

import pytest

from expforge.errors import ConfigError
from expforge.runner import run_one
from expforge.search import run_search

from .conftest import client, run_cli


def test_secrets_are_masked_in_params_tags_artifacts_and_console(tmp_path: Path) -> None:
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
             f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]
    done = run_cli("model=linear", "+data.password=hunter2", "+tracking.tags.api_key=k-123",
                   "+notes.warehouse=postgresql://alice:s3cret@db.example/prod",
                   "+notes.credentials=c-456", *store)
    assert done.returncode == 0, done.stderr[-2000:]
    for text in (done.stdout, done.stderr):
        assert "hunter2" not in text and "s3cret" not in text and "k-123" not in text
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("expforge").experiment_id])
    params, tags = run.data.params, run.data.tags
    assert params["data.password"] == "***" and params["notes.credentials"] == "***"
    assert params["notes.warehouse"] == "postgresql://alice:***@db.example/prod"
    assert tags["api_key"] == "***" and params["tracking.tags.api_key"] == "***"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    artifact = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    overrides = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/overrides.yaml")
    for text in (artifact, overrides, str(params), str(tags)):
        assert "hunter2" not in text and "s3cret" not in text and "k-123" not in text \
            and "c-456" not in text


def test_blocked_targets_name_the_setting_that_allows_them(plain, tmp_path: Path) -> None:
    cfg = plain("model=rf")
    cfg["model"]["regressor"]["_target_"] = "os.system"
    with pytest.raises(ConfigError, match=r"model.regressor._target_=os.system is not an "
                                          r"allowed target.*security.allowed_targets"):
        run_one(cfg)
    cfg = plain("search=optuna", f"search.storage={tmp_path}/s.journal")
    cfg["search"]["pruner"] = {"_target_": "subprocess.call", "args": "id"}
    with pytest.raises(ConfigError, match=r"search.pruner._target_=subprocess.call is not an "
                                          r"allowed target"):
        run_search(cfg)
    # a prefix the user allows on purpose is instantiated
    cfg = plain("model=rf", "model.n_estimators=5", "security.allowed_targets=[sklearn.]")
    cfg["security"]["allowed_targets"] = ["sklearn.ensemble.ExtraTrees"]
    cfg["model"]["regressor"]["_target_"] = "sklearn.ensemble.ExtraTreesRegressor"
    _, model = run_one(cfg, log_model=False, log_plots=False)
    assert type(model.steps[-1][1]).__name__ == "ExtraTreesRegressor"
