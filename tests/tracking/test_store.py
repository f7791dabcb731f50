"""Opening a store: four processes writing one SQLite store at once (in WAL mode), a first
run stopped while MLflow creates its store, and new stores copied from a cached schema."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import ROOT, client

WRITER = """
import sys
from expforge.tracking import LocalStore, RunRecord, TrackingSettings
settings = TrackingSettings(uri=sys.argv[1], experiment="writers", artifact_root=sys.argv[2])
store = LocalStore(settings.uri)
exp = store.connect(settings)
for i in range(25):
    run = store.wait(store.create_run(exp, f"w{sys.argv[3]}-{i}", {"writer": sys.argv[3]}))
    store.write(RunRecord(run, params={f"p{k}": str(k) for k in range(10)},
                          metrics={f"m{k}": float(k) for k in range(5)}))
"""


def test_four_processes_write_one_sqlite_store_without_loss(tmp_path: Path) -> None:
    """Four processes started at once on a new store, and with no cached schema yet: each
    may make the store and the cache, and one of each stays, whole."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(tmp_path), str(w)],
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for w in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not any("database is locked" in e for e in errors)
    assert [p.name for p in (tmp_path / "cache" / "expforge").iterdir()] == [schema_name()]
    assert sorted(p.name for p in tmp_path.glob("*mlflow.db*creating*")) == []
    from expforge.tracking.store import sqlite_commits_without_fsync

    sqlite_commits_without_fsync()  # before this process connects, as a writer does
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("writers").experiment_id], max_results=500)
    assert len(runs) == 100 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(len(r.data.params) == 10 and len(r.data.metrics) == 5 for r in runs)
    # The store expforge made is in WAL journal mode, which the file keeps, and the
    # connections of a process that writes through expforge commit without an fsync.
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # SQLite's own: FULL
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = SqlAlchemyStore(uri, str(tmp_path)).engine
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").fetchone() == (1,)  # NORMAL


def test_a_first_run_interrupted_while_creating_its_store_leaves_no_half_made_store(
        tmp_path: Path) -> None:
    """MLflow creates a store by migrating it (~2 s). Ctrl-C meanwhile used to leave a file
    that every later command failed to open; the store now appears complete or not at all,
    and so does the empty schema that later stores are copied from."""
    cache = tmp_path / "cache"  # no schema there yet: this run migrates one
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["XDG_CACHE_HOME"] = str(cache)
    args = [sys.executable, str(ROOT / "run.py"), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    deadline = time.time() + 60
    while not list(cache.glob("expforge/.mlflow-schema-*.db.creating-*")):
        assert time.time() < deadline and proc.poll() is None, "no migrations began"
        time.sleep(0.005)
    time.sleep(0.2)  # inside the migrations
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if "mlflow" in p.name) == []
    assert list((cache / "expforge").iterdir()) == []
    again = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False,
                           env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.name for p in (cache / "expforge").iterdir()] == [schema_name()]
    # The run closed its store: the -wal file is folded into mlflow.db and gone.
    assert sorted(p.name for p in tmp_path.iterdir() if "mlflow" in p.name) == ["mlflow.db"]


def test_a_new_store_is_a_copy_of_the_cached_schema_with_its_own_artifact_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow migrates an empty schema once into the cache; each new store is a copy of it
    that keeps its own default experiment. A damaged cached file is made again; where there
    is no cache to write, each store is migrated in place, as without one."""
    from mlflow.entities import Param

    from expforge.tracking import LocalStore, TrackingSettings

    migrations = _Migrations()
    logger = logging.getLogger("mlflow.store.db.utils")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, migrations])
    cached = tmp_path / "cache" / "expforge" / schema_name()
    for name, cache, migrated in (("first", "cache", 1), ("second", "cache", 0),
                                  ("damaged", "cache", 1), ("again", "cache", 0),
                                  ("no-cache", "a-file", 1)):
        if name == "damaged":
            cached.write_bytes(b"not a database")
        (tmp_path / "a-file").touch()  # a cache folder that cannot be made
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / cache))
        settings = TrackingSettings(uri=f"sqlite:///{tmp_path}/{name}.db", experiment=name,
                                    artifact_root=str(tmp_path / f"art-{name}"))
        migrations.seen = 0
        LocalStore(settings.uri).connect(settings)
        assert migrations.seen == migrated, name
        c = client(settings.uri)
        assert c.get_experiment("0").artifact_location == (
            tmp_path / f"art-{name}" / "0").as_uri()
        assert c.get_experiment_by_name(name) is not None
        run = c.create_run(c.get_experiment_by_name(name).experiment_id)
        c.log_batch(run.info.run_id, params=[Param("alpha", "1.0")])
        c.set_terminated(run.info.run_id)
        assert c.get_run(run.info.run_id).data.params == {"alpha": "1.0"}
        assert cached.read_bytes().startswith(b"SQLite format 3"), name
    assert sorted(p.name for p in tmp_path.rglob("*creating*")) == []


class _Migrations(logging.Handler):
    """Counts MLflow's migrations of a new schema."""

    seen = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.seen += "Creating initial MLflow database tables" in record.getMessage()


def schema_name() -> str:
    """The cached empty schema's file name: one a version of MLflow's schema."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return f"mlflow-schema-{_get_latest_schema_revision()}.db"


ALONGSIDE = """
import sys, time
from pathlib import Path
import mlflow
from expforge.tracking import LocalStore, TrackingSettings
db = Path(sys.argv[1])
while not db.exists():
    time.sleep(0.001)
settings = TrackingSettings(uri=f"sqlite:///{db}", experiment="alongside",
                            artifact_root=sys.argv[2])
print("experiment", LocalStore(settings.uri).connect(settings))
"""


def test_a_run_opening_a_store_that_plain_mlflow_is_creating_waits_for_it(
        tmp_path: Path) -> None:
    """``mlflow ui`` or a plain MLflow script creates its store in place; a run that opens
    the file meanwhile used to migrate it too and fail on tables the other had made."""
    db = tmp_path / "mlflow.db"
    ours = subprocess.Popen([sys.executable, "-c", ALONGSIDE, str(db), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    theirs = subprocess.run(
        [sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1])"
         ".search_experiments()", f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=120, check=False)
    out, err = ours.communicate(timeout=120)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert ours.returncode == 0 and "experiment " in out, err[-2000:]
    assert client(f"sqlite:///{db}").get_experiment_by_name("alongside") is not None
