"""python run.py [overrides]: one run, one job of a multirun, or an Optuna study.

Kept thin on purpose: `--help` and config errors must not pay for importing MLflow.
"""

from __future__ import annotations

import gc

gc.disable()  # until the start-up is over (see expforge.process.start_up_done)

from pathlib import Path

import hydra
from omegaconf import DictConfig

from expforge.config import register_resolvers

ROOT = Path(__file__).resolve().parent
register_resolvers(ROOT)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from expforge.cli import run_job

    return run_job(cfg)


if __name__ == "__main__":
    import sys

    from expforge.cli import app_help, precheck
    from expforge.process import exit_status, freeze_at_exit

    if not app_help(sys.argv[1:], ROOT, "config", "run"):
        freeze_at_exit()
        precheck(sys.argv[1:], ROOT, "config")
        main()
        sys.exit(exit_status())
