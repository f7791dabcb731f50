"""Where a run comes from: the project's git commit, the versions of the key packages, and
the context tags (user, source) that ``mlflow.start_run`` would add."""

from __future__ import annotations

import functools
import subprocess
import sys
from importlib import metadata

__all__ = ["KEY_PACKAGES", "context_tags", "git_info", "installed", "versions"]

# The packages whose versions decide whether a run can be reproduced bit for bit.
KEY_PACKAGES = ("expforge", "mlflow", "scikit-learn", "xgboost", "optuna", "numpy", "pandas",
                "hydra-core")


def installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of python and the key packages, recorded on every run."""
    found = {"python": sys.version.split()[0]}
    for package in KEY_PACKAGES:
        found[package] = metadata.version(package) if installed(package) else "absent"
    return found


@functools.lru_cache(maxsize=4)
def git_info(root: str) -> dict[str, str]:
    """Commit and dirty flag of the project repository (empty outside a git checkout)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}


def context_tags() -> dict[str, str]:
    """The tags ``mlflow.start_run`` adds (user, source name and type, git)."""
    from mlflow.tracking.context.registry import resolve_tags

    return dict(resolve_tags({}))
