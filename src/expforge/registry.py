"""Select -> (re-evaluate) -> gate -> register -> alias: promote the best model of a search.

Candidates are FINISHED runs with a logged model: the children of a search or sweep parent
(the most recent one by default), or the runs an MLflow filter selects. The winner is
registered as a new version of ``register.model_name`` with tags that say where it came from,
and the alias (``champion``) moves to it; the version it leaves gets ``previous``. Running the
step twice creates nothing new: the report says the winner already holds the alias.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expforge.data import load_data
from expforge.errors import RegistryError, first_line
from expforge.metrics import (
    base_metric,
    better,
    check_direction,
    direction_of,
    ranking_key,
    score,
)
from expforge.tracking import (
    RunRecord,
    TrackingSettings,
    check_reachable,
    open_store,
    queries,
    reader,
)
from expforge.tracking.models import alias_version, load_model, register_version

__all__ = ["Candidate", "RegisterSettings", "Report", "print_report", "register_after",
           "register_best"]


@dataclass(frozen=True)
class Criterion:
    metric: str
    threshold: float
    higher_is_better: bool


@dataclass(frozen=True)
class RegisterSettings:
    """``cfg.register`` as plain values."""

    parent_run_id: str | None = None
    experiment: str | None = None
    filter: str | None = None
    metric: str | None = None
    direction: str | None = None
    top_n: int | None = None
    select_by: str | None = None
    criteria: tuple[Criterion, ...] = ()
    must_beat_champion: bool = False
    model_name: str | None = None
    alias: str = "champion"

    @classmethod
    def from_config(cls, reg: Mapping[str, Any]) -> RegisterSettings:
        criteria = []
        given = reg.get("criteria") or []
        if not isinstance(given, (list, tuple)):
            raise RegistryError(
                f"register.criteria={given} is invalid; give a list, e.g. [{{metric: val_rmse, "
                "threshold: 60, higher_is_better: false}]")
        for i, c in enumerate(given):
            if not isinstance(c, Mapping) or "metric" not in c or "threshold" not in c:
                raise RegistryError(
                    f"register.criteria[{i}]={c} is invalid; give {{metric: val_rmse, "
                    "threshold: 60, higher_is_better: false}"
                )
            higher = _flag(c, "higher_is_better", f"register.criteria[{i}].higher_is_better")
            if higher is None:
                higher = direction_of(str(c["metric"])) == "maximize"
            try:
                threshold = float(c["threshold"])
            except (TypeError, ValueError):
                raise RegistryError(
                    f"register.criteria[{i}].threshold={c['threshold']} is invalid; give a "
                    "number, e.g. threshold: 60") from None
            criteria.append(Criterion(str(c["metric"]), threshold, higher))
        direction = reg.get("direction")
        if direction is not None:
            check_direction("register.direction", direction, RegistryError)
        top_n = reg.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise RegistryError(f"register.top_n={top_n} is invalid; give a whole number >= 1")
        return cls(
            parent_run_id=reg.get("parent_run_id"),
            experiment=reg.get("experiment"),
            filter=reg.get("filter"),
            metric=reg.get("metric"),
            direction=direction,
            top_n=top_n,
            select_by=reg.get("select_by"),
            criteria=tuple(criteria),
            must_beat_champion=bool(_flag(reg, "must_beat_champion",
                                          "register.must_beat_champion")),
            model_name=reg.get("model_name"),
            alias=_alias(str(reg.get("alias") or "champion")),
        )


def _alias(alias: str) -> str:
    """``register.alias`` as MLflow's registry takes it (its rules, checked before anything is
    registered): letters, digits, ``_`` and ``-``; not ``latest`` nor a version (``v3``)."""
    if not re.fullmatch(r"[\w\-]{1,255}", alias):
        raise RegistryError(f"register.alias={alias} is invalid; give letters, digits, _ and "
                            "- only, e.g. register.alias=champion")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(f"register.alias={alias} is reserved by MLflow (latest and v<N> "
                            "name versions); give another, e.g. register.alias=champion")
    return alias


def _flag(values: Mapping[str, Any], key: str, shown: str) -> bool | None:
    """A true/false setting (None where unset); any other value is an error naming it."""
    value = values.get(key)
    if value is not None and not isinstance(value, bool):
        raise RegistryError(f"{shown}={value} is invalid; give true or false")
    return value


@dataclass
class Candidate:
    run: Any  # mlflow.entities.Run
    model_uri: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)


@dataclass
class Report:
    """What happened, for the console and for tests."""

    target: str
    considered: int
    metric: str
    direction: str
    winner: Candidate | None = None
    gate: list[str] = field(default_factory=list)
    passed: bool = False
    model_name: str = ""
    version: str | None = None
    alias: str = ""
    created: bool = False
    note: str = ""
    reevaluated: list[tuple[str, dict[str, float]]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}" if self.version else ""


def register_best(
    reg: Mapping[str, Any], tracking: Mapping[str, Any], root: str | Path = "."
) -> Report:
    """The whole post-step; raises ``RegistryError`` with one clear line when it cannot."""
    settings = RegisterSettings.from_config(reg)
    track = TrackingSettings.from_config(
        {**tracking, "experiment": settings.experiment or tracking["experiment"]}
    )
    key = "register.experiment" if settings.experiment else "tracking.experiment"
    check_reachable(track.uri)
    client = reader(track.uri)
    experiment_id = queries.existing_experiment(client, track.experiment, key)
    target, runs = _candidate_runs(client, experiment_id, settings)
    candidates = _with_models(client, experiment_id, runs, target)
    metric, direction = _objective(settings, candidates)
    ranked = _rank(candidates, metric, direction)
    report = Report(target=target, considered=len(ranked), metric=metric, direction=direction,
                    alias=settings.alias)
    winner = ranked[0]
    if settings.top_n:
        winner, metric, direction = _reevaluate(ranked[: settings.top_n], settings, track,
                                                root, report)
        report.metric, report.direction = metric, direction
    report.winner = winner
    name = settings.model_name or f"{track.experiment}-model"
    report.model_name = name
    report.passed = _gate(client, winner, settings, name, metric, direction, report)
    if report.passed:
        _promote(client, winner, name, settings.alias, metric, report)
    return report


# -- candidates ----------------------------------------------------------------------------


def _candidate_runs(client: Any, experiment_id: str,
                    settings: RegisterSettings) -> tuple[str, list[Any]]:
    finished = "attributes.status = 'FINISHED'"
    parent = settings.parent_run_id
    if parent:
        target = f"children of run {parent}"
    elif settings.filter:
        target = f"runs matching {settings.filter!r}"
    else:
        parents = queries.latest_parents(client, experiment_id)
        if parents:
            parent = parents[0].info.run_id
            target = (f"the latest {parents[0].data.tags['expforge.role']} {parent} "
                      f"({parents[0].info.run_name})")
        else:
            target = "every run of the experiment"
    if parent and settings.parent_run_id and not queries.search_all(
            client, experiment_id, f"attributes.run_id = '{parent}'"):
        raise RegistryError(
            f"register.parent_run_id={parent} is not a run of this experiment; "
            "give a study's or sweep's parent run id (expforge.runs() lists them)")
    if parent:
        runs = queries.descendants(client, experiment_id, parent)
    else:
        where = f"{finished} and {settings.filter}" if settings.filter else finished
        runs = [r for r in queries.search_all(client, experiment_id, where)
                if r.data.tags.get("expforge.role") not in queries.PARENT_ROLES]
    if not runs:
        raise RegistryError(
            f"no FINISHED candidate runs among {target}; run a search or sweep first "
            "(python run.py search=optuna) or point register.parent_run_id, "
            "register.experiment or register.filter at runs that exist"
        )
    return target, runs


def _with_models(client: Any, experiment_id: str, runs: list[Any],
                 target: str) -> list[Candidate]:
    by_run = queries.logged_models(client, experiment_id)
    found = [Candidate(r, by_run[r.info.run_id], dict(r.data.metrics))
             for r in runs if r.info.run_id in by_run]
    if not found:
        raise RegistryError(
            f"none of the {len(runs)} candidate runs ({target}) has a logged model; log models "
            "(tracking.log_model=true, search.log_models=best or all) and run again"
        )
    return found


def _objective(settings: RegisterSettings, candidates: list[Candidate]) -> tuple[str, str]:
    tags = candidates[0].run.data.tags
    metric = settings.metric or tags.get("objective.metric")
    if not metric:
        raise RegistryError("register.metric is not set and the runs record no objective; "
                            "set register.metric=<metric> (e.g. val_rmse)")
    direction = settings.direction or (
        tags.get("objective.direction") if metric == tags.get("objective.metric")
        else direction_of(metric)
    ) or direction_of(metric)
    if not any(metric in c.metrics for c in candidates):
        known = sorted({k for c in candidates for k in c.metrics})
        raise RegistryError(
            f"register.metric={metric} is not logged by the candidate runs; choose one of: "
            f"{', '.join(known)}"
        )
    return metric, direction


def _rank(candidates: list[Candidate], metric: str, direction: str) -> list[Candidate]:
    """Best first by ``metric``; ties go to the faster fit."""
    def key(c: Candidate) -> tuple[float, float]:
        return (ranking_key(c.metrics.get(metric, math.nan), direction),
                c.metrics.get("fit_time_s", math.inf))

    return sorted((c for c in candidates if metric in c.metrics), key=key)


# -- re-evaluation on the test split -------------------------------------------------------


def _reevaluate(top: list[Candidate], settings: RegisterSettings, track: TrackingSettings,
                root: str | Path, report: Report) -> tuple[Candidate, str, str]:
    """Score each of the top candidates on its test split, logging a run per candidate."""
    import yaml

    base = base_metric(report.metric).split("_", 1)[-1]
    select_by = settings.select_by or f"test_{base}"
    direction = direction_of(select_by)
    eval_track = TrackingSettings(uri=track.uri, experiment=f"{track.experiment}-best-models",
                                  artifact_root=track.artifact_root)
    store = open_store(eval_track)
    eval_id = store.connect(eval_track)
    client = reader(track.uri)
    datasets: dict[str, Any] = {}
    for cand in top:
        text = queries.read_text(client, cand.run_id, "config.yaml")
        if text is None:
            raise RegistryError(
                f"run {cand.run_id} has no config.yaml, so it cannot be re-evaluated; drop "
                "register.top_n or pick runs that expforge recorded")
        cfg = yaml.safe_load(text)
        key = yaml.safe_dump(cfg["data"]) + str(cfg.get("seed"))
        if key not in datasets:
            datasets[key] = load_data(cfg["data"], int(cfg.get("seed", 0)), root)
        dataset = datasets[key]
        model = load_model(track.uri, cand.model_uri)
        metrics, _ = score(model, dataset)
        tags = {"source_run_id": cand.run_id, "source_model_uri": cand.model_uri,
                "expforge.role": "reevaluation"}
        run_id = store.wait(store.create_run(eval_id, f"reeval-{cand.run_id[:8]}", tags))
        store.write(RunRecord(run_id, metrics=metrics,
                              params={"source_run_id": cand.run_id, "model_uri": cand.model_uri,
                                      "dataset_digest": dataset.digest}))
        cand.metrics.update(metrics)
        report.reevaluated.append((cand.run_id, {k: v for k, v in metrics.items()
                                                 if k.startswith("test_")}))
    if select_by not in top[0].metrics:
        raise RegistryError(
            f"register.select_by={select_by} is not a re-evaluated metric; choose one of: "
            f"{', '.join(sorted(top[0].metrics))}"
        )
    return _rank(top, select_by, direction)[0], select_by, direction


# -- gate and promotion --------------------------------------------------------------------


def _gate(client: Any, winner: Candidate, settings: RegisterSettings, name: str, metric: str,
          direction: str, report: Report) -> bool:
    ok = True
    for c in settings.criteria:
        value = winner.metrics.get(c.metric)
        if value is None:
            raise RegistryError(
                f"register.criteria names {c.metric}, which the winner does not log; choose one "
                f"of: {', '.join(sorted(winner.metrics))}"
            )
        good = value >= c.threshold if c.higher_is_better else value <= c.threshold
        sign = ">=" if c.higher_is_better else "<="
        verdict = "pass" if good else f"FAIL by {abs(value - c.threshold):.4g}"
        report.gate.append(f"{c.metric} = {value:.6g} {sign} {c.threshold:g}: {verdict}")
        ok = ok and good
    if settings.must_beat_champion:
        current = alias_version(client, name, settings.alias)
        recorded = current.tags.get(f"metric.{metric}") if current else None
        if current is None or recorded is None:
            report.gate.append(f"no {settings.alias} with {metric} yet: pass")
        elif current.run_id == winner.run_id:
            report.gate.append(f"the winner already is {settings.alias} v{current.version}: pass")
        else:
            theirs, ours = float(recorded), winner.metrics[metric]
            good = better(ours, theirs, direction)
            verdict = "pass" if good else f"FAIL by {abs(ours - theirs):.4g}"
            report.gate.append(f"{metric} = {ours:.6g} beats {settings.alias} "
                               f"v{current.version} ({theirs:.6g}): {verdict}")
            ok = ok and good
    return ok


def _promote(client: Any, winner: Candidate, name: str, alias: str, metric: str,
             report: Report) -> None:
    current = alias_version(client, name, alias)
    if current is not None and current.run_id == winner.run_id:
        report.version, report.created = str(current.version), False
        report.note = (f"run {winner.run_id} already is {name}@{alias} (version "
                       f"{current.version}); no new version")
        return
    tags = winner.run.data.tags
    version_tags = {
        "source_run_id": winner.run_id,
        "config_hash": tags.get("config_hash", ""),
        "dataset_digest": tags.get("dataset_digest", ""),
        "git_commit": tags.get("mlflow.source.git.commit", ""),
        **{f"metric.{k}": f"{v:.10g}" for k, v in sorted(winner.metrics.items())},
    }
    description = (
        f"Best {metric} = {winner.metrics[metric]:.6g} ({report.direction}) among "
        f"{report.considered} candidates: {report.target}."
        + (f" Gate: {'; '.join(report.gate)}." if report.gate else "")
    )
    try:
        version, created = register_version(client, name, winner.model_uri, winner.run_id,
                                            version_tags, description, alias, current)
    except Exception as exc:  # rolled back by register_version: nothing half-registered
        raise RegistryError(f"registering run {winner.run_id} as {name} failed: "
                            f"{first_line(exc)}; its new version was rolled back, run it "
                            "again") from exc
    report.version, report.created = version, created
    verb = "registered" if created else "kept the existing"
    report.note = (f"{verb} {name} version {version}; {alias} -> v{version}"
                   + (f", previous -> v{current.version}"
                      if current is not None and str(current.version) != version else ""))


def register_after(plain: Mapping[str, Any], parent_run_id: str | None = None,
                   run_id: str | None = None) -> Report:
    """The post-step of a search or sweep (its parent run), or of a single run (its only
    candidate), when ``register.enabled=true``; its report (``passed`` is False when the
    gate blocked the promotion)."""
    reg = {**plain["register"], "parent_run_id": parent_run_id}
    if run_id is not None:
        reg["filter"] = f"attributes.run_id = '{run_id}'"
    report = register_best(reg, plain["tracking"], plain["paths"]["root"])
    print_report(report)
    return report


def print_report(report: Report) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"candidates: {report.considered} ({report.target})")
    if report.reevaluated:
        for run_id, metrics in report.reevaluated:
            shown = ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items()))
            console.print(f"  re-evaluated {run_id}: {shown}")
    if report.winner is not None:
        value = report.winner.metrics.get(report.metric, math.nan)
        console.print(f"winner: run {report.winner.run_id} with {report.metric} = {value:.6g}")
    for line in report.gate:
        console.print(f"gate: {line}")
    if not report.passed:
        console.print(f"not promoted: the winner failed the gate; {report.alias} is unchanged")
        return
    console.print(report.note)
    console.print(f"load it: mlflow.pyfunc.load_model({report.uri!r})", soft_wrap=True)
