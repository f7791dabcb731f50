"""The Optuna study: its storage, sampler and pruner, built from ``cfg.search``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from expforge import config as config_mod
from expforge.errors import ConfigError, ExpforgeError, SearchError, first_line
from expforge.search.recovery import FailedTrialRun
from expforge.search.settings import SearchSettings
from expforge.search.space import Param, grid_of
from expforge.tracking import Store

__all__ = ["open_study", "pruner", "sampler"]


def open_study(settings: SearchSettings, params: list[Param], index: int, store: Store,
               experiment_id: str) -> Any:
    """Create or load the study; worker ``index`` gets its own sampler seed. ``store`` and
    ``experiment_id`` end the runs of trials whose heartbeat stops (RDB storage)."""
    import optuna

    # Failed trials are reported in one line each (see report.report_failure).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=_storage(settings, FailedTrialRun(store, experiment_id)),
            sampler=sampler(settings, params, index),
            pruner=pruner(settings),
            directions=settings.directions,  # type: ignore[arg-type]  # checked
            load_if_exists=True,
        )
        existing = len(study.get_trials(deepcopy=False))
        if existing:  # a resume: a sampler seeded as before would replay the first trials
            study.sampler = sampler(settings, params, index, offset=existing)
        return study
    except ValueError as exc:  # directions differ from the stored study
        raise SearchError(
            f"search.study_name={settings.study_name}: {exc}; pick another study name"
        ) from None
    except ExpforgeError:
        raise
    except Exception as exc:
        raise SearchError(
            f"search.storage={config_mod.mask_uri(settings.storage)} cannot be opened: "
            f"{first_line(exc)}"
        ) from None


def _storage(settings: SearchSettings, on_stale: FailedTrialRun) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    url = settings.storage
    if "://" not in url:
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("postgresql", "mysql")):
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=on_stale,
            engine_kwargs={"pool_pre_ping": True},
        )
    return optuna.storages.RDBStorage(url)


def sampler(settings: SearchSettings, params: list[Param], index: int, offset: int = 0) -> Any:
    """The configured sampler; worker ``index`` and a resume after ``offset`` trials get their
    own seed, so parallel workers do not mirror each other and a resume does not replay."""
    spec = dict(settings.sampler)
    extra: dict[str, Any] = {}
    if "seed" in spec and spec["seed"] is not None:
        spec["seed"] = int(spec["seed"]) + index + 1009 * offset
    if str(spec.get("_target_", "")).endswith("GridSampler") and "search_space" not in spec:
        extra["search_space"] = grid_of(params)
    return _instantiate("search.sampler", spec, settings.allowed_targets, **extra)


def pruner(settings: SearchSettings) -> Any:
    if settings.pruner is None:
        import optuna

        return optuna.pruners.NopPruner()
    return _instantiate("search.pruner", settings.pruner, settings.allowed_targets)


def _instantiate(key: str, spec: Mapping[str, Any], allowed: tuple[str, ...],
                 **extra: Any) -> Any:
    from hydra.utils import instantiate

    target = config_mod.check_target(f"{key}._target_", spec.get("_target_"), allowed)
    try:
        return instantiate({**spec, **extra}, _convert_="all")
    except Exception as exc:
        raise ConfigError(
            f"{key}._target_={target} cannot be built ({first_line(exc.__cause__ or exc)}); "
            "use e.g. optuna.samplers.TPESampler, RandomSampler, CmaEsSampler, GridSampler, "
            "NSGAIISampler"
        ) from None
