"""The one place that knows the config's shape: resolvers, checks, flattening, hashing.

Hydra composes; this module turns the composed ``DictConfig`` into plain values that the
rest of expforge takes, and rejects a wrong key or value before any run starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from expforge.errors import ConfigError, first_line

__all__ = [
    "PARAM_VALUE_LIMIT",
    "CVSchema",
    "SearchSchema",
    "TrackingSchema",
    "check_target",
    "checked",
    "closest_keys",
    "config_hash",
    "flatten",
    "mask_overrides",
    "mask_secrets",
    "project_root",
    "register_resolvers",
    "register_schemas",
    "slug",
    "to_plain",
    "to_yaml",
]

# MLflow rejects param values longer than this; longer ones are truncated with a marker.
PARAM_VALUE_LIMIT = 6000
TRUNCATED = "...[truncated; see config.yaml]"
# Config sections that describe where things go rather than what is computed.
LOCATION_KEYS = ("paths", "tracking", "hydra")
_SECRET_KEY = re.compile(r"(password|passwd|token|secret|api_?key|credential)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@",
                           re.IGNORECASE)
MASK = "***"
# What a `_target_` in a config may name: configs are code, so only these (and the prefixes a
# user adds in security.allowed_targets) are instantiated.
ALLOWED_TARGETS = ("sklearn.", "xgboost.", "optuna.", "expforge.")


def project_root() -> Path:
    """The project root: ``$EXPFORGE_ROOT``, else the folder holding ``run.py`` above us."""
    env = os.environ.get("EXPFORGE_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "run.py").is_file() and (parent / "conf").is_dir():
            return parent
    return Path.cwd()


def register_resolvers(root: Path | None = None) -> None:
    """Register ``${expforge.root:}``, so config paths never depend on the working directory,
    and the schemas (``register_schemas``)."""
    from omegaconf import OmegaConf

    resolved = str(root or project_root())
    OmegaConf.register_new_resolver("expforge.root", lambda: resolved, replace=True)
    register_schemas()


def to_plain(cfg: Any) -> dict[str, Any]:
    """Resolve every interpolation and return plain dicts and lists (no DictConfig)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(f"{key}: {first_line(exc)}; set it on the command line ({key}=...)"
                          ) from None
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    return plain  # type: ignore[return-value]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for every leaf: ``{"model": {"max_depth": 3}}`` -> ``{"model.max_depth": 3}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def param_values(tree: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, str]:
    """Flattened config as MLflow param strings, over-long values truncated with a marker."""
    skipped = tuple(exclude)
    out = {}
    for key, value in flatten(tree).items():
        if key.split(".", 1)[0] in skipped:
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - len(TRUNCATED)] + TRUNCATED
        out[key] = text
    return out


def config_hash(plain: Mapping[str, Any]) -> str:
    """A short hash of what is computed (locations excluded): equal hash, equal experiment.
    ``cv=none`` is left out, so runs recorded before the ``cv`` group keep their hash."""
    content = {k: v for k, v in plain.items() if k not in LOCATION_KEYS}
    if (content.get("cv") or {}).get("name", "none") == "none":
        content.pop("cv", None)
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def mask_uri(text: str) -> str:
    """``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def mask_secrets(tree: Any, key: str = "") -> Any:
    """A copy with values of secret-looking keys and passwords inside URIs masked."""
    if isinstance(tree, Mapping):
        return {k: mask_secrets(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [mask_secrets(v, key) for v in tree]
    if key and _SECRET_KEY.search(key) and tree not in (None, ""):
        return MASK
    if isinstance(tree, str):
        return mask_uri(tree)
    return tree


def mask_overrides(overrides: Iterable[str]) -> list[str]:
    """Command-line overrides (``+data.password=x``) with secret values masked."""
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            value = MASK
        out.append(f"{key}{sep}{mask_uri(value)}")
    return out


def to_yaml(tree: Any) -> str:
    """YAML text of plain values, with libyaml's emitter when present (much faster)."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return str(yaml.dump(tree, Dumper=dumper, sort_keys=False, default_flow_style=False))


def slug(name: str, default: str = "default") -> str:
    """A name as a file or folder name: runs of other characters become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or default


def closest_keys(key: str, candidates: Iterable[str]) -> list[str]:
    """Candidates that look like a misspelling of ``key``."""
    return difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)


def require(condition: bool, key: str, value: Any, fix: str) -> None:
    """Raise the standard one-line error when a config check fails."""
    if not condition:
        raise ConfigError(f"{key}={value} is invalid; {fix}")


def allowed_targets(plain: Mapping[str, Any]) -> tuple[str, ...]:
    """The built-in prefixes plus ``security.allowed_targets``."""
    extra = (plain.get("security") or {}).get("allowed_targets") or []
    return ALLOWED_TARGETS + tuple(str(p) for p in extra)


def check_target(key: str, target: Any, allowed: Iterable[str] = ALLOWED_TARGETS) -> str:
    """Refuse a ``_target_`` outside the allowed prefixes (an experiment file is code)."""
    prefixes = tuple(allowed)
    if not target or not str(target).startswith(prefixes):
        raise ConfigError(
            f"{key}={target} is not an allowed target (allowed: {', '.join(prefixes)}); if you "
            f"trust it, add its prefix to security.allowed_targets "
            f"(+security.allowed_targets=[{str(target).split('.')[0]}.])"
        )
    return str(target)


# -- schemas: the settings' types as Hydra structured configs --------------------------------

_WHOLE = {"fix": "give a whole number >= 1", "check": lambda v: v >= 1}
_SECONDS = {"fix": "give seconds > 0 or null", "check": lambda v: v is None or v > 0}


def _choice(*options: str) -> dict[str, Any]:
    return {"fix": f"choose one of: {', '.join(options)}", "check": lambda v: v in options}


@dataclass
class SearchSchema:
    """``cfg.search`` of ``search=optuna`` (conf/search/optuna.yaml holds the defaults)."""

    name: str = "optuna"
    n_trials: int = field(default=20, metadata=_WHOLE)
    timeout: float | None = field(default=None, metadata=_SECONDS)
    study_name: str | None = None
    storage: str | None = None
    n_workers: int = field(default=1, metadata=_WHOLE)
    metrics: list[str] | None = None
    directions: list[str] | None = None
    sampler: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    pruner: dict[str, Any] | None = None
    report_every: int = field(default=10, metadata=_WHOLE)
    log_models: str = field(default="best", metadata=_choice("all", "best", "none"))
    max_failure_ratio: float = field(default=0.5, metadata={
        "fix": "give a share in [0, 1) (failed trials do not use the budget, so 1 would retry "
               "a failing config forever)", "check": lambda v: 0 <= v < 1})
    heartbeat_interval: int | None = field(
        default=60, metadata={"fix": "give seconds >= 1 or null",
                              "check": lambda v: v is None or v >= 1})
    grace_period: int | None = field(
        default=180, metadata={"fix": "give seconds >= 1 or null",
                               "check": lambda v: v is None or v >= 1})
    top_k: int = field(default=10, metadata=_WHOLE)
    plots: bool = field(default=True, metadata={"fix": "give true or false"})
    target: float | None = field(default=None, metadata={"fix": "give a number or null"})
    enqueue: list[dict[str, Any]] = field(default_factory=list, metadata={
        "fix": "give a list of {dotted key: value} configs, e.g. "
               "search.enqueue=[{model.max_depth: 6}]"})
    warm_start: dict[str, Any] = field(
        default_factory=lambda: {"from": None, "top_k": 5, "storage": None},
        metadata={"fix": "set its keys, e.g. search.warm_start.from=<study name or parent run "
                         "id> (search.warm_start.top_k, search.warm_start.storage)"})
    patience: int | None = field(
        default=None, metadata={"fix": "give a whole number >= 1 or null",
                                "check": lambda v: v is None or v >= 1})


@dataclass
class TrackingSchema:
    """``cfg.tracking`` (conf/tracking/default.yaml holds the defaults)."""

    uri: str = "sqlite:///mlflow.db"
    artifact_root: str | None = None
    experiment: str = "expforge"
    run_name: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    log_model: bool = field(default=True, metadata={"fix": "give true or false"})
    log_plots: bool = field(default=True, metadata={"fix": "give true or false"})
    autolog: bool = field(default=False, metadata={"fix": "give true or false"})
    writer: str = field(default="auto", metadata=_choice("auto", "process", "inline"))
    retry_s: float = field(default=120, metadata={"fix": "give seconds > 0",
                                                  "check": lambda v: v > 0})
    system_metrics: bool = field(default=False, metadata={"fix": "give true or false"})
    reuse: bool = field(default=False, metadata={"fix": "give true or false"})


@dataclass
class CVSchema:
    """``cfg.cv`` (conf/cv/*.yaml hold each strategy's defaults)."""

    name: str = field(default="none", metadata=_choice("none", "kfold", "repeated", "group",
                                                       "time", "splitter"))
    folds: int = field(default=5, metadata={
        "fix": "give a whole number >= 2 (cv=none keeps one validation split)",
        "check": lambda v: v >= 2})
    repeats: int = field(default=3, metadata=_WHOLE)
    groups: str | None = None
    order_by: str | None = None
    splitter: dict[str, Any] | None = None
    refit: bool = field(default=True, metadata={"fix": "give true or false"})


SCHEMAS: dict[str, type] = {"search": SearchSchema, "tracking": TrackingSchema, "cv": CVSchema}


def register_schemas() -> None:
    """The schemas in Hydra's ConfigStore, as ``search/optuna_schema``, ``tracking/schema``
    and ``cv/schema``: the config files put them first in their defaults list, so Hydra
    types every value as it composes."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="search", name="optuna_schema", node=SearchSchema)
    store.store(group="tracking", name="schema", node=TrackingSchema)
    store.store(group="cv", name="schema", node=CVSchema)


def checked(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` of config section ``section`` typed by its schema and checked; the one-line
    error names the key, the bad value and the fix."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = SCHEMAS[section]
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), dict(values))
    except OmegaConfBaseException as exc:
        raise schema_error(section, exc) from None
    plain = OmegaConf.to_container(typed, resolve=True)
    assert isinstance(plain, dict)
    for f in fields(schema):
        check = f.metadata.get("check")
        if check is not None and not check(plain[f.name]):
            raise ConfigError(f"{section}.{f.name}={plain[f.name]} is invalid; "
                              f"{f.metadata['fix']}")
    return {str(k): v for k, v in plain.items()}


def schema_error(section: str, exc: Exception, override: str | None = None) -> ConfigError:
    """Hydra's or OmegaConf's report of a value that does not fit the schema, in one line:
    ``search.n_trials=many is invalid; give a whole number >= 1``. ``override`` is the
    command line's ``key=value`` that Hydra could not merge, if known: it names the key and
    the value where OmegaConf names only an item of the value (``0`` for
    ``search.enqueue=[5]``) or no value."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    key = str(getattr(cause, "full_key", "") or getattr(exc, "full_key", "") or "")
    value = getattr(cause, "value", None)
    if override is not None:
        given, _, text = override.partition("=")
        if value is None or (key != given and not key.startswith((f"{given}.", f"{given}["))):
            key, value = given, text
    leaf = key.rsplit(".", 1)[-1]
    schema = SCHEMAS.get(section) or SCHEMAS.get(key.split(".", 1)[0])
    known = {f.name: f for f in fields(schema)} if schema else {}
    full = key if "." in key or not key else f"{section}.{key}"
    if value is None:
        found = re.search(r"Value '([^']*)'", str(cause))
        value = found.group(1) if found else "?"
    if leaf in known and "fix" in known[leaf].metadata:
        return ConfigError(f"{full}={value} is invalid; {known[leaf].metadata['fix']}")
    return ConfigError(f"{full}: {first_line(cause)}")
