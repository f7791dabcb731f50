"""The only package that talks to MLflow.

Runs are recorded through one interface, ``Store`` (``interface.py``): created when their
work starts, written in one go when it ends, then given a model and files. ``open_store``
decides who does the work: this process (``LocalStore``) or a writer process of a search's
own (``_writer``). Lookups are in ``queries``; ``reader`` gives the client they take.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from expforge.tracking.interface import Store, failed_record
from expforge.tracking.local import LocalStore
from expforge.tracking.provenance import git_info, versions
from expforge.tracking.records import DatasetDescription, RunRecord, describe_dataset
from expforge.tracking.store import (
    WRITERS,
    TrackingSettings,
    check_reachable,
    connect,
    ui_command,
)

__all__ = [
    "WRITERS",
    "DatasetDescription",
    "LocalStore",
    "RunRecord",
    "Store",
    "TrackingSettings",
    "check_reachable",
    "connect",
    "describe_dataset",
    "failed_record",
    "git_info",
    "open_store",
    "reader",
    "ui_command",
    "versions",
]


def open_store(settings: TrackingSettings, workers: int | None = None) -> Store:
    """The store that records this command's runs.

    A single run (``workers`` None) writes in this process. A search of ``workers`` worker
    processes follows ``tracking.writer``: ``process`` starts a writer process whose clients
    are this process and the workers, ``inline`` has each process write its own runs, and
    ``auto`` (the default) picks the writer process where it pays (see docs/design.md).
    A writer process is forked, so it needs a process that holds no store connection yet:
    where MLflow is loaded already (a job of a multirun), each process writes its own.
    """
    if workers is None or settings.writer == "inline" or "mlflow" in sys.modules:
        return LocalStore(settings.uri, settings)
    if settings.writer == "auto" and (os.cpu_count() or 1) < 2:
        return LocalStore(settings.uri, settings)  # no core to write on while trials fit
    from expforge.tracking._writer import WriterClient

    return WriterClient(settings.uri, clients=1 + workers if workers > 1 else 1)


def reader(uri: str) -> Any:
    """An ``MlflowClient`` of the store at ``uri`` (its model registry too), for the lookups of
    ``tracking.queries`` and the registry's operations of ``tracking.models``."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
