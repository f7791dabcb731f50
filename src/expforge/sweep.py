"""Hydra callback: one MLflow parent run per multirun sweep, made before any job starts.

``on_multirun_start`` creates the store schema, the experiment and the sweep's parent run once,
in the launching process, so parallel jobs (joblib, submitit) never race on them; the parent's
id reaches every job through the environment, which launchers pass on to their processes.
``on_multirun_end`` puts a table of every job's metrics, the best job and the sweep report (the
study report's page, of the jobs) on the parent, and registers the winner when
``register.enabled=true``.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import time
from collections import defaultdict
from typing import Any

from hydra.experimental.callback import Callback

from expforge.config import mask_overrides
from expforge.metrics import ranking_key
from expforge.process import gate_blocked, guarded, quiet_optuna, terminate_as_interrupt
from expforge.tracking import RunRecord, Store, TrackingSettings, open_store, queries, reader

__all__ = ["ENV_PARENT", "SweepParent"]

ENV_PARENT = "EXPFORGE_SWEEP_PARENT_RUN_ID"


def _section(config: Any, key: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    node = OmegaConf.select(config, key)
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}  # type: ignore


class SweepParent(Callback):
    """Registered in ``conf/config.yaml`` under ``hydra.callbacks``."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        guarded(lambda: self._start(config))
        # SIGTERM between two jobs would end the launcher without its exit handlers, and the
        # parent run would stay RUNNING: it raises KeyboardInterrupt, as inside a job, until
        # the multirun ends (a process that goes on, a notebook's, gets its handler back).
        self._sigterm = signal.getsignal(signal.SIGTERM)
        terminate_as_interrupt()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            guarded(lambda: self._end(config))
        finally:
            previous = getattr(self, "_sigterm", None)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _start(self, config: Any) -> None:
        register = _section(config, "register")
        if register.get("enabled"):  # its settings fail here, not after every job
            from expforge.registry import RegisterSettings

            RegisterSettings.from_config(register)
        tracking = TrackingSettings.from_config(_section(config, "tracking"))
        store = open_store(tracking)
        experiment_id = store.connect(tracking)
        overrides = [str(o) for o in config.hydra.overrides.task]
        tags = {"expforge.role": "sweep", "hydra.overrides": " ".join(mask_overrides(overrides)),
                **tracking.tags}
        created = store.create_run(experiment_id, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags)
        os.environ[ENV_PARENT] = store.wait(created)
        self._store: Store | None = store  # it ends the parent run (and its system metrics)
        # A failing job or Ctrl-C ends a sweep without on_multirun_end: never leave it RUNNING.
        atexit.register(self._abandon, config)

    def _abandon(self, config: Any) -> None:
        if os.environ.get(ENV_PARENT):
            self._end(config, aborted=True)

    def _end(self, config: Any, aborted: bool = False) -> None:
        parent_id = os.environ.pop(ENV_PARENT, None)
        if not parent_id:
            return
        atexit.unregister(self._abandon)
        tracking = TrackingSettings.from_config(_section(config, "tracking"))
        client = reader(tracking.uri)
        parent = client.get_run(parent_id)
        jobs = queries.child_runs(client, parent)
        record = RunRecord(parent_id)
        swept = _swept(config, jobs)
        table = _jobs_table(jobs, swept, parent_id) if jobs else None
        if table is not None:
            record.texts["jobs.csv"] = table.to_csv(index=False)
        best = _best_jobs(jobs)
        for metric, run in best.items():
            suffix = "" if len(best) == 1 else f".{metric}"  # jobs of different tasks
            record.tags[f"best_run_id{suffix}"] = run.info.run_id
            record.tags[f"best_run_name{suffix}"] = run.info.run_name
            record.metrics[f"best_{metric}"] = _value(run, metric)
        failed = aborted or not jobs or any(r.info.status != "FINISHED" for r in jobs)
        record.status = "FAILED" if failed else "FINISHED"
        store = getattr(self, "_store", None) or open_store(tracking)
        self._store = None
        try:
            store.write(record)
            if table is not None and tracking.log_plots and not aborted:
                report = _attach_report(store, parent, jobs, table, swept, best,
                                        str(config.hydra.sweep.dir), tracking)
                print(f"sweep report: {report}")
        finally:
            store.close()
        register = _section(config, "register")
        if register.get("enabled") and jobs and not aborted:
            from expforge.registry import register_after

            registration = register_after({"register": register,
                                           "tracking": _section(config, "tracking"),
                                           "paths": _section(config, "paths")}, parent_id)
            if not registration.passed:
                gate_blocked()


def _swept(config: Any, jobs: list[Any]) -> dict[str, list[str]]:
    """``{key: each job's value}`` of the command line's keys whose values differ between
    the jobs (a config group's choice from the job's tag, any other key from its params)."""
    keys = []
    for override in config.hydra.overrides.task:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if not key.startswith("hydra") and key not in keys:
            keys.append(key)
    swept = {}
    for key in keys:
        values = [str(r.data.tags.get(key, r.data.params.get(key, ""))) for r in jobs]
        if len(set(values)) > 1:
            swept[key] = values
    return swept


def _jobs_table(jobs: list[Any], swept: dict[str, list[str]], parent_id: str) -> Any:
    """One row per job: its run, status, whether it was reused (a run of an earlier sweep,
    ``tracking.reuse``), the swept keys' values and its metrics."""
    import pandas as pd

    return pd.DataFrame([{"run_id": r.info.run_id, "run_name": r.info.run_name,
                          "status": r.info.status,
                          "reused": r.data.tags.get("mlflow.parentRunId") != parent_id,
                          **{k: r.data.tags[k] for k in ("model", "data") if k in r.data.tags},
                          **{k: values[i] for k, values in swept.items()},
                          **dict(sorted(r.data.metrics.items()))}
                         for i, r in enumerate(jobs)])


def _attach_report(store: Any, parent: Any, jobs: list[Any], table: Any,
                   swept: dict[str, list[str]], best: dict[str, Any], folder: str,
                   tracking: TrackingSettings) -> str:
    """The sweep report on the parent run, and a copy in the sweep's output folder; the
    copy's path. Its figures are Optuna's, of a study made of the finished jobs of the first
    objective (the swept keys as params)."""
    import shutil
    from pathlib import Path

    from expforge.plots import study_figures
    from expforge.runner import attach_figures
    from expforge.search.page import write_report

    figures: dict[str, Any] = {}
    facts = {"sweep": str(parent.data.tags.get("hydra.overrides", "")),
             "jobs": f"{sum(r.info.status == 'FINISHED' for r in jobs)} finished of "
                     f"{len(jobs)}",
             "parent run": parent.info.run_id, "experiment": tracking.experiment,
             "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if best:
        metric, run = next(iter(best.items()))
        direction = str(run.data.tags.get("objective.direction") or "minimize")
        facts["objective"] = f"{metric} ({direction})"
        facts["best"] = f"{_value(run, metric):.6g} ({run.info.run_name}, run {run.info.run_id})"
        if len(best) == 1:  # else jobs of several tasks: in the order they ran
            table = table.iloc[sorted(range(len(jobs)), key=lambda i: ranking_key(
                _value(jobs[i], metric), direction))]
        study = _jobs_study(jobs, swept, metric, direction)
        if len(study.trials) >= 2:
            figures = study_figures(study, [metric])
    copy = Path(folder, "sweep_report.html")

    def add(target: Path) -> None:
        page = write_report(target, list(figures), f"Sweep {parent.info.run_name}", facts,
                            table, name="sweep_report.html")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page, copy)

    attach_figures(store, parent.info.run_id, figures, add)
    return str(copy)


def _jobs_study(jobs: list[Any], swept: dict[str, list[str]], metric: str,
                direction: str) -> Any:
    """An in-memory Optuna study of the finished jobs with ``metric``: a trial per job, the
    swept keys as its params (numbers as a range, anything else as a choice)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    quiet_optuna()

    distributions: dict[str, Any] = {}
    values: dict[str, list[Any]] = {}
    for key, texts in swept.items():
        try:
            numbers = [float(t) for t in texts]
            distributions[key] = FloatDistribution(min(numbers), max(numbers))
            values[key] = numbers
        except ValueError:
            distributions[key] = CategoricalDistribution(sorted(set(texts)))
            values[key] = texts
    study = optuna.create_study(direction=direction)  # type: ignore[arg-type]  # a tag of ours
    for i, r in enumerate(jobs):
        value = _value(r, metric)
        if r.info.status != "FINISHED" or math.isnan(value):
            continue
        study.add_trial(optuna.trial.create_trial(
            params={k: v[i] for k, v in values.items()}, distributions=distributions,
            value=value))
    return study


def _value(run: Any, metric: str) -> float:
    """A job's objective: its metric, or a study's best value of it."""
    key = f"best_{metric}" if run.data.tags.get("expforge.role") == "study" else metric
    return float(run.data.metrics.get(key, math.nan))


def _best_jobs(jobs: list[Any]) -> dict[str, Any]:
    """The best finished job per objective metric (one entry unless tasks were mixed)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for r in jobs:
        metric = str(r.data.tags.get("objective.metric", ""))
        if r.info.status == "FINISHED" and metric:
            groups[metric].append(r)
    best = {}
    for metric, runs in groups.items():
        direction = str(runs[0].data.tags.get("objective.direction") or "minimize")
        best[metric] = min(runs, key=lambda r: ranking_key(_value(r, metric), direction))
    return best
