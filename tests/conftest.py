"""Shared fixtures: configs composed like run.py does, and a real sqlite store in tmp."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from expforge.config import register_resolvers, to_plain

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_resolvers(ROOT)


def compose(*overrides: str) -> Any:
    """The config ``python run.py <overrides>`` would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One sqlite store for the session (schema creation costs ~1 s a database)."""
    base = tmp_path_factory.mktemp("store")
    return {"uri": f"sqlite:///{base}/mlflow.db", "artifacts": str(base / "mlartifacts")}


@pytest.fixture()
def plain(store: dict[str, str], request: pytest.FixtureRequest) -> Callable[..., dict]:
    """Resolved config for overrides, recorded in the session store, one experiment a test."""
    experiment = request.node.name.replace("[", "-").replace("]", "")

    def make(*overrides: str) -> dict[str, Any]:
        cfg = compose(
            f"tracking.uri={store['uri']}",
            f"tracking.artifact_root={store['artifacts']}",
            f"tracking.experiment={experiment}",
            *overrides,
        )
        return to_plain(cfg)

    return make


def client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)  # not the registry another test set


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300,
    script: str = "run.py",
) -> subprocess.CompletedProcess[str]:
    """Run an entry point as a user types it: ``python run.py <args>``."""
    # in-process tests leave MLFLOW_TRACKING_URI/REGISTRY_URI in os.environ: a user has none
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("MLFLOW_") and k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlflow_server(port: int, backend_uri: str, artifacts: Path) -> subprocess.Popen[str]:
    """A real ``mlflow server`` in its own process group (kill it whole with ``os.killpg``,
    as a crashed host would be), once it answers. Without the server's job runner (seven
    processes for GenAI jobs that no test uses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(artifacts), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/health", server)
    return server


def wait_for_http(url: str, server: subprocess.Popen[str], timeout: float = 180) -> None:
    """Poll ``url`` until the server answers; fail with its stderr if it dies first."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None, server.stderr.read()[-3000:] if server.stderr else ""
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s")


def write_taxi_month(path: Path, n: int, seed: int, month: int = 1) -> Path:
    """A small file with the NYC TLC green trip schema (no download)."""
    rng = np.random.default_rng(seed)
    pickup = pd.Timestamp(f"2021-{month:02d}-01") + pd.to_timedelta(
        rng.integers(0, 28 * 24 * 3600, n), unit="s"
    )
    distance = rng.gamma(2.0, 1.5, n).round(2)
    minutes = distance * 3 + rng.normal(4, 2, n)
    minutes[::25] = 90  # outliers that the 1..60 minute filter drops
    frame = pd.DataFrame(
        {
            "VendorID": rng.integers(1, 3, n),
            "lpep_pickup_datetime": pickup,
            "lpep_dropoff_datetime": pickup + pd.to_timedelta(minutes, unit="m"),
            "PULocationID": rng.integers(1, 30, n),
            "DOLocationID": rng.integers(1, 30, n),
            "trip_distance": distance,
            "fare_amount": distance * 2.5,
        }
    )
    frame.to_parquet(path)
    return path


@pytest.fixture()
def taxi_files(tmp_path: Path) -> dict[str, Path]:
    return {
        split: write_taxi_month(tmp_path / f"green_tripdata_2021-0{m}.parquet", 400, m, m)
        for split, m in (("train", 1), ("val", 2), ("test", 3))
    }


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: `make test` installs it


@contextmanager
def browser_page(offline: bool = False) -> Iterator[Any]:
    """A page of headless Chromium (Debian's, driven by Playwright; no browser download).
    ``offline``: every request beyond the page's own file and inlined data is refused, as on
    a machine without a network."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            if offline:
                page.refused = []
                page.route("**/*", lambda route: route.continue_()
                           if route.request.url.startswith(("file:", "data:"))
                           else (page.refused.append(route.request.url), route.abort()))
            yield page
        finally:
            browser.close()


def rendered_figures(page: Any) -> list[dict[str, Any]]:
    """Each image of the page: its alt text and whether the browser decoded it."""
    return list(page.evaluate(
        "[...document.images].map(i => ({alt: i.alt, shown: i.complete && i.naturalWidth > 0}))"))


@pytest.fixture(autouse=True)
def _signals_given_back() -> Iterator[None]:
    """Every test leaves this process's Ctrl-C and SIGTERM handling as it found it: a handler
    or a blocked signal left behind changes what later tests in the same worker see (the
    multirun callback's SIGTERM handler did). Put back, and failed."""
    import signal

    def state() -> tuple[Any, Any, set[Any]]:
        return (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                signal.pthread_sigmask(signal.SIG_BLOCK, []))

    before = state()
    yield
    after = state()
    if after != before:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
        signal.pthread_sigmask(signal.SIG_SETMASK, before[2])
        pytest.fail(f"the test left Ctrl-C and SIGTERM handling changed: {before} -> {after}")
