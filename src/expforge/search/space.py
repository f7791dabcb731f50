"""Search spaces: YAML in either grammar -> checked Optuna distributions -> trial configs.

A space maps dotted config keys to distributions, explicitly::

    model.max_depth: {type: int, low: 2, high: 12}
    model.learning_rate: {type: float, low: 0.01, high: 0.3, log: true}
    model.booster: {type: categorical, choices: [gbtree, dart]}
    model.rate_drop: {type: float, low: 0.0, high: 0.3, when: {model.booster: dart}}

(nested keys work too: ``model: {max_depth: ...}``), or in the override grammar of
hydra-optuna-sweeper's ``params:`` (parsed by Hydra's own parser, so existing sweeper configs
port unchanged)::

    model.learning_rate: tag(log, interval(0.01, 0.3))
    model.max_depth: int(interval(2, 12))
    model.n_estimators: range(10, 50)       # 10..50, as hydra-optuna-sweeper reads it
    model.booster: choice(gbtree, dart)

``when`` values may be a list (any of them), and the key ``task`` means the data's task.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from expforge.config import closest_keys, flatten
from expforge.errors import SearchError, first_line

__all__ = ["MISSING", "Param", "apply_params", "fixed_values", "for_task", "grid_of", "lookup",
           "parse_space", "space_size", "suggest"]

_TYPES = ("int", "float", "categorical")
MISSING = object()


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution and the condition under which it is suggested."""

    key: str
    distribution: Any  # optuna.distributions.BaseDistribution
    when: dict[str, Any] = field(default_factory=dict)


def parse_space(space: Mapping[str, Any] | None, config: Mapping[str, Any]) -> list[Param]:
    """Check the whole space against the composed config before any trial runs."""
    if not space:
        raise SearchError(
            "search_space is empty; pick one (search_space=<model>) or add keys such as "
            "search_space.model.max_depth='int(interval(2, 12))'"
        )
    known = flatten(config)
    params = []
    fixed = fixed_values(space)
    for key, spec in _leaves(space).items():
        if key in fixed:
            continue  # applied to the study's config (search/fixed.py), not searched
        where = f"search_space.{key}"
        if lookup(config, key) is MISSING:
            near = closest_keys(key, known)
            hint = f"; did you mean {near[0]}?" if near else "; use a dotted key of the config"
            raise SearchError(f"{where}: {key} is not a key of the config{hint}")
        when = {}
        if isinstance(spec, Mapping):
            when = dict(spec.get("when") or {})
            for cond in when:
                if cond != "task" and lookup(config, str(cond)) is MISSING:
                    raise SearchError(
                        f"{where}.when: {cond} is not a key of the config; conditions name "
                        "config keys (or task)"
                    )
            dist = _explicit(where, spec) if "type" in spec else _grammar(
                where, spec.get("sweep", spec.get("values"))
            )
        else:
            dist = _grammar(where, spec)
        params.append(Param(key, dist, when))
    if not params:
        raise SearchError(
            f"search_space has nothing to search, only fixed values ({', '.join(fixed)}); add "
            "a distribution, e.g. search_space.model.max_depth='int(interval(2, 12))'")
    return params


def for_task(params: list[Param], task: str) -> list[Param]:
    """The params that a trial on data of ``task`` may suggest: those whose ``when.task``
    does not exclude it. A grid and the size of the space count only these; the study's
    recorded space and the enqueue check keep them all, as suggesting skips the others."""
    kept = [p for p in params if "task" not in p.when or task in _listed(p.when["task"])]
    if not kept:
        raise SearchError(
            f"search_space has nothing to search for the {task} task: the when.task of "
            f"{', '.join(p.key for p in params)} excludes it; add a key for {task}, or pick "
            "the search_space of the model")
    return kept


def fixed_values(space: Mapping[str, Any] | None) -> dict[str, Any]:
    """The leaves of ``space`` that are plain values, not distributions: as in
    hydra-optuna-sweeper's ``params:``, every trial gets them (``data.batch_size: 64``, or a
    config group's choice, ``model: xgb``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Sweep
    from hydra.errors import HydraException

    fixed: dict[str, Any] = {}
    for key, spec in _leaves(space or {}).items():
        if isinstance(spec, (Mapping, list, tuple)):
            continue
        if not isinstance(spec, str):
            fixed[key] = spec
            continue
        try:
            value = OverridesParser.create().parse_override(f"x={spec}").value()
        except HydraException:
            continue  # reported by parse_space
        if not isinstance(value, Sweep):
            fixed[key] = value
    return fixed


def _leaves(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> spec; nested mappings (``model: {max_depth: ...}``) are walked into, so
    ``search_space.model.max_depth=...`` on the command line means the same as a dotted key."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(spec, Mapping) and not {"type", "sweep", "values"} & set(spec):
            out.update(_leaves(spec, f"{dotted}."))
        else:
            out[dotted] = spec
    return out


def suggest(trial: Any, params: list[Param], config: Mapping[str, Any], task: str) -> dict:
    """Ask ``trial`` for each param whose condition holds (in space order)."""
    chosen: dict[str, Any] = {}
    for param in params:
        if not _holds(param.when, chosen, config, task):
            continue
        chosen[param.key] = _suggest_one(trial, param)
    return chosen


def _suggest_one(trial: Any, param: Param) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    d = param.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(param.key, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(param.key, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(param.key, d.low, d.high, step=d.step, log=d.log)


def apply_params(config: Mapping[str, Any], chosen: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with the dotted keys set to the chosen values."""
    out = copy.deepcopy(dict(config))
    for key, value in chosen.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if hasattr(value, "item") else value
    return out


def space_size(params: list[Param]) -> int | None:
    """How many distinct configs the space holds, None when it is continuous (an upper
    bound where params are conditional)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    size = 1
    for p in params:
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            size *= len(d.choices)
        elif isinstance(d, IntDistribution):
            size *= len(range(d.low, d.high + 1, 1 if d.log else d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            size *= round((d.high - d.low) / d.step) + 1
        else:
            return None
    return size


def grid_of(params: list[Param]) -> dict[str, list[Any]]:
    """The grid for GridSampler: every param must be discrete."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    grid: dict[str, list[Any]] = {}
    for p in params:
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            grid[p.key] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            grid[p.key] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = round((d.high - d.low) / d.step)
            grid[p.key] = [round(d.low + i * d.step, 12) for i in range(n + 1)]
        else:
            raise SearchError(
                f"search_space.{p.key} is continuous; GridSampler needs discrete params "
                "(choices, int ranges or a float step)"
            )
    return grid


# -- parsing -------------------------------------------------------------------------------


def _explicit(where: str, spec: Mapping[str, Any]) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind = spec.get("type")
    if kind not in _TYPES:
        raise SearchError(f"{where}.type={kind} is not a type; choose one of: {', '.join(_TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not choices:
            raise SearchError(f"{where}.choices is empty; list at least one choice")
        return CategoricalDistribution(list(choices))
    low, high = spec.get("low"), spec.get("high")
    if low is None or high is None:
        raise SearchError(f"{where}: {kind} needs low and high")
    log, step = bool(spec.get("log", False)), spec.get("step")
    _check_bounds(where, low, high, log, step)
    if kind == "int":
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return FloatDistribution(float(low), float(high), log=log,
                             step=None if step is None else float(step))


def _grammar(where: str, text: Any) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not isinstance(text, str):
        raise SearchError(
            f"{where}={text} is not a distribution; use {{type: int|float|categorical, ...}} "
            "or the sweeper grammar, e.g. 'int(interval(2, 12))'"
        )
    try:
        override = OverridesParser.create().parse_override(f"x={text}")
    except HydraException as exc:
        raise SearchError(f"{where}={text} cannot be parsed: {first_line(exc)}") from None
    value = override.value()
    if isinstance(value, ChoiceSweep):
        if not value.list:
            raise SearchError(f"{where}={text} has no choices; list at least one")
        return CategoricalDistribution(list(value.list))  # type: ignore[arg-type]
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step or 1
        if start is None or stop is None or step <= 0 or stop <= start:
            raise SearchError(f"{where}={text} is an empty range; use range(low, high[, step])")
        # As in hydra-optuna-sweeper (so its configs keep their meaning): stop is included.
        n = math.floor((stop - start) / step + 1e-9)
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(int(start), int(start + n * step), step=int(step))
        return FloatDistribution(float(start), float(start + n * step), step=float(step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        low, high = value.start, value.end
        _check_bounds(where, low, high, log, None)
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low or 0), float(high or 0), log=log)  # checked above
    raise SearchError(
        f"{where}={text} is a fixed value, not a distribution; use interval(...), range(...) "
        "or choice(...)"
    )


def _check_bounds(where: str, low: Any, high: Any, log: bool, step: Any) -> None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise SearchError(f"{where}: low={low} and high={high} must be numbers")
    if low > high:
        raise SearchError(f"{where}: low={low} > high={high}; swap them")
    if log and low <= 0:
        raise SearchError(f"{where}: log=true needs low > 0 (got low={low}); raise low")
    if step is not None and step <= 0:
        raise SearchError(f"{where}: step={step} must be positive")
    if log and step is not None and step != 1:
        raise SearchError(f"{where}: log=true cannot take step={step}; drop one of them")


def lookup(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _listed(wanted: Any) -> list[Any]:
    """A ``when`` value: one value, or a list of them (any of them)."""
    return list(wanted) if isinstance(wanted, (list, tuple)) else [wanted]


def _holds(when: Mapping[str, Any], chosen: Mapping[str, Any], config: Mapping[str, Any],
           task: str) -> bool:
    for key, wanted in when.items():
        current = task if key == "task" else chosen.get(key, lookup(config, key))
        if current not in _listed(wanted):
            return False
    return True
