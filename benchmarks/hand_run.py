"""The minimal script a user writes by hand for `python run.py` (default dataset and model):
fit the same random forest and log the same kind of run (params, metrics, model)."""

from __future__ import annotations

import math
import sys

import mlflow
from sklearn.datasets import load_diabetes
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("hand-run")
X, y = load_diabetes(return_X_y=True, as_frame=True)
X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=0.25,
                                                  random_state=42)
params = {"n_estimators": 100, "max_features": 1.0, "min_samples_leaf": 1}
with mlflow.start_run():
    model = RandomForestRegressor(**params, n_jobs=-1, random_state=42).fit(X_train, y_train)
    mlflow.log_params(params)
    for split, (Xs, ys) in {"train": (X_train, y_train), "val": (X_val, y_val),
                            "test": (X_test, y_test)}.items():
        pred = model.predict(Xs)
        mlflow.log_metrics({f"{split}_rmse": math.sqrt(mean_squared_error(ys, pred)),
                            f"{split}_mae": mean_absolute_error(ys, pred),
                            f"{split}_r2": r2_score(ys, pred)})
    # skops (the default format) refuses tree models unless their Tree type is trusted.
    mlflow.sklearn.log_model(model, name="model", input_example=X_train.head(5),
                             skops_trusted_types=["sklearn.tree._tree.Tree"])
