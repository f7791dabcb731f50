"""expforge: Hydra configs in, complete MLflow runs, Optuna studies and registered models out."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
