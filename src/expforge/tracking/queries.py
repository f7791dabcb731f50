"""Every lookup that the search, the sweep, the registry and the reproduce step make.

Each takes an ``MlflowClient`` (``tracking.reader`` gives one; a store's implementations
hold their own) and returns MLflow's entities or plain values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expforge.config import mask_uri
from expforge.errors import RegistryError, TrackingError, first_line

__all__ = [
    "REUSED",
    "child_runs",
    "experiment_id_of",
    "finished_twin",
    "latest_parents",
    "logged_models",
    "read_text",
    "run_of",
    "running_parents",
    "running_trial_runs",
    "search_all",
]

PARENT_ROLES = ("study", "sweep")


def experiment_id_of(client: Any, name: str) -> str | None:
    found = client.get_experiment_by_name(name)
    return None if found is None else str(found.experiment_id)


def run_of(client: Any, run_id: str) -> Any:
    """The run ``run_id``, or None when the store has none of that id."""
    try:
        return client.get_run(run_id)
    except Exception:
        return None


def read_text(client: Any, run_id: str, path: str) -> str | None:
    """The text artifact ``path`` of a run, or None when it has none."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="expforge-read-") as folder:
        try:
            local = client.download_artifacts(run_id, path, folder)
        except Exception:
            return None
        return Path(local).read_text(encoding="utf-8")


def running_parents(client: Any, experiment_id: str, role: str, name: str) -> list[Any]:
    """The active RUNNING parent runs of ``role`` for the study ``name``, oldest first."""
    rivals = client.search_runs(
        [experiment_id],
        f"tags.`optuna.study_name` = '{name}' and "
        f"tags.`expforge.role` = '{role}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time ASC"],
    )
    return [r for r in rivals if r.info.lifecycle_stage == "active"]


def running_trial_runs(client: Any, experiment_id: str, study_name: str) -> dict[str, str]:
    """``{trial number: run id}`` of the study's trial runs still RUNNING."""
    running = client.search_runs(
        [experiment_id],
        f"tags.`optuna.study_name` = '{study_name}' and "
        "tags.`expforge.role` = 'trial' and attributes.status = 'RUNNING'",
    )
    return {r.data.tags.get("optuna.trial_number"): r.info.run_id for r in running}


def logged_models(client: Any, experiment_id: str, run_id: str | None = None,
                  ) -> dict[str, str]:
    """``{run id: models:/<model id>}`` of the experiment's logged models (the first model of
    each run); with ``run_id``, of that run only."""
    by_run: dict[str, str] = {}
    token = None
    where = f"source_run_id = '{run_id}'" if run_id else None
    while True:
        page = client.search_logged_models(experiment_ids=[experiment_id], page_token=token,
                                           filter_string=where,
                                           max_results=1 if run_id else 1000)
        for m in page:
            if m.source_run_id and m.source_run_id not in by_run:
                by_run[m.source_run_id] = f"models:/{m.model_id}"
        token = page.token
        if not token or run_id:
            return by_run


REUSED = "expforge.reused."  # a sweep parent's tag per job it reused: expforge.reused.<run id>


def child_runs(client: Any, parent: Any) -> list[Any]:
    """The runs directly under the run ``parent``, oldest first, after the runs a sweep
    reused as its jobs (``tracking.reuse``: they hang under the sweep that made them)."""
    runs = list(client.search_runs([parent.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                   order_by=["attributes.start_time ASC"]))
    tags = parent.data.tags
    reused = [client.get_run(k[len(REUSED):]) for k in sorted(tags) if k.startswith(REUSED)]
    return reused + runs


def finished_twin(client: Any, experiment_id: str, config_hash: str, digest: str) -> Any:
    """The newest FINISHED run that trained the same config on the same data (a single run
    or a sweep's job: not a study's parent or trial), or None."""
    for r in client.search_runs(
            [experiment_id], f"tags.config_hash = '{config_hash}' and tags.dataset_digest = "
                             f"'{digest}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=20):
        if r.data.tags.get("expforge.role") in (None, "run"):
            return r
    return None


def latest_parents(client: Any, experiment_id: str) -> list[Any]:
    """Top-level study and sweep parents, newest first (a study inside a sweep is skipped:
    its sweep is the target)."""
    found = []
    for role in PARENT_ROLES:
        found += client.search_runs(
            [experiment_id], f"tags.`expforge.role` = '{role}'",
            order_by=["attributes.start_time DESC"], max_results=20,
        )
    top = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return sorted(top, key=lambda r: r.info.start_time, reverse=True)


def descendants(client: Any, experiment_id: str, parent: str) -> list[Any]:
    """The FINISHED runs under ``parent``; a study under a sweep contributes its trials."""
    runs = []
    tags = client.get_run(parent).data.tags
    runs += [r for k in sorted(tags) if k.startswith(REUSED)
             if (r := client.get_run(k[len(REUSED):])).info.status == "FINISHED"]
    for r in search_all(client, experiment_id, f"tags.mlflow.parentRunId = '{parent}'"):
        if r.data.tags.get("expforge.role") in PARENT_ROLES:
            runs.extend(descendants(client, experiment_id, r.info.run_id))
        elif r.info.status == "FINISHED":
            runs.append(r)
    return runs


def search_all(client: Any, experiment_id: str, where: str) -> list[Any]:
    """Every run matching the MLflow filter ``where``, page by page."""
    from mlflow.exceptions import MlflowException

    runs: list[Any] = []
    token = None
    try:
        while True:
            page = client.search_runs([experiment_id], where, max_results=1000,
                                      page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
    except MlflowException as exc:
        raise RegistryError(f"cannot search runs with filter {where!r}: {first_line(exc)}; "
                            "fix register.filter (MLflow search syntax)") from None


def existing_experiment(client: Any, name: str, key: str) -> str:
    """The id of the experiment ``name``, which must exist (``key`` names the setting)."""
    found = experiment_id_of(client, name)
    if found is None:
        raise RegistryError(
            f"{key}={name} does not exist in {mask_uri(client.tracking_uri)}; run an "
            "experiment first or set register.experiment to one that exists"
        )
    return found


def require_run(client: Any, run_id: str, key: str) -> Any:
    """The run ``run_id``, which must exist (``key`` names the setting)."""
    run = run_of(client, run_id)
    if run is None:
        raise TrackingError(
            f"{key}={run_id} is not a run in {mask_uri(client.tracking_uri)}; copy the id from "
            "the UI or the run summary, and point tracking.uri at its store"
        )
    return run
