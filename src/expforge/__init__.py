"""expforge: Hydra configs in, complete MLflow runs, Optuna studies and registered models out.

From Python: ``expforge.run``, ``expforge.search``, ``expforge.register``, ``expforge.runs``
(``expforge.api``). Importing expforge loads none of MLflow, Optuna or scikit-learn.
"""

from __future__ import annotations

from expforge.api import StudyResult, register, run, runs, search

__all__ = ["StudyResult", "__version__", "register", "run", "runs", "search"]

__version__ = "0.1.0"
