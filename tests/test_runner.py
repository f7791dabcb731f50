from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expforge.errors import ModelError
from expforge.runner import RunContext, run_one

from .conftest import client

MODELS = ("rf", "xgb", "linear", "hgb")
DATASETS = {
    "diabetes": ("val_rmse", {"val_rmse", "val_mae", "val_r2", "test_rmse", "train_rmse"}),
    "breast_cancer": ("val_log_loss", {"val_accuracy", "val_f1", "val_roc_auc", "val_log_loss"}),
    "wine": ("val_log_loss", {"val_accuracy", "val_f1", "val_roc_auc", "test_log_loss"}),
}
SMALL = {"rf": ["model.n_estimators=20"], "xgb": ["model.n_estimators=20"],
         "hgb": ["model.max_iter=20"], "linear": []}


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("model", MODELS)
def test_every_model_on_every_task_is_recorded(plain, store, model: str, data: str) -> None:
    cfg = plain(f"model={model}", f"data={data}", "+tracking.tags.developer=alice",
                *SMALL[model])
    ctx = RunContext(choices={"model": model, "data": data}, overrides=[f"model={model}"])
    result, _ = run_one(cfg, ctx, log_plots=(data != "diabetes" or model == "rf"))
    objective, expected = DATASETS[data]
    run = client(store["uri"]).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert result.objective.metric == objective
    assert result.value == pytest.approx(run.data.metrics[objective])
    assert expected <= set(run.data.metrics) and "fit_time_s" in run.data.metrics
    params = run.data.params
    assert params["data.name"] == data and params["model.name"] == model and params["seed"] == "42"
    if model == "rf":
        assert params["model.n_estimators"] == "20"
    tags = run.data.tags
    assert tags["model"] == model and tags["data"] == data and tags["developer"] == "alice"
    assert tags["mlflow.runName"] == f"{model}-{data}"
    assert len(tags["config_hash"]) == 16 and len(tags["dataset_digest"]) == 16
    assert "mlflow.source.git.commit" in tags or not (Path(cfg["paths"]["root"]) / ".git").exists()
    assert tags["versions.scikit-learn"] and tags["versions.python"]
    inputs = run.inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"train", "val", "test"}
    assert contexts["train"].digest.startswith(tags["dataset_digest"])
    assert json.loads(contexts["val"].profile)["num_rows"] > 0
    artifacts = {a.path for a in client(store["uri"]).list_artifacts(result.run_id)}
    assert {"config.yaml", "overrides.yaml"} <= artifacts
    if data != "diabetes" or model == "rf":
        plots = {a.path for a in client(store["uri"]).list_artifacts(result.run_id, "plots")}
        want = ({"plots/predicted_vs_actual.png", "plots/residuals.png"} if data == "diabetes"
                else {"plots/confusion_matrix.png", "plots/roc.png"})
        assert want <= plots
        if model != "hgb":  # HistGradientBoosting has no importances
            assert "plots/feature_importance.png" in plots
    logged = client(store["uri"]).search_logged_models(
        experiment_ids=[result.experiment_id],
        filter_string=f"source_run_id = '{result.run_id}'",
    )
    assert len(logged) == 1 and result.model_uri == f"models:/{logged[0].model_id}"


def test_long_param_values_are_truncated_with_marker(plain, store) -> None:
    cfg = plain("model=linear", "+tracking.tags.note=x")
    cfg["notes"] = "x" * 7000
    result, _ = run_one(cfg, log_model=False, log_plots=False)
    value = client(store["uri"]).get_run(result.run_id).data.params["notes"]
    assert len(value) <= 6000 and value.endswith("[truncated; see config.yaml]")


def test_unknown_hyperparameter_fails_before_any_run(plain, store) -> None:
    cfg = plain("model=rf", "+model.max_dept=3")
    with pytest.raises(ModelError, match=r"model.max_dept=3 is not a parameter of "
                                         r"RandomForestRegressor.*max_depth"):
        run_one(cfg)


def test_rejected_hyperparameter_ends_the_run_failed(plain, store) -> None:
    cfg = plain("model=rf", "model.max_depth=-1")
    with pytest.raises(ModelError, match=r"model.max_depth=-1 is rejected by model=rf"):
        run_one(cfg)
    runs = client(store["uri"]).search_runs(
        [client(store["uri"]).get_experiment_by_name(cfg["tracking"]["experiment"])
         .experiment_id]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "max_depth" in runs[0].data.tags["error"]


def test_autolog_switch_logs_without_duplicate_params(plain, store) -> None:
    """MLflow's autologging for the run only: the caller's own (a notebook's) is given back
    as it was, and what was off stays off."""
    import mlflow
    from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS, autologging_is_disabled

    cfg = plain("model=rf", "model.n_estimators=10", "tracking.autolog=true",
                "tracking.log_plots=false")
    mlflow.sklearn.autolog(log_models=False, silent=True)
    try:
        result, _ = run_one(cfg)
        assert not autologging_is_disabled("sklearn")
        assert AUTOLOGGING_INTEGRATIONS["sklearn"]["log_models"] is False
        assert autologging_is_disabled("xgboost")
        # a fit that fails inside the autologged block gives everything back as well
        with pytest.raises(ModelError, match=r"model\.max_depth=-1 is rejected"):
            run_one({**cfg, "model": {**cfg["model"], "max_depth": -1}})
        assert not autologging_is_disabled("sklearn") and mlflow.active_run() is None
        assert AUTOLOGGING_INTEGRATIONS["sklearn"]["log_models"] is False
    finally:
        mlflow.sklearn.autolog(disable=True, silent=True)
    run = client(store["uri"]).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "model.n_estimators" in run.data.params  # ours
    assert any(k.startswith("training_") for k in run.data.metrics)  # autolog's

    # the caller's mlflow.autolog(), which configures every integration, is given back too
    # (as in a fresh notebook: mlflow.autolog() leaves an integration configured before alone)
    AUTOLOGGING_INTEGRATIONS.pop("sklearn", None)
    mlflow.autolog(log_models=False, silent=True)
    try:
        assert AUTOLOGGING_INTEGRATIONS["sklearn"]["globally_configured"] is True
        run_one(cfg)
        assert AUTOLOGGING_INTEGRATIONS["sklearn"]["globally_configured"] is True
        assert AUTOLOGGING_INTEGRATIONS["sklearn"]["log_models"] is False
        assert not autologging_is_disabled("sklearn")
    finally:
        mlflow.autolog(disable=True, silent=True)


def test_logged_models_predict_raw_rows_in_a_fresh_process(plain, store, taxi_files) -> None:
    regression, _ = run_one(plain("model=xgb", "model.n_estimators=10"),
                            log_plots=False)
    taxi, _ = run_one(plain("model=rf", "model.n_estimators=10", "data=nyc_taxi",
                            *(f"data.{k}_path={v}" for k, v in taxi_files.items())),
                      log_plots=False)
    script = f"""
import sys, mlflow, pandas as pd
from sklearn.datasets import load_diabetes
mlflow.set_tracking_uri({store['uri']!r})
rows = load_diabetes(as_frame=True).data.head(3)
print(len(mlflow.pyfunc.load_model({regression.model_uri!r}).predict(rows)))
taxi = pd.DataFrame({{"trip_distance": [1.5, 7.0], "PU_DO": ["3_7", "999_1"]}})
print(len(mlflow.pyfunc.load_model({taxi.model_uri!r}).predict(taxi)))
assert not [m for m in sys.modules if m.startswith("expforge")], "expforge was imported"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180, check=False, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[:2] == ["3", "2"]
