"""The Optuna study: its storage, sampler and pruner, built from ``cfg.search``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from expforge import config as config_mod
from expforge.databases import DatabaseUnusable, schema_lock
from expforge.errors import ConfigError, ExpforgeError, SearchError, first_line
from expforge.process import quiet_optuna
from expforge.search.job import PURPOSE_ATTR
from expforge.search.recovery import FailedTrialRun, heartbeats_used
from expforge.search.settings import SearchSettings
from expforge.search.space import Param
from expforge.tracking import Store

__all__ = ["journal_damage", "keep_purpose", "load_existing", "open_study", "pruner",
           "purpose_of", "repair_journal", "sampler"]


def open_study(settings: SearchSettings, params: list[Param], index: int, store: Store,
               experiment_id: str, model: str) -> Any:
    """Create or load the study; worker ``index`` gets its own sampler seed. ``store`` and
    ``experiment_id`` end the runs of trials whose heartbeat stops (RDB storage). A study
    loaded again must be for the same ``model``, space and objective (see ``keep_purpose``).
    """
    import optuna

    quiet_optuna()  # a failed trial is one line of ours (report.report_failure)
    journal = None if "://" in settings.storage else Path(settings.storage)
    repaired = repair_journal(journal) if journal is not None and index == 0 else None
    try:
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=_storage(settings, FailedTrialRun(store, experiment_id)),
            sampler=sampler(settings, index),
            pruner=pruner(settings),
            directions=settings.directions,  # type: ignore[arg-type]  # checked
            load_if_exists=True,
        )
        keep_purpose(study, settings, purpose_of(settings, params, model))
        existing = len(study.get_trials(deepcopy=False))
        if repaired:
            done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
            print(f"warning: {repaired}; the study's {done} finished trials before it are "
                  "kept", file=sys.stderr)
        if existing:  # a resume: a sampler seeded as before would replay the first trials
            study.sampler = sampler(settings, index, offset=existing)
        return study
    except ValueError as exc:  # directions differ, or a damaged journal
        if journal is not None and (damage := journal_damage(journal)):
            raise SearchError(damage) from None
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


def purpose_of(settings: SearchSettings, params: list[Param], model: str) -> dict[str, Any]:
    """What a study is created for: the model, the space, the objective(s) and the folds."""
    from optuna.distributions import distribution_to_json

    return {"model": model,
            "objective": [f"{o.metric} ({o.direction})" for o in settings.objectives],
            "space": {p.key: distribution_to_json(p.distribution) for p in params},
            "folds": settings.folds}


def keep_purpose(study: Any, settings: SearchSettings, purpose: dict[str, Any]) -> None:
    """Refuse to mix trials of another model, space or objective into a study: Optuna
    would fail every such trial inside ``suggest``, or mix incomparable values."""
    stored = study.user_attrs.get(PURPOSE_ATTR)
    if stored is None:
        stored = _purpose_of_trials(study, purpose)
        if stored is None:  # a new study (or one without trials): this is its purpose
            study.set_user_attr(PURPOSE_ATTR, purpose)
            return
    differences = _differences(stored, purpose)
    if differences:
        name = settings.study_name
        raise SearchError(
            f"search.study_name={name} was created for {'; '.join(differences)}; run it "
            "with the config it was created for, or start a new study with "
            f"search.study_name=<new name> (its trials are kept either way)"
        )


def _purpose_of_trials(study: Any, purpose: dict[str, Any]) -> dict[str, Any] | None:
    """The space of a study made before expforge recorded its purpose, from its trials."""
    from optuna.distributions import distribution_to_json

    for t in study.get_trials(deepcopy=False):
        if t.distributions:  # only the params this trial was given (conditions)
            space = {k: distribution_to_json(d) for k, d in t.distributions.items()}
            return {**purpose, "space": {**purpose["space"], **space}}
    return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    import json

    out = []
    if old.get("model") != new["model"]:
        out.append(f"model={old.get('model')}, not model={new['model']}")
    if old.get("objective") != new["objective"]:
        out.append(f"the objective {', '.join(old.get('objective') or [])}, not "
                   f"{', '.join(new['objective'])}")
    old_folds = old.get("folds", "cv=none")  # studies made before the cv group: none
    if old_folds != new.get("folds", "cv=none"):
        out.append(f"the folds {old_folds}, not {new.get('folds', 'cv=none')}")
    old_space, new_space = old.get("space") or {}, new["space"]
    if old_space != new_space and old.get("model") == new["model"]:  # else it goes without saying
        changed = [k for k in sorted(set(old_space) | set(new_space))
                   if old_space.get(k) != new_space.get(k)]
        parts = []
        for k in changed[:3]:
            was = _described(json.loads(old_space[k])) if k in old_space else "absent"
            now = _described(json.loads(new_space[k])) if k in new_space else "absent"
            parts.append(f"search_space.{k}={was}, not {now}")
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        out.append(", ".join(parts) + more)
    return out


def _described(spec: dict[str, Any]) -> str:
    attrs = {k: v for k, v in spec.get("attributes", {}).items() if v not in (None, False)}
    if "choices" in attrs:
        return f"choice({', '.join(map(str, attrs['choices']))})"
    kind = spec.get("name", "").replace("Distribution", "").lower()
    extra = [f"{k}={v}" for k, v in attrs.items()
             if k not in ("low", "high") and (k, v) != ("step", 1)]
    return f"{kind}({', '.join([str(attrs.get('low')), str(attrs.get('high')), *extra])})"


def repair_journal(path: Path) -> str | None:
    """Cut a journal's torn last line (a process killed while appending to it) before
    anything is appended after it; the cut bytes go to a file beside it. What was done, or
    None. Under the journal's own lock, so a line another process is writing is never
    taken for a torn one."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        with path.open("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            block = 1 << 16
            tail = b""
            while size > len(tail):  # back to the last complete line
                start = max(0, size - len(tail) - block)
                f.seek(start)
                tail = f.read(size - len(tail) - start) + tail
                if b"\n" in tail or start == 0:
                    break
            if tail.endswith(b"\n"):
                return None
            keep = size - len(tail) + tail.rfind(b"\n") + 1
            f.seek(keep)
            torn = f.read()
            aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
            aside.write_bytes(torn)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    return (f"{path}: its last line was cut off by a crash during a write ({len(torn)} bytes, "
            f"moved to {aside.name})")


def journal_damage(path: Path) -> str | None:
    """A line in the middle of a journal that is not a complete record, named with the
    file and the line, or None."""
    import json

    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                json.loads(line)
            except ValueError as exc:
                return (f"search.storage={path} is damaged at line {number} ({first_line(exc)})"
                        f"; the study cannot be read past it: restore the file from a backup, "
                        f"or keep its first {number - 1} lines (head -n {number - 1}) to keep "
                        "the trials recorded before it, or start a new search.study_name")
    return None


def load_existing(storage: str, study_name: str) -> Any:
    """An existing study, to read (the Python API's result, a warm start's source):
    ``storage`` is a journal file or a database URL. ``KeyError`` where it has no such
    study; nothing is created."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in storage:
        opened: Any = optuna.storages.RDBStorage(storage, skip_table_creation=True)
    else:
        opened = optuna.storages.JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=study_name, storage=opened)


def _storage(settings: SearchSettings, on_stale: FailedTrialRun) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    url = settings.storage
    if "://" not in url:
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    try:  # the first command on a new database creates Optuna's schema, alone
        with schema_lock(url, "expforge: optuna schema"):
            if url.startswith(("postgresql", "mysql")):
                with heartbeats_used():
                    return optuna.storages.RDBStorage(
                        url,
                        heartbeat_interval=settings.heartbeat_interval,
                        grace_period=settings.grace_period,
                        heartbeat_stale_trial_callback=on_stale,
                        engine_kwargs={"pool_pre_ping": True},
                    )
            return optuna.storages.RDBStorage(url)
    except DatabaseUnusable as exc:
        raise SearchError(f"search.storage={config_mod.mask_uri(url)} cannot be opened ({exc}); "
                          "start the database, create it, or fix search.storage") from None


def sampler(settings: SearchSettings, index: int, offset: int = 0) -> Any:
    """The configured sampler; worker ``index`` and a resume after ``offset`` trials get their
    own seed, so parallel workers do not mirror each other and a resume does not replay."""
    spec = dict(settings.sampler)
    extra: dict[str, Any] = {}
    grid = str(spec.get("_target_", "")).endswith("GridSampler")
    # GridSampler's seed shuffles its grid, and trial k gets the k-th point: every process
    # must shuffle alike.
    if "seed" in spec and spec["seed"] is not None and not grid:
        spec["seed"] = int(spec["seed"]) + index + 1009 * offset
    if grid and "search_space" not in spec:
        extra["search_space"] = settings.grid  # of the searched params (coordinator)
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
        examples = ("optuna.samplers.TPESampler, RandomSampler, CmaEsSampler, GridSampler, "
                    "NSGAIISampler" if key == "search.sampler" else
                    "optuna.pruners.MedianPruner, WilcoxonPruner, HyperbandPruner, "
                    "SuccessiveHalvingPruner, PercentilePruner")
        raise ConfigError(
            f"{key}._target_={target} cannot be built ({first_line(exc.__cause__ or exc)}); "
            f"check its arguments ({key}.<name>=...), or use e.g. {examples}"
        ) from None
