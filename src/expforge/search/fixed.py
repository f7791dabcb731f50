"""Fixed values in a search space, as hydra-optuna-sweeper applies them: every trial gets
them. A config key (``data.split.val: 0.25``) is set in the study's config; a config group's
choice (``model: linear``) composes the study's config again with that choice, as the
command line ``model=linear`` would."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from expforge.config import closest_keys, flatten, to_plain
from expforge.errors import ConfigError, SearchError, first_line
from expforge.runner import RunContext
from expforge.search.space import MISSING, apply_params, fixed_values, lookup

__all__ = ["with_fixed"]

def with_fixed(plain: Mapping[str, Any], context: RunContext
               ) -> tuple[Mapping[str, Any], RunContext]:
    """The study's config and context with the space's fixed values applied."""
    fixed = fixed_values(plain.get("search_space"))
    if not fixed:
        return plain, context
    conf = Path(plain["paths"]["root"], "conf")
    groups = {k: str(v) for k, v in fixed.items() if "." not in k and (conf / k).is_dir()}
    if groups:
        given = [o for o in context.overrides
                 if o.split("=", 1)[0].lstrip("+~") not in groups]
        plain = _compose(conf, [*given, *(f"{g}={v}" for g, v in groups.items())])
        context = replace(context, choices={**context.choices, **groups})
    values = {k: v for k, v in fixed.items() if k not in groups}
    for key in values:
        if lookup(plain, key) is MISSING:
            near = closest_keys(key, flatten(plain))
            hint = f"; did you mean {near[0]}?" if near else ""
            raise SearchError(f"search_space.{key}={values[key]} fixes {key}, which is not a "
                              f"key of the config (nor a config group){hint}")
    return apply_params(plain, values), context


def _compose(conf: Path, overrides: list[str]) -> dict[str, Any]:
    """The config of ``overrides``, inside a running Hydra app (its global instance) or
    outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose("config", overrides=overrides)
        else:
            with initialize_config_dir(str(conf), version_base="1.3"):
                cfg = compose("config", overrides=overrides)
    except Exception as exc:
        raise ConfigError(f"search_space fixes a config group: {first_line(exc)}") from None
    return to_plain(cfg)
