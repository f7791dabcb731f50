"""The caller's MLflow fluent state, kept apart from expforge's in-process use of it.

expforge points MLflow's fluent API at its own store (``mlflow.set_tracking_uri``) and makes
its runs the fluent active run where MLflow logs only there (a model, autologging). Called
from a notebook, that would leave the notebook's MLflow pointed at expforge's store, and
collide with a run the notebook has open, and the notebook's own autologging
(``mlflow.autolog()``) would log every fit of expforge's as a run of its own. ``kept`` puts the
caller's state aside for the length of a call and gives it back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["kept"]

_ENVIRONMENT = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_EXPERIMENT_NAME")


@contextmanager
def kept() -> Iterator[None]:
    """For the block: no fluent active run, no experiment set and the caller's autologging
    off (``tracking.autolog=true`` turns expforge's own on, ``models.autologged``);
    afterwards the caller's tracking and registry URIs, the environment variables MLflow
    mirrors them in, the experiment set with ``mlflow.set_experiment``, the active runs and
    the autologging are as they were."""
    environment = {name: os.environ.get(name) for name in _ENVIRONMENT}
    before = _fluent_state() if "mlflow" in sys.modules else None
    autologging = None
    if before is not None:
        _set_fluent_state(None, None, None, [])
        from mlflow.utils import autologging_utils

        # MLflow's own switch for every integration, also those that a later import (of
        # xgboost, say) would turn on; its context manager does not give back a prior True.
        autologging = autologging_utils._AUTOLOGGING_GLOBALLY_DISABLED
        autologging_utils._AUTOLOGGING_GLOBALLY_DISABLED = True
    try:
        yield
    finally:
        if "mlflow" in sys.modules:
            _set_fluent_state(*(before or (None, None, None, [])))
        if autologging is not None:
            from mlflow.utils import autologging_utils

            autologging_utils._AUTOLOGGING_GLOBALLY_DISABLED = autologging
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _fluent_state() -> tuple[Any, Any, Any, list[Any]]:
    """MLflow's own globals (private: its setters resolve and mirror them, so a value read
    back through the public getters would not be the one to give back)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    return (tracking._tracking_uri, registry._registry_uri, fluent._active_experiment_id,
            list(fluent._active_run_stack.get()))


def _set_fluent_state(tracking_uri: Any, registry_uri: Any, experiment_id: Any,
                      active_runs: list[Any]) -> None:
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry

    mlflow.set_tracking_uri(tracking_uri)  # public: it also resets the tracer's store
    registry._registry_uri = registry_uri
    fluent._active_experiment_id = experiment_id
    fluent._active_run_stack.get()[:] = active_runs
