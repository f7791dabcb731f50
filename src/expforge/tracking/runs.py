"""The one place where a run's contents are written: created RUNNING, written in one go,
ended; and the repairs of runs that a killed process left.

Every function takes an ``MlflowClient``; ``LocalStore`` calls them in the calling process,
the writer process calls the same ones for its clients.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from expforge.tracking.datasets import dataset_inputs, log_inputs
from expforge.tracking.queries import running_parents
from expforge.tracking.records import RunRecord

__all__ = ["create_run", "end_run", "log_files", "open_parent_run", "rewrite_run",
           "write_record"]


def create_run(client: Any, context_tags: Mapping[str, str], experiment_id: str,
               run_name: str, tags: Mapping[str, str], parent_run_id: str | None,
               start: int, locations: MutableMapping[str, str]) -> str:
    """A RUNNING run with the tags ``mlflow.start_run`` would add; its id. Its artifact URI
    goes into ``locations``, for ``write_record``."""
    all_tags = {**context_tags, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, start_time=start, tags=all_tags, run_name=run_name)
    locations[run.info.run_id] = run.info.artifact_uri
    return str(run.info.run_id)


def write_record(client: Any, record: RunRecord, locations: MutableMapping[str, str],
                 inputs: MutableMapping[tuple[str, str, str], tuple[Any, ...]]) -> None:
    """One run's contents: one batch (params, metrics, tags), the texts, the dataset inputs,
    the end. ``locations``: the artifact URIs of the runs created by ``create_run`` (a run
    that ends is dropped from it); ``inputs``: dataset entities already built, by key."""
    from mlflow.entities import Metric, Param, RunTag

    now = record.end_time
    if record.metrics or record.params or record.tags or record.history:
        client.log_batch(
            record.run_id,
            metrics=[*(Metric(k, float(v), now, step) for k, values in record.history.items()
                       for step, v in enumerate(values)),
                     *(Metric(k, float(v), now, record.step) for k, v in record.metrics.items())],
            params=[Param(k, str(v)) for k, v in record.params.items()],
            tags=[RunTag(k, str(v)) for k, v in record.tags.items()],
        )
    location = locations.get(record.run_id)
    if record.status is not None:
        locations.pop(record.run_id, None)
    if record.texts:
        _log_texts(client, record.run_id, record.texts, location)
    if record.dataset is not None:
        description = record.dataset
        if description.key not in inputs:
            inputs[description.key] = dataset_inputs(description)
        log_inputs(client, record.run_id, inputs[description.key])
    if record.status is not None:
        client.set_terminated(record.run_id, record.status, end_time=now)


def _log_texts(client: Any, run_id: str, texts: Mapping[str, str],
               artifact_uri: str | None) -> None:
    """Texts as the run's artifacts. Given the run's ``artifact_uri``, all of them in one
    call to its artifact store (``MlflowClient.log_text`` looks the whole run up first, for
    each text)."""
    if artifact_uri is None:
        for path, text in texts.items():
            client.log_text(run_id, text, path)
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

    with tempfile.TemporaryDirectory(prefix="expforge-texts-") as folder:
        for path, text in texts.items():
            file = Path(folder, *path.split("/"))
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text, encoding="utf-8")
        uri = add_databricks_profile_info_to_artifact_uri(artifact_uri, client.tracking_uri)
        get_artifact_repository(uri, tracking_uri=client.tracking_uri).log_artifacts(folder)


def log_files(client: Any, run_id: str, folder: str) -> None:
    """The files under ``folder`` as the run's artifacts (same relative paths); the folder is
    removed (``expforge.plots.save_figures`` made it for this)."""
    try:
        client.log_artifacts(run_id, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def end_run(client: Any, run_id: str, status: str, tags: Mapping[str, str]) -> None:
    """End a run that is still RUNNING with ``status``; ``tags`` in any case."""
    from mlflow.entities import RunTag

    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def rewrite_run(client: Any, whole: RunRecord, end: RunRecord,
                inputs: MutableMapping[tuple[str, str, str], tuple[Any, ...]]) -> None:
    """``whole`` if the run has no params yet, else only ``end``: a run that has its params
    was written and lacks only its end (killed while a model was logged into it); its config
    may have changed since (a bigger budget), and MLflow refuses to change a param."""
    done = bool(client.get_run(end.run_id).data.params)
    write_record(client, end if done else whole, {}, inputs)


def open_parent_run(client: Any, experiment_id: str, existing: str | None, name: str,
                    tags: Mapping[str, str]) -> tuple[str, bool]:
    """``existing`` if it is an active run, else a new parent run named ``name`` (its
    ``expforge.role`` and ``optuna.study_name`` tags name its rivals); whether it was
    reused. Processes starting together may each create a parent: all keep the earliest."""
    if existing:
        try:
            if client.get_run(existing).info.lifecycle_stage == "active":
                return existing, True
        except Exception:
            pass  # the run is gone (deleted or another store): start a new parent
    run = client.create_run(experiment_id, tags=dict(tags), run_name=name)
    rivals = running_parents(client, experiment_id, str(tags["expforge.role"]),
                             str(tags["optuna.study_name"]))
    winner = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
        return winner, True
    return run.info.run_id, False
