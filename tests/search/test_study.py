from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from expforge.errors import SearchError
from expforge.runner import RunContext
from expforge.search import run_search

from ..conftest import ROOT, client

FAST_RF = ["model=rf", "search_space.model.n_estimators.high=30",
           "search_space.model.n_estimators.low=5"]


def children(c, experiment_id: str, parent_id: str) -> list:
    return c.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def load(storage: Path, name: str) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name,
                             storage=JournalStorage(JournalFileBackend(str(storage))))


def test_study_layout_parent_children_best_model(plain, store, tmp_path: Path) -> None:
    cfg = plain("search=optuna", *FAST_RF, "search.n_trials=5", "search.study_name=layout",
                f"search.storage={tmp_path}/s.journal")
    best = run_search(cfg, RunContext(choices={"model": "rf", "data": "diabetes"})).best_value
    c = client(store["uri"])
    exp = c.get_experiment_by_name(cfg["tracking"]["experiment"])
    study = load(tmp_path / "s.journal", "layout")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "layout"
    assert parent.data.tags["optuna.study_name"] == "layout"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["best_val_rmse"] == pytest.approx(best)
    assert parent.data.params["search.n_trials"] == "5"
    # the MLflow UI opens the experiment on its training runs; the parent says where the
    # study comes from as any run does
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for tag in ("mlflow.user", "mlflow.source.name", "mlflow.source.git.commit",
                "dataset_digest", "versions.mlflow"):
        assert parent.data.tags.get(tag), tag
    assert sorted(d.dataset.digest for d in parent.inputs.dataset_inputs) == [
        f"{parent.data.tags['dataset_digest']}-{split}" for split in ("test", "train", "val")]
    paths = {a.path for a in c.list_artifacts(parent_id)} | {
        a.path for a in c.list_artifacts(parent_id, "plots")}
    assert {"top_trials.csv", "config.yaml", "plots/optimization_history.png",
            "plots/param_importances.png", "plots/slice.png"} <= paths
    runs = children(c, exp.experiment_id, parent_id)
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    for trial in study.trials:
        run = by_number[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.trial_state"] == "COMPLETE"
        assert run.data.params["model.max_depth"] == str(trial.params["model.max_depth"])
        assert run.data.metrics["val_rmse"] == pytest.approx(trial.value)
    best_run = by_number[study.best_trial.number]
    local = c.download_artifacts(best_run.info.run_id, "config.yaml", str(tmp_path))
    config = yaml.safe_load(Path(local).read_text())
    assert config["model"]["max_depth"] == study.best_trial.params["model.max_depth"]
    logged = c.search_logged_models(experiment_ids=[exp.experiment_id],
                                    filter_string=f"source_run_id = '{best_run.info.run_id}'")
    assert len(logged) == 1


@pytest.mark.parametrize("model", ["xgb", "hgb"])
def test_pruning_stops_iterative_models_early(plain, store, tmp_path: Path, model: str) -> None:
    cfg = plain("search=optuna", f"model={model}", "search.n_trials=2",
                "search.report_every=5", "search.study_name=prune",
                f"search.storage={tmp_path}/s.journal")
    cfg["search"]["pruner"] = {"_target_": "optuna.pruners.ThresholdPruner", "upper": 1.0}
    run_search(cfg)
    study = load(tmp_path / "s.journal", "prune")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    c = client(store["uri"])
    for t in study.trials:
        assert list(t.intermediate_values) == [5]  # stopped at the first report
        run = c.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["pruned"] == "true" and run.data.tags["pruned_step"] == "5"
        assert run.data.tags["optuna.trial_state"] == "PRUNED"


def test_failing_trials_do_not_stop_the_study(plain, store, tmp_path: Path) -> None:
    cfg = plain("search=optuna", "model=rf", "search.n_trials=4", "search.study_name=fail",
                f"search.storage={tmp_path}/s.journal", "search.max_failure_ratio=0.9",
                "search.sampler._target_=optuna.samplers.RandomSampler")
    cfg["search_space"] = {"model.max_depth": "choice(3, -1)",
                           "model.n_estimators": "int(interval(5, 10))"}
    run_search(cfg)
    study = load(tmp_path / "s.journal", "fail")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(complete) == 4 and failed  # fails are retried: the budget still completes
    c = client(store["uri"])
    run = c.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "max_depth" in run.data.tags["error"]
    assert run.data.tags["optuna.trial_state"] == "FAIL"
    assert "error/traceback.txt" in {a.path for a in c.list_artifacts(run.info.run_id, "error")}


def test_too_many_failures_stop_with_a_clear_message(plain, tmp_path: Path) -> None:
    cfg = plain("search=optuna", "model=rf", "search.n_trials=5", "search.study_name=allfail",
                f"search.storage={tmp_path}/s.journal")
    cfg["search_space"] = {"model.max_depth": "choice(-1, -2)"}
    with pytest.raises(SearchError, match=r"search.max_failure_ratio=0.5 exceeded: 4 of 4 "
                                          r"trials failed; last error: model.max_depth="):
        run_search(cfg)


def test_same_seed_same_trial_sequence(plain, tmp_path: Path) -> None:
    values = []
    for name in ("seq-a", "seq-b"):
        cfg = plain("search=optuna", *FAST_RF, "search.n_trials=4", f"search.study_name={name}",
                    f"search.storage={tmp_path}/s.journal", "search.log_models=none",
                    "search.plots=false")
        run_search(cfg)
        study = load(tmp_path / "s.journal", name)
        values.append([(t.params, t.value) for t in study.trials])
    assert [p for p, _ in values[0]] == [p for p, _ in values[1]]
    # RandomForest sums its trees' predictions across threads: equal up to the last bits
    assert [v for _, v in values[0]] == pytest.approx([v for _, v in values[1]], rel=1e-12)


def test_bad_search_settings_fail_before_any_trial(plain, tmp_path: Path) -> None:
    from expforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"search.n_trials=0 is invalid"):
        run_search(plain("search=optuna", "search.n_trials=0"))
    with pytest.raises(ConfigError, match=r"search.sampler._target_=optuna.samplers.Nope cannot"):
        run_search(plain("search=optuna", "search.sampler._target_=optuna.samplers.Nope",
                         f"search.storage={tmp_path}/x.journal"))
    with pytest.raises(ConfigError, match=r"SQLite is not safe for parallel workers"):
        run_search(plain("search=optuna", "search.n_workers=2",
                         f"search.storage=sqlite:///{tmp_path}/o.db"))


def _cli(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "search=optuna", *args,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out",
            f"search.storage={tmp_path}/s.journal", "search.study_name=cli"]


def _assert_budget_exact(tmp_path: Path, n: int) -> None:
    study = load(tmp_path / "s.journal", "cli")
    done = [t for t in study.trials if t.state.is_finished() and
            t.state != optuna.trial.TrialState.FAIL]
    assert len(done) == n
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("expforge")
    runs = c.search_runs([exp.experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("expforge.role") == "study"]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    numbers = [r.data.tags["optuna.trial_number"] for r in kids
               if r.data.tags["optuna.trial_state"] in ("COMPLETE", "PRUNED")]
    assert len(numbers) == len(set(numbers)) == n  # one run per trial, no duplicate
    assert {t.user_attrs["mlflow_run_id"] for t in done} <= {r.info.run_id for r in kids}


# run.py as a user types it, reporting at its very end whether this process loaded MLflow.
_REPORTS_MLFLOW = """
import atexit, runpy, sys
import gc
atexit.register(lambda: print("mlflow loaded here:", "mlflow" in sys.modules,
                              "gc enabled:", gc.isenabled()))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_study_with_a_writer_process_records_plots_figures_and_model(
        tmp_path: Path) -> None:
    """One worker from the command line: a writer process does all the store's work (runs,
    parent, best model) and the command's own process never loads MLflow; it draws the
    plots, which the writer logs. No hand-over file is left behind."""
    handover = tmp_path / "tmp"  # its own temporary folder: other tests make theirs
    handover.mkdir()
    command = _cli(tmp_path, *FAST_RF, "search.n_trials=3")
    done = subprocess.run([command[0], "-c", _REPORTS_MLFLOW, *command[1:]],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "TMPDIR": str(handover)})
    assert done.returncode == 0, done.stderr[-3000:]
    # The command never loaded MLflow, and its start-up turned the collector back on.
    assert "mlflow loaded here: False gc enabled: True" in done.stdout, done.stdout[-2000:]
    _assert_budget_exact(tmp_path, 3)
    study = load(tmp_path / "s.journal", "cli")
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.n_trials"] == "3"
    assert parent.data.metrics["n_complete"] == 3
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= {
        a.path for a in c.list_artifacts(parent_id, "plots")}
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.tags["best_run_id"] == best_run
    assert {a.path for a in c.list_artifacts(best_run, "plots")} == {
        "plots/feature_importance.png", "plots/predicted_vs_actual.png", "plots/residuals.png"}
    assert c.get_run(best_run).info.status == "FINISHED"
    assert c.search_logged_models(experiment_ids=[exp_id],
                                  filter_string=f"source_run_id = '{best_run}'")
    trial_run = c.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert {d.dataset.name for d in trial_run.inputs.dataset_inputs} == {
        "diabetes-train", "diabetes-val", "diabetes-test"}
    assert not list(handover.glob("expforge-*"))  # the hand-over files were read and deleted


def test_two_spawned_workers_where_mlflow_is_loaded(plain, store, tmp_path: Path) -> None:
    """In a process that has used MLflow (a multirun's jobs, this test), connections may be
    pooled: the workers are spawned, not forked, and receive the loaded data pickled. Their
    GridSampler (seeded) shuffles its grid alike, so each point is tried once."""
    import mlflow

    mlflow.MlflowClient(store["uri"]).search_experiments(max_results=1)  # a pooled connection
    cfg = plain("search=optuna", *FAST_RF, "search.n_trials=4", "search.n_workers=2",
                "search.study_name=spawned", f"search.storage={tmp_path}/s.journal",
                "search.plots=false", "search.sampler._target_=optuna.samplers.GridSampler")
    cfg["search_space"] = {"model.max_depth": "choice(2, 4)", "model.n_estimators": "range(5, 6)"}
    run_search(cfg, RunContext())
    study = load(tmp_path / "s.journal", "spawned")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 4
    assert os.getpid() not in {t.user_attrs["expforge.pid"] for t in study.trials}
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4


def test_two_workers_finish_exactly_the_budget(tmp_path: Path) -> None:
    """Two forked workers write their runs through the search's writer process: the
    command's own process never loads MLflow, and every run is whole. The command draws the
    study's plots and report while the worker with the best model logs it and its plots; no
    hand-over file or folder is left behind."""
    handover = tmp_path / "tmp"  # its own temporary folder: other tests make theirs
    handover.mkdir()
    command = _cli(tmp_path, *FAST_RF, "search.n_trials=7", "search.n_workers=2")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([command[0], "-c", _REPORTS_MLFLOW, *command[1:]],
                                stdout=stdout, stderr=stderr, text=True,
                                env={**os.environ, "TMPDIR": str(handover)})
        names = _names_until_exit(proc, timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(),
                                       err.read_text())
    assert done.returncode == 0, done.stderr[-3000:]
    # top and ps tell the writer and the workers apart
    assert {"expforge-writer", "expforge-work0", "expforge-work1"} <= names, names
    # The command never loaded MLflow, and its start-up turned the collector back on.
    assert "mlflow loaded here: False gc enabled: True" in done.stdout, done.stdout[-2000:]
    # The writer closed the store as it ended: mlflow.db alone, copied, holds every run.
    assert sorted(p.name for p in tmp_path.glob("mlflow.db*")) == ["mlflow.db"]
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "mlflow.db", tmp_path / "copy")
    _assert_budget_exact(tmp_path, 7)
    study = load(tmp_path / "s.journal", "cli")
    assert len({t.user_attrs["expforge.pid"] for t in study.trials}) == 2
    c = client(f"sqlite:///{tmp_path}/copy/mlflow.db")
    for trial in study.trials:
        run = c.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val_rmse"] == pytest.approx(trial.value)
        assert run.data.params["model.max_depth"] == str(trial.params["model.max_depth"])
        assert "config.yaml" in {a.path for a in c.list_artifacts(run.info.run_id)}
        assert len(run.inputs.dataset_inputs) == 3
    parent = c.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 7
    assert "study_report.html" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= {
        a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    best = study.best_trial.user_attrs["mlflow_run_id"]
    assert c.search_logged_models(experiment_ids=[parent.info.experiment_id],
                                  filter_string=f"source_run_id = '{best}'")
    assert {a.path for a in c.list_artifacts(best, "plots")} == {
        "plots/feature_importance.png", "plots/predicted_vs_actual.png", "plots/residuals.png"}
    assert not list(handover.glob("expforge-*"))


def _names_until_exit(proc: subprocess.Popen[str], timeout: float) -> set[str]:
    """The names (``/proc/PID/comm``) of ``proc``'s descendants, seen until it exits."""
    names: set[str] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"still running after {timeout} s")
        family = {proc.pid}
        for entry in sorted(Path("/proc").glob("[0-9]*"), key=lambda e: int(e.name)):
            try:
                stat = (entry / "stat").read_text()
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) in family:
                family.add(int(entry.name))
                names.add(name)
        time.sleep(0.01)
    return names


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_study_logging_every_model(tmp_path: Path, workers: int) -> None:
    """search.log_models=all from the command line: each trial logs its model where it
    runs, into the configured store (the writer process holds the store's other work)."""
    elsewhere = tmp_path / "elsewhere"  # the working directory: where a default store would be
    elsewhere.mkdir()
    done = subprocess.run(_cli(tmp_path, *FAST_RF, "search.n_trials=3", "search.plots=false",
                               "search.log_models=all", f"search.n_workers={workers}"),
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(elsewhere.iterdir())  # nothing went to a default store
    _assert_budget_exact(tmp_path, 3)
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    study = load(tmp_path / "s.journal", "cli")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED", (trial.state, run.data.tags.get("error"))
        assert c.search_logged_models(experiment_ids=[exp_id],
                                      filter_string=f"source_run_id = '{run_id}'")


def test_a_worker_killed_mid_trial_leaves_no_run_behind(tmp_path: Path) -> None:
    """SIGKILL of one of two workers: the other finishes the budget, the killed trial's run
    ends KILLED, and what the dead worker had handed to the writer is written."""
    # Trials of ~0.5 s, so that the kill lands in one of them.
    args = _cli(tmp_path, "model=rf", "search_space.model.n_estimators.low=400",
                "search_space.model.n_estimators.high=500", "search.n_trials=4",
                "search.n_workers=2", "search.plots=false")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "s.journal"
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = load(journal, "cli").trials if journal.exists() else []
        except KeyError:  # the file exists, the study not yet
            continue
        finished = {t.user_attrs.get("expforge.pid") for t in trials if t.state.is_finished()}
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING
                   and t.user_attrs.get("expforge.pid") in finished]
        if running:  # a worker that has handed runs over, now in its next fit
            victim = running[0]
    assert victim is not None
    os.kill(victim.user_attrs["expforge.pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    _assert_budget_exact(tmp_path, 4)
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    study = load(journal, "cli")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    runs = {int(r.data.tags["optuna.trial_number"]): r
            for r in children(c, exp_id, study.user_attrs["mlflow_parent_run_id"])}
    assert study.trials[victim.number].state == optuna.trial.TrialState.FAIL
    # Its run exists where the writer had created it before the kill (its id may not have
    # reached the trial).
    assert runs.get(victim.number) is None or runs[victim.number].info.status == "KILLED"
    for trial in study.trials:
        if trial.number != victim.number:
            assert runs[trial.number].info.status == "FINISHED"
            assert runs[trial.number].data.metrics["val_rmse"] == pytest.approx(trial.value)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_then_resume_completes_the_budget(tmp_path: Path, sig: int) -> None:
    # Eight trials: the signal lands in a fit, well before the study's end, where the main
    # process writes to the store itself (the best model), also on a loaded machine.
    args = _cli(tmp_path, "model=rf", "search_space.model.n_estimators.low=150",
                "search_space.model.n_estimators.high=300", "search.n_trials=8")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "s.journal"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until one trial finished and the next one runs
        if journal.exists():
            try:
                trials = load(journal, "cli").trials
            except KeyError:  # the file exists, the study not yet
                trials = []
            if any(t.state.is_finished() for t in trials) and any(
                    t.state == optuna.trial.TrialState.RUNNING for t in trials):
                break
        time.sleep(0.3)
    # Into the next trial's fit (a 150-300 tree forest): a signal that lands inside an SQLite
    # write can leave that write's lock held (see the note on issue 6).
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("expforge").experiment_id])
    assert "KILLED" in {r.info.status for r in runs}
    assert "RUNNING" not in {r.info.status for r in runs}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_budget_exact(tmp_path, 8)


def test_resume_continues_without_replaying_trials(plain, tmp_path: Path) -> None:
    base = ["search=optuna", *FAST_RF, "search.study_name=resume", "search.plots=false",
            f"search.storage={tmp_path}/s.journal", "search.log_models=none"]
    run_search(plain(*base, "search.n_trials=3"))
    run_search(plain(*base, "search.n_trials=6"))  # the budget grows: three more trials
    study = load(tmp_path / "s.journal", "resume")
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 6 and len(set(params)) == 6
    parents = {t.user_attrs.get("mlflow_run_id") for t in study.trials}
    assert len(parents) == 6


def test_deleted_parent_run_gets_a_new_parent(plain, store, tmp_path: Path) -> None:
    base = ["search=optuna", *FAST_RF, "search.study_name=deleted", "search.plots=false",
            f"search.storage={tmp_path}/s.journal", "search.log_models=none"]
    first = run_search(plain(*base, "search.n_trials=1")).parent_run_id
    client(store["uri"]).delete_run(first)
    second = run_search(plain(*base, "search.n_trials=2")).parent_run_id
    assert second != first
    assert client(store["uri"]).get_run(second).info.status == "FINISHED"


def test_multi_objective_with_nsga2_and_grid_sampler(plain, store, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = plain("search=optuna", "model=rf", "search.n_trials=3", "search.study_name=moo",
                f"search.storage={tmp_path}/s.journal", "search.plots=false",
                "search.sampler._target_=optuna.samplers.NSGAIISampler",
                "search.metrics=[val_rmse,fit_time_s]",
                "search.directions=[minimize,minimize]")
    cfg["search_space"] = {"model.n_estimators": "int(interval(5, 15))"}
    assert run_search(cfg).best_value is None  # a Pareto front, not one best value
    study = load(tmp_path / "s.journal", "moo")
    assert len(study.directions) == 2 and len(study.best_trials) >= 1
    assert all(len(t.values) == 2 for t in study.trials)

    # A budget larger than the grid, and a config to try first that is a point of the grid
    # (GridSampler would count it for no point, and run it twice): the study stops once
    # every point is tried, each once, and says so.
    grid = plain("search=optuna", "model=rf", "search.n_trials=7", "search.study_name=grid",
                 f"search.storage={tmp_path}/s.journal", "search.plots=false",
                 "search.sampler._target_=optuna.samplers.GridSampler", "~search.sampler.seed",
                 "search.enqueue=[{model.max_depth: 2, model.n_estimators: 5}]")
    # a continuous key that only classification searches is not part of a regression grid
    grid["search_space"] = {"model.max_depth": "choice(2, 4)", "model.n_estimators": "range(5, 6)",
                            "model.max_features": {"type": "float", "low": 0.3, "high": 1.0,
                                                   "when": {"task": ["binary", "multiclass"]}}}
    run_search(grid)
    trials = load(tmp_path / "s.journal", "grid").trials
    seen = {(t.params["model.max_depth"], t.params["model.n_estimators"]) for t in trials}
    assert seen == {(2, 5), (2, 6), (4, 5), (4, 6)} and len(trials) == 4
    out, err = capsys.readouterr()
    assert "1 of the configs to try first is a point of the grid, tried in its turn" in out
    assert ("search.n_trials=7 is more than the 4 configs of the grid; the study stops once "
            "each of them is tried") in err
    assert "stopped: grid (all 4 configs of the grid tried)" in out
    # run again, it says that the grid is covered: a larger budget would not go on
    run_search(grid)
    assert len(load(tmp_path / "s.journal", "grid").trials) == len(trials)
    assert ("stopped already: grid (all 4 configs of the grid tried); no new trial: for more "
            "configs, start a new study (search.study_name=<new name>) with a wider "
            "search_space") in capsys.readouterr().out

    # a failed point of the grid is tried (GridSampler does not try it again): the study
    # stops once every point has finished, not after as many COMPLETE trials
    failing = plain("search=optuna", "model=rf", "search.n_trials=5", "search.plots=false",
                    "search.study_name=grid-failing", f"search.storage={tmp_path}/s.journal",
                    "search.sampler._target_=optuna.samplers.GridSampler", "~search.sampler.seed",
                    "model.n_estimators=5")
    failing["search_space"] = {"model.max_depth": "choice(2, -1)"}
    run_search(failing)
    trials = load(tmp_path / "s.journal", "grid-failing").trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]
    assert "stopped: grid (all 2 configs of the grid tried, 1 of them failed)" in (
        capsys.readouterr().out)


def test_a_study_in_a_sweep_hangs_under_the_sweep_parent(plain, store, tmp_path: Path) -> None:
    from expforge.registry import register_best
    from expforge.tracking import TrackingSettings, connect

    cfg = plain("search=optuna", *FAST_RF, "search.n_trials=2", "search.study_name=in-sweep",
                f"search.storage={tmp_path}/s.journal", "search.plots=false")
    c = client(store["uri"])
    exp_id = connect(TrackingSettings.from_config(cfg["tracking"]))
    sweep = c.create_run(exp_id, run_name="sweep", tags={"expforge.role": "sweep"}).info.run_id
    study_parent = run_search(cfg, sweep_parent_run_id=sweep).parent_run_id
    assert c.get_run(study_parent).data.tags["mlflow.parentRunId"] == sweep
    c.set_terminated(sweep, "FINISHED")
    # register.py's default target is the sweep (not the study inside it), and it reaches the
    # trials through the study
    report = register_best({"model_name": "in-sweep-m"}, cfg["tracking"])
    assert sweep in report.target and report.winner is not None


def test_the_console_fits_80_columns_without_a_terminal(tmp_path: Path) -> None:
    """A CI log: COLUMNS=80, output piped. The top-trials table shows whole values (4
    significant digits, run ids of 8 characters) in the columns that fit; nothing else but
    expforge's own lines."""
    done = subprocess.run(
        _cli(tmp_path, "model=xgb", "search.n_trials=2", "search.plots=false",
             "model.n_estimators=20", "~search_space.model.n_estimators"),
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("top trials of cli"))
    table = lines[start + 1:start + 7]
    assert all(len(line) <= 80 for line in table) and "…" not in done.stdout
    header = [c.strip() for c in table[1].split("┃")[1:-1]]
    assert header[:3] == ["trial", "run_id", "val_rmse"] and "." not in header[3]
    row = [c.strip() for c in table[3].split("│")[1:-1]]
    assert len(row[1]) == 8 and len(row[2].replace(".", "")) <= 4
    assert lines[start + 7].startswith("(+") and "top_trials.csv" in lines[start + 7]
    summary = next(line for line in lines if line.startswith("study cli: "))
    assert summary.startswith("study cli: 2 complete") and len(summary.split()[-1]) == 32
    assert lines[-1].startswith("open the UI: mlflow ui --backend-store-uri sqlite:///")
    assert lines[-1].endswith("/#/experiments/1/runs?workflowType=machine_learning")
    assert "View run" not in done.stdout and "Warning" not in done.stderr


def test_fixed_values_of_a_ported_sweeper_config_reach_every_trial(tmp_path: Path) -> None:
    """hydra-optuna-sweeper's ``params:`` may fix values: a config key, and a config group's
    choice. Every trial gets them, and records them as its params."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "run.py", project / "run.py")
    shutil.copytree(ROOT / "conf", project / "conf")
    (project / "conf" / "experiment" / "ported.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /search: optuna\n"
        "search:\n  n_trials: 2\n  plots: false\n"
        "search_space:\n"
        "  model: linear\n"                        # a group choice: rf is the default
        "  data.split.val: 0.25\n"                 # a plain value
        "  model.regressor.alpha: tag(log, interval(0.1, 10.0))\n")
    done = subprocess.run([sys.executable, str(project / "run.py"), "experiment=ported"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    c = client(f"sqlite:///{project}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    trials = c.search_runs([exp_id], "tags.`expforge.role` = 'trial'")
    assert len(trials) == 2
    for run in trials:
        assert run.data.tags["model"] == "linear"
        assert run.data.params["model.name"] == "linear"
        assert run.data.params["data.split.val"] == "0.25"
        assert 0.1 <= float(run.data.params["model.regressor.alpha"]) <= 10.0


def test_a_trial_of_a_linear_classifier_is_the_same_fit_as_a_run(plain, store,
                                                                    tmp_path: Path) -> None:
    """Only boosting is fitted round by round for pruning: a LogisticRegression trial is
    the run's single fit (round by round, its solver restarted every k iterations, ended
    elsewhere, twenty times slower, with convergence warnings)."""
    import warnings

    from expforge.runner import run_one

    single, _ = run_one(plain("model=linear", "data=breast_cancer"), log_model=False,
                        log_plots=False)
    cfg = plain("search=optuna", "model=linear", "data=breast_cancer", "search.n_trials=1",
                "search.plots=false", "search.log_models=none",
                f"search.storage={tmp_path}/s.journal", "search.study_name=linear",
                'search_space.model.classifier.C="choice(1.0)"')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning
        found = run_search(cfg, RunContext(choices={"model": "linear"}))
    assert found.best_value == pytest.approx(single.value, rel=1e-12)
