"""Opening a store: the settings, a quick reachability probe, a SQLite store created whole,
and the experiment, got or created."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from expforge.config import mask_uri, slug
from expforge.databases import DatabaseUnusable, probe, schema_lock
from expforge.errors import TrackingError, first_line

__all__ = ["WRITERS", "TrackingSettings", "check_reachable", "close_sqlite_stores", "connect",
           "load_store_code", "quiet_http_client", "ui_command"]

DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Classical training, for MLflow UIs that read the experiment's kind from this tag (3.17.2's
# does not: see TRAINING_VIEW).
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17.2's UI decides between its GenAI and its training views by a setting of the
# browser (default GenAI), not by that tag; an address can ask for the training view.
TRAINING_VIEW = "runs?workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where ``mlflow ui`` listens by default
# Who writes a search's runs: a process of its own, this process, or the choice of
# ``open_store`` (see docs/design.md).
WRITERS = ("auto", "process", "inline")


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
    writer: str = "auto"
    retry_s: float = 120.0
    system_metrics: bool = False
    reuse: bool = False

    @classmethod
    def from_config(cls, tracking: Mapping[str, Any]) -> TrackingSettings:
        writer = str(tracking.get("writer") or "auto")
        if writer not in WRITERS:
            from expforge.errors import ConfigError

            raise ConfigError(f"tracking.writer={writer} is invalid; choose one of: "
                              f"{', '.join(WRITERS)}")
        return cls(
            uri=str(tracking["uri"]),
            experiment=str(tracking["experiment"]),
            artifact_root=tracking.get("artifact_root"),
            run_name=tracking.get("run_name"),
            tags={str(k): str(v) for k, v in (tracking.get("tags") or {}).items()},
            log_model=bool(tracking.get("log_model", True)),
            log_plots=bool(tracking.get("log_plots", True)),
            autolog=bool(tracking.get("autolog", False)),
            writer=writer,
            retry_s=float(tracking.get("retry_s") or 120.0),
            system_metrics=bool(tracking.get("system_metrics", False)),
            reuse=bool(tracking.get("reuse", False)),
        )


def ui_command(uri: str, experiment_id: str) -> str:
    """How to look at an experiment's runs in the MLflow UI: the address of its training-runs
    view, after ``mlflow ui`` where no server runs."""
    if uri.startswith(("http://", "https://")):
        return f"{mask_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/{TRAINING_VIEW}"
    return (f"mlflow ui --backend-store-uri {mask_uri(uri)}, then "
            f"{LOCAL_UI}/#/experiments/{experiment_id}/{TRAINING_VIEW}")


def connect(settings: TrackingSettings) -> str:
    """Point MLflow at ``settings.uri``, fail fast if it is unusable; the experiment's id."""
    import mlflow

    scheme = urlparse(settings.uri).scheme.split("+", 1)[0]
    if scheme != "postgresql":  # there, the schema lock's connection is the probe
        check_reachable(settings.uri)
    if scheme in ("http", "https"):
        quiet_http_client(settings.retry_s)
    if scheme == "sqlite":
        _create_sqlite_store(settings)
        sqlite_commits_without_fsync()
    mlflow.set_tracking_uri(settings.uri)
    mlflow.set_registry_uri(settings.uri)
    if scheme == "postgresql":
        try:  # the first command on a new database creates MLflow's schema, alone
            with schema_lock(settings.uri, "expforge: mlflow schema"):
                return ensure_experiment(settings)
        except DatabaseUnusable as exc:
            raise _unusable(settings.uri, exc) from None
    return ensure_experiment(settings)


def quiet_http_client(retry_s: float) -> None:
    """MLflow's HTTP client for a tracking server: a request to a server that stops
    answering is retried for about ``retry_s`` seconds, not its default of about four
    minutes; urllib3's line per retry and MLflow's link per run are not shown. Settings the
    user made in the environment stay."""
    import logging

    # MLflow's retries sleep 0, 2, 4, 8, ... s (backoff factor 1) plus up to 1 s of jitter
    # each; it allows at most 10 retries.
    retries, waited = 0, 0.0
    while waited < retry_s and retries < 10:
        retries += 1
        waited += (2.0 ** (retries - 1) if retries > 1 else 0.0) + 0.5
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(min(120, max(10, retry_s)))))
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # MLflow prints "View run ... / View experiment ..." for every run it ends on a server,
    # after expforge's own summary, which names the UI once.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _create_sqlite_store(settings: TrackingSettings) -> None:
    """A new SQLite store is made under a temporary name and linked into place complete.

    MLflow creates a store by running its schema migrations in the file itself; a Ctrl-C
    meanwhile left a half-made store that every later command failed to open. The link does
    not replace a store that another process made first. The store starts as a copy of the
    cached empty schema (``_copy_empty_schema``) where there is one, and is made in WAL
    journal mode, which the file keeps (see ``sqlite_commits_without_fsync``).
    """
    path = Path(settings.uri.split("sqlite:///", 1)[-1])
    if path.exists():
        return
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = Path(settings.artifact_root or path.parent / "mlartifacts").resolve().as_uri()
    with _made_whole(path) as temporary:
        _copy_empty_schema(temporary)
        SqlAlchemyStore(f"sqlite:///{temporary}", root).engine.dispose()
        with contextlib.closing(sqlite3.connect(temporary)) as db:
            db.execute("PRAGMA journal_mode=WAL")  # its -wal file goes at close


@contextlib.contextmanager
def _made_whole(path: Path, replace: bool = False) -> Iterator[Path]:
    """A SQLite file written under a temporary name beside ``path``, then linked into place
    (never over a file that another process put there first), or with ``replace`` put in
    place of what is there; whatever is left of the temporary file is removed."""
    temporary = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        yield temporary
        if replace:
            os.replace(temporary, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                temporary.with_name(temporary.name + suffix).unlink()


def _copy_empty_schema(target: Path) -> None:
    """Copies to ``target`` a SQLite file that holds MLflow's tracking schema and no rows,
    kept per schema version in the user's cache (``$XDG_CACHE_HOME/expforge``, else
    ``~/.cache/expforge``) and made there first where it is missing or is not that schema.
    Where the cache cannot be written or read, nothing is copied and MLflow migrates
    ``target`` itself.

    MLflow makes a store by running each of its schema migrations; a copy of the result opens
    at once, and MLflow adds its default experiment, with the new store's artifact root, on
    that first open. A cached file is replaced whole, so a copy being made meanwhile reads
    the old file or the new one.
    """
    try:
        from mlflow.store.db.utils import (  # MLflow's private ones: without them, no copy
            _get_latest_schema_revision,
            _initialize_tables,
            create_sqlalchemy_engine,
        )

        head = _get_latest_schema_revision()
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "expforge")
        schema = cache / f"mlflow-schema-{head}.db"
        if _revision(schema) != head:  # none yet, or damaged
            cache.mkdir(parents=True, exist_ok=True)
            with _made_whole(schema, replace=True) as temporary:
                engine = create_sqlalchemy_engine(f"sqlite:///{temporary}")
                try:
                    _initialize_tables(engine)
                finally:
                    engine.dispose()
        shutil.copyfile(schema, target)
        copied = _revision(target) == head
    except Exception:  # a cache that cannot be written or read
        copied = False
    if not copied:  # MLflow migrates target itself
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


def _revision(path: Path) -> str | None:
    """The schema version of the MLflow store at ``path`` (None if it is none)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as db:
            return str(db.execute("SELECT version_num FROM alembic_version").fetchone()[0])
    except (sqlite3.Error, TypeError):
        return None


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
    elif scheme == "postgresql":
        try:
            probe(uri)
        except DatabaseUnusable as exc:
            raise _unusable(uri, exc) from None
    elif scheme in DB_SCHEMES:
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


def _unusable(uri: str, exc: DatabaseUnusable) -> TrackingError:
    return TrackingError(f"tracking.uri={mask_uri(uri)} cannot be opened ({exc}); start the "
                         "database, create it, or fix tracking.uri")


def _default_port(scheme: str) -> int | None:
    return {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(scheme)


def ensure_experiment(settings: TrackingSettings) -> str:
    """Get or create the experiment; for database stores its artifacts go to artifact_root."""
    from mlflow.exceptions import MlflowException

    try:
        client = _client_of(settings.uri)
    except Exception as exc:  # a store MLflow cannot open, or cannot bring up to date
        hint = ""
        if urlparse(settings.uri).scheme == "sqlite":
            hint = ("; if a run was interrupted while the store was being created, it holds no "
                    "runs: delete the file and run again")
        raise TrackingError(f"tracking.uri={mask_uri(settings.uri)} cannot be opened "
                            f"({first_line(exc)}){hint}") from None
    try:
        existing = client.get_experiment_by_name(settings.experiment)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                client.restore_experiment(existing.experiment_id)
            if existing.tags.get(KIND_TAG) is None:  # made by an older expforge, or by hand
                client.set_experiment_tag(existing.experiment_id, KIND_TAG, TRAINING_KIND)
            return str(existing.experiment_id)
        location = None
        scheme = urlparse(settings.uri).scheme.split("+", 1)[0]
        if settings.artifact_root and scheme in DB_SCHEMES:
            location = Path(settings.artifact_root, slug(settings.experiment)).resolve().as_uri()
        try:
            return str(client.create_experiment(settings.experiment, artifact_location=location,
                                                tags={KIND_TAG: TRAINING_KIND}))
        except MlflowException as exc:  # another process created it first
            found = client.get_experiment_by_name(settings.experiment)
            if found is None:
                raise TrackingError(
                    f"tracking.experiment={settings.experiment} cannot be created: "
                    f"{first_line(exc)}"
                ) from None
            return str(found.experiment_id)
    except MlflowException as exc:
        raise TrackingError(f"tracking.uri={mask_uri(settings.uri)}: {first_line(exc)}"
                            ) from None


def _client_of(uri: str) -> Any:
    """MLflow's client of the store at ``uri``.

    A SQLite store that another program (``mlflow ui``, a plain MLflow script) creates in
    place holds only some of MLflow's tables while its migrations run. Opening it then would
    migrate it from this process too, and both fail on each other's tables ("table ...
    already exists"). Such a store is opened once the file has been still for a second; an
    open that still meets the last migrations is tried again, a few times. A store left
    half-made for good fails with MLflow's own reason.
    """
    import mlflow

    path = Path(uri.split("sqlite:///", 1)[-1]) if urlparse(uri).scheme == "sqlite" else None
    if path is not None and not _has_all_tables(path):
        _wait_until_still(path)
    for _ in range(3):
        try:
            return mlflow.MlflowClient(uri)
        except Exception as exc:
            if path is None or "not a database" in str(exc):
                raise
        _wait_until_still(path)
    return mlflow.MlflowClient(uri)


def _has_all_tables(path: Path) -> bool:
    """Whether the SQLite file holds every table of MLflow's tracking schema (a file that is
    not a database counts as whole: MLflow's open says what it is)."""
    import sqlite3

    import mlflow.store.db.utils  # noqa: F401  (it puts every table of the schema in Base)
    from mlflow.store.db.base_sql_model import Base

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.DatabaseError:
        return True
    return set(Base.metadata.tables) <= {name for (name,) in rows}


def _wait_until_still(path: Path, still_s: float = 1.0, limit_s: float = 60.0) -> None:
    """Wait until neither the SQLite file nor its journals have changed for ``still_s``."""
    def changed() -> float:
        names = (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal"))
        return max((p.stat().st_mtime for p in names if p.exists()), default=0.0)

    deadline = time.monotonic() + limit_s
    while time.time() - changed() < still_s and time.monotonic() < deadline:
        time.sleep(0.1)


_FSYNC_OFF = [False]


def sqlite_commits_without_fsync() -> None:
    """Every SQLite connection this process opens to a database in WAL journal mode (the
    stores expforge creates) commits with ``synchronous=NORMAL``: no fsync per commit, only at
    checkpoints. A commit stays atomic and the file consistent; what a power cut (not a
    crashed process) can lose is the last commits before it."""
    if _FSYNC_OFF[0]:
        return
    _FSYNC_OFF[0] = True
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def on_connect(connection: Any, _: Any) -> None:
        if not isinstance(connection, sqlite3.Connection):
            return
        try:
            (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        except sqlite3.DatabaseError:
            return  # not a database: MLflow's own open fails and says so, without retrying
        if str(mode).lower() == "wal":
            connection.execute("PRAGMA synchronous=NORMAL")

    event.listen(Engine, "connect", on_connect)


def close_sqlite_stores() -> None:
    """Close the connections that this process's MLflow keeps to SQLite stores.

    The last connection to a store in WAL journal mode to close folds the ``-wal`` file into
    the store file and removes it, so that after a command the store file alone holds every
    commit (a copy, a move). The interpreter does not close them at exit where the collector
    is frozen (``process.freeze_at_exit``), nor in a process that multiprocessing ends. A
    closed engine opens new connections if it is used again. Registered with ``atexit`` as
    this module is imported; the writer process calls it as it ends.
    """
    import sys

    for module, name in (("mlflow.store.tracking.sqlalchemy_store", "SqlAlchemyStore"),
                         ("mlflow.store.model_registry.sqlalchemy_store", "SqlAlchemyStore")):
        engines = getattr(getattr(sys.modules.get(module), name, None), "_engine_map", {})
        for engine in list(engines.values()):
            if engine.dialect.name == "sqlite":
                engine.dispose()


# Registered before MLflow is loaded, so that it runs after MLflow's own exit handlers (an
# open run's end, queued async logging), which write through these engines.
atexit.register(close_sqlite_stores)


def load_store_code(uri: str) -> None:
    """Load MLflow and the code of the store at ``uri`` without opening it."""
    import mlflow  # noqa: F401

    if urlparse(uri).scheme == "sqlite":
        sqlite_commits_without_fsync()
    with contextlib.suppress(ImportError):  # if it is broken, opening the store will say so
        importlib.import_module(_store_module(uri))


def _store_module(uri: str) -> str:
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    if scheme in DB_SCHEMES:
        return "mlflow.store.tracking.sqlalchemy_store"
    if scheme in ("http", "https"):
        return "mlflow.store.tracking.rest_store"
    return "mlflow.store.tracking.file_store"
