"""expforge from Python (a notebook, a script): the commands as functions.

    import expforge
    result = expforge.run(["model=xgb", "data=wine"])
    study = expforge.search(["model=xgb", "search.n_trials=30"])
    report = expforge.register()
    table = expforge.runs(parent_run_id=study.parent_run_id)

The configs are composed with Hydra's compose API from the project's ``conf/`` (or
``config_dir``), as ``python run.py <overrides>`` composes them, and checked by the same
pre-check. A mistake raises the ``ExpforgeError`` whose line the command would print; nothing
exits. The caller's working directory, garbage collector and signal handlers are left as
they were, and so is its MLflow: its tracking and registry URIs, its experiment and the run
it has open, which expforge's runs neither nest under nor end. Every function can be called
again in the same process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from expforge.errors import ConfigError, first_line

if TYPE_CHECKING:
    from expforge.registry import Report

__all__ = ["StudyResult", "register", "run", "runs", "search"]

# The tags that ``runs`` shows as columns, besides run id, name, status, params and metrics.
KEY_TAGS = ("expforge.role", "model", "data", "optuna.study_name", "optuna.trial_number",
            "optuna.trial_state", "config_hash", "dataset_digest", "mlflow.parentRunId")


Call = TypeVar("Call", bound=Callable[..., Any])


def _callers_state_kept(function: Call) -> Call:
    """The caller's MLflow (its URIs, experiment and active runs) as it was after the call,
    and out of the call's way (``tracking.fluent.kept``); its Optuna verbosity too."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        from expforge.process import optuna_verbosity_kept
        from expforge.tracking.fluent import kept  # not at import: run.py's start-up

        with kept(), optuna_verbosity_kept():
            return function(*args, **kwargs)

    return call  # type: ignore[return-value]


@dataclass(frozen=True)
class StudyResult:
    """What ``search`` returns: the parent run, the best value and params, the study, and
    with ``register.enabled=true`` the registration's ``registry.Report``."""

    parent_run_id: str
    study_name: str
    best_value: float | None
    best_params: dict[str, Any]
    study: Any  # optuna.Study
    registration: Report | None = None  # None unless register.enabled=true


@_callers_state_kept
def run(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> Any:
    """One run of the composed config (``python run.py <overrides>``); its
    ``runner.RunResult``: run id, metrics, objective and value, model URI."""
    from expforge.runner import run_one

    plain, context = _compose("config", overrides, config_dir)
    if (plain.get("search") or {}).get("name", "none") != "none":
        raise ConfigError("expforge.run runs one config; for a study call "
                          "expforge.search([...]) with the same overrides")
    result, _ = run_one(plain, context)
    return result


@_callers_state_kept
def search(overrides: Sequence[str] = (), config_dir: str | Path | None = None
           ) -> StudyResult:
    """The Optuna study of the composed config (``search=optuna`` unless another search is
    given), registered afterwards when ``register.enabled=true``."""
    from expforge.search import run_search
    from expforge.search.study import load_existing

    given = list(overrides)
    if not any(o.lstrip("+~").startswith("search=") for o in given):
        given.insert(0, "search=optuna")
    plain, context = _compose("config", given, config_dir)
    registers = (plain.get("register") or {}).get("enabled")
    if registers:  # its settings fail here, not after the whole study
        from expforge.registry import RegisterSettings

        RegisterSettings.from_config(plain["register"])
    found = run_search(plain, context)
    registration = None
    if registers:
        from expforge.registry import register_after

        registration = register_after(plain, found.parent_run_id)
    study = load_existing(found.storage, found.study_name)
    try:
        best_params = dict(study.best_trial.params)
    except ValueError:  # no COMPLETE trial, or several objectives
        best_params = {}
    return StudyResult(found.parent_run_id, found.study_name, found.best_value, best_params,
                       study, registration)


@_callers_state_kept
def register(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> Any:
    """``python register.py <overrides>``: select, gate, register; the
    ``registry.Report`` (``passed`` is False when the gate blocked the promotion)."""
    from expforge.registry import register_best

    plain, _ = _compose("register", overrides, config_dir)
    return register_best(plain["register"], plain["tracking"], plain["paths"]["root"])


def runs(experiment: str | None = None, parent_run_id: str | None = None,
         filter: str | None = None, tracking_uri: str | None = None,
         config_dir: str | Path | None = None) -> Any:
    """The runs of an experiment (default: the configured one) as a pandas DataFrame, one row
    per run: run id, name, status, start time, the params as typed columns (``param.*``),
    the metrics (``metric.*``) and the key tags. ``parent_run_id`` keeps the children of a
    study or sweep; ``filter`` is an MLflow filter string."""
    import pandas as pd

    from expforge.errors import TrackingError
    from expforge.tracking import check_reachable, reader

    tracking, _ = _compose("config", (), config_dir)
    uri = tracking_uri or tracking["tracking"]["uri"]
    name = experiment or tracking["tracking"]["experiment"]
    check_reachable(uri)
    client = reader(uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        raise TrackingError(f"tracking.experiment={name} does not exist in {uri}")
    clauses = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"] if parent_run_id else []
    if filter:
        clauses.append(filter)
    try:
        listed = client.search_runs([found.experiment_id], " and ".join(clauses),
                                    max_results=50_000)
    except Exception as exc:
        raise ConfigError(f"filter={filter!r} is not an MLflow filter: {first_line(exc)}"
                          ) from None
    rows = []
    for r in listed:
        row: dict[str, Any] = {"run_id": r.info.run_id, "run_name": r.info.run_name,
                               "status": r.info.status,
                               "start_time": pd.to_datetime(r.info.start_time, unit="ms")}
        row.update({f"param.{k}": _typed(v) for k, v in r.data.params.items()})
        row.update({f"metric.{k}": v for k, v in r.data.metrics.items()})
        row.update({f"tag.{k}": r.data.tags[k] for k in KEY_TAGS if k in r.data.tags})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "run_name", "status"])


def _typed(text: str) -> Any:
    """A param as MLflow keeps it (a string) back as the value it was: int, float, bool."""
    if text in ("True", "true", "False", "false"):
        return text in ("True", "true")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "None" else text


def _compose(config_name: str, overrides: Sequence[str], config_dir: str | Path | None
             ) -> tuple[dict[str, Any], Any]:
    """The plain config and the run context of ``overrides``, as the command composes them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from expforge.cli import check_overrides
    from expforge.config import project_root, register_resolvers, to_plain
    from expforge.runner import RunContext

    conf = Path(config_dir).resolve() if config_dir else project_root() / "conf"
    if not (conf / f"{config_name}.yaml").is_file():
        raise ConfigError(f"config_dir={conf} has no {config_name}.yaml; give the folder that "
                          "holds the project's configs (its conf/)")
    root = conf.parent
    register_resolvers(root)
    given = [str(o) for o in overrides]
    check_overrides(given, root, config_name)
    try:
        with initialize_config_dir(str(conf), version_base="1.3", job_name="expforge"):
            cfg = compose(config_name, overrides=given, return_hydra_config=True)
    except Exception as exc:
        raise ConfigError(f"{' '.join(given) or config_name}: {first_line(exc)}") from None
    choices = {str(k): str(v) for k, v in
               OmegaConf.to_container(cfg.hydra.runtime.choices).items()  # type: ignore[union-attr]
               if v is not None and not str(k).startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]
    return to_plain(cfg), RunContext(choices=choices, overrides=given)
