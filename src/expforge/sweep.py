"""Hydra callback: one MLflow parent run per multirun sweep, made before any job starts.

``on_multirun_start`` creates the store schema, the experiment and the sweep's parent run once,
in the launching process, so parallel jobs (joblib, submitit) never race on them; the parent's
id reaches every job through the environment, which launchers pass on to their processes.
``on_multirun_end`` puts a table of every job's metrics and the best job on the parent, and
registers the winner when ``register.enabled=true``.
"""

from __future__ import annotations

import atexit
import math
import os
import time
from collections import defaultdict
from typing import Any

from hydra.experimental.callback import Callback

__all__ = ["ENV_PARENT", "SweepParent"]

ENV_PARENT = "EXPFORGE_SWEEP_PARENT_RUN_ID"


def _section(config: Any, key: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    node = OmegaConf.select(config, key)
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}  # type: ignore


class SweepParent(Callback):
    """Registered in ``conf/config.yaml`` under ``hydra.callbacks``."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from expforge.cli import guarded

        guarded(lambda: self._start(config))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from expforge.cli import guarded

        guarded(lambda: self._end(config))

    def _start(self, config: Any) -> None:
        import mlflow

        from expforge.config import mask_overrides
        from expforge.tracking import TrackingSettings, connect

        tracking = TrackingSettings.from_config(_section(config, "tracking"))
        experiment_id = connect(tracking)
        overrides = [str(o) for o in config.hydra.overrides.task]
        name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        run = mlflow.MlflowClient(tracking.uri).create_run(
            experiment_id,
            run_name=name,
            tags={"expforge.role": "sweep", "hydra.overrides": " ".join(mask_overrides(overrides)),
                  **tracking.tags},
        )
        os.environ[ENV_PARENT] = run.info.run_id
        # A failing job or Ctrl-C ends a sweep without on_multirun_end: never leave it RUNNING.
        atexit.register(self._abandon, config)

    def _abandon(self, config: Any) -> None:
        if os.environ.get(ENV_PARENT):
            self._end(config, aborted=True)

    def _end(self, config: Any, aborted: bool = False) -> None:
        import mlflow

        parent_id = os.environ.pop(ENV_PARENT, None)
        if not parent_id:
            return
        atexit.unregister(self._abandon)
        tracking = _section(config, "tracking")
        client = mlflow.MlflowClient(tracking["uri"])
        parent = client.get_run(parent_id)
        jobs = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
        import pandas as pd

        rows = []
        for r in jobs:
            row = {"run_id": r.info.run_id, "run_name": r.info.run_name,
                   "status": r.info.status,
                   **{k: r.data.tags[k] for k in ("model", "data") if k in r.data.tags},
                   **dict(sorted(r.data.metrics.items()))}
            rows.append(row)
        if rows:
            client.log_text(parent_id, pd.DataFrame(rows).to_csv(index=False), "jobs.csv")
        best = _best_jobs(jobs)
        for metric, run in best.items():
            suffix = "" if len(best) == 1 else f".{metric}"  # jobs of different tasks
            client.set_tag(parent_id, f"best_run_id{suffix}", run.info.run_id)
            client.set_tag(parent_id, f"best_run_name{suffix}", run.info.run_name)
            client.log_metric(parent_id, f"best_{metric}", _value(run, metric))
        failed = aborted or any(r.info.status != "FINISHED" for r in jobs)
        client.set_terminated(parent_id, "FAILED" if failed or not jobs else "FINISHED")
        register = _section(config, "register")
        if register.get("enabled") and jobs and not aborted:
            from expforge.cli import register_after

            register_after({"register": register, "tracking": tracking,
                            "paths": _section(config, "paths")}, parent_id)


def _objective_metric(run: Any) -> str:
    return str(run.data.tags.get("objective.metric", ""))


def _value(run: Any, metric: str) -> float:
    key = f"best_{metric}" if run.data.tags.get("expforge.role") == "study" else metric
    value = float(run.data.metrics.get(key, math.nan))
    return math.inf if math.isnan(value) else value


def _best_jobs(jobs: list[Any]) -> dict[str, Any]:
    """The best finished job per objective metric (one entry unless tasks were mixed)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for r in jobs:
        if r.info.status == "FINISHED" and _objective_metric(r):
            groups[_objective_metric(r)].append(r)
    best = {}
    for metric, runs in groups.items():
        sign = 1.0 if runs[0].data.tags.get("objective.direction") != "maximize" else -1.0
        best[metric] = min(runs, key=lambda r: sign * _value(r, metric))
    return best
