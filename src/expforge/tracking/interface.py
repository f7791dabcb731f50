"""``Store``: the one interface through which expforge records runs.

A run is created RUNNING when its work starts (``create_run``), handed over once as a
``RunRecord`` when its work ends (``write``), and may then get a model and files
(``attach_model``, ``attach_files``). Single runs, multirun jobs, trials, study and sweep
parent runs and re-evaluation runs all take this path. ``LocalStore`` does the work in the
calling process; the writer process (``tracking._writer``) does it in a process of its own,
behind the same methods. ``tracking.open_store`` chooses.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from expforge.config import mask_uri
from expforge.errors import ExpforgeError, TrackingError, error_line
from expforge.tracking.records import RunRecord
from expforge.tracking.store import TrackingSettings

__all__ = ["Store"]


class Store(ABC):
    """A tracking store's named operations. Writes are in order; where the work is done in
    another process, a write's error comes with the next ``flush``."""

    uri: str

    @abstractmethod
    def connect(self, settings: TrackingSettings,
                meanwhile: Callable[[], None] | None = None) -> str:
        """Open the store (created if new) and the experiment; the experiment's id. A store
        in another process opens while this one runs ``meanwhile``."""

    @abstractmethod
    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str],
                   parent_run_id: str | None = None,
                   on_created: Callable[[str], None] | None = None) -> Future[str]:
        """A new RUNNING run (with the context tags ``mlflow.start_run`` adds); a future of
        its id. ``on_created(run_id)`` runs as soon as the run exists."""

    @abstractmethod
    def write(self, record: RunRecord) -> None:
        """A run's contents in one go, and its end (unless ``record.status`` is None)."""

    @abstractmethod
    def attach_model(self, run_id: str, model: Any, input_example: Any) -> str | None:
        """Log a fitted model into a run, written or not; its URI where it is logged at once
        (None where another process logs it)."""

    @abstractmethod
    def attach_files(self, run_id: str, folder: str) -> None:
        """The files under ``folder`` as the run's artifacts; the folder is removed."""

    @abstractmethod
    def end_run(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        """End a run that is still RUNNING with ``status``, and tag it in any case."""

    @abstractmethod
    def rewrite_run(self, whole: RunRecord, end: RunRecord) -> None:
        """A run left unwritten by a killed process: ``whole`` if it has no params yet, else
        only ``end``."""

    @abstractmethod
    def open_parent_run(self, experiment_id: str, existing: str | None, name: str,
                        tags: Mapping[str, str]) -> tuple[str, bool]:
        """``existing`` if it is active, else a new parent run (the earliest where rivals
        start together); whether it was reused."""

    @abstractmethod
    def running_trial_runs(self, experiment_id: str, study_name: str) -> dict[str, str]:
        """``{trial number: run id}`` of the study's trial runs still RUNNING."""

    @abstractmethod
    def model_of(self, experiment_id: str, run_id: str) -> str | None:
        """The URI of the run's logged model, or None."""

    def load_code(self) -> None:
        """Load the store's code ahead (its imports), where that costs nothing: before a
        fork, whose children then inherit it, or while waiting."""

    def warm_up(self) -> None:
        """Load ahead what logging a model needs, where that costs the trials nothing."""

    def flush(self) -> None:
        """Wait until everything handed over is written; raise the first write's error."""

    def close(self) -> None:
        """Flush and let go of the store."""

    @abstractmethod
    def for_client(self, client: int) -> Store:
        """This store for a process forked from this one (parallel worker ``client``, from
        1)."""

    def clients_started(self) -> None:
        """Every process that takes a client (``for_client``) has been forked."""

    def wait(self, future: Future[Any], what: str = "creating a run") -> Any:
        """The value of a future of this store; its error as one of ours, other errors as a
        ``TrackingError`` that says ``what`` failed."""
        try:
            return future.result()
        except ExpforgeError:
            raise
        except Exception as exc:
            raise TrackingError(f"tracking.uri={mask_uri(self.uri)}: {what} failed: "
                                f"{error_line(exc)}") from exc

    @contextmanager
    def ended(self, run_id: str) -> Iterator[None]:
        """The run ends as the block does: FINISHED, FAILED (error tag and traceback) or
        KILLED (Ctrl-C, SIGTERM)."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            self.write(RunRecord(run_id, status="KILLED"))
            raise
        except BaseException as exc:
            self.write(failed_record(run_id, exc))
            raise
        else:
            self.write(RunRecord(run_id))


def failed_record(run_id: str, exc: BaseException) -> RunRecord:
    """The end of a run that ``exc`` stopped: FAILED with the error tag and the traceback
    (call it while ``exc`` is being handled)."""
    return RunRecord(run_id, status="FAILED", tags={"error": error_line(exc)},
                     texts={"error/traceback.txt": traceback.format_exc()})
