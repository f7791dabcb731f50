"""The Python API, called in-process as a notebook calls it: twice in one process, with the
caller's working directory, garbage collector and signal handlers left alone."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import pytest

import expforge
from expforge.errors import ConfigError, DataError


def test_run_search_register_and_runs_from_python(tmp_path: Path) -> None:
    """Called inside the notebook's own MLflow run, in another store and experiment, with
    the notebook's autologging on: the notebook's run stays open there, and its tracking URI,
    experiment and environment are as they were after each call; so is Optuna's verbosity,
    and its console handler. Its autologging logs none of expforge's fits, and its own fits
    after."""
    import logging

    import mlflow
    import optuna

    from expforge.process import optuna_verbosity_kept
    from expforge.tracking.fluent import kept

    optuna_handlers = list(logging.getLogger("optuna").handlers)
    with kept(), optuna_verbosity_kept():  # this test's own settings go at its end
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mine.db")
        mlflow.create_experiment("mine", artifact_location=(tmp_path / "mine").as_uri())
        mlflow.set_experiment("mine")
        from mlflow.utils import autologging_utils

        # This test's own kept() turned autologging off, as for an API call; the notebook
        # itself is in no call.
        autologging_utils._AUTOLOGGING_GLOBALLY_DISABLED = False
        # as in a fresh notebook: mlflow.autolog() leaves an integration configured before
        # (by an earlier test of this process) alone
        for integration in ("sklearn", "xgboost"):
            autologging_utils.AUTOLOGGING_INTEGRATIONS.pop(integration, None)
        mlflow.autolog(silent=True)
        with mlflow.start_run(run_name="the notebook's") as mine:
            try:
                _run_search_register_and_runs(tmp_path)
            except BaseException:
                mlflow.autolog(disable=True, silent=True)
                raise
            assert mlflow.active_run().info.run_id == mine.info.run_id
            assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/mine.db"
            assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mine.db"
            mlflow.log_metric("after", 1.0)
        try:
            from sklearn.linear_model import Ridge

            Ridge().fit([[0.0], [1.0], [2.0]], [0.0, 1.0, 2.0])  # the notebook's own fit
        finally:
            mlflow.autolog(disable=True, silent=True)
        autologged = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert [r.data.tags["estimator_name"] for r in autologged
                if "mlflow.autologging" in r.data.tags] == ["Ridge"]
        mine = mlflow.get_run(mine.info.run_id)
        assert mine.info.status == "FINISHED" and mine.data.metrics == {"after": 1.0}
        assert mlflow.get_experiment(mine.info.experiment_id).name == "mine"
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
        assert logging.getLogger("optuna").handlers == optuna_handlers


def _run_search_register_and_runs(tmp_path: Path) -> None:
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
             f"tracking.artifact_root={tmp_path}/art", "tracking.log_plots=false"]
    cwd, gc_on = os.getcwd(), gc.isenabled()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    first = expforge.run([*store, "model=linear"])
    again = expforge.run([*store, "model=linear"])  # a notebook cell run twice
    assert first.run_id != again.run_id
    assert first.metrics["val_rmse"] == again.metrics["val_rmse"]  # same seed, same run
    assert first.objective.metric == "val_rmse" and first.model_uri.startswith("models:/")
    import mlflow

    ours = mlflow.MlflowClient(store[0].split("=", 1)[1]).get_run(first.run_id)
    assert "mlflow.parentRunId" not in ours.data.tags  # not under the notebook's run

    study = expforge.search([*store, "model=rf", "model.n_estimators=5", "search.n_trials=3",
                             "search.plots=false", f"search.storage={tmp_path}/s.journal",
                             "register.enabled=true", "register.model_name=from-python"])
    assert len(study.study.trials) == 3 and study.best_value == study.study.best_value
    assert study.registration.passed and study.registration.version == "1"
    assert set(study.best_params) == {"model.n_estimators", "model.max_depth",
                                      "model.min_samples_leaf", "model.max_features"}

    report = expforge.register([*store, "register.model_name=from-python"])
    assert report.passed and report.version == "1" and not report.created  # already champion

    table = expforge.runs(tracking_uri=store[0].split("=", 1)[1],
                          parent_run_id=study.parent_run_id)
    assert len(table) == 3 and set(table["status"]) == {"FINISHED"}
    assert table["param.model.max_depth"].dtype.kind == "i"  # typed, not strings
    assert {"metric.val_rmse", "tag.optuna.trial_number"} <= set(table.columns)
    everything = expforge.runs(tracking_uri=store[0].split("=", 1)[1],
                               filter="tags.`expforge.role` = 'trial'")
    assert len(everything) == 3
    # the caller's autologging logged no run of its own beside expforge's
    ours = mlflow.MlflowClient(store[0].split("=", 1)[1])
    assert [r.info.run_id for r in ours.search_runs(
        [e.experiment_id for e in ours.search_experiments()])
        if "mlflow.autologging" in r.data.tags] == []

    assert os.getcwd() == cwd and gc.isenabled() == gc_on
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_mistakes_raise_the_commands_one_line(tmp_path: Path) -> None:
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    with pytest.raises(ConfigError, match=r"^model.max_dept=3 names model.max_dept, which is "
                                          r"not a config key; did you mean model.max_depth\?"):
        expforge.run([*store, "model.max_dept=3"])
    with pytest.raises(ConfigError, match=r"^experiment=nope is not an option of the experiment "
                                          r"group"):
        expforge.run([*store, "experiment=nope"])
    with pytest.raises(DataError, match=r"^data\.path=nope\.csv does not exist"):
        expforge.run([*store, "data=tabular", "data.path=nope.csv", "data.target=y"])
    with pytest.raises(ConfigError, match=r"expforge\.search"):
        expforge.run([*store, "search=optuna"])
    with pytest.raises(ConfigError, match=r"has no config\.yaml"):
        expforge.run(config_dir=tmp_path)
