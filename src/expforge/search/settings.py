"""``cfg.search`` as checked plain values: typed by ``config.SearchSchema``, then the
derived defaults (objectives, study name, storage)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expforge import config as config_mod
from expforge.cv import CVSettings
from expforge.errors import ConfigError
from expforge.metrics import check_direction, cv_metric, direction_of, metric_names
from expforge.runner import Objective, cross_validates, objective_of

__all__ = ["SearchSettings", "settings_of"]


@dataclass(frozen=True)
class SearchSettings:
    n_trials: int
    timeout: float | None
    study_name: str
    storage: str
    n_workers: int
    objectives: tuple[Objective, ...]
    sampler: dict[str, Any]
    pruner: dict[str, Any] | None
    report_every: int
    log_models: str
    max_failure_ratio: float
    heartbeat_interval: int | None
    grace_period: int | None
    top_k: int
    plots: bool
    seed: int = 0
    target: float | None = None
    patience: int | None = None
    enqueue: tuple[dict[str, Any], ...] = ()
    warm_start_from: str | None = None
    warm_start_top_k: int = 5
    warm_start_storage: str | None = None
    allowed_targets: tuple[str, ...] = config_mod.ALLOWED_TARGETS
    folds: str = "cv=none"  # the trials' cross-validation, in words (``CVSettings.describe``)
    # GridSampler's grid (of the params the data's task suggests), when it builds its own
    grid: dict[str, list[Any]] | None = None

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def grid_size(self) -> int | None:
        return None if self.grid is None else math.prod(len(v) for v in self.grid.values())

    @property
    def objective(self) -> Objective:
        """The first objective: the one that ranks trials, picks the best and prunes."""
        return self.objectives[0]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


def settings_of(plain: Mapping[str, Any], task: str) -> SearchSettings:
    """Check ``cfg.search`` and fill in the derived defaults (study name, storage)."""
    s = config_mod.checked("search", plain["search"])
    cv = CVSettings.from_config(plain)
    study_name = s["study_name"] or (
        f"{plain['tracking']['experiment']}-{plain['data']['name']}-"
        f"{plain['model'].get('name', 'model')}"
    )
    default = Path("studies", f"{config_mod.slug(study_name, 'study')}.journal")
    storage = str(s["storage"] or default)
    if "://" not in storage:  # a journal file: relative paths start at the project root
        storage = str(Path(plain["paths"]["root"], storage).resolve())
    if s["n_workers"] > 1 and storage.startswith("sqlite"):
        raise ConfigError(
            f"search.storage={storage} with search.n_workers={s['n_workers']}: SQLite is not "
            "safe for parallel workers; use a journal file (search.storage=studies/<name>"
            ".journal, the default) or PostgreSQL (search.storage=postgresql://...)"
        )
    return SearchSettings(
        n_trials=s["n_trials"],
        timeout=s["timeout"],
        study_name=str(study_name),
        storage=storage,
        n_workers=s["n_workers"],
        objectives=_objectives(s, plain, task),
        sampler=dict(s["sampler"] or {"_target_": "optuna.samplers.TPESampler"}),
        pruner=dict(s["pruner"]) if s["pruner"] else None,
        report_every=s["report_every"],
        log_models=s["log_models"],
        max_failure_ratio=s["max_failure_ratio"],
        heartbeat_interval=s["heartbeat_interval"],
        grace_period=s["grace_period"],
        top_k=s["top_k"],
        plots=s["plots"],
        target=s["target"],
        patience=s["patience"],
        enqueue=tuple(dict(e) if isinstance(e, Mapping) else e for e in s["enqueue"] or ()),
        **_warm_start(s["warm_start"] or {}),
        seed=int(plain.get("seed", 0)),
        allowed_targets=config_mod.allowed_targets(plain),
        folds=cv.describe() if cv else "cv=none",
    )


def _warm_start(warm: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(warm) - {"from", "top_k", "storage"})
    if unknown:
        raise ConfigError(f"search.warm_start.{unknown[0]} is not a key of search.warm_start; "
                          "its keys: from, top_k, storage")
    top_k = warm.get("top_k", 5)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"search.warm_start.top_k={top_k} is invalid; give a whole number "
                          ">= 1")
    source = warm.get("from")
    return {"warm_start_from": None if source in (None, "") else str(source),
            "warm_start_top_k": top_k,
            "warm_start_storage": None if not warm.get("storage") else str(warm["storage"])}


def _objectives(s: Mapping[str, Any], plain: Mapping[str, Any], task: str,
                ) -> tuple[Objective, ...]:
    metrics, directions = s["metrics"], s["directions"]
    if directions and not metrics:
        raise ConfigError(
            f"search.directions={directions} needs search.metrics (one metric per direction); "
            "for one objective set metric=... and direction=..."
        )
    if metrics and len(metrics) > 1:
        for rule in ("target", "patience"):
            if s[rule] is not None:
                raise ConfigError(
                    f"search.{rule}={s[rule]} needs one objective, and search.metrics="
                    f"{list(metrics)} has {len(metrics)}; drop search.{rule} (several "
                    "objectives have a front, not a best value)")
    if not metrics:
        return (objective_of(plain, task),)
    directions = directions or [direction_of(m) for m in metrics]
    if len(directions) != len(metrics):
        raise ConfigError(
            f"search.directions={directions} must have one direction per search.metrics "
            f"entry ({len(metrics)})"
        )
    for d in directions:
        check_direction("search.directions", d)
    cross_validated = cross_validates(plain)
    known = metric_names(task, cv=cross_validated)
    for m in metrics:  # a metric the runs never log would fail every trial
        if m not in known:
            raise ConfigError(f"search.metrics lists {m}, which a {task} run does not log; "
                              f"choose from: {', '.join(sorted(known))}")
    if cross_validated:  # a val metric stands for its folds' mean
        metrics = [cv_metric(str(m)) for m in metrics]
    return tuple(Objective(str(m), str(d)) for m, d in zip(metrics, directions, strict=True))
