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

from expforge.config import mask_overrides
from expforge.metrics import ranking_key
from expforge.process import guarded
from expforge.tracking import RunRecord, TrackingSettings, open_store, queries, reader

__all__ = ["ENV_PARENT", "SweepParent"]

ENV_PARENT = "EXPFORGE_SWEEP_PARENT_RUN_ID"


def _section(config: Any, key: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    node = OmegaConf.select(config, key)
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}  # type: ignore


class SweepParent(Callback):
    """Registered in ``conf/config.yaml`` under ``hydra.callbacks``."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        guarded(lambda: self._start(config))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        guarded(lambda: self._end(config))

    def _start(self, config: Any) -> None:
        tracking = TrackingSettings.from_config(_section(config, "tracking"))
        store = open_store(tracking)
        experiment_id = store.connect(tracking)
        overrides = [str(o) for o in config.hydra.overrides.task]
        tags = {"expforge.role": "sweep", "hydra.overrides": " ".join(mask_overrides(overrides)),
                **tracking.tags}
        created = store.create_run(experiment_id, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags)
        os.environ[ENV_PARENT] = store.wait(created)
        # A failing job or Ctrl-C ends a sweep without on_multirun_end: never leave it RUNNING.
        atexit.register(self._abandon, config)

    def _abandon(self, config: Any) -> None:
        if os.environ.get(ENV_PARENT):
            self._end(config, aborted=True)

    def _end(self, config: Any, aborted: bool = False) -> None:
        parent_id = os.environ.pop(ENV_PARENT, None)
        if not parent_id:
            return
        atexit.unregister(self._abandon)
        tracking = TrackingSettings.from_config(_section(config, "tracking"))
        client = reader(tracking.uri)
        parent = client.get_run(parent_id)
        jobs = queries.child_runs(client, parent.info.experiment_id, parent_id)
        record = RunRecord(parent_id)
        if jobs:
            import pandas as pd

            rows = [{"run_id": r.info.run_id, "run_name": r.info.run_name,
                     "status": r.info.status,
                     **{k: r.data.tags[k] for k in ("model", "data") if k in r.data.tags},
                     **dict(sorted(r.data.metrics.items()))} for r in jobs]
            record.texts["jobs.csv"] = pd.DataFrame(rows).to_csv(index=False)
        best = _best_jobs(jobs)
        for metric, run in best.items():
            suffix = "" if len(best) == 1 else f".{metric}"  # jobs of different tasks
            record.tags[f"best_run_id{suffix}"] = run.info.run_id
            record.tags[f"best_run_name{suffix}"] = run.info.run_name
            record.metrics[f"best_{metric}"] = _value(run, metric)
        failed = aborted or not jobs or any(r.info.status != "FINISHED" for r in jobs)
        record.status = "FAILED" if failed else "FINISHED"
        store = open_store(tracking)
        store.write(record)
        store.close()
        register = _section(config, "register")
        if register.get("enabled") and jobs and not aborted:
            from expforge.registry import register_after

            register_after({"register": register, "tracking": _section(config, "tracking"),
                            "paths": _section(config, "paths")}, parent_id)


def _value(run: Any, metric: str) -> float:
    """A job's objective: its metric, or a study's best value of it."""
    key = f"best_{metric}" if run.data.tags.get("expforge.role") == "study" else metric
    return float(run.data.metrics.get(key, math.nan))


def _best_jobs(jobs: list[Any]) -> dict[str, Any]:
    """The best finished job per objective metric (one entry unless tasks were mixed)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for r in jobs:
        metric = str(r.data.tags.get("objective.metric", ""))
        if r.info.status == "FINISHED" and metric:
            groups[metric].append(r)
    best = {}
    for metric, runs in groups.items():
        direction = str(runs[0].data.tags.get("objective.direction") or "minimize")
        best[metric] = min(runs, key=lambda r: ranking_key(_value(r, metric), direction))
    return best
