"""``WriterClient``: ``Store`` over pipes to the writer process.

Client 0 is the process that starts the writer (the command); a process forked from it
later (a parallel worker) takes another client with ``for_client``. Each client has a pipe
for its requests, whose buffer bounds what can be pending, and one for the replies, which a
thread receives as they come, so that a trial is linked to its run as soon as the run
exists.
"""

from __future__ import annotations

import itertools
import os
import pickle
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

from expforge.config import mask_uri
from expforge.errors import TrackingError
from expforge.process import STOP_GRACE_S, interrupted_for, interrupts_deferred
from expforge.tracking._writer import messages as m
from expforge.tracking.interface import Store
from expforge.tracking.records import RunRecord
from expforge.tracking.store import TrackingSettings

__all__ = ["WriterClient"]


class WriterClient(Store):
    """A writer process and this process's client of it.

    Start it before this process imports MLflow: it is forked, and no database connection
    may cross a fork. The calling process then need not load MLflow at all.
    """

    def __init__(self, uri: str, clients: int = 1) -> None:
        import multiprocessing

        from expforge.tracking._writer.server import serve

        ctx = multiprocessing.get_context("fork")
        requests = [ctx.Pipe(duplex=False) for _ in range(clients)]  # (writer's, client's)
        replies = [ctx.Pipe(duplex=False) for _ in range(clients)]  # (client's, writer's)
        # The clients' ends, per client; the writer's own ends go to the writer.
        self._ends = [(send, receive)
                      for (_, send), (receive, _) in zip(requests, replies, strict=True)]
        self._closed = False
        self._process: Any = ctx.Process(
            target=serve,
            args=(uri, [r for r, _ in requests], [s for _, s in replies], os.getpid(),
                  self._ends),
            name="expforge-writer", daemon=False)
        self._process.start()
        for (receive, _), (_, send) in zip(requests, replies, strict=True):
            receive.close()
            send.close()
        self.uri = uri
        self._pid = self._process.pid
        self._attach(0)

    def for_client(self, client: int) -> Store:
        """Client ``client`` of this writer, in a process forked from client 0: its own
        pipes; the other clients' ends are closed here, so that the writer sees each client
        end when its process does."""
        other = object.__new__(WriterClient)
        other.uri, other._process, other._pid = self.uri, None, self._pid
        other._ends = self._ends
        other._attach(client)
        return other

    def clients_started(self) -> None:
        self._keep_only(self._client)

    # -- the operations --------------------------------------------------------------

    def connect(self, settings: TrackingSettings,
                meanwhile: Callable[[], None] | None = None) -> str:
        future = self._ask(m.Connect(settings=settings), "opening the store")
        if meanwhile is not None:
            meanwhile()
        return str(self.wait(future, "opening the store"))

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str],
                   parent_run_id: str | None = None,
                   on_created: Callable[[str], None] | None = None) -> Future[str]:
        return self._ask(m.CreateRun(experiment_id=experiment_id, run_name=run_name,
                                     tags=dict(tags), parent_run_id=parent_run_id,
                                     start=int(time.time() * 1000)),
                         "creating a run", on_created)

    def write(self, record: RunRecord) -> None:
        self._send(m.Write(record=record))

    def attach_model(self, run_id: str, model: Any, input_example: Any) -> None:
        """Through a private temporary file, not the pipe: a message bigger than the pipe's
        buffer would hold this process until the writer reads it."""
        fd, path = tempfile.mkstemp(prefix="expforge-model-", suffix=".pkl")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump((model, input_example), f, protocol=pickle.HIGHEST_PROTOCOL)
            self._send(m.AttachModel(run_id=run_id, path=path))
        except BaseException:  # not handed over (the writer deletes it once read)
            os.unlink(path)
            raise

    def attach_files(self, run_id: str, folder: str) -> None:
        self._send(m.AttachFiles(run_id=run_id, folder=folder))

    def end_run(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        self._call(m.EndRun(run_id=run_id, status=status, tags=dict(tags)), "ending a run")

    def rewrite_run(self, whole: RunRecord, end: RunRecord) -> None:
        self._call(m.RewriteRun(whole=whole, end=end), "writing a run again")

    def open_parent_run(self, experiment_id: str, existing: str | None, name: str,
                        tags: Mapping[str, str]) -> tuple[str, bool]:
        run_id, resumed = self._call(m.OpenParentRun(
            experiment_id=experiment_id, existing=existing, name=name, tags=dict(tags)),
            "opening the parent run")
        return str(run_id), bool(resumed)

    def running_trial_runs(self, experiment_id: str, study_name: str) -> dict[str, str]:
        found = self._call(m.RunningTrialRuns(experiment_id=experiment_id,
                                              study_name=study_name),
                           "finding the study's runs")
        return dict(found)

    def model_of(self, experiment_id: str, run_id: str) -> str | None:
        found = self._call(m.ModelOf(experiment_id=experiment_id, run_id=run_id),
                           "finding a run's model")
        return None if found is None else str(found)

    def warm_up(self) -> None:
        self._send(m.WarmUp())

    def wait(self, future: Future[Any], what: str = "creating a run") -> Any:
        while not future.done():
            wait_futures([future], timeout=0.5)
            self._check_grace()
        return super().wait(future, what)

    def flush(self) -> None:
        self._send(m.Flush())
        self._end(m.Flushed)

    def close(self) -> None:
        """Client 0: flush and end the writer. Another client: flush."""
        if self._closed:
            return
        self._closed = True
        if self._client != 0:
            self.flush()
            return
        try:
            self._send(m.Close())
            self._end(m.Closed)
        finally:
            self._requests.close()
            self._process.join(timeout=60)

    @property
    def pid(self) -> int:
        """The writer process's pid."""
        return int(self._pid or 0)

    @property
    def exitcode(self) -> int | None:
        """The writer process's exit code (client 0; None while it runs)."""
        return None if self._process is None else self._process.exitcode

    # -- the pipes -------------------------------------------------------------------

    def _attach(self, client: int) -> None:
        self._client = client
        self._opened = time.monotonic()  # an interrupt before this ended another study
        self._requests, self._replies = self._ends[client]
        # Requests that await a value, by id: (future, on_created, what failed).
        self._awaiting: dict[int, tuple[Future[Any], Callable[[str], None] | None, str]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._done: queue.Queue[m.Reply | None] = queue.Queue()  # Flushed, Closed; None: gone
        self._closed = False
        if client != 0:
            self._keep_only(client)
        threading.Thread(target=self._receive, name="expforge-writer-replies",
                         daemon=True).start()

    def _keep_only(self, client: int) -> None:
        for index, ends in enumerate(self._ends):
            if index != client:
                for end in ends:
                    end.close()

    def _call(self, request: m.Request, what: str) -> Any:
        return self.wait(self._ask(request, what), what)

    def _ask(self, request: m.Request, what: str,
             on_created: Callable[[str], None] | None = None) -> Future[Any]:
        """Send a request that the writer answers with a value; a future of the value."""
        future: Future[Any] = Future()
        with self._lock:
            request.request = next(self._ids)
            self._awaiting[request.request] = (future, on_created, what)
        try:
            self._send(request)
        except BaseException:
            with self._lock:
                self._awaiting.pop(request.request, None)
            raise
        return future

    def _send(self, request: m.Request) -> None:
        """Whole or not at all: Ctrl-C or SIGTERM between the two writes of a big message
        would leave half of it in the pipe, and the writer could not read on."""
        if self._process is not None and not self._process.is_alive():
            raise self._ended()
        try:
            with interrupts_deferred():
                self._requests.send(request)
        except (BrokenPipeError, ConnectionResetError) as exc:  # the writer is gone
            raise self._ended() from exc

    def _end(self, expected: type[m.Reply]) -> None:
        """Wait for the reply ``expected``. Replies to earlier requests whose wait was cut
        short (Ctrl-C during a flush) come first; their errors count too."""
        first_error = ""
        while True:
            try:
                reply = self._done.get(timeout=0.5)
            except queue.Empty:
                self._check_grace()
                continue
            if reply is None:
                raise self._ended()
            first_error = first_error or str(reply.error or "")
            if isinstance(reply, expected):
                break
        if first_error:  # a whole line (server._serve)
            raise TrackingError(first_error)

    def _check_grace(self) -> None:
        """Every wait ends: when the writer is gone (the reply thread sees its pipe close),
        and at most ``STOP_GRACE_S`` after Ctrl-C (a store that does not answer would hold
        the command for minutes), when client 0 stops the writer without the writes it
        still holds."""
        since = interrupted_for()
        if since is None or time.monotonic() - since < self._opened:
            return  # no interrupt, or one of an earlier study of this process (a notebook's)
        if since > STOP_GRACE_S:
            if self._process is not None:
                self._process.kill()
                self._process.join(timeout=5)
            raise KeyboardInterrupt(f"the run writer did not finish within {STOP_GRACE_S:g} s")

    def _receive(self) -> None:
        try:
            while True:
                reply = self._replies.recv()
                if not isinstance(reply, m.Value):
                    self._done.put(reply)
                    continue
                with self._lock:
                    awaited = self._awaiting.pop(reply.request, None)
                if awaited is None:
                    continue  # its sender was interrupted and gave up on it
                future, on_created, what = awaited
                try:
                    if isinstance(reply.error, BaseException):
                        raise reply.error
                    if reply.error:
                        raise TrackingError(
                            f"tracking.uri={mask_uri(self.uri)}: {what} failed: {reply.error}")
                    if on_created is not None:
                        on_created(reply.value)
                    future.set_result(reply.value)
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
            self._done.put(None)

    def _ended(self) -> TrackingError:
        code = f" (exit code {self._process.exitcode})" if self._process is not None else ""
        return TrackingError(f"tracking.uri={mask_uri(self.uri)}: the run writer process "
                             f"(pid {self._pid}) ended{code}")
