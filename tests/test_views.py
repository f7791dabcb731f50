"""What a user looks at after a study: the study report in a browser, the study in the MLflow
UI and in optuna-dashboard, and a console that leaves the libraries' lines to the job log.

One study made through the CLI (a fresh store) serves every case of the module; the module's
cases run in one test process (``xdist_group``), so it is made once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    browser_page,
    client,
    free_port,
    mlflow_server,
    rendered_figures,
    run_cli,
    wait_for_http,
)
from .search.test_scale_out import PG, postgres_reachable

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("views")]

N_TRIALS = 4


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("views")
    uri = f"sqlite:///{base}/mlflow.db"
    done = run_cli("search=optuna", "model=rf", f"search.n_trials={N_TRIALS}",
                   "search.study_name=views", f"search.storage={base}/views.journal",
                   "search_space.model.n_estimators.high=30", f"tracking.uri={uri}",
                   f"tracking.artifact_root={base}/art", f"paths.outputs={base}/out")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    summary = next(line for line in lines if line.startswith("study views: "))
    return {"base": base, "uri": uri, "done": done, "lines": lines,
            "parent": summary.split()[-1], "journal": base / "views.journal"}


def _line(study: dict[str, Any], prefix: str) -> str:
    return next(line for line in study["lines"] if line.startswith(prefix)).removeprefix(prefix)


def test_the_study_report_is_one_page_that_shows_its_figures_offline(study) -> None:
    page = Path(_line(study, "study report: "))
    assert page.is_file() and (study["base"] / "out") in page.parents
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and not re.findall(r'(?:src|href)="(?!data:)', text)
    c = client(study["uri"])
    parent = c.get_run(study["parent"])
    assert "study_report.html" in {a.path for a in c.list_artifacts(study["parent"])}

    with browser_page(offline=True) as p:
        p.goto(page.as_uri())
        figures = rendered_figures(p)
        headers = p.locator("table.leaderboard thead th").all_inner_texts()
        rows = [r.split("\t") for r in p.locator("table.leaderboard tbody tr").all_inner_texts()]
        facts = dict(zip(p.locator("dt").all_inner_texts(), p.locator("dd").all_inner_texts(),
                         strict=True))
        assert p.refused == []  # nothing was fetched: it opens without a network
    assert [f["alt"] for f in figures] == ["Optimisation history", "Parameter importances",
                                           "Slice plot", "Parallel coordinates"]
    assert all(f["shown"] for f in figures), figures
    assert headers[:3] == ["trial", "run_id", "val_rmse"]
    assert "model.max_depth" in headers  # whole keys: the page has room
    assert len(rows) == N_TRIALS and rows[0][1] == parent.data.tags["best_run_id"]
    values = [float(r[2]) for r in rows]
    assert values == sorted(values)
    assert facts["trials"] == f"{N_TRIALS} complete, 0 pruned, 0 failed of {N_TRIALS}"
    assert facts["parent run"] == study["parent"]


def test_the_libraries_lines_go_to_the_job_log_not_the_console(study) -> None:
    done = study["done"]
    console = done.stdout + done.stderr
    for line in ("Creating initial MLflow database tables", "Trial 0 finished",
                 "A new study created", "alembic", "INFO"):
        assert line not in console
    log = (Path(_line(study, "study report: ")).parent / "run.log").read_text()
    # MLflow opening the new store (its migrations where the empty schema was not cached yet)
    assert re.search(r"\]\[(mlflow|alembic)\.", log) and "Trial 0 finished" in log, log[:2000]


def test_the_mlflow_ui_lists_the_study_with_its_trials(study) -> None:
    """The address expforge prints opens the UI's training-runs view (MLflow 3.17's UI opens
    its GenAI view otherwise); the parent run's row, expanded, lists every trial."""
    command, address = _line(study, "open the UI: ").split(", then ")
    assert command == f"mlflow ui --backend-store-uri {study['uri']}"
    port = free_port()
    server = mlflow_server(port, study["uri"], study["base"] / "art")
    try:
        with browser_page() as p:
            p.goto(address.replace("127.0.0.1:5000", f"127.0.0.1:{port}"))
            p.get_by_text("matching runs").wait_for(timeout=60_000)
            parent = p.locator("[role=row]", has_text="views").first
            parent.locator("button").first.click()  # the parent's expander
            p.get_by_text(f"views-trial-{N_TRIALS - 1}").wait_for(timeout=30_000)
            names = p.locator("[role=row] a").all_inner_texts()
            text = p.locator("body").inner_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert "views" in names
    assert {f"views-trial-{i}" for i in range(N_TRIALS)} <= set(names)
    assert "Runs" in text and "Overview" not in text  # the training view, not GenAI's
    assert "diabetes-train" in text  # the parent's dataset inputs


def _dashboard(storage: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/api/studies", server, timeout=60)
    return server, url


def _served(storage: str, name: str) -> dict[str, Any]:
    """The study ``name`` as optuna-dashboard serves it from ``storage``."""
    server, url = _dashboard(storage)
    try:
        with urllib.request.urlopen(f"{url}/api/studies", timeout=10) as r:
            summaries = json.load(r)["study_summaries"]
        found = next(s for s in summaries if s["study_name"] == name)
        with urllib.request.urlopen(f"{url}/api/studies/{found['study_id']}?after=0",
                                    timeout=10) as r:
            return dict(json.load(r))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_optuna_dashboard_serves_a_journal_study(study) -> None:
    served = _served(str(study["journal"]), "views")
    assert [t["state"] for t in served["trials"]] == ["Complete"] * N_TRIALS


@pytest.mark.skipif(not postgres_reachable(), reason="no PostgreSQL on 127.0.0.1:5432")
def test_optuna_dashboard_serves_a_postgresql_study(study, tmp_path: Path) -> None:
    import psycopg

    name = f"expforge_dash_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        done = run_cli("search=optuna", "model=linear", "search.n_trials=2", "search.plots=false",
                       "search.study_name=dash", f"search.storage={PG}/{name}",
                       f"tracking.uri={study['uri']}", f"paths.outputs={tmp_path}/out")
        assert done.returncode == 0, done.stderr[-3000:]
        served = _served(f"{PG}/{name}", "dash")
        assert [t["state"] for t in served["trials"]] == ["Complete"] * 2
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
