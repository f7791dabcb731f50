"""The benchmark suite keeps working (tiny sizes; the real numbers are in RESULTS.md). One
case a section, so that parallel test workers share them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

EXPECTED = {
    "overhead": ["(c) python run.py search=optuna, 2 trials", "(a) bare Optuna loop, 2 trials"],
    "cheap": ["(c) / (b), whole command", "(c) n_workers=2 / n_workers=1, whole command",
              "(c) with search.n_workers=2: CPU by process | command"],
    "long": ["(c) python run.py search=optuna, RandomSampler: per trial, trials 21-30 / 1-10",
             "with TPE, growth per trial from the first window to the last"],
    "parallel": ["with the defaults: throughput n_workers=2 / n_workers=1, end to end",
                 "with the defaults, n_workers=2: before the first trial",
                 "ceiling: two bare XGBoost fits",
                 "with the defaults: the most n_workers=2 / n_workers=1 could be here"],
    "writer": ["writer process / in-process"],
    "scale": ["peak memory (PSS of the process tree)"],
    "startup": ["run.py / hand-written"],
    "gpu": ["## GPU (xgb, CPU against CUDA)"],  # measured, or skipped with the reason
}


@pytest.mark.parametrize("section", list(EXPECTED))
def test_benchmark_smoke(section: str, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", section,
         "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Machine:" in text
    for line in EXPECTED[section]:
        assert line in text
