"""What a new study tries first: the configs of ``search.enqueue``, then the best trials of an
earlier study (``search.warm_start.from``: its name, or its MLflow parent run id).

They are Optuna's enqueued trials: each counts towards ``search.n_trials`` like any trial, and
they are enqueued only into a study that has no trial yet, so a resumed study does not try
them again.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from expforge import config as config_mod
from expforge.errors import SearchError
from expforge.search.space import Param
from expforge.search.study import load_existing
from expforge.tracking import reader

__all__ = ["check_enqueued", "enqueue_first", "warm_start_configs"]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def check_enqueued(configs: Sequence[Mapping[str, Any]], params: list[Param],
                   searched: list[Param], task: str) -> None:
    """Every key of every ``search.enqueue`` entry is a key of the space and every value is
    inside its range or choices: one error before any trial otherwise. A key that the data's
    ``task`` does not search (not in ``searched``, ``space.for_task``) gets a warning: the
    trial leaves it out."""
    by_key = {p.key: p for p in params}
    active = {p.key for p in searched}
    for i, entry in enumerate(configs):
        if not isinstance(entry, Mapping):
            raise SearchError(f"search.enqueue[{i}]={entry} is not a config; give each entry as "
                              "{dotted key: value}, e.g. search.enqueue=[{model.max_depth: 6}]")
        for key, value in entry.items():
            if key not in by_key:
                raise SearchError(
                    f"search.enqueue[{i}].{key}={value}: {key} is not a key of the search "
                    f"space; its keys: {', '.join(by_key)}")
            if not _inside(by_key[key].distribution, value):
                raise SearchError(
                    f"search.enqueue[{i}].{key}={value} is outside the search space "
                    f"({key}: {_shown(by_key[key].distribution)}); give a value inside it, or "
                    f"widen search_space.{key}")
            if key not in active:
                print(f"warning: search.enqueue[{i}].{key}={value} is not searched for the "
                      f"{task} task (its when.task: {by_key[key].when['task']}); that trial "
                      "leaves it out", file=sys.stderr)


def warm_start_configs(source: str, top_k: int, storage: str | None, settings_storage: str,
                       tracking_uri: str, params: list[Param]) -> list[dict[str, Any]]:
    """The params of the ``top_k`` best COMPLETE trials of the study ``source`` (a study name,
    or a study's parent run id), best first, as configs of this space: keys this space does
    not have, and values outside its ranges, are dropped with a warning."""
    study = _source_study(source, storage, settings_storage, tracking_uri)
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SearchError(f"search.warm_start.from={source}: the study {study.study_name} has "
                          "no completed trial to start from")
    sign = 1 if study.directions[0].name == "MINIMIZE" else -1
    best = sorted(complete, key=lambda t: (math.isnan(t.values[0]), sign * t.values[0]))
    by_key = {p.key: p for p in params}
    configs, unknown, outside = [], set(), set()
    for t in best[:top_k]:
        kept = {}
        for key, value in t.params.items():
            if key not in by_key:
                unknown.add(key)
            elif not _inside(by_key[key].distribution, value):
                outside.add(f"{key}={value}")
            else:
                kept[key] = value
        if kept:
            configs.append(kept)
    if unknown or outside:
        parts = ([f"keys not in this space: {', '.join(sorted(unknown))}"] if unknown else []) \
            + ([f"values outside it: {', '.join(sorted(outside))}"] if outside else [])
        print(f"warning: search.warm_start.from={source}: dropped {'; '.join(parts)} (this "
              "study samples those)", file=sys.stderr)
    return configs


def enqueue_first(study: Any, configs: Sequence[Mapping[str, Any]]) -> int:
    """Enqueue ``configs`` into a study with no trial yet; how many were enqueued."""
    if not configs or study.get_trials(deepcopy=False):
        return 0
    for entry in configs:
        study.enqueue_trial(dict(entry), skip_if_exists=True)
    return len(configs)


def _source_study(source: str, storage: str | None, settings_storage: str,
                  tracking_uri: str) -> Any:
    """The earlier study: named in ``storage`` (given), this study's storage, or the default
    journal file of that name beside this study's; or the study of a parent run."""
    if RUN_ID.match(source):
        tags = _run_tags(source, tracking_uri)
        name = tags.get("optuna.study_name")
        if not name:
            raise SearchError(f"search.warm_start.from={source} is a run, not a study's parent "
                              "run (no optuna.study_name tag); give a study's parent run id or "
                              "a study name")
        recorded = tags.get("optuna.storage", "")
        if recorded and "***" not in recorded:  # a masked URL cannot be opened: ours is tried
            storage = storage or recorded
        source = name
    places = [storage] if storage else [settings_storage]
    if not storage and "://" not in settings_storage:
        places.append(str(Path(settings_storage).with_name(
            f"{config_mod.slug(source, 'study')}.journal")))
    for place in places:
        if place is None or ("://" not in place and not Path(place).is_file()):
            continue
        try:
            return load_existing(place, source)
        except KeyError:
            continue
    where = " or ".join(config_mod.mask_uri(p) for p in places if p)
    raise SearchError(
        f"search.warm_start.from={source} is neither a study in {where} nor a study's parent "
        "run id; give the name of a finished study (with search.warm_start.storage=... where "
        "it lives elsewhere) or its parent run id")


def _run_tags(run_id: str, tracking_uri: str) -> dict[str, str]:
    try:
        return dict(reader(tracking_uri).get_run(run_id).data.tags)
    except Exception as exc:
        raise SearchError(f"search.warm_start.from={run_id} is not a run of tracking.uri="
                          f"{config_mod.mask_uri(tracking_uri)}; give a study's parent run id "
                          "or a study name") from exc


def _inside(d: Any, value: Any) -> bool:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(d, CategoricalDistribution):
        return value in d.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(d, IntDistribution) and value != int(value):
        return False
    if not d.low <= value <= d.high:
        return False
    if d.step is not None:
        steps = (value - d.low) / d.step
        return abs(steps - round(steps)) < 1e-8
    return True


def _shown(d: Any) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(d, CategoricalDistribution):
        return f"one of {', '.join(map(str, d.choices))}"
    extra = (", log" if d.log else "") + (f", step {d.step}" if d.step not in (None, 1) else "")
    return f"from {d.low} to {d.high}{extra}"
