"""Contenders (a) and (b) of the overhead benchmark: the loop a user writes by hand.

    python hand_optuna.py N [--mlflow URI] [--model ridge --sampler random --storage FILE]

(a) without --mlflow: a bare Optuna loop, no tracking (the floor).
(b) with --mlflow: one MLflow run per trial with log_params and log_metric, as the classic
    course homework does. Same data split, model, space and sampler as expforge's run.

``--record-all``: (b) recording per run what an expforge trial's run records (76 params, the
val metrics of three splits, 25 tags, the three splits as dataset inputs, a config.yaml),
with MLflow's fluent API as a user would write it.

``--model ridge --sampler random --storage FILE``: the cheap-trials section's loop, Ridge
(scaled features, as expforge's linear model) with alpha in expforge's range, a seeded
RandomSampler and a journal file, whose trials' start times the benchmark reads.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import optuna
from sklearn.datasets import load_diabetes
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n_trials", type=int)
    parser.add_argument("--mlflow", default=None, help="tracking URI: contender (b)")
    parser.add_argument("--experiment", default="hand-written")
    parser.add_argument("--model", choices=("rf", "ridge"), default="rf")
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    parser.add_argument("--storage", default=None, help="a journal file (default: in memory)")
    parser.add_argument("--record-all", action="store_true")
    args = parser.parse_args()
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    # expforge's split (seed 42, val 0.2, test 0.2, rows kept in file order): the same rows
    # give the same forests and values, so TPE proposes the same trials to every contender.
    rest, _ = train_test_split(np.arange(len(X)), test_size=0.2, random_state=42)
    train, val = (np.sort(i) for i in train_test_split(rest, test_size=0.25, random_state=42))
    X_train, X_val, y_train, y_val = X.iloc[train], X.iloc[val], y.iloc[train], y.iloc[val]
    test = np.setdiff1d(np.arange(len(X)), rest)
    splits = {"train": (X_train, y_train), "val": (X_val, y_val),
              "test": (X.iloc[test], y.iloc[test])}
    if args.mlflow:
        import mlflow

        mlflow.set_tracking_uri(args.mlflow)
        mlflow.set_experiment(args.experiment)
        if args.record_all:
            import yaml

            static = {f"config.section{i // 10}.key{i}": f"value{i}" for i in range(75)}
            tags = {f"tag{i}": f"value-{i}" for i in range(25)}
            datasets = [mlflow.data.from_pandas(Xs.assign(target=ys), name=f"diabetes-{name}")
                        for name, (Xs, ys) in splits.items()]
            config_text = yaml.safe_dump(static)

    def objective(trial: optuna.Trial) -> float:
        model: object
        if args.model == "ridge":
            params: dict[str, float] = {
                "alpha": trial.suggest_float("alpha", 1e-4, 100.0, log=True)}
            model = make_pipeline(StandardScaler(), Ridge(**params))
        else:
            params = {
                "n_estimators": trial.suggest_int("n_estimators", 10, 50),
                "max_depth": trial.suggest_int("max_depth", 1, 20),
                "min_samples_leaf": trial.suggest_int("min_samples_leaf", 1, 4),
            }
            model = RandomForestRegressor(**params, n_jobs=1, random_state=42)
        model.fit(X_train, y_train)  # type: ignore[attr-defined]
        rmse = math.sqrt(mean_squared_error(y_val, model.predict(X_val)))  # type: ignore[attr-defined]
        if args.mlflow and args.record_all:
            metrics = {"fit_time_s": 0.0}
            for name, (Xs, ys) in splits.items():
                pred = model.predict(Xs)  # type: ignore[attr-defined]
                err = np.asarray(ys) - pred
                metrics |= {f"{name}_rmse": float(np.sqrt(np.mean(err**2))),
                            f"{name}_mae": float(np.mean(np.abs(err))),
                            f"{name}_r2": float(1 - np.sum(err**2)
                                                / np.sum((ys - ys.mean()) ** 2))}
            with mlflow.start_run(run_name=f"trial-{trial.number}", tags=tags):
                mlflow.log_params({**static, **params})
                mlflow.log_metrics(metrics)
                mlflow.log_inputs(datasets=datasets, contexts=list(splits),
                                  tags_list=[None] * len(datasets))
                mlflow.log_text(config_text, "config.yaml")
        elif args.mlflow:
            with mlflow.start_run():
                mlflow.log_params(params)
                mlflow.log_metric("val_rmse", rmse)
        return rmse

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.RandomSampler(seed=42) if args.sampler == "random"
               else optuna.samplers.TPESampler(seed=42))
    storage = None
    if args.storage:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(args.storage))
    study = optuna.create_study(sampler=sampler, storage=storage)
    study.optimize(objective, n_trials=args.n_trials)
    print(f"best {study.best_value:.6f} trial {study.best_trial.number} {study.best_params}")


if __name__ == "__main__":
    main()
