"""Cross-validation (``cv``): folds from the train and val rows only, each fold's metrics at
its step, the folds' mean as the objective, the model refitted on all the folds' rows; in a
search, each fold's score reported to the pruner as the trial goes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from expforge.cv import STRIDE, CVSettings, folds_of
from expforge.data import load_data
from expforge.metrics import score
from expforge.runner import fitted_model, run_one

from .conftest import client, run_cli
from .search.test_study import load


def _folds(cfg: dict):
    settings = CVSettings.from_config(cfg)
    assert settings is not None
    dataset = load_data(cfg["data"], int(cfg["seed"]), cfg["paths"]["root"],
                        keep=settings.columns())
    return dataset, folds_of(settings, dataset, int(cfg["seed"]))


@pytest.fixture()
def shops(tmp_path: Path) -> Path:
    """A table with a group column (shop) and a date column, neither of them a feature."""
    rng = np.random.default_rng(3)
    n = 160
    frame = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n),
                          "shop": rng.integers(0, 9, n).astype(str),
                          "day": rng.permutation(pd.date_range("2026-01-01", periods=n))})
    frame["y"] = 3 * frame.x1 + rng.normal(size=n)
    path = tmp_path / "shops.csv"
    frame.to_csv(path, index=False)
    return path


def test_a_cross_validated_run_records_its_folds_and_refits(plain, store) -> None:
    cfg = plain("model=linear", "cv=kfold", "cv.folds=3")
    result, model = run_one(cfg)
    c = client(store["uri"])
    run = c.get_run(result.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert result.objective.metric == tags["objective.metric"] == "cv_val_rmse_mean"
    history = {name: [m.value for m in sorted(c.get_metric_history(result.run_id, name),
                                              key=lambda m: m.step)]
               for name in ("val_rmse", "val_r2", "cv_train_rows", "cv_val_rows")}
    assert [m.step for m in c.get_metric_history(result.run_id, "val_rmse")] == [0, 1, 2]
    assert metrics["cv_val_rmse_mean"] == pytest.approx(np.mean(history["val_rmse"]))
    assert metrics["cv_val_rmse_std"] == pytest.approx(np.std(history["val_rmse"]))
    assert metrics["cv_val_r2_mean"] == pytest.approx(np.mean(history["val_r2"]))
    assert result.value == pytest.approx(metrics["cv_val_rmse_mean"])

    # Every train or val row is validated once; no test row is in any fold.
    dataset, folds = _folds(cfg)
    pool = len(dataset.train.y) + len(dataset.val.y)
    assert history["cv_val_rows"] == [float(len(v)) for _, v in folds.indices]
    assert sum(history["cv_val_rows"]) == pool
    assert all(t + v == pool for t, v in zip(history["cv_train_rows"], history["cv_val_rows"],
                                             strict=True))
    validated = np.concatenate([v for _, v in folds.indices])
    assert sorted(validated) == list(range(pool))

    # The logged model is refitted on the train and val rows and scored on the test split.
    refit = fitted_model(cfg, dataset)
    expected, _ = score(refit, dataset, only=("test",))
    assert metrics["test_rmse"] == pytest.approx(expected["test_rmse"])
    assert np.allclose(model.predict(dataset.test.X), refit.predict(dataset.test.X))
    assert result.model_uri is not None
    plots = {a.path for a in c.list_artifacts(result.run_id, "plots")}
    assert "plots/predicted_vs_actual.png" in plots

    # cv.refit=false: the folds' scores only, no model and no test metrics.
    result, model = run_one(plain("model=linear", "cv=kfold", "cv.folds=3", "cv.refit=false"))
    metrics = c.get_run(result.run_id).data.metrics
    assert model is None and result.model_uri is None
    assert "cv_val_rmse_mean" in metrics and not any(k.startswith("test_") for k in metrics)


def test_each_strategy_draws_its_folds(plain, shops: Path) -> None:
    table = ["data=tabular", f"data.path={shops}", "data.target=y",
             "data.features.numeric=[x1,x2]"]
    frame = pd.read_csv(shops)

    _, folds = _folds(plain("data=breast_cancer", "cv=kfold", "cv.folds=4"))
    y = folds.pool.y.to_numpy()
    shares = [y[v].mean() for _, v in folds.indices]  # stratified: the class share holds
    assert max(shares) - min(shares) < 0.02

    _, folds = _folds(plain("cv=repeated", "cv.folds=3", "cv.repeats=2"))
    assert len(folds) == 6
    first, second = ([sorted(v[:5]) for _, v in folds.indices[r * 3:r * 3 + 3]] for r in (0, 1))
    assert first != second  # another shuffle per repeat

    _, folds = _folds(plain(*table, "cv=group", "cv.groups=shop", "cv.folds=3"))
    shop = folds.pool.meta["shop"].to_numpy()
    for fit, val in folds.indices:
        assert not set(shop[fit]) & set(shop[val])

    _, folds = _folds(plain(*table, "cv=time", "cv.order_by=day", "cv.folds=3"))
    day = pd.to_datetime(folds.pool.meta["day"])
    for fit, val in folds.indices:
        assert day.iloc[fit].max() < day.iloc[val].min()
    # ... and in the file's row order without cv.order_by
    _, folds = _folds(plain(*table, "cv=time", "cv.folds=3"))
    rows = folds.pool.meta["__row__"].to_numpy()
    for fit, val in folds.indices:
        assert rows[fit].max() < rows[val].min()
    assert set(rows) <= set(range(len(frame)))

    _, folds = _folds(plain("cv=splitter",
                            "cv.splitter._target_=sklearn.model_selection.ShuffleSplit",
                            "cv.splitter.n_splits=4", "~cv.splitter.shuffle",
                            "+cv.splitter.test_size=0.25"))
    assert len(folds) == 4 and all(len(v) == pytest.approx(len(folds.pool.y) / 4, abs=1)
                                   for _, v in folds.indices)
    # A splitter that cannot be built, or is none, is one line naming the key.
    from expforge.errors import ConfigError

    for change, says in [
        (["cv.splitter._target_=sklearn.model_selection.Nope"], "Nope cannot be built"),
        (["+cv.splitter.bogus=3"], "KFold cannot be built (KFold.__init__() got an"),
        (["cv.splitter.n_splits=1"], "KFold cannot be built (k-fold cross-validation"),
        (["cv.splitter._target_=sklearn.preprocessing.StandardScaler",
          "~cv.splitter.n_splits", "~cv.splitter.shuffle", "~cv.splitter.random_state"],
         "StandardScaler is not a splitter"),
    ]:
        with pytest.raises(ConfigError, match=r"^cv\.splitter\._target_=\S*" + re.escape(says)):
            _folds(plain("cv=splitter", *change))


def test_boosting_reports_rounds_within_folds_and_each_folds_score(plain) -> None:
    """A step-based pruner sees each fold's rounds and then its score, at steps that are the
    same point of every trial."""
    import optuna

    from expforge.search.trial import TrialReporter

    cfg = plain("model=xgb", "model.n_estimators=30", "cv=kfold", "cv.folds=2")
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    reporter = TrialReporter(trial, "val_rmse", 10)
    result, _ = run_one(cfg, reporter=reporter, stop_early=(optuna.TrialPruned,),
                        log_model=False, log_plots=False)
    steps = sorted(study.trials[0].intermediate_values)
    assert steps == [10, 20, 30, STRIDE, STRIDE + 10, STRIDE + 20, STRIDE + 30, 2 * STRIDE]
    folds = [study.trials[0].intermediate_values[s] for s in (STRIDE, 2 * STRIDE)]
    assert np.mean(folds) == pytest.approx(result.value)


def _search(tmp_path: Path, *args: str):
    done = run_cli("search=optuna", "model=linear", "search.plots=false",
                   "search.sampler._target_=optuna.samplers.RandomSampler",
                   f"search.storage={tmp_path}/cv.journal", "search.study_name=cv",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out",
                   *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return load(tmp_path / "cv.journal", "cv"), client(f"sqlite:///{tmp_path}/mlflow.db")


def test_a_3_fold_search_prunes_a_hopeless_trial_after_its_first_fold(tmp_path: Path) -> None:
    key = "model.regressor.alpha"
    study, c = _search(tmp_path, "cv=kfold", "cv.folds=3", "search.n_trials=3",
                       "+search.pruner.n_startup_trials=2",
                       f"search.enqueue=[{{{key}: 0.01}}, {{{key}: 0.1}}, {{{key}: 100}}]")
    good, better, hopeless = study.trials
    assert good.state.name == better.state.name == "COMPLETE"
    assert sorted(good.intermediate_values) == [1, 2, 3]
    assert good.value == pytest.approx(np.mean(list(good.intermediate_values.values())))
    assert hopeless.state.name == "PRUNED" and list(hopeless.intermediate_values) == [1]
    run = c.get_run(hopeless.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pruned"] == "true" and run.data.tags["pruned_fold"] == "0"
    assert len(c.get_metric_history(run.info.run_id, "val_rmse")) == 1  # the fold it did
    assert "cv_val_rmse_mean" not in run.data.metrics  # no mean of an unfinished run
    parent = c.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["best_cv_val_rmse_mean"] == pytest.approx(
        min(good.value, better.value))


def test_wilcoxon_pruner_compares_trials_fold_by_fold(tmp_path: Path) -> None:
    """WilcoxonPruner through ``search.pruner._target_``: one value per fold of 3 x 2
    repeated folds; a config worse on every fold stops after 4 (its first chance)."""
    key = "model.classifier.C"
    study, _ = _search(tmp_path, "data=breast_cancer", "cv=repeated", "cv.folds=3",
                       "cv.repeats=2", "search.n_trials=2",
                       "search.pruner._target_=optuna.pruners.WilcoxonPruner",
                       f"search.enqueue=[{{{key}: 1.0}}, {{{key}: 0.001}}]")
    best, worse = study.trials
    assert best.state.name == "COMPLETE" and sorted(best.intermediate_values) == [1, 2, 3, 4,
                                                                                  5, 6]
    assert worse.state.name == "PRUNED" and sorted(worse.intermediate_values) == [1, 2, 3, 4]
