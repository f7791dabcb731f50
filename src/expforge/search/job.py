"""What every step of a search shares: the job, and the names it keeps on Optuna's trials.

The bottom of the package: it imports none of the steps above it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from expforge.data import Dataset
from expforge.runner import RunContext
from expforge.search.settings import SearchSettings
from expforge.search.space import Param, apply_params
from expforge.tracking import Store, TrackingSettings

__all__ = ["HOST_ATTR", "METRICS_ATTR", "PARENT_ATTR", "PID_ATTR", "PURPOSE_ATTR", "RUN_ATTR",
           "SKIPPED_ATTR", "STOP_ATTR", "STUDY_ROLE", "Job"]

STUDY_ROLE = "study"  # the parent run's expforge.role
RUN_ATTR = "mlflow_run_id"  # a trial's run, as optuna-integration names it
PARENT_ATTR = "mlflow_parent_run_id"  # the study's parent run
PID_ATTR = "expforge.pid"  # the process that runs the trial ...
HOST_ATTR = "expforge.host"  # ... on this host
SKIPPED_ATTR = "expforge.skipped"  # a trial asked for after the budget was spent
METRICS_ATTR = "expforge.metrics"  # all of a trial's metrics, to write a lost run again
PURPOSE_ATTR = "expforge.created_for"  # the study's model, space and objective
STOP_ATTR = "expforge.stopped"  # the rule that stopped the study last, and its settings


@dataclass
class Job:
    """Everything a worker needs; inherited by forked workers, sent to spawned ones."""

    plain: Mapping[str, Any]
    context: RunContext
    dataset: Dataset
    settings: SearchSettings
    params: list[Param]
    tracking: TrackingSettings
    store: Store  # this process's (a writer process's client, or its own)
    parent_run_id: str = ""
    experiment_id: str = ""
    sweep_parent_run_id: str | None = None
    deadline: float = math.inf  # time.time() when search.timeout ends: the same in each worker

    @property
    def model_name(self) -> str:
        return str(self.plain["model"].get("name", "model"))

    def trial_config(self, number: int, chosen: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved config of trial ``number``: the study's, with the trial's values."""
        cfg = apply_params(self.plain, chosen)
        cfg["tracking"]["run_name"] = f"{self.settings.study_name}-trial-{number}"
        return cfg
