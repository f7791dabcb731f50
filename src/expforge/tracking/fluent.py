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
from contextlib import contextmanager, nullcontext
from typing import Any

__all__ = ["autologging_switched", "kept"]

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
    if before is not None:
        _set_fluent_state(None, None, None, [])
    try:
        # Without MLflow loaded, the caller cannot have turned its autologging on.
        with autologging_switched(False) if before is not None else nullcontext():
            yield
    finally:
        if "mlflow" in sys.modules:
            _set_fluent_state(*(before or (None, None, None, [])))
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def autologging_switched(on: bool) -> Iterator[None]:
    """MLflow's autologging of every integration on or off for the block, as it was after.

    The switch is MLflow's private global (its own ``disable_autologging`` context does
    not give back an earlier off). It also covers the integrations that an import during
    the block turns on (``mlflow.autolog()`` hooks the import of xgboost, say), which
    turning each integration off would miss. It is the process's: other threads of the
    caller log nothing either for the block."""
    from mlflow.utils import autologging_utils

    before = autologging_utils._AUTOLOGGING_GLOBALLY_DISABLED
    autologging_utils._AUTOLOGGING_GLOBALLY_DISABLED = not on
    try:
        yield
    finally:
        autologging_utils._AUTOLOGGING_GLOBALLY_DISABLED = before


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
