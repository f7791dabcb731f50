"""python register.py [overrides]: register the best model of a search or sweep.

    python register.py                                   # latest search/sweep, alias champion
    python register.py register.parent_run_id=<id> register.top_n=5 register.select_by=test_rmse
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from expforge.config import register_resolvers

ROOT = Path(__file__).resolve().parent
register_resolvers(ROOT)


@hydra.main(version_base="1.3", config_path="conf", config_name="register")
def main(cfg: DictConfig) -> None:
    from expforge.cli import register_job

    register_job(cfg)


if __name__ == "__main__":
    import sys

    from expforge.cli import app_help, precheck
    from expforge.process import exit_status, freeze_at_exit

    if not app_help(sys.argv[1:], ROOT, "register", "register"):
        freeze_at_exit()
        precheck(sys.argv[1:], ROOT, "register")
        main()
        sys.exit(exit_status())
