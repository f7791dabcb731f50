"""The requests a client sends the writer process, and its replies: one dataclass each.

A request that ``awaits`` a value carries the id of its reply (``Value.request``), so a
request whose sender was interrupted cannot take the next request's value. A request that
``drains`` is done after everything the other clients sent before it (a repair after the
writes of the worker it repairs; the end after every client's writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from expforge.tracking.records import RunRecord
from expforge.tracking.store import TrackingSettings

__all__ = [
    "AttachFiles", "AttachModel", "Close", "Connect", "CreateRun", "EndRun", "Flush",
    "ModelOf", "OpenParentRun", "Reply", "Request", "RewriteRun", "RunningTrialRuns", "Value",
    "WarmUp", "Write",
]


@dataclass
class Request:
    awaits: ClassVar[bool] = False  # answered with a Value
    drains: ClassVar[bool] = False  # done after what the other clients sent before it
    request: int = -1  # the id of its Value reply


@dataclass
class Connect(Request):
    awaits: ClassVar[bool] = True
    settings: TrackingSettings | None = None


@dataclass
class CreateRun(Request):
    awaits: ClassVar[bool] = True
    experiment_id: str = ""
    run_name: str = ""
    tags: dict[str, str] | None = None
    parent_run_id: str | None = None
    start: int = 0


@dataclass
class Write(Request):
    record: RunRecord | None = None


@dataclass
class AttachModel(Request):
    run_id: str = ""
    path: str = ""  # a private file holding the pickled (model, input example)


@dataclass
class AttachFiles(Request):
    run_id: str = ""
    folder: str = ""


@dataclass
class EndRun(Request):
    awaits: ClassVar[bool] = True
    drains: ClassVar[bool] = True
    run_id: str = ""
    status: str = ""
    tags: dict[str, str] | None = None


@dataclass
class RewriteRun(Request):
    awaits: ClassVar[bool] = True
    drains: ClassVar[bool] = True
    whole: RunRecord | None = None
    end: RunRecord | None = None


@dataclass
class OpenParentRun(Request):
    awaits: ClassVar[bool] = True
    drains: ClassVar[bool] = True
    experiment_id: str = ""
    existing: str | None = None
    name: str = ""
    tags: dict[str, str] | None = None


@dataclass
class RunningTrialRuns(Request):
    awaits: ClassVar[bool] = True
    drains: ClassVar[bool] = True
    experiment_id: str = ""
    study_name: str = ""


@dataclass
class ModelOf(Request):
    awaits: ClassVar[bool] = True
    drains: ClassVar[bool] = True
    experiment_id: str = ""
    run_id: str = ""


@dataclass
class WarmUp(Request):
    pass


@dataclass
class Flush(Request):
    pass


@dataclass
class Close(Request):
    """Client 0: the end of the writer; another client: the end of its requests."""

    drains: ClassVar[bool] = True


@dataclass
class Reply:
    error: Any = ""  # an ExpforgeError as it is, another error as one line, or ""


@dataclass
class Value(Reply):
    request: int = -1
    value: Any = None


@dataclass
class Flushed(Reply):
    """Everything the client sent before its Flush is done; ``error``: the first error of
    its writes since the last Flushed."""


@dataclass
class Closed(Reply):
    """The client's Close is done (and for client 0 the writer ends)."""
