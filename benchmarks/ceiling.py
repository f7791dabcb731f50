"""The hardware's ceiling for parallel trials: one XGBoost fit (one thread) alone against two
at once in two processes, as the parallel benchmark's trials fit (60% of N rows x 50).

    python ceiling.py N      # prints the median speed-up of 3 repetitions
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time

import numpy as np


def fit(rows: int) -> float:
    import xgboost as xgb

    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, 50), dtype=np.float32)
    y = (X[:, 0] + rng.standard_normal(rows) > 0).astype(int)
    start = time.perf_counter()
    xgb.XGBClassifier(n_estimators=100, max_depth=6, n_jobs=1).fit(X, y)
    return time.perf_counter() - start


def main() -> None:
    rows = int(int(sys.argv[1]) * 0.6)
    speedups = []
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(fit, [rows, rows])  # warm both processes
        for _ in range(3):
            start = time.perf_counter()
            pool.map(fit, [rows])
            pool.map(fit, [rows])
            one_after_other = time.perf_counter() - start
            start = time.perf_counter()
            pool.map(fit, [rows, rows], chunksize=1)
            speedups.append(one_after_other / (time.perf_counter() - start))
    print(f"{statistics.median(speedups):.3f}")


if __name__ == "__main__":
    main()
