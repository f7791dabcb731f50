"""The edge between Hydra and expforge: DictConfig in, console output and exit codes out.

Every user error (``ExpforgeError``) becomes one line on stderr and exit code 1 (see
``process.guarded``); the full traceback appears only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expforge.errors import ConfigError, first_line
from expforge.process import (
    EXIT_ERROR,
    command_started,
    gate_blocked,
    guarded,
    library_logs_to_job_log,
)

if TYPE_CHECKING:  # --help and the pre-checks must not pay for pandas and scikit-learn
    from expforge.runner import RunContext

__all__ = ["app_help", "check_overrides", "hydra_context", "precheck", "register_job",
           "run_job"]


def hydra_context() -> RunContext:
    """Hydra's choices and overrides for the current job (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    from expforge.runner import RunContext

    if not HydraConfig.initialized():
        return RunContext()
    hc = HydraConfig.get()
    choices = {str(k): str(v) for k, v in hc.runtime.choices.items() if v is not None}
    return RunContext(choices=choices, overrides=list(hc.overrides.task),
                      output_dir=hc.runtime.output_dir)


def run_job(cfg: Any) -> float | None:
    """``python run.py``: a single run, or a study when ``search=optuna``."""

    def action() -> float | None:
        from expforge.config import to_plain

        command_started()  # run.py turned the collector off until the start-up is over
        library_logs_to_job_log()
        plain = to_plain(cfg)
        if plain.get("reproduce"):
            from expforge.reproduce import print_reproduction, reproduce_run

            rep = reproduce_run(str(plain["reproduce"]), plain)
            print_reproduction(rep)
            return rep.result.value
        from expforge.sweep import ENV_PARENT

        sweep_parent = os.environ.get(ENV_PARENT)  # set by SweepParent in a multirun
        search = (plain.get("search") or {}).get("name", "none")
        registers = (plain.get("register") or {}).get("enabled") and not sweep_parent
        if registers:  # its settings fail here, not after the run or the whole study
            from expforge.registry import RegisterSettings

            RegisterSettings.from_config(plain["register"])
        if search != "none":
            from expforge.search import run_search

            found = run_search(plain, hydra_context(), sweep_parent_run_id=sweep_parent)
            if registers:
                from expforge.registry import register_after

                if not register_after(plain, found.parent_run_id).passed:
                    gate_blocked()  # the study is recorded; only the promotion is not
            return found.best_value
        from expforge.runner import run_one

        result, _ = run_one(plain, hydra_context(), parent_run_id=sweep_parent)
        print_summary(result)
        if registers:
            from expforge.registry import register_after

            if not register_after(plain, run_id=result.run_id).passed:
                gate_blocked()
        return result.value

    return guarded(action)


def register_job(cfg: Any) -> None:
    """``python register.py``: select, gate, register; exit 2 (``gate_blocked``) when the gate
    blocks promotion."""

    def action() -> None:
        from expforge.config import to_plain
        from expforge.registry import print_report, register_best

        library_logs_to_job_log()
        plain = to_plain(cfg)
        report = register_best(plain["register"], plain["tracking"], plain["paths"]["root"])
        print_report(report)
        if not report.passed:
            gate_blocked()

    guarded(action)


def print_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from expforge.tracking import ui_command

    metrics = result.metrics
    folds = {k[len("cv_val_"):-len("_mean")] for k in metrics
             if k.startswith("cv_val_") and k.endswith("_mean")}
    names = sorted({k.split("_", 1)[1] for k in metrics if k.startswith("train_")} | folds)
    title = (f"reused run {result.run_id} (tracking.reuse: FINISHED with the same config and "
             "data; nothing trained)" if result.reused else f"run {result.run_id}")
    table = Table(title=title, title_justify="left")
    table.add_column("split")
    for name in names:
        table.add_column(name, justify="right")
    for split in ("train", "val", "test"):
        if split == "val" and folds:  # cross-validated: the folds' scores stand for val
            table.add_row("val (folds)", *(
                f"{metrics.get(f'cv_val_{n}_mean', float('nan')):.4g} ± "
                f"{metrics.get(f'cv_val_{n}_std', float('nan')):.2g}" for n in names))
        elif any(k.startswith(f"{split}_") for k in metrics):
            table.add_row(split, *(f"{metrics.get(f'{split}_{n}', float('nan')):.4g}"
                                   for n in names))
    console = Console()
    console.print(table)
    console.print(
        f"objective {result.objective.metric} = {result.value:.6g} "
        f"({result.objective.direction}); fit {metrics.get('fit_time_s', 0):.3f}s"
    )
    console.print(f"open the UI: {ui_command(result.tracking_uri, result.experiment_id)}",
                  soft_wrap=True)


def precheck(argv: list[str], root: Path, config_name: str) -> None:
    """Checks before Hydra starts, each ending in one line instead of Hydra's report.

    A misspelt key (``model.max_dept=3``): Hydra's report is several lines and suggests
    ``+key`` (adding a new key), the wrong fix for a typo; only commands with dotted key
    overrides pay for the extra compose. An unwritable project directory: Hydra would fail
    with a traceback while creating its output folder.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --help, --cfg, --info, ...: Hydra's own business
    try:
        check_overrides([a for a in argv if not a.startswith("-")], root, config_name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def check_overrides(argv: list[str], root: Path, config_name: str) -> None:
    """The pre-check's checks of Hydra overrides (``precheck``); a ``ConfigError`` with the
    one line. The Python API runs them too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(argv)
    except Exception:
        return  # a syntax error: Hydra reports it
    given = {o.key_or_group: o.value() for o in overrides}
    _check_writable(given, root)
    _check_groups(overrides, root / "conf", config_name)
    _check_top_level(overrides, root / "conf", config_name)
    keys, groups = [], []
    for o in overrides:
        if o.is_add() or o.is_delete() or o.is_force_add() or o.key_or_group.startswith("hydra"):
            continue
        if "." in o.key_or_group and "/" not in o.key_or_group:
            keys.append(o)
        elif "." not in o.key_or_group:
            value = o.value()
            listed = getattr(value, "list", None)
            first = listed[0] if listed else value
            groups.append(f"{o.key_or_group}={first}")
    if keys:
        _check_keys(keys, groups, str(root / "conf"), config_name)


def _check_writable(given: dict[str, Any], root: Path) -> None:
    if any(k.startswith(("hydra.run", "hydra.sweep")) for k in given):
        return
    outputs = Path(str(given.get("paths.outputs") or Path(
        str(given.get("paths.root") or root), "outputs")))
    folder = outputs
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise ConfigError(
            f"paths.outputs={outputs} cannot be created ({folder} is not writable); fix the "
            "permissions of the project directory or set paths.outputs=<writable folder> (and "
            "tracking.uri)")


def _group_files(conf: Path) -> dict[str, set[str]]:
    """Each config group (a folder under ``conf/``) and its config files' names."""
    return {folder.name: {f.stem for f in folder.iterdir() if f.suffix in (".yaml", ".yml")}
            for folder in conf.iterdir() if folder.is_dir()}


def _group_options(conf: Path) -> dict[str, set[str]]:
    """Each config group and its options: its files and the schemas registered in it (which
    Hydra's --help lists too)."""
    from hydra.core.config_store import ConfigStore

    options = _group_files(conf)
    for group, entries in ConfigStore.instance().repo.items():  # the schemas
        if isinstance(entries, dict) and group in options:
            options[group] |= {name.rsplit(".", 1)[0] for name in entries}
    return options


def _check_groups(overrides: list[Any], conf: Path, config_name: str) -> None:
    """An unknown group option (``experiment=nope``, which the defaults list marks
    optional, would otherwise be skipped without a word) and a config file that is not
    valid YAML (a traceback from deep inside Hydra), each in one line."""
    options = _group_options(conf)
    offered = _group_files(conf)  # what the error lists: no schema
    chosen = _default_choices(conf / f"{config_name}.yaml")
    for o in overrides:
        group = o.key_or_group
        if group not in options or o.is_delete() or o.package:
            continue
        value = o.value()
        values = getattr(value, "list", None)
        if values is None:
            values = [value] if isinstance(value, str) else []
        chosen[group] = [str(v) for v in values]
        for v in chosen[group]:
            if v not in options[group] and v != "null":
                listed = ", ".join(sorted(offered.get(group) or options[group]))
                raise ConfigError(f"{group}={v} is not an option of the {group} group (no "
                                  f"{conf.name}/{group}/{v}.yaml); choose one of: {listed}")
    files = [conf / f"{config_name}.yaml"] + [
        conf / group / f"{v}.yaml" for group, values in chosen.items() for v in values]
    for file in files:
        _check_yaml(file, conf)


def _check_top_level(overrides: list[Any], conf: Path, config_name: str) -> None:
    """A misspelt top-level key or group (``serch=optuna``): Hydra's report is several lines
    and suggests ``+serch`` (adding a new key), the wrong fix for a typo."""
    import yaml

    from expforge.config import closest_keys

    try:
        primary = yaml.safe_load((conf / f"{config_name}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # reported by _check_yaml or by Hydra
    if not isinstance(primary, dict):
        return
    names = set(_group_files(conf)) | {str(k) for k in primary if k != "defaults"} | {"hydra"}
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package or "." in key \
                or "/" in key or key in names:
            continue
        near = closest_keys(key, names)
        hint = f"did you mean {near[0]}? " if near else ""
        text = o.input_line or key
        raise ConfigError(f"{text} names {key}, which is neither a config group nor a config "
                          f"key; {hint}(to add a new key on purpose: +{text})")


def _default_choices(primary: Path) -> dict[str, list[str]]:
    """The group options that the primary config's defaults list picks (interpolated and
    optional entries aside)."""
    import yaml

    try:
        defaults = (yaml.safe_load(primary.read_text()) or {}).get("defaults") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return {}  # reported by _check_yaml or by Hydra
    chosen: dict[str, list[str]] = {}
    for entry in defaults:
        if isinstance(entry, dict) and len(entry) == 1:
            (group, value), = entry.items()
            if isinstance(value, str) and "${" not in value and " " not in str(group):
                chosen[str(group)] = [value]
    return chosen


def _check_yaml(file: Path, conf: Path) -> None:
    import yaml

    if not file.is_file():
        return
    try:  # libyaml's loader where there is one: this runs on every command
        yaml.load(file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        context = getattr(exc, "context", None)
        detail = f"{context}: {problem}" if context else str(problem)
        raise ConfigError(f"{file.relative_to(conf.parent)} is not valid YAML ({detail} "
                          f"at{where}); fix the file") from None


def _check_keys(keys: list[Any], groups: list[str], conf_dir: str, config_name: str) -> None:
    """One compose with every override when all is well; the slower diagnosis (a compose
    without the values, to name the misspelt key and its nearest) only when it is not."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigTypeError, ValidationError

    from expforge.config import schema_error

    given = [o.input_line for o in keys if o.input_line and not o.is_sweep_override()]
    try:
        with initialize_config_dir(conf_dir, version_base="1.3"):
            cfg = compose(config_name, overrides=groups + given)
    except ConfigCompositionException as exc:
        failed = next((line for line in given
                       if str(exc) == f"Error merging override {line}"), None)
        key = failed.split("=", 1)[0] if failed else ""
        where = str(getattr(exc.__cause__, "full_key", "") or "")
        below = bool(where) and key.startswith(f"{where}.")  # search.n_trials.x: no such key
        if isinstance(exc.__cause__, (ValidationError, ConfigTypeError)) and not below and \
                "not in struct" not in str(exc.__cause__):
            # A value the schema refuses (search.n_trials=many, a mapping for a list): one
            # line, not Hydra's report.
            raise schema_error((key or where).split(".", 1)[0], exc, failed) from None
        try:
            with initialize_config_dir(conf_dir, version_base="1.3"):
                cfg = compose(config_name, overrides=groups)
        except Exception:
            return  # Hydra reports it
    except Exception:
        return  # Hydra reports it
    _check_known(keys, cfg)


def _check_known(keys: list[Any], cfg: Any) -> None:
    from omegaconf import OmegaConf

    from expforge.config import closest_keys, flatten

    missing = object()
    for o in keys:
        parent, _, leaf = o.key_or_group.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=missing)  # "???" values still exist
        # `leaf in node` is False for a "???" value; the key exists all the same.
        if not (OmegaConf.is_dict(node) and leaf in node.keys()):  # noqa: SIM118
            known = flatten(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
            near = closest_keys(o.key_or_group, known)
            hint = f"did you mean {near[0]}? " if near else ""
            text = o.input_line or o.key_or_group
            raise ConfigError(f"{text} names {o.key_or_group}, which is not a config key; "
                              f"{hint}(to add a new key on purpose: +{text})")


_HELP_FLAGS = ("--help", "-h")


def app_help(argv: list[str], root: Path, config_name: str, app_name: str) -> bool:
    """``--help``, printed as Hydra prints it, without Hydra's start-up.

    Hydra builds the list of config groups by re-reading the primary config and creating
    an override parser for every group it asks about (its own and the launchers' included),
    most of its start-up. Our groups are the folders under ``conf/`` and the schemas.
    Returns False when ``argv`` does not ask for the app's help (``--hydra-help`` is
    Hydra's).
    """
    if not any(a in _HELP_FLAGS for a in argv):
        return False
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = root / "conf"
    overrides = [a for a in argv if not a.startswith("-")]
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    options = _group_options(conf)
    groups = [f"{group}: {', '.join(sorted(found))}"
              for group, found in sorted(options.items()) if found]
    print(f"{app_name} is powered by Hydra.\n\n== Configuration groups ==\n"
          "Compose your configuration from those groups (group=option)\n\n"
          + "\n".join(groups) + "\n\n\n== Config ==\n"
          "Override anything in the config (foo.bar=value)\n\n"
          + OmegaConf.to_yaml(cfg, resolve="--resolve" in argv)
          + "\n\nPowered by Hydra (https://hydra.cc)\n"
          "Use --hydra-help to view Hydra specific help\n\n")
    return True
