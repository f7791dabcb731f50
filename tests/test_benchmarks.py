"""The benchmark suite keeps working (tiny sizes; the real numbers are in RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "(c) python run.py search=optuna, 2 trials" in text
    assert "(a) bare Optuna loop, 2 trials" in text and "Machine:" in text
    assert "throughput n_workers=2 / n_workers=1, while trials run" in text
    assert "ceiling: two bare XGBoost fits" in text
    assert "peak memory (PSS of the process tree)" in text
    assert "run.py / hand-written" in text
    assert "## GPU (xgb, CPU against CUDA)" in text  # measured, or skipped with the reason
