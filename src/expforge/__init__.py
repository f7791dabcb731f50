"""expforge: Hydra configs in, complete MLflow runs, Optuna studies and registered models out."""

from __future__ import annotations

import gc

__all__ = ["__version__", "start_up_done"]

__version__ = "0.1.0"


def start_up_done() -> None:
    """The command's start-up is over: its work (a fit, a study's trials) begins.

    ``run.py`` imports and loads with the garbage collector off: its full collections walk
    the whole growing heap again and again (~0.5 s of a study's 3 s start-up). Here what the
    start-up loaded is frozen out of the collector's walks (a full collection during the
    trials stalled them up to 0.15 s), and the collector resumes. Its few thousand dead
    objects stay (a collection first would cost 0.2 s). Where the collector runs (expforge
    used as a library), nothing changes.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
