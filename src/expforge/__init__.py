"""expforge: Hydra configs in, complete MLflow runs, Optuna studies and registered models out."""

from __future__ import annotations

import gc

__all__ = ["__version__", "start_up_done"]

__version__ = "0.1.0"


def start_up_done() -> None:
    """The command's start-up is over: its work begins (a study's data, a run's fit).

    ``run.py`` imports with the garbage collector off: its full collections walk the whole
    growing heap again and again (~0.5 s of a study's 3 s start-up). Here what was loaded so
    far is frozen out of the collector's walks (a full collection during the trials stalled
    them up to 0.15 s), and the collector resumes. The few thousand dead objects of the
    start-up stay (a collection first would cost 0.2 s): a study calls this before it loads
    its data, which it keeps for many trials; a single run, which ends after its fit, calls
    it at the fit. Where the collector runs (expforge used as a library), nothing changes.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
