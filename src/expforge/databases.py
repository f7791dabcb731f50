"""Database URLs shared by MLflow's store and Optuna's storage: a quick first connection
(one line instead of minutes of retries) and a lock held while a schema is created.

Several commands that open a new database at the same moment (an array job's tasks) each
run the schema creation of MLflow or Optuna, and those race: PostgreSQL refuses the second
``CREATE TABLE`` of a name (``DuplicateTable``, ``UniqueViolation ... pg_type``). A retry
after such an error could find a schema half made by the other command, so instead every
command takes one lock per database for its first connection: the first creates the
schema, the others wait and then find it complete (docs/design.md, "Processes starting
together").
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from expforge.errors import first_line

__all__ = ["DatabaseUnusable", "probe", "schema_lock"]

CONNECT_TIMEOUT_S = 5


class DatabaseUnusable(Exception):
    """The database cannot be reached or opened; the first line of the reason."""


@contextlib.contextmanager
def schema_lock(url: str, name: str) -> Iterator[None]:
    """Hold the lock ``name`` of the database at ``url`` for the block: a session advisory
    lock on PostgreSQL (it ends with the connection, also when the process dies), ``flock``
    on ``<file>.lock`` beside a SQLite file; nothing for other URLs. Raises
    ``DatabaseUnusable`` when the database cannot be connected to."""
    scheme = urlparse(url).scheme.split("+", 1)[0]
    if scheme == "postgresql":
        with _advisory_lock(url, name):
            yield
    elif scheme == "sqlite" and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.split("sqlite:///", 1)[1])
        if not path.parent.is_dir():
            yield  # reported by the caller's own check
            return
        with open(path.with_name(f".{path.name}.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        yield


def probe(url: str) -> None:
    """Connect once, within seconds (MLflow retries a failed connection for minutes)."""
    engine = _engine(url)
    try:
        engine.connect().close()
    except Exception as exc:
        raise DatabaseUnusable(_reason(exc)) from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def _advisory_lock(url: str, name: str) -> Iterator[None]:
    import sqlalchemy

    engine = _engine(url)
    try:
        try:
            connection = engine.connect()
        except Exception as exc:
            raise DatabaseUnusable(_reason(exc)) from None
        with connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:name))"),
                               {"name": name})
            connection.commit()
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    connection.execute(
                        sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:name))"),
                        {"name": name})
                    connection.commit()
    finally:
        engine.dispose()


def _engine(url: str) -> Any:
    """An engine for one connection that gives up after ``CONNECT_TIMEOUT_S``."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def _reason(exc: BaseException) -> str:
    """The driver's own message ("database "x" does not exist"), without SQLAlchemy's
    wrapping."""
    original: Any = getattr(exc, "orig", None) or exc
    return first_line(original).removeprefix("connection failed: ")
