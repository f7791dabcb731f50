"""expforge benchmarks, side by side with what a user would write by hand.

    python benchmarks/run.py            # full suite (~45 min on 2 cores); writes RESULTS.md
    python benchmarks/run.py --smoke    # tiny sizes, to keep the suite working (CI)

Every contender runs end to end as a separate process (imports included), the contenders of a
comparison alternate within each repetition, and medians are reported. Peak memory is the
largest sum of PSS over the process tree (shared copy-on-write pages counted once).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
HERE = Path(__file__).resolve().parent
# Where the contenders run: the run's scratch folder (``main``). A hand-written MLflow loop
# puts its artifacts in ./mlruns, as MLflow does, which must not land in the project.
SCRATCH = [ROOT]


@dataclass
class Measure:
    wall_s: float
    peak_mb: float
    cpu_s: float = 0.0  # user + system seconds of the whole process tree
    roles: dict[str, float] = field(default_factory=dict)  # CPU seconds by process name


# A search's processes by name (expforge.process.name_process); the command is the root.
ROLES = (("expforge-writer", "writer"), ("expforge-work", "workers"))


@dataclass
class Table:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:58s} {value}", flush=True)


def _tree(pid: int) -> dict[int, tuple[str, float]]:
    """``pid`` and all its descendants: name and CPU seconds (user + system) of each."""
    children: dict[int, list[int]] = {}
    facts: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:].rsplit(")", 1)
        fields = rest.split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        facts[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        if p in facts:
            tree[p] = facts[p]
    return tree


def _roles(pid: int, seen: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds of the command (``pid``), its writer, its workers and anything else."""
    roles: dict[str, float] = {}
    for p, (name, cpu) in seen.items():
        role = "command" if p == pid else next(
            (r for prefix, r in ROLES if name.startswith(prefix)), "other")
        roles[role] = roles.get(role, 0.0) + cpu
    return roles


def _tree_pss_kb(pid: int) -> int:
    """PSS of ``pid`` and all its descendants (KiB)."""
    total, todo = 0, list(_tree(pid))
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def run(cmd: list[str], cwd: Path | None = None, sample_memory: bool = False,
        sample_cpu: bool = False) -> Measure:
    """``cmd`` to its end; its wall time, the CPU time of its process tree (every process it
    started waits for its own) and, sampled, its peak memory and its processes' CPU by role."""
    import resource

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd or SCRATCH[0], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = [0]
    seen: dict[int, tuple[str, float]] = {}  # each process's last name and CPU seconds
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if sample_memory:
                peak[0] = max(peak[0], _tree_pss_kb(proc.pid))
            if sample_cpu:
                seen.update(_tree(proc.pid))
            stop.wait(0.25 if sample_memory else 0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory or sample_cpu:
        sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    if sampler.is_alive():
        sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n"
                         f"{err[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measure(wall, peak[0] / 1024, cpu, _roles(proc.pid, seen) if sample_cpu else {})


def expforge(store: Path, *args: str) -> list[str]:
    return [PY, str(ROOT / "run.py"), *args, f"tracking.uri=sqlite:///{store}/bench.db",
            f"tracking.artifact_root={store}/art", f"paths.outputs={store}/out"]


# Off in the throughput runs; on (the defaults) in the runs "with the defaults".
QUIET_SEARCH = ("search.plots=false", "search.log_models=none")
# The space of the overhead comparison, on rf's default space.
RF_SPACE = [
    "search_space.model.n_estimators.low=10", "search_space.model.n_estimators.high=50",
    "search_space.model.n_estimators.log=false", "search_space.model.max_depth.low=1",
    "search_space.model.max_depth.high=20", "search_space.model.min_samples_leaf.high=4",
    "~search_space.model.max_features",
]


def overhead(store: Path, sizes: tuple[int, ...], reps: int, table: Table) -> dict[str, float]:
    """(a) bare Optuna, (b) hand-written MLflow loop, (c) run.py search=optuna."""
    uri = f"sqlite:///{store}/bench.db"
    counter = iter(range(10**6))

    def contender(name: str, n: int) -> list[str]:
        if name == "a":
            return [PY, str(HERE / "hand_optuna.py"), str(n)]
        if name == "b":
            return [PY, str(HERE / "hand_optuna.py"), str(n), "--mlflow", uri]
        i = next(counter)
        return expforge(store, "search=optuna", "model=rf", "model.n_jobs=1",
                        f"search.n_trials={n}", f"search.study_name=bench-{i}",
                        f"search.storage={store}/studies/bench-{i}.journal",
                        "tracking.experiment=bench-c", *RF_SPACE)

    # Warm the store (schema, experiments) so that no contender pays for creating it.
    if reps > 1:
        run(contender("b", 1))
        run(contender("c", 1))
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(reps):
        for n in sizes:
            for name in ("a", "b", "c"):
                times.setdefault((name, n), []).append(run(contender(name, n)).wall_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, label in (("a", "(a) bare Optuna loop"), ("b", "(b) hand-written MLflow loop"),
                        ("c", "(c) python run.py search=optuna")):
        for n in sizes:
            table.add(f"{label}, {n} trials", f"{med[(name, n)]:.2f} s")
    if len(sizes) < 2:  # smoke: no slope from one size
        return {}
    small, large = sizes
    slope = {name: (med[(name, large)] - med[(name, small)]) / (large - small)
             for name in "abc"}
    table.add("per-trial cost over (a): (b)", f"{(slope['b'] - slope['a']) * 1000:.1f} ms")
    table.add("per-trial cost over (a): (c)", f"{(slope['c'] - slope['a']) * 1000:.1f} ms")
    for n in (large, small):
        table.add(f"(c) / (b) end to end, {n} trials", f"{med[('c', n)] / med[('b', n)]:.2f}x")
    return {"c_over_b": med[("c", large)] / med[("b", large)],
            "c_slope_ms": (slope["c"] - slope["a"]) * 1000}


def parallel(store: Path, n_samples: int, n_trials: int, reps: int, table: Table,
             full: bool = True) -> None:
    """XGBoost, one thread per worker: 2 workers against 1 with the defaults (plots, the best
    model) and, in a full run, with plots and model logging off, and a joblib multirun (the
    smoke run leaves both out: the same commands, and tests/test_experiments.py runs the
    joblib launcher)."""
    # The same work in every trial of every contender: the space keeps only the parameters
    # that leave a fit's cost alone (learning_rate, reg_lambda). With subsample and
    # colsample_bytree in it, the two workers' seeds drew other values than the one worker's
    # (fits of 1.07 s against 0.88 s on average), and the ratio measured the draw.
    fixed = ["model=xgb", "data=synthetic", f"data.n_samples={n_samples}", "data.n_features=50",
             "model.n_jobs=1", "model.n_estimators=100", "model.max_depth=6",
             *(f"~search_space.model.{name}" for name in (
                 "n_estimators", "max_depth", "subsample", "colsample_bytree",
                 "min_child_weight")),
             "search.pruner=null", *QUIET_SEARCH, "tracking.experiment=bench-parallel"]
    counter = iter(range(10**6))
    grid = [0.05, 0.1, 0.15, 0.2]
    lambdas = ["0.5", "1", "2", "4"]
    if n_trials < len(grid) * len(lambdas):  # smoke: as many jobs as trials
        grid, lambdas = grid[:n_trials], lambdas[:1]
    multirun_jobs = len(grid) * len(lambdas)

    def search(workers: int, defaults: bool = False) -> list[str]:
        i = next(counter)
        # defaults: Optuna's plots, the best model logged with its figures
        given = [a for a in fixed if not defaults or a not in QUIET_SEARCH]
        return expforge(store, "search=optuna", *given, f"search.n_trials={n_trials}",
                        f"search.n_workers={workers}", f"search.study_name=par-{i}",
                        f"search.storage={store}/studies/par-{i}.journal")

    def multirun() -> list[str]:
        values = ",".join(map(str, grid))
        return expforge(store, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        *fixed[:7], f"model.learning_rate={values}",
                        f"model.reg_lambda={','.join(lambdas)}", "tracking.log_plots=false",
                        "tracking.log_model=false", "tracking.experiment=bench-parallel")

    times: dict[str, list[float]] = {"1": [], "2": [], "joblib": [], "1d": [], "2d": []}
    spans: dict[str, list[float]] = {"1": [], "2": []}
    phases: dict[str, list[tuple[float, float, float]]] = {"1d": [], "2d": []}
    for _ in range(reps):
        for workers in ("1", "2") if full else ():
            cmd = search(int(workers))
            times[workers].append(run(cmd).wall_s)
            spans[workers].append(_span(store, cmd))
        for workers in ("1d", "2d"):
            cmd = search(int(workers[0]), defaults=True)
            started = time.time()
            times[workers].append(run(cmd).wall_s)
            phases[workers].append(_phases(store, cmd, started, time.time()))
        if full:
            times["joblib"].append(run(multirun()).wall_s)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    span = {k: statistics.median(v) for k, v in spans.items() if v}
    phase = {k: [statistics.median(p[i] for p in v) for i in range(3)]
             for k, v in phases.items()}
    if full:
        table.add(f"search.n_workers=1, {n_trials} trials", f"{med['1']:.2f} s")
        table.add(f"search.n_workers=2, {n_trials} trials", f"{med['2']:.2f} s")
        table.add(f"joblib multirun, 2 jobs at a time, {multirun_jobs} runs",
                  f"{med['joblib']:.2f} s")
        table.add("throughput n_workers=2 / n_workers=1, end to end",
                  f"{med['1'] / med['2']:.2f}x")
        table.add("throughput n_workers=2 / n_workers=1, while trials run (first start to "
                  "last end)",
                  f"{span['1'] / span['2']:.2f}x ({span['1']:.2f} s / {span['2']:.2f} s)")
    table.add(f"with the defaults (plots, best model): n_workers=1, {n_trials} trials",
              f"{med['1d']:.2f} s")
    table.add(f"with the defaults: n_workers=2, {n_trials} trials", f"{med['2d']:.2f} s")
    table.add("with the defaults: throughput n_workers=2 / n_workers=1, end to end",
              f"{med['1d'] / med['2d']:.2f}x")
    for k in ("1d", "2d"):
        before, trials, after = phase[k]
        table.add(f"with the defaults, n_workers={k[0]}: before the first trial / trials / "
                  "after the last", f"{before:.2f} s / {trials:.2f} s / {after:.2f} s")
    if full:
        table.add("throughput n_workers=2 / joblib multirun (per trial)",
                  f"{(med['joblib'] / multirun_jobs) / (med['2'] / n_trials):.2f}x")
    ceiling = _ceiling(n_samples)
    table.add("ceiling: two bare XGBoost fits side by side / one after the other",
              f"{ceiling:.2f}x")
    # The most two workers could give with the defaults: the start-up before the first trial
    # as with one worker (the trials need the data and the study), the trials at the
    # ceiling, and the work after the last trial (it needs the last trial) on both cores.
    before, trials, after = phase["1d"]
    table.add("with the defaults: the most n_workers=2 / n_workers=1 could be here",
              f"{med['1d'] / (before + trials / ceiling + after / 2):.2f}x")


def _span(store: Path, cmd: list[str]) -> float:
    """Seconds from the first trial's start to the last trial's end of the study ``cmd`` ran."""

    trials = _trials(store, cmd)
    return (max(t.datetime_complete for t in trials)
            - min(t.datetime_start for t in trials)).total_seconds()


def _trials(store: Path, cmd: list[str]) -> list[Any]:
    """The trials of the study the command ``cmd`` ran (a journal storage)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    given = dict(a.split("=", 1) for a in cmd if a.startswith("search."))
    storage = optuna.storages.JournalStorage(JournalFileBackend(given["search.storage"]))
    return optuna.load_study(study_name=given["search.study_name"], storage=storage).trials


def _phases(store: Path, cmd: list[str], started: float, ended: float
            ) -> tuple[float, float, float]:
    """Seconds of the command ``cmd`` (run from ``started`` to ``ended``, epoch seconds)
    before its study's first trial started, from there to the last trial's end, and after."""
    trials = _trials(store, cmd)
    first = min(t.datetime_start for t in trials).timestamp()
    last = max(t.datetime_complete for t in trials).timestamp()
    return first - started, last - first, ended - last


def _starts(journal: Path) -> list[float]:
    """The trials' start times (seconds) of the one study in a journal file, in order."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    return sorted(t.datetime_start.timestamp() for t in trials if t.datetime_start)


def _gap_ms(starts: list[float], first: int, last: int) -> float:
    """Median gap between the starts of trials ``first``..``last`` (1-based), in ms."""
    window = starts[first - 1:last]
    return statistics.median(b - a for a, b in itertools.pairwise(window)) * 1000


@contextmanager
def _busy(on: bool) -> Iterator[None]:
    """One core kept busy by another process (a fixed CPU-bound loop) while inside."""
    if not on:
        yield
        return
    proc = subprocess.Popen([PY, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # scheduled and spinning
        yield
    finally:
        proc.kill()
        proc.wait()


CHEAP = ["model=linear", "search.pruner=null", "search.plots=false",
         "search.sampler._target_=optuna.samplers.RandomSampler"]


def cheap(store: Path, n_trials: int, reps: int, table: Table, busy: bool = False
          ) -> dict[str, float]:
    """Issue 18: Ridge on diabetes, RandomSampler seeded, a journal file per study, warm SQLite
    stores (one per contender, each made as its own tool makes it): the bare Optuna loop,
    the hand-written MLflow loop, ``run.py`` with one and with two workers. The median wall
    time of each."""
    counter = iter(range(10**6))
    window = [(1, max(2, n_trials // 8)), (max(1, n_trials // 4), n_trials // 2),
              (max(1, n_trials * 3 // 4), n_trials)]

    def contender(name: str, n: int) -> tuple[list[str], Path]:
        kind = "cheap-busy" if busy else "cheap"
        journal = store / "studies" / f"{kind}-{name}-{next(counter)}.journal"
        journal.parent.mkdir(exist_ok=True)
        if name in ("a", "b", "b2"):
            mlflow = [] if name == "a" else ["--mlflow", f"sqlite:///{store}/cheap-hand.db"]
            if name == "b2":
                mlflow += ["--record-all", "--experiment", "hand-written-all"]
            return [PY, str(HERE / "hand_optuna.py"), str(n), "--model", "ridge", "--sampler",
                    "random", "--storage", str(journal), *mlflow], journal
        workers = "2" if name == "c2" else "1"
        return [PY, str(ROOT / "run.py"), "search=optuna", *CHEAP, f"search.n_trials={n}",
                f"search.n_workers={workers}", f"search.storage={journal}",
                f"search.study_name={journal.stem}", "tracking.experiment=bench-cheap",
                f"tracking.uri=sqlite:///{store}/cheap-expforge.db",
                f"tracking.artifact_root={store}/art", f"paths.outputs={store}/out"], journal

    names = {"a": "(a) bare Optuna loop", "b": "(b) hand-written MLflow loop",
             "b2": "(b) recording what an expforge run records",
             "c": "(c) python run.py search=optuna", "c2": "(c) with search.n_workers=2"}
    if reps > 1:  # warm stores: schema and experiment made (not in the smoke run)
        for name in ("b", "b2", "c"):
            run(contender(name, 2)[0])
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    roles: dict[tuple[str, str], list[float]] = {}
    gaps: dict[tuple[str, int], list[float]] = {}
    with _busy(busy):
        for _ in range(reps):
            for name in names:
                cmd, journal = contender(name, n_trials)
                measure = run(cmd, sample_cpu=name in ("c", "c2"))
                walls.setdefault(name, []).append(measure.wall_s)
                cpus.setdefault(name, []).append(measure.cpu_s)
                for role, seconds in measure.roles.items():
                    roles.setdefault((name, role), []).append(seconds)
                starts = _starts(journal)
                for i, (first, last) in enumerate(window):
                    gaps.setdefault((name, i), []).append(_gap_ms(starts, first, last))
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    for name, label in names.items():
        per = ", ".join(f"{first}-{last}: {statistics.median(gaps[(name, i)]):.1f} ms"
                        for i, (first, last) in enumerate(window))
        table.add(f"{label}, {n_trials} trials",
                  f"{med[name]:.2f} s, CPU {cpu[name]:.1f} s (per trial {per})")
    for name in ("c", "c2"):
        split = {role: statistics.median(v) for (n, role), v in roles.items() if n == name
                 and statistics.median(v) >= 0.05}  # not the git subprocess's instants
        busy_share = split.get("writer", 0) / med[name]
        table.add(f"{names[name]}: CPU by process",
                  ", ".join(f"{role} {seconds:.1f} s" for role, seconds in sorted(split.items()))
                  + f"; the writer busy {busy_share:.0%} of the command's time")
    table.add("(c) / (b), whole command", f"{med['c'] / med['b']:.2f}x (goal <= 1.0x)")
    table.add("(c) / (b) recording as much, whole command", f"{med['c'] / med['b2']:.2f}x")
    late, early = (statistics.median(gaps[("c", i)]) for i in (2, 0))
    table.add(f"(c) per trial, trials {window[2][0]}-{window[2][1]} / {window[0][0]}-"
              f"{window[0][1]}", f"{late / early:.2f}x (goal <= 1.1x)")
    table.add("(c) n_workers=2 / n_workers=1, whole command", f"{med['c'] / med['c2']:.2f}x")
    return med


def long_study(store: Path, n_trials: int, table: Table) -> None:
    """Issue 18, goal 3: one study of ``n_trials`` cheap trials (Ridge on diabetes, journal)
    with RandomSampler, where nothing but expforge's own cost could grow, and with TPE,
    beside the bare Optuna loop with TPE, whose sampler's own cost grows with the trials.
    The median gap between trial starts at the start, midway and at the end. One run each:
    every window is a median of its own. A full run adds RandomSampler with a target and a
    patience that never stop it, asked before every trial."""
    size = max(10, n_trials // 30)
    window = [(1, size), (n_trials // 2 - size // 2 + 1, n_trials // 2 + size - size // 2),
              (n_trials - size + 1, n_trials)]
    tpe = "search.sampler._target_=optuna.samplers.TPESampler"

    def contender(name: str) -> tuple[list[str], Path]:
        journal = store / "studies" / f"long-{name}.journal"
        journal.parent.mkdir(exist_ok=True)
        if name == "a":
            return [PY, str(HERE / "hand_optuna.py"), str(n_trials), "--model", "ridge",
                    "--sampler", "tpe", "--storage", str(journal)], journal
        extra = {"c-tpe": [tpe], "c-rules": ["search.target=-1", f"search.patience={10**6}"]}
        return expforge(store, "search=optuna", *CHEAP, *extra.get(name, []),
                        f"search.n_trials={n_trials}", f"search.storage={journal}",
                        f"search.study_name={journal.stem}",
                        "tracking.experiment=bench-long"), journal

    names = {"c": "(c) python run.py search=optuna, RandomSampler",
             "c-tpe": "(c) the same with TPESampler", "a": "(a) bare Optuna loop, TPESampler"}
    if n_trials >= 1000:  # val_rmse never reaches -1, and the patience outlasts the study
        names["c-rules"] = "(c) RandomSampler, with search.target and search.patience"
    gaps: dict[str, list[float]] = {}
    for name, label in names.items():
        cmd, journal = contender(name)
        measure = run(cmd)
        starts = _starts(journal)
        gaps[name] = [_gap_ms(starts, first, last) for first, last in window]
        per = ", ".join(f"{first}-{last}: {gap:.1f} ms"
                        for (first, last), gap in zip(window, gaps[name], strict=True))
        table.add(f"{label}, {n_trials} trials", f"{measure.wall_s:.1f} s (per trial {per})")
    first, last = window[0], window[-1]
    for name, label in names.items():
        table.add(f"{label}: per trial, trials {last[0]}-{last[1]} / {first[0]}-{first[1]}",
                  f"{gaps[name][-1] / gaps[name][0]:.2f}x"
                  + (" (goal <= 1.1x)" if name in ("c", "c-rules") else ""))
    growth = {name: gaps[name][-1] - gaps[name][0] for name in ("c-tpe", "a")}
    table.add("with TPE, growth per trial from the first window to the last",
              f"expforge {growth['c-tpe']:+.1f} ms, the bare loop {growth['a']:+.1f} ms "
              f"(TPE's own): {growth['c-tpe'] - growth['a']:+.1f} ms beyond TPE's")


def _ceiling(n_samples: int) -> float:
    """What two cores give two single-threaded XGBoost fits of the trials' size."""
    out = subprocess.run([PY, str(HERE / "ceiling.py"), str(n_samples)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def writer(store: Path, smoke: bool, reps: int, table: Table) -> None:
    """The same searches with ``tracking.writer=process`` and ``inline``, alternating: what
    the writer process buys (or costs) on forest trials, cheap trials and two workers."""
    n = 2 if smoke else None
    cases = {
        "rf (n_jobs=1), 40 trials, TPE": [
            "model=rf", "model.n_jobs=1", f"search.n_trials={n or 40}", *RF_SPACE],
        "Ridge on diabetes, 200 trials, RandomSampler, no plots": [
            "model=linear", f"search.n_trials={n or 200}", "search.pruner=null",
            "search.sampler._target_=optuna.samplers.RandomSampler", "search.plots=false"],
        "xgb, 2 workers, 16 trials": [
            "model=xgb", "data=synthetic", f"data.n_samples={2000 if smoke else 20000}",
            "data.n_features=50", "model.n_jobs=1", "model.n_estimators=100",
            "model.max_depth=6", f"search.n_trials={n or 16}", "search.n_workers=2",
            "search.pruner=null", "search.plots=false", "search.log_models=none",
            *(f"~search_space.model.{name}" for name in (
                "n_estimators", "max_depth", "subsample", "colsample_bytree",
                "min_child_weight"))],
    }
    if smoke:  # one case keeps the section working
        cases = dict(list(cases.items())[1:2])
    counter = iter(range(10**6))
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(reps):
        for case, args in cases.items():
            for mode in ("process", "inline"):
                i = next(counter)
                cmd = expforge(store, "search=optuna", *args, f"tracking.writer={mode}",
                               f"search.study_name=writer-{i}", "tracking.experiment=bench-w",
                               f"search.storage={store}/studies/writer-{i}.journal")
                times.setdefault((case, mode), []).append(run(cmd).wall_s)
    for case in cases:
        process = statistics.median(times[(case, "process")])
        inline = statistics.median(times[(case, "inline")])
        table.add(f"{case}: writer process / in-process",
                  f"{process:.2f} s / {inline:.2f} s = {process / inline:.2f}x")


def scale(store: Path, n_samples: int, n_trials: int, table: Table) -> None:
    data_mb = n_samples * 50 * 4 / 2**20
    m = run(expforge(store, "experiment=synthetic_scale", f"data.n_samples={n_samples}",
                     f"search.n_trials={n_trials}", "model.n_estimators=50",
                     "~search_space.model.n_estimators", f"search.study_name=scale-{n_samples}",
                     f"search.storage={store}/studies/scale-{n_samples}.journal",
                     "search.log_models=none"), sample_memory=True)
    budget = 2.5 * data_mb + 1024
    table.add(f"synthetic {n_samples:,} x 50 float32 ({data_mb:.0f} MB), xgb, "
              f"{n_trials} trials, 2 workers", f"{m.wall_s:.1f} s")
    table.add("peak memory (PSS of the process tree)",
              f"{m.peak_mb:.0f} MB (goal <= {budget:.0f} MB: "
              f"{'met' if m.peak_mb <= budget else 'missed'})")


def gpu(store: Path, n_samples: int, n_trials: int, table: Table) -> None:
    """The scale search with ``model.device=cuda`` (one worker: one GPU) against the CPU.

    Runs only where ``nvidia-smi`` sees a GPU and XGBoost was built with CUDA (XGBoost would
    otherwise fall back to the CPU with a warning); the GPU's peak memory, sampled while the
    search runs, shows that the trials ran on it."""
    missing = _cuda_missing()
    if missing:
        table.add("GPU", f"skipped: {missing}")
        return
    common = ["experiment=synthetic_scale", f"data.n_samples={n_samples}",
              f"search.n_trials={n_trials}", "search.log_models=none"]
    cpu = run(expforge(store, *common, "search.study_name=gpu-cpu",
                       f"search.storage={store}/studies/gpu-cpu.journal"))
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, check=False).stdout.split()
            peak[0] = max([peak[0], *(int(v) for v in out if v.isdigit())])
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        cuda = run(expforge(store, *common, "model.device=cuda", "search.n_workers=1",
                            "search.study_name=gpu-cuda",
                            f"search.storage={store}/studies/gpu-cuda.journal"))
    finally:
        stop.set()
    table.add(f"synthetic {n_samples:,} x 50, xgb, {n_trials} trials, CPU (2 workers)",
              f"{cpu.wall_s:.1f} s")
    table.add("the same, model.device=cuda (1 worker)", f"{cuda.wall_s:.1f} s "
              f"(GPU memory peak {peak[0]} MiB)")
    table.add("CPU / GPU", f"{cpu.wall_s / cuda.wall_s:.2f}x")


def _cuda_missing() -> str:
    """Why the GPU section cannot run here ("" when it can)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                check=False).stdout
    except OSError:
        listed = ""
    if "GPU" not in listed:
        return "no NVIDIA GPU (nvidia-smi lists none)"
    out = subprocess.run([PY, "-c", "import xgboost; print(xgboost.build_info()['USE_CUDA'])"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return "" if out == "True" else "this XGBoost was built without CUDA"


def startup(store: Path, reps: int, table: Table) -> None:
    helps, ours, hand = [], [], []
    for _ in range(reps):
        helps.append(run([PY, str(ROOT / "run.py"), "--help"]).wall_s)
        ours.append(run(expforge(store, "tracking.experiment=bench-startup")).wall_s)
        hand.append(run([PY, str(HERE / "hand_run.py"), f"sqlite:///{store}/bench.db"]).wall_s)
    table.add("python run.py --help", f"{statistics.median(helps):.2f} s (goal < 1 s)")
    table.add("python run.py (default data and model)", f"{statistics.median(ours):.2f} s")
    table.add("hand-written script, same model and run", f"{statistics.median(hand):.2f} s")
    table.add("run.py / hand-written", f"{statistics.median(ours) / statistics.median(hand):.2f}x "
              "(goal <= 1.3x)")


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "?")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.platform()}; {os.cpu_count()} cores ({cpu}); {mem:.0f} GiB; "
            f"Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--only", nargs="*", default=None,
                        help="overhead cheap cheap-busy long parallel writer scale startup gpu")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    args = parser.parse_args()
    sections = args.only or ["overhead", "cheap", "cheap-busy", "long", "parallel", "writer",
                             "scale", "startup", "gpu"]
    reps = args.reps or (1 if args.smoke else 3)
    tables = []
    with tempfile.TemporaryDirectory(prefix="expforge-bench-") as tmp:
        store = Path(tmp)
        SCRATCH[0] = store
        print(f"machine: {machine()}", flush=True)
        if "overhead" in sections:
            tables.append(Table("Overhead of tracking (diabetes, rf n_jobs=1, TPE seeded)"))
            print(tables[-1].title, flush=True)
            overhead(store, (2,) if args.smoke else (10, 40), reps, tables[-1])
        walls: dict[bool, dict[str, float]] = {}
        for busy in (False, True):
            if ("cheap-busy" if busy else "cheap") in sections:
                tables.append(Table("Cheap trials (Ridge on diabetes, RandomSampler, journal)"
                                    + (", one core kept busy" if busy else "")))
                print(tables[-1].title, flush=True)
                walls[busy] = cheap(store, 8 if args.smoke else 400, reps, tables[-1], busy=busy)
        if len(walls) == 2:
            tables.append(Table("Cheap trials, from quiet to one core kept busy"))
            print(tables[-1].title, flush=True)
            for name in ("b", "c", "c2"):
                tables[-1].add(f"slowdown, busy / quiet: ({name})",
                               f"{walls[True][name] / walls[False][name]:.2f}x")
        if "long" in sections:
            tables.append(Table("A long study (Ridge on diabetes, journal, one worker)"))
            print(tables[-1].title, flush=True)
            long_study(store, 30 if args.smoke else 3000, tables[-1])
        if "parallel" in sections:
            tables.append(Table("Parallel throughput (xgb, 1 thread per worker)"))
            print(tables[-1].title, flush=True)
            parallel(store, 2000 if args.smoke else 20000, 2 if args.smoke else 16, reps,
                     tables[-1], full=not args.smoke)
        if "writer" in sections:
            tables.append(Table("Writer process against the in-process store"))
            print(tables[-1].title, flush=True)
            writer(store, args.smoke, reps, tables[-1])
        if "scale" in sections:
            tables.append(Table("Scale"))
            print(tables[-1].title, flush=True)
            scale(store, 5000 if args.smoke else 1_000_000, 2 if args.smoke else 5, tables[-1])
        if "startup" in sections:
            tables.append(Table("Start-up"))
            print(tables[-1].title, flush=True)
            startup(store, reps, tables[-1])
        if "gpu" in sections:
            tables.append(Table("GPU (xgb, CPU against CUDA)"))
            print(tables[-1].title, flush=True)
            gpu(store, 5000 if args.smoke else 1_000_000, 2 if args.smoke else 5, tables[-1])
    lines = ["# Benchmark results", "", f"Machine: {machine()}.",
             f"Mode: {'smoke (tiny sizes)' if args.smoke else 'full'}; medians of {reps} "
             f"repetition(s), contenders alternating; `python benchmarks/run.py`.", ""]
    for t in tables:
        lines += [f"## {t.title}", "", "| measure | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in t.rows]
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
