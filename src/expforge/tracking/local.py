"""``LocalStore``: the store's work done in the calling process, at once.

The writer process serves its clients with one of these, so both ways of writing do the
same MLflow calls (``tracking.runs``, ``tracking.queries``, ``tracking.models``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from expforge.config import mask_uri
from expforge.errors import ExpforgeError, TrackingError, error_line
from expforge.process import interrupts_deferred
from expforge.tracking import models, queries, runs
from expforge.tracking.interface import Store
from expforge.tracking.provenance import context_tags
from expforge.tracking.records import RunRecord
from expforge.tracking.store import TrackingSettings, connect, load_store_code
from expforge.tracking.system import SystemMetrics

__all__ = ["LocalStore"]


class LocalStore(Store):
    """Writes in this process; Ctrl-C and SIGTERM wait for each write to end (see
    ``process.interrupts_deferred``)."""

    def __init__(self, uri: str, settings: TrackingSettings | None = None) -> None:
        self.uri = uri
        self._settings = settings  # cfg.tracking before connect: a worker gets the command's
        self._client: Any = None
        self._context: dict[str, str] | None = None
        self._locations: dict[str, str] = {}  # run id -> artifact URI, of runs created here
        self._inputs: dict[tuple[str, str, str], tuple[Any, ...]] = {}  # dataset entities
        # Set once the store stopped answering for tracking.retry_s: every later request
        # fails at once with the same line instead of retrying again (a flush of queued
        # writes would otherwise take retry_s each).
        self._gone: str | None = None
        self._retry_s = settings.retry_s if settings is not None else 120.0
        self._system: SystemMetrics | None = None  # tracking.system_metrics=true

    @property
    def client(self) -> Any:
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def connect(self, settings: TrackingSettings,
                meanwhile: Callable[[], None] | None = None) -> str:
        self._settings, self._retry_s = settings, settings.retry_s
        with self._failing("opening the store"):
            experiment_id = connect(settings)
        self._monitors()
        if meanwhile is not None:
            meanwhile()
        return experiment_id

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str],
                   parent_run_id: str | None = None,
                   on_created: Callable[[str], None] | None = None) -> Future[str]:
        future: Future[str] = Future()
        try:
            run_id = self.create_run_now(experiment_id, run_name, tags, parent_run_id,
                                         int(time.time() * 1000))
            if on_created is not None:
                on_created(run_id)
            future.set_result(run_id)
        except Exception as exc:
            future.set_exception(exc)
        return future

    def create_run_now(self, experiment_id: str, run_name: str, tags: Mapping[str, str],
                       parent_run_id: str | None, start: int) -> str:
        """``create_run``, its id at once (the writer process serves its clients with it)."""
        if self._context is None:
            self._context = context_tags()
        with self._failing("creating a run"), interrupts_deferred():
            run_id = runs.create_run(self.client, self._context, experiment_id, run_name, tags,
                                     parent_run_id, start, self._locations)
            if (system := self._monitors()) is not None:
                system.start(run_id)
            return run_id

    def write(self, record: RunRecord) -> None:
        with self._failing("writing a run"), interrupts_deferred():
            if self._system is not None and record.status is not None:
                self._system.finish(record.run_id)
            runs.write_record(self.client, record, self._locations, self._inputs)

    def attach_model(self, run_id: str, model: Any, input_example: Any) -> str:
        with self._failing("logging a model"), interrupts_deferred():
            return models.attach_model(self.uri, run_id, model, input_example)

    def attach_files(self, run_id: str, folder: str) -> None:
        with self._failing("logging files"), interrupts_deferred():
            runs.log_files(self.client, run_id, folder)

    def end_run(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        with self._failing("ending a run"), interrupts_deferred():
            if self._system is not None:
                self._system.finish(run_id)
            runs.end_run(self.client, run_id, status, tags)

    def rewrite_run(self, whole: RunRecord, end: RunRecord) -> None:
        with self._failing("writing a run again"), interrupts_deferred():
            runs.rewrite_run(self.client, whole, end, self._inputs)

    def open_parent_run(self, experiment_id: str, existing: str | None, name: str,
                        tags: Mapping[str, str]) -> tuple[str, bool]:
        if self._context is None:
            self._context = context_tags()
        with self._failing("opening the parent run"), interrupts_deferred():
            run_id, resumed = runs.open_parent_run(self.client, experiment_id, existing, name,
                                                   {**self._context, **tags})
            if (system := self._monitors()) is not None:
                system.start(run_id, resumed)
            return run_id, resumed

    def running_trial_runs(self, experiment_id: str, study_name: str) -> dict[str, str]:
        with self._failing("finding the study's runs"):
            return queries.running_trial_runs(self.client, experiment_id, study_name)

    def model_of(self, experiment_id: str, run_id: str) -> str | None:
        with self._failing("finding a run's model"):
            return queries.logged_models(self.client, experiment_id, run_id).get(run_id)

    def load_code(self) -> None:
        load_store_code(self.uri)
        if self._context is None:
            self._context = context_tags()

    def close(self) -> None:
        # A store that stopped answering would keep each monitor's last write waiting for
        # tracking.retry_s: their daemon threads end with the process instead.
        if self._system is not None and self._gone is None:
            self._system.close()

    def for_client(self, client: int) -> Store:
        """Its own store, which opens when first used."""
        store = LocalStore(self.uri, self._settings)
        store._context = self._context
        return store

    def _monitors(self) -> SystemMetrics | None:
        """The system-metrics monitors of this store's runs (``tracking.system_metrics=true``;
        a worker's store starts its own)."""
        if self._system is None and self._settings is not None \
                and self._settings.system_metrics:
            self._system = SystemMetrics(self.uri)
        return self._system

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """MLflow's errors as one line that says what failed; a server that stopped
        answering as the line that says so, now and for every later request."""
        if self._gone is not None:
            raise TrackingError(self._gone)
        try:
            yield
        except ExpforgeError:
            raise
        except Exception as exc:
            if _unreachable(exc):
                self._gone = (
                    f"tracking.uri={mask_uri(self.uri)} stopped answering while {what} "
                    f"({_reason(exc)}; retried for about tracking.retry_s={self._retry_s:g} s);"
                    " once it answers again, run the same command again: a study resumes")
                raise TrackingError(self._gone) from exc
            raise TrackingError(f"tracking.uri={mask_uri(self.uri)}: {what} failed: "
                                f"{error_line(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The socket's own words ("Connection refused", "Read timed out") out of MLflow's and
    urllib3's nested messages."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^\"')(]+)", text) or re.search(
        r"(Read timed out|Connection aborted|Connection reset by peer|timed out)", text)
    return found.group(1).strip().rstrip(".") if found else error_line(exc)


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says that the tracking server could not be reached (after MLflow's
    retries), not that it refused the request."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if type(seen).__name__ in ("ConnectionError", "MaxRetryError", "NewConnectionError",
                                   "ConnectionRefusedError", "ConnectTimeoutError") \
                or "Max retries exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
