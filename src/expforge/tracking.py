"""The only module that talks to MLflow about runs.

``connect`` checks the store once and makes sure the experiment exists; ``tracked_run`` is a
context manager that always ends its run (FINISHED, FAILED or KILLED), so nothing is ever
left RUNNING; the ``log_*`` helpers batch what a run records.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from expforge.config import mask_uri
from expforge.errors import ExpforgeError, TrackingError

__all__ = [
    "DatasetDescription",
    "ProcessRunWriter",
    "RunRecord",
    "RunWriter",
    "TrackingSettings",
    "attach_model",
    "connect",
    "create_run",
    "dataset_inputs",
    "describe_dataset",
    "ended",
    "error_line",
    "git_info",
    "interrupts_deferred",
    "load_store_code",
    "log_datasets",
    "log_figures",
    "log_files",
    "log_model",
    "log_params",
    "set_tags",
    "tracked_run",
    "versions",
]

# The packages whose versions decide whether a run can be reproduced bit for bit.
KEY_PACKAGES = ("expforge", "mlflow", "scikit-learn", "xgboost", "optuna", "numpy", "pandas",
                "hydra-core")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


@dataclass(frozen=True)
class TrackingSettings:
    """``cfg.tracking`` as plain values."""

    uri: str
    experiment: str
    artifact_root: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    log_model: bool = True
    log_plots: bool = True
    autolog: bool = False

    @classmethod
    def from_config(cls, tracking: Mapping[str, Any]) -> TrackingSettings:
        return cls(
            uri=str(tracking["uri"]),
            experiment=str(tracking["experiment"]),
            artifact_root=tracking.get("artifact_root"),
            run_name=tracking.get("run_name"),
            tags={str(k): str(v) for k, v in (tracking.get("tags") or {}).items()},
            log_model=bool(tracking.get("log_model", True)),
            log_plots=bool(tracking.get("log_plots", True)),
            autolog=bool(tracking.get("autolog", False)),
        )


def connect(settings: TrackingSettings) -> str:
    """Point MLflow at ``settings.uri``, fail fast if unusable, return the experiment id."""
    import mlflow

    check_reachable(settings.uri)
    if urlparse(settings.uri).scheme == "sqlite":
        _create_sqlite_store(settings)
    mlflow.set_tracking_uri(settings.uri)
    mlflow.set_registry_uri(settings.uri)
    return ensure_experiment(settings)


def _create_sqlite_store(settings: TrackingSettings) -> None:
    """A new SQLite store is made under a temporary name and linked into place complete.

    MLflow creates a store by running its schema migrations (~1 s) in the file itself; a
    Ctrl-C meanwhile left a half-made store that every later command failed to open. The
    link does not replace a store that another process made first.
    """
    path = Path(settings.uri.split("sqlite:///", 1)[-1])
    if path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    temporary = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        root = Path(settings.artifact_root or path.parent / "mlartifacts").resolve().as_uri()
        SqlAlchemyStore(f"sqlite:///{temporary}", root).engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        for leftover in (temporary, temporary.with_name(temporary.name + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def check_reachable(uri: str) -> None:
    """One quick probe instead of MLflow's minutes of retries against a dead server."""
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    shown = mask_uri(uri)
    if scheme in ("http", "https"):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except Exception as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"tracking.uri={shown} is unreachable ({reason}); start the tracking server or "
                "fix tracking.uri"
            ) from None
    elif scheme == "sqlite":
        path = Path(uri.split("sqlite:///", 1)[-1])
        folder = path.parent
        if not folder.is_dir():
            raise TrackingError(
                f"tracking.uri={shown}: folder {folder} does not exist; create it or fix "
                "tracking.uri"
            )
        # SQLite writes a journal beside the database: the folder must be writable too.
        blocked = [p for p in (folder, path) if p.exists() and not os.access(p, os.W_OK)]
        if blocked:
            raise TrackingError(
                f"tracking.uri={shown}: {blocked[0]} is not writable; fix its permissions or "
                "point tracking.uri elsewhere"
            )
    elif scheme in _DB_SCHEMES:
        parsed = urlparse(uri)
        host, port = parsed.hostname or "localhost", parsed.port or _default_port(scheme)
        if host and port:
            try:
                socket.create_connection((host, port), timeout=3).close()
            except OSError as exc:
                raise TrackingError(
                    f"tracking.uri={shown} is unreachable ({exc.strerror or exc}); start the "
                    "database or fix tracking.uri"
                ) from None
    elif scheme not in ("file", "databricks", ""):
        raise TrackingError(
            f"tracking.uri={shown} has an unknown scheme {scheme!r}; use sqlite:///path, "
            "http://host:port or postgresql://..."
        )


def _default_port(scheme: str) -> int | None:
    return {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(scheme)


def ensure_experiment(settings: TrackingSettings) -> str:
    """Get or create the experiment; for database stores its artifacts go to artifact_root."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client = mlflow.MlflowClient(settings.uri)
    except Exception as exc:  # a store MLflow cannot open, or cannot bring up to date
        text = str(exc).strip().splitlines()
        hint = ""
        if urlparse(settings.uri).scheme == "sqlite":
            hint = ("; if a run was interrupted while the store was being created, it holds no "
                    "runs: delete the file and run again")
        raise TrackingError(f"tracking.uri={mask_uri(settings.uri)} cannot be opened "
                            f"({text[0] if text else type(exc).__name__}){hint}") from None
    try:
        existing = client.get_experiment_by_name(settings.experiment)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                client.restore_experiment(existing.experiment_id)
            return str(existing.experiment_id)
        location = None
        scheme = urlparse(settings.uri).scheme.split("+", 1)[0]
        if settings.artifact_root and scheme in _DB_SCHEMES:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", settings.experiment).strip("-") or "default"
            location = Path(settings.artifact_root, slug).resolve().as_uri()
        try:
            return str(client.create_experiment(settings.experiment, artifact_location=location))
        except MlflowException as exc:  # another process created it first
            found = client.get_experiment_by_name(settings.experiment)
            if found is None:
                raise TrackingError(
                    f"tracking.experiment={settings.experiment} cannot be created: {exc.message}"
                ) from None
            return str(found.experiment_id)
    except MlflowException as exc:
        first = str(exc.message).splitlines()[0]
        raise TrackingError(f"tracking.uri={mask_uri(settings.uri)}: {first}") from None


_deferring = False  # inside interrupts_deferred (main thread only)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the end of the block, then interrupt as usual.

    For this process's own writes to the store (logging a model, the end of a study): a
    signal that lands inside an SQLite write can leave the write's lock held by this process,
    and every later write (the run's KILLED end) then waits 20 s and fails. Blocks of a few
    tenths of a second; the main thread only (Python runs signal handlers there).
    """
    import signal

    global _deferring
    if threading.current_thread() is not threading.main_thread() or _deferring:
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt(f"signal {received[0]}")


@contextmanager
def tracked_run(
    experiment_id: str,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    stop_early: tuple[type[BaseException], ...] = (),
) -> Iterator[Any]:
    """An active MLflow run that always ends: FINISHED, FAILED (error tagged) or KILLED.

    ``stop_early`` exceptions (a pruned trial) end the run FINISHED and propagate.
    """
    import mlflow

    active = mlflow.active_run()
    run = mlflow.start_run(
        nested=active is not None,  # a trial of an in-process study, under its parent
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name,
        parent_run_id=parent_run_id,
        tags=dict(tags or {}),
    )
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        _end(run, "KILLED")
        raise
    except stop_early:
        _end(run, "FINISHED")
        raise
    except BaseException as exc:
        try:
            mlflow.set_tag("error", error_line(exc))
            mlflow.log_text(traceback.format_exc(), "error/traceback.txt")
        finally:
            _end(run, "FAILED")
        raise
    else:
        _end(run, "FINISHED")


def _end(run: Any, status: str) -> None:
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run.info.run_id:
        mlflow.end_run(status)
    else:
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message``: a run's ``error`` tag."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:5000]


@dataclass(frozen=True)
class DatasetDescription:
    """What a run's dataset inputs record, in plain values: built where the data is, turned
    into MLflow's entities (``dataset_inputs``) where the run is written."""

    name: str
    source: str
    digest: str
    sample: Any  # the first 100 training rows with the target, for the schema
    splits: tuple[tuple[str, int, int], ...]  # (split, rows, elements)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.source, self.digest)


@dataclass
class RunRecord:
    """What a run records once its work is done: written by a run writer in one go."""

    run_id: str
    status: str | None = "FINISHED"  # how the run ends; None: it goes on
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact path -> text
    dataset: DatasetDescription | None = None  # logged as the run's train/val/test inputs
    step: int = 0  # of the metrics
    end_time: int = field(default_factory=lambda: int(time.time() * 1000))


def write_record(client: Any, record: RunRecord, locations: dict[str, str] | None = None,
                 ) -> None:
    """One run's contents: one batch (params, metrics, tags), artifacts, inputs, its end.
    ``locations``: the artifact URIs of the runs this writer created (``create_run``)."""
    from mlflow.entities import Metric, Param, RunTag

    now = record.end_time
    if record.metrics or record.params or record.tags:
        client.log_batch(
            record.run_id,
            metrics=[Metric(k, float(v), now, record.step) for k, v in record.metrics.items()],
            params=[Param(k, str(v)) for k, v in record.params.items()],
            tags=[RunTag(k, str(v)) for k, v in record.tags.items()],
        )
    location = (locations or {}).get(record.run_id)
    if record.status is not None and locations:  # the run ends: its location is done with
        locations.pop(record.run_id, None)
    if record.texts:
        log_texts(client, record.run_id, record.texts, location)
    if record.dataset is not None:
        log_inputs(client, record.run_id, record.dataset)
    if record.status is not None:
        client.set_terminated(record.run_id, record.status, end_time=now)


def log_texts(client: Any, run_id: str, texts: Mapping[str, str],
              artifact_uri: str | None = None) -> None:
    """Texts as the run's artifacts (path -> text). Given the run's ``artifact_uri``, all of
    them in one call to its artifact store: ``MlflowClient.log_text`` looks the whole run up
    in the store first, for each text (6-10 ms of a trial's writes)."""
    if artifact_uri is None:
        for path, text in texts.items():
            client.log_text(run_id, text, path)
        return
    import tempfile

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

    with tempfile.TemporaryDirectory(prefix="expforge-texts-") as folder:
        for path, text in texts.items():
            file = Path(folder, *path.split("/"))
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text, encoding="utf-8")
        uri = add_databricks_profile_info_to_artifact_uri(artifact_uri, client.tracking_uri)
        get_artifact_repository(uri, tracking_uri=client.tracking_uri).log_artifacts(folder)


@contextmanager
def ended(writer: RunWriter, run_id: str) -> Iterator[None]:
    """``tracked_run`` for a run that ``writer`` writes: ended FINISHED, FAILED (error tagged,
    traceback logged) or KILLED, whatever leaves the block."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        writer.write(RunRecord(run_id, status="KILLED"))
        raise
    except BaseException as exc:
        writer.write(RunRecord(run_id, status="FAILED", tags={"error": error_line(exc)},
                               texts={"error/traceback.txt": traceback.format_exc()}))
        raise
    else:
        writer.write(RunRecord(run_id))


class RunWriter:
    """Does a search's store work: its runs, created at a trial's start and written in one go
    at its end, and any other request on the store (``call``, ``submit``).

    A trial creates its run (``create_run``), fits, and hands the finished run over as one
    ``RunRecord``: params, metrics and tags in one ``log_batch``, the config artifact, the
    dataset inputs and the end, four transactions instead of one per call. This writer
    writes in the calling process, at once; ``ProcessRunWriter`` has the same interface and
    does the work in a process of its own, in parallel with the fits, when a core is free for
    it. (A writer thread was measured and bought nothing: MLflow's SQLAlchemy work holds the
    GIL, and the fit slowed as much as the writes were hidden.)
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: Any = None
        self._context_tags: dict[str, str] | None = None
        self._locations: dict[str, str] = {}  # run id -> artifact URI, of runs created here

    @property
    def client(self) -> Any:
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def connect(self, settings: TrackingSettings,
                meanwhile: Callable[[], None] | None = None) -> str:
        """``connect(settings)`` where the runs are written; the experiment's id. A writer
        process connects while this process runs ``meanwhile``."""
        experiment_id = connect(settings)
        if meanwhile is not None:
            meanwhile()
        return experiment_id

    def for_client(self, client: int) -> RunWriter:
        """The writer for a process forked from this one (parallel worker ``client``, from
        1): here, its own, which connects when it is first used."""
        return RunWriter(self.uri)

    def clients_started(self) -> None:
        """Every process that takes a client (``for_client``) has been forked."""

    def warm_up(self) -> None:
        """Load ahead what logging a model needs, where that costs the trials little (a writer
        process, between the runs' writes)."""

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(client, *args)`` on the store; its result. ``function`` is a module's
        function and ``args`` plain data: a writer process receives them through a pipe."""
        return function(self.client, *args)

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """``function(client, *args)`` in turn with the writes, while this process goes on
        (a writer process); its errors come with the next ``flush``. ``args`` may be large
        (a fitted model)."""
        function(self.client, *args)

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str],
                   parent_run_id: str | None = None,
                   on_created: Callable[[str], None] | None = None) -> Any:
        """A future of the new RUNNING run's id; ``on_created(run_id)`` runs before it is set."""
        from concurrent.futures import Future

        future: Future[str] = Future()
        try:
            if self._context_tags is None:
                self._context_tags = _context_tags()
            run_id = create_run(self.client, self._context_tags, experiment_id, run_name, tags,
                                parent_run_id, int(time.time() * 1000), self._locations)
            if on_created is not None:
                on_created(run_id)
            future.set_result(run_id)
        except Exception as exc:
            future.set_exception(exc)
        return future

    def wait(self, future: Any, what: str = "creating a run") -> Any:
        """The value of a future (the run id of ``create_run``); its error as one of ours,
        other errors as a ``TrackingError`` that says ``what`` failed."""
        try:
            return future.result()
        except ExpforgeError:
            raise
        except Exception as exc:
            raise TrackingError(f"tracking.uri={mask_uri(self.uri)}: {what} failed: "
                                f"{error_line(exc)}") from exc

    def write(self, record: RunRecord) -> None:
        write_record(self.client, record, self._locations)

    def flush(self) -> None:
        """Wait until everything handed over is written (nothing waits here)."""

    def close(self) -> None:
        """Flush and let go of the writer."""


def create_run(client: Any, context_tags: Mapping[str, str], experiment_id: str,
               run_name: str, tags: Mapping[str, str], parent_run_id: str | None,
               start: int, locations: dict[str, str]) -> str:
    """A RUNNING run with the tags ``mlflow.start_run`` would add; its id. Its artifact URI
    goes into ``locations`` (for ``write_record``)."""
    all_tags = {**context_tags, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, start_time=start, tags=all_tags, run_name=run_name)
    locations[run.info.run_id] = run.info.artifact_uri
    return str(run.info.run_id)


class ProcessRunWriter(RunWriter):
    """A writer process: the store's work runs on another core, in parallel with the fits.

    It overrides every method of ``RunWriter`` (and holds no client of its own): the calling
    process need not load MLflow at all (~1 s of imports and ~1 s to open a store, which the
    writer does while the caller loads the data).

    Start it before this process imports MLflow (it is forked, and no database connection
    may cross a fork). Each of its ``clients`` has a pipe for its requests, whose buffer
    bounds what can be pending, and one for the replies (a result, the end of a flush),
    which come back in order. Client 0 is this process; a process forked from it later (a
    parallel worker) takes another with ``for_client``. The writer ignores Ctrl-C (the
    process group's SIGINT: the parent decides) and ends when client 0 tells it to, or once
    every client is gone and what they sent is written.
    """

    def __init__(self, uri: str, clients: int = 1) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        requests = [ctx.Pipe(duplex=False) for _ in range(clients)]  # (writer's, client's)
        replies = [ctx.Pipe(duplex=False) for _ in range(clients)]  # (client's, writer's)
        # The clients' ends, per client; the writer's own ends go to the writer.
        self._clients = [(send, receive)
                         for (_, send), (receive, _) in zip(requests, replies, strict=True)]
        self._process = ctx.Process(
            target=_writer_main,
            args=(uri, [r for r, _ in requests], [s for _, s in replies], os.getpid(),
                  self._clients),
            name="expforge-writer", daemon=False)
        self._process.start()
        for (receive, _), (_, send) in zip(requests, replies, strict=True):
            receive.close()
            send.close()
        self.uri = uri
        self._pid = self._process.pid
        self._attach(0)

    def for_client(self, client: int) -> RunWriter:
        """This writer for client ``client``, in a process forked from client 0 (a worker):
        its own pipes; the other clients' ends are closed here, so that the writer sees
        each client end when its process does."""
        writer = object.__new__(ProcessRunWriter)
        writer.uri, writer._process, writer._pid = self.uri, None, self._pid
        writer._clients = self._clients
        writer._attach(client)
        return writer

    def clients_started(self) -> None:
        self._keep_only(self._client)

    def _attach(self, client: int) -> None:
        self._client = client
        self._requests, self._replies = self._clients[client]
        # Requests that await a value, by id: a reply names its request, so a request whose
        # sender was interrupted after sending it cannot take the next request's value.
        self._awaiting: dict[int, tuple[Any, Callable[[str], None] | None, str]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._ends: queue.Queue[tuple[str, str]] = queue.Queue()
        self._closed = False
        if client != 0:
            self._keep_only(client)
        # Replies are received as they come, so a trial is linked to its run (on_created)
        # as soon as the run exists, also while the trial is still fitting.
        threading.Thread(target=self._receive, name="expforge-writer-replies",
                         daemon=True).start()

    def _keep_only(self, client: int) -> None:
        for index, ends in enumerate(self._clients):
            if index != client:
                for end in ends:
                    end.close()

    def connect(self, settings: TrackingSettings,
                meanwhile: Callable[[], None] | None = None) -> str:
        future = self._ask("connect", settings, "opening the store")
        if meanwhile is not None:
            meanwhile()
        return str(self.wait(future, "opening the store"))

    def warm_up(self) -> None:
        self._send(("warm", None, None))

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        what = "a request to the store"
        return self.wait(self._ask("call", (function, args), what), what)

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Through a private temporary file, not the pipe: a message bigger than the pipe's
        buffer would hold this process until the writer reads it."""
        import pickle
        import tempfile

        fd, path = tempfile.mkstemp(prefix="expforge-request-", suffix=".pkl")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump((function, args), f, protocol=pickle.HIGHEST_PROTOCOL)
            self._send(("submit", path, None))
        except BaseException:  # not handed over (the writer deletes it once read)
            os.unlink(path)
            raise

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str],
                   parent_run_id: str | None = None,
                   on_created: Callable[[str], None] | None = None) -> Any:
        """A future of the run's id; ``on_created(run_id)`` runs before it is set."""
        return self._ask("create", (experiment_id, run_name, dict(tags), parent_run_id,
                                    int(time.time() * 1000)), "creating a run", on_created)

    def write(self, record: RunRecord) -> None:
        self._send(("record", record, None))

    def flush(self) -> None:
        self._send(("flush", None, None))
        self._end("flushed")

    def close(self) -> None:
        """Client 0: flush and end the writer. Another client: flush."""
        if self._closed:
            return
        self._closed = True
        if self._client != 0:
            self.flush()
            return
        try:
            self._send(None)
            self._end("closed")
        finally:
            self._requests.close()
            self._process.join(timeout=60)

    def _ask(self, kind: str, payload: Any, what: str,
             on_created: Callable[[str], None] | None = None) -> Any:
        """Send a request that the writer answers with a value; a future of the value."""
        from concurrent.futures import Future

        future: Future[Any] = Future()
        with self._lock:
            request = next(self._ids)
            self._awaiting[request] = (future, on_created, what)
        try:
            self._send((kind, payload, request))
        except BaseException:
            with self._lock:
                self._awaiting.pop(request, None)
            raise
        return future

    def _send(self, message: Any) -> None:
        """Whole or not at all: Ctrl-C or SIGTERM between the two writes of a big message
        would leave half of it in the pipe, and the writer could not read on."""
        if self._process is not None and not self._process.is_alive():
            raise self._ended()
        try:
            with interrupts_deferred():
                self._requests.send(message)
        except (BrokenPipeError, ConnectionResetError) as exc:  # the writer is gone
            raise self._ended() from exc

    def _end(self, expected: str) -> None:
        """Wait for the reply ``expected``. Replies to earlier requests whose wait was cut
        short (Ctrl-C during a flush) come first; their errors count too."""
        first_error = ""
        while True:
            kind, error = self._ends.get()
            if kind == "ended":
                raise self._ended()
            first_error = first_error or error
            if kind == expected:
                break
        if first_error:
            raise TrackingError(f"tracking.uri={mask_uri(self.uri)}: writing a run failed: "
                                f"{first_error}")

    def _receive(self) -> None:
        try:
            while True:
                kind, request, value, error = self._replies.recv()
                if kind != "value":
                    self._ends.put((kind, error))
                    continue
                with self._lock:
                    awaited = self._awaiting.pop(request, None)
                if awaited is None:
                    continue  # its sender was interrupted and gave up on it
                future, on_created, what = awaited
                try:
                    if isinstance(error, BaseException):
                        raise error
                    if error:
                        raise TrackingError(
                            f"tracking.uri={mask_uri(self.uri)}: {what} failed: {error}")
                    if on_created is not None:
                        on_created(value)
                    future.set_result(value)
                except Exception as exc:
                    future.set_exception(exc)
        except (EOFError, OSError):
            pass
        finally:  # the writer is gone: nothing waits for it in vain
            with self._lock:
                left, self._awaiting = list(self._awaiting.values()), {}
            for future, _, _ in left:
                if not future.done():
                    future.set_exception(self._ended())
            self._ends.put(("ended", ""))

    def _ended(self) -> TrackingError:
        code = f" (exit code {self._process.exitcode})" if self._process is not None else ""
        return TrackingError(f"tracking.uri={mask_uri(self.uri)}: the run writer process "
                             f"(pid {self._pid}) ended{code}")


def _writer_main(uri: str, requests: list[Any], replies: list[Any], parent: int,
                 clients: list[tuple[Any, Any]]) -> None:
    """The writer process: do what arrives from each client, in each client's order, until
    client 0 says stop or every client is gone. ``clients``: the clients' ends of the
    pipes, which this process closes."""
    import gc
    import signal
    from multiprocessing.connection import wait

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for ends in clients:
        for end in ends:
            end.close()
    import mlflow

    mlflow.set_tracking_uri(uri)  # for logging a model into a run (see attach_model)
    state = _WriterState(uri, _context_tags())
    # Loaded before a request needs it: the store's code (~1 s of imports, which the first
    # request would otherwise wait for).
    load_store_code(uri)
    # What is loaded now stays: kept out of the collector's walks, which would otherwise
    # hold a request up to ~0.15 s each time they cover the whole heap. (Forked from
    # ``python run.py``, it has loaded MLflow with the collector off: see start_up_done.)
    gc.freeze()
    gc.enable()
    live = dict(enumerate(requests))  # the clients whose pipe is open
    pending: dict[int, deque[Any]] = {client: deque() for client in live}  # read, not done
    while live or any(pending.values()):
        for connection in wait(list(live.values()), timeout=0 if any(pending.values()) else None):
            _read(next(c for c, x in live.items() if x is connection), live, pending)
        # A trial waits for its run's id before it ends: creating a run goes before the
        # writes of runs that have ended, which no one waits for.
        for client, messages in pending.items():
            for message in [m for m in messages if m is not None and m[0] == "create"]:
                messages.remove(message)
                _serve(state, client, message, replies, parent)
        for client in [c for c, messages in pending.items() if messages]:
            head = pending[client][0] if pending[client] else None
            if (client == 0 or (head is not None and head[0] == "call")) and len(pending) > 1:
                # Repairs (calls) and the end (client 0) come after everything the other
                # clients sent so far: a dead worker's runs are written before they are
                # repaired, and none of its writes are dropped at the end.
                for other in [c for c in pending if c != 0]:
                    if other in live:
                        _read(other, live, pending)
                    while pending[other]:
                        _serve(state, other, pending[other].popleft(), replies, parent)
            if pending[client] and not _serve(state, client, pending[client].popleft(),
                                              replies, parent):
                return


def _read(client: int, live: dict[int, Any], pending: dict[int, deque[Any]]) -> None:
    """Every request of ``client`` that has arrived; a client whose process is gone is no
    longer live (what it sent is still done)."""
    connection = live[client]
    while connection.poll():
        try:
            pending[client].append(connection.recv())
        except Exception:  # gone (EOF), or died inside a send: what came whole is done
            del live[client]
            return


@dataclass
class _WriterState:
    uri: str
    context: dict[str, str]  # the tags of a run's context (user, source)
    client: Any = None  # created once the store exists ("connect"; or the parent made it)
    locations: dict[str, str] = field(default_factory=dict)  # run id -> artifact URI
    errors: dict[int, str] = field(default_factory=lambda: collections.defaultdict(str))
    warm: bool = False


def _serve(state: _WriterState, client: int, message: Any, replies: list[Any],
           parent: int) -> bool:
    """Do one request of ``client``; False when client 0 says stop."""
    import pickle

    import mlflow

    if message is None:
        with contextlib.suppress(OSError):
            replies[client].send(("closed", None, None, state.errors.pop(client, "")))
        return client != 0

    def reply(kind: str, value: Any, error: Any) -> None:
        with contextlib.suppress(OSError):  # the client died meanwhile
            replies[client].send((kind, request, value, error))

    kind, payload, request = message
    if kind == "connect":
        try:
            value: Any = connect(payload)
            state.client = state.client or mlflow.MlflowClient(state.uri)
        except Exception as exc:
            reply("value", None, _portable(exc))
        else:
            reply("value", value, "")
        return True
    if state.client is None:
        state.client = mlflow.MlflowClient(state.uri)
    if kind == "create" and client == 0 and os.getppid() != parent:
        return True  # killed meanwhile: nobody would write or end the run
    if kind in ("create", "call"):
        try:
            if kind == "create":
                value = create_run(state.client, state.context, *payload, state.locations)
            else:
                function, args = payload
                value = function(state.client, *args)
        except Exception as exc:
            reply("value", None, _portable(exc))
        else:
            reply("value", value, "")
        return True
    if kind == "flush":
        reply("flushed", None, state.errors.pop(client, ""))
        return True
    if kind == "warm":  # on a thread: a request that comes meanwhile waits only for what
        # it needs itself. Each time a request's database call returns, it waits for the
        # thread to hand the GIL back: after 1 ms instead of Python's 5.
        if not state.warm:
            state.warm = True
            sys.setswitchinterval(0.001)
            threading.Thread(target=_warm_up, name="expforge-warm-up", daemon=True).start()
        return True
    try:
        if kind == "record":
            write_record(state.client, payload, state.locations)
        elif kind == "submit":
            try:
                with open(payload, "rb") as f:
                    function, args = pickle.load(f)  # written by the client (0600)
            finally:
                os.unlink(payload)
            function(state.client, *args)
    except Exception as exc:
        state.errors[client] = state.errors[client] or error_line(exc)
    return True


def _portable(exc: Exception) -> Any:
    """An error to send back: our own one-line errors as they are, others as a line."""
    return exc if isinstance(exc, ExpforgeError) else error_line(exc)


def _warm_up() -> None:
    """MLflow's model logging, loaded ahead: its sklearn flavor, and the map of every
    installed module to its package that its first call builds (~0.3 s). Not the model's
    own classes (~1 s for scikit-learn's ensembles, to unpickle it): loaded during the
    trials, they slowed the runs' writes more than they saved at the end, where the writer
    loads them while this process draws the plots."""
    with contextlib.suppress(Exception):  # a private cache of MLflow's; only a warm-up
        import mlflow.sklearn  # noqa: F401
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()


def log_files(client: Any, run_id: str, folder: str) -> None:
    """The files under ``folder`` as the run's artifacts (same relative paths); the folder is
    removed (``expforge.plots.save_figures`` made it for this)."""
    import shutil

    try:
        client.log_artifacts(run_id, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def attach_model(client: Any, run_id: str, model: Any, input_example: Any) -> None:
    """Log a fitted model into the ended run ``run_id``; meant for ``RunWriter.submit``."""
    with tracked_run("", run_id=run_id):
        log_model(model, input_example)


def load_store_code(uri: str) -> None:
    """Load MLflow and the code of the store at ``uri`` (~2 s here), without opening it."""
    import importlib

    import mlflow  # noqa: F401

    with contextlib.suppress(ImportError):  # if it is broken, opening the store will say so
        importlib.import_module(_store_module(uri))


def _store_module(uri: str) -> str:
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    if scheme in _DB_SCHEMES:
        return "mlflow.store.tracking.sqlalchemy_store"
    if scheme in ("http", "https"):
        return "mlflow.store.tracking.rest_store"
    return "mlflow.store.tracking.file_store"


def _context_tags() -> dict[str, str]:
    """The tags mlflow.start_run adds (user, source, git), resolved once per writer."""
    from mlflow.tracking.context.registry import resolve_tags

    return dict(resolve_tags({}))


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags on any run, active or not, in one batch."""
    import mlflow
    from mlflow.entities import RunTag

    mlflow.MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_params(params: Mapping[str, str]) -> None:
    """All params in batched calls (MLflow splits batches of 100 itself)."""
    import mlflow

    mlflow.log_params(dict(params))


def log_figures(figures: Mapping[str, Any]) -> None:
    import mlflow

    for path, fig in figures.items():
        mlflow.log_figure(fig, path)


_DESCRIPTIONS: dict[tuple[str, str, str], DatasetDescription] = {}
_DATASET_ENTITIES: dict[tuple[str, str, str], tuple[Any, ...]] = {}


def describe_dataset(dataset: Any) -> DatasetDescription:
    """A loaded dataset as its runs' inputs record it; built once per dataset."""
    key = (dataset.name, dataset.source, dataset.digest)
    if key not in _DESCRIPTIONS:
        sample = dataset.train.X.head(100).assign(**{dataset.target: dataset.train.y.head(100)})
        splits = tuple((name, len(split.X), int(split.X.size + len(split.y)))
                       for name, split in dataset.splits.items())
        _DESCRIPTIONS[key] = DatasetDescription(*key, sample=sample, splits=splits)
    return _DESCRIPTIONS[key]


def dataset_inputs(description: DatasetDescription) -> tuple[Any, ...]:
    """MLflow dataset inputs (train/val/test with digest, source, schema); built once per
    dataset."""
    if description.key not in _DATASET_ENTITIES:
        _DATASET_ENTITIES[description.key] = _build_dataset_entities(description)
    return _DATASET_ENTITIES[description.key]


def _build_dataset_entities(description: DatasetDescription) -> tuple[Any, ...]:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.utils import _infer_schema

    with warnings.catch_warnings():  # MLflow's hint about integer columns is for model inputs
        warnings.simplefilter("ignore")
        schema = json.dumps({"mlflow_colspec": _infer_schema(description.sample).to_dict()})
    source_type = "local" if "/" in description.source else "code"
    inputs = []
    for split_name, rows, elements in description.splits:
        entity = Dataset(
            name=f"{description.name}-{split_name}",
            digest=f"{description.digest}-{split_name}"[:36],
            source_type=source_type,
            source=json.dumps({"uri": description.source}),
            schema=schema,
            profile=json.dumps({"num_rows": rows, "num_elements": elements}),
        )
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", split_name)]))
    return tuple(inputs)


def log_datasets(run_id: str, dataset: Any) -> None:
    """Record train/val/test as the run's dataset inputs, with digest and source."""
    import mlflow

    log_inputs(mlflow.MlflowClient(), run_id, describe_dataset(dataset))


def log_inputs(client: Any, run_id: str, description: DatasetDescription) -> None:
    """The described dataset's splits as the run's inputs."""
    from mlflow.exceptions import MlflowException

    inputs = list(dataset_inputs(description))
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException:
        # Processes that log runs at once may create the same dataset entity at once (the
        # first trials of parallel workers); the loser's insert fails (MLflow's get-or-create
        # is not atomic), and now it exists.
        time.sleep(0.5)
        client.log_inputs(run_id, datasets=inputs)


def log_model(model: Any, input_example: Any, name: str = "model") -> Any:
    """Log the fitted Pipeline with signature, example and explicit pip requirements.

    Giving the requirements skips MLflow's inference subprocess (seconds per call). The
    format is cloudpickle: MLflow's default, skops, costs 2.5-4 s of import per process here
    (it scans every loaded module), and these models are our own output in our own store.
    """
    import mlflow
    from mlflow.models import infer_signature

    _quiet_pickle_warning()
    example = input_example.head(5)
    signature = infer_signature(example, model.predict(example))
    return mlflow.sklearn.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(model),
        serialization_format="cloudpickle",
    )


@functools.lru_cache(maxsize=1)
def _quiet_pickle_warning() -> None:
    """Drop MLflow's per-call pickle warning; the README explains the choice once."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pickle or cloudpickle format" not in record.getMessage()

    logging.getLogger("mlflow.sklearn").addFilter(_Filter())


def _pip_requirements(model: Any) -> list[str]:
    packages = ["scikit-learn", "pandas", "numpy", "scipy", "cloudpickle"]
    estimator = type(model.steps[-1][1]).__module__
    if estimator.startswith("xgboost"):
        packages.append("xgboost")
    return [f"{p}=={metadata.version(p)}" for p in packages if _installed(p)]


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of python and the key packages, recorded on every run."""
    found = {"python": sys.version.split()[0]}
    for package in KEY_PACKAGES:
        found[package] = metadata.version(package) if _installed(package) else "absent"
    return found


@functools.lru_cache(maxsize=4)
def git_info(root: str) -> dict[str, str]:
    """Commit and dirty flag of the project repository (empty outside a git checkout)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}
