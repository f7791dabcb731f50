"""The writer process: do what arrives from each client, in each client's order.

Ordering rules (why: docs/design.md):
1. Each client's requests are done in the order it sent them, except that
2. a ``CreateRun`` goes before the writes queued ahead of it (a trial waits for its run's
   id; nobody waits for an ended run's writes), and
3. a request that ``drains``, and every request of client 0 (the command), is done after
   everything the other clients sent so far: a dead worker's runs are written before they
   are repaired, and none of the workers' writes are dropped at the end.
The writer ends when client 0 closes, or once every client is gone and what they sent is
done.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from expforge.config import mask_uri
from expforge.errors import ExpforgeError, error_line
from expforge.process import freeze_loaded, ignore_interrupts, name_process
from expforge.tracking._writer import messages as m
from expforge.tracking.local import LocalStore
from expforge.tracking.models import load_model_code
from expforge.tracking.store import close_sqlite_stores

__all__ = ["serve"]


@dataclass
class _State:
    store: LocalStore
    replies: list[Any]  # the writer's end of each client's reply pipe
    parent: int  # the command's pid: a create for it after its death is not done
    errors: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    warm: bool = False


def serve(uri: str, requests: list[Any], replies: list[Any], parent: int,
          client_ends: list[tuple[Any, Any]]) -> None:
    """The writer process's main: ``requests``/``replies`` are the writer's pipe ends, one
    per client; ``client_ends`` the clients' ends, closed here."""
    from multiprocessing.connection import wait

    ignore_interrupts()
    name_process("expforge-writer")
    for ends in client_ends:
        for end in ends:
            end.close()
    state = _State(LocalStore(uri), replies, parent)
    state.store.load_code()  # before any request needs it
    freeze_loaded()  # what is loaded now stays out of the collector's walks
    live = dict(enumerate(requests))  # the clients whose pipe is open
    pending: dict[int, deque[m.Request]] = {client: deque() for client in live}
    try:
        while live or any(pending.values()):
            ready = wait(list(live.values()), timeout=0 if any(pending.values()) else None)
            for connection in ready:
                _read(next(c for c, x in live.items() if x is connection), live, pending)
            for client, queued in pending.items():  # rule 2
                for request in [r for r in queued if isinstance(r, m.CreateRun)]:
                    queued.remove(request)
                    _serve(state, client, request)
            for client in [c for c, queued in pending.items() if queued]:
                head = pending[client][0] if pending[client] else None
                if (client == 0 or (head is not None and head.drains)) and len(pending) > 1:
                    for other in [c for c in pending if c != 0]:  # rule 3
                        if other in live:
                            _read(other, live, pending)
                        while pending[other]:
                            _serve(state, other, pending[other].popleft())
                if pending[client] and not _serve(state, client, pending[client].popleft()):
                    return
    finally:  # the store file alone then holds every run (multiprocessing skips atexit)
        close_sqlite_stores()


def _read(client: int, live: dict[int, Any], pending: dict[int, deque[m.Request]]) -> None:
    """Every request of ``client`` that has arrived; a client whose process is gone is no
    longer live (what it sent whole is still done)."""
    connection = live[client]
    while connection.poll():
        try:
            pending[client].append(connection.recv())
        except Exception:  # gone (EOF), or died inside a send
            del live[client]
            return


def _serve(state: _State, client: int, request: m.Request) -> bool:
    """Do one request of ``client``; False when client 0 closes."""
    if isinstance(request, m.Close):
        _reply(state, client, m.Closed(error=state.errors.pop(client, "")))
        return client != 0
    if isinstance(request, m.Flush):
        _reply(state, client, m.Flushed(error=state.errors.pop(client, "")))
        return True
    if isinstance(request, m.WarmUp):
        _warm_up(state)
        return True
    if isinstance(request, m.CreateRun) and client == 0 and os.getppid() != state.parent:
        return True  # the command was killed meanwhile: nobody would write or end the run
    try:
        value = _do(state.store, request)
    except Exception as exc:
        if request.awaits:
            _reply(state, client, m.Value(error=_portable(exc), request=request.request))
        else:
            # a whole line: LocalStore's errors say what failed already
            line = str(exc) if isinstance(exc, ExpforgeError) else (
                f"tracking.uri={mask_uri(state.store.uri)}: writing a run failed: "
                f"{error_line(exc)}")
            state.errors[client] = state.errors[client] or line
    else:
        if request.awaits:
            _reply(state, client, m.Value(request=request.request, value=value))
    return True


def _do(store: LocalStore, request: m.Request) -> Any:
    """The store's operation that ``request`` names."""
    match request:
        case m.Connect(settings=settings) if settings is not None:
            return store.connect(settings)
        case m.CreateRun():
            return store.create_run_now(request.experiment_id, request.run_name,
                                        request.tags or {}, request.parent_run_id,
                                        request.start)
        case m.Write(record=record) if record is not None:
            store.write(record)
        case m.AttachModel(run_id=run_id, path=path):
            try:
                with open(path, "rb") as f:
                    model, example = pickle.load(f)  # written by the client (mode 0600)
            finally:
                os.unlink(path)
            store.attach_model(run_id, model, example)
        case m.AttachFiles(run_id=run_id, folder=folder):
            store.attach_files(run_id, folder)
        case m.EndRun(run_id=run_id, status=status, tags=tags):
            store.end_run(run_id, status, tags or {})
        case m.RewriteRun(whole=whole, end=end) if whole is not None and end is not None:
            store.rewrite_run(whole, end)
        case m.OpenParentRun():
            return store.open_parent_run(request.experiment_id, request.existing,
                                         request.name, request.tags or {})
        case m.RunningTrialRuns(experiment_id=experiment_id, study_name=study_name):
            return store.running_trial_runs(experiment_id, study_name)
        case m.ModelOf(experiment_id=experiment_id, run_id=run_id):
            return store.model_of(experiment_id, run_id)
        case _:
            raise TypeError(f"the writer process has no operation for {request!r}")
    return None


def _reply(state: _State, client: int, reply: m.Reply) -> None:
    with contextlib.suppress(OSError):  # the client died meanwhile
        state.replies[client].send(reply)


def _portable(exc: Exception) -> Any:
    """An error to send back: our own one-line errors as they are, others as a line."""
    return exc if isinstance(exc, ExpforgeError) else error_line(exc)


def _warm_up(state: _State) -> None:
    """MLflow's model logging, loaded on a thread: a request that comes meanwhile waits only
    for what it needs itself. Each time a request's database call returns, it waits for the
    thread to hand the GIL back: sooner with a shorter switch interval."""
    if state.warm:
        return
    state.warm = True
    sys.setswitchinterval(0.001)
    threading.Thread(target=load_model_code, name="expforge-warm-up", daemon=True).start()
