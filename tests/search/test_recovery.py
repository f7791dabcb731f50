"""After a crash: SIGKILL of a search, runs a killed writer left unwritten, stale trials, a best
model lost with its session."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna

from ..conftest import client
from .test_study import _assert_budget_exact, _cli, load


def test_sigkill_leaves_ghosts_that_the_next_start_clears(tmp_path: Path) -> None:
    # Trials of ~1 s, so that the kill lands in one of them.
    args = _cli(tmp_path, "model=rf", "search_space.model.n_estimators.low=800",
                "search_space.model.n_estimators.high=1000", "search.n_trials=3")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "s.journal"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            trials = load(journal, "cli").trials if journal.exists() else []
        except KeyError:  # the file exists, the study not yet
            trials = []
        if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    ghosts = [r for r in c.search_runs([exp_id]) if r.info.status == "RUNNING"]
    assert ghosts  # the killed process could not clean up
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_budget_exact(tmp_path, 3)
    statuses = {r.info.run_id: r.info.status for r in c.search_runs([exp_id])}
    trial_ghosts = [g for g in ghosts if g.data.tags.get("expforge.role") == "trial"]
    assert trial_ghosts
    # A ghost of a trial that Optuna saw finish (killed between its end and the run's) is
    # written and ended FINISHED; the trial that was cut short is KILLED.
    complete = {str(t.number) for t in load(journal, "cli").trials
                if t.state == optuna.trial.TrialState.COMPLETE}
    for g in trial_ghosts:
        cut_short = g.data.tags["optuna.trial_number"] not in complete
        assert statuses[g.info.run_id] == ("KILLED" if cut_short else "FINISHED")


def test_runs_pending_in_a_killed_writer_are_written_again(plain, store, tmp_path: Path) -> None:
    """A trial is COMPLETE in Optuna but its process died before the writer wrote its run:
    the next start of the study writes the run from the trial (params, metrics, end)."""
    import socket

    from expforge.runner import RunContext
    from expforge.search import run_search

    from .test_study import FAST_RF

    cfg = plain("search=optuna", *FAST_RF, "search.n_trials=2", "search.study_name=repair",
                f"search.storage={tmp_path}/s.journal", "search.plots=false")
    run_search(cfg, RunContext())
    study = load(tmp_path / "s.journal", "repair")
    c = client(store["uri"])
    exp_id = c.get_experiment_by_name(cfg["tracking"]["experiment"]).experiment_id
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    # What a SIGKILL between Optuna's tell and the writer leaves: a created, empty run.
    ghost = c.create_run(exp_id, run_name="repair-trial-2", tags={
        "mlflow.parentRunId": parent_id, "optuna.study_name": "repair",
        "optuna.trial_number": "2", "expforge.role": "trial"}).info.run_id
    dead_pid = subprocess.Popen(["true"])  # its pid is free once it has exited
    dead_pid.wait()
    metrics = {"val_rmse": 55.5, "test_rmse": 56.5, "fit_time_s": 0.1}
    first = study.trials[0]
    study.add_trial(optuna.trial.create_trial(
        params=first.params, distributions=first.distributions, value=55.5,
        user_attrs={"expforge.pid": dead_pid.pid, "expforge.host": socket.gethostname(),
                    "mlflow_run_id": ghost, "expforge.metrics": metrics}))
    run_search({**cfg, "search": {**cfg["search"], "n_trials": 3}}, RunContext())
    run = c.get_run(ghost)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == metrics
    assert run.data.params["model.max_depth"] == str(first.params["model.max_depth"])
    assert run.data.tags["optuna.trial_state"] == "COMPLETE"
    assert run.data.tags["expforge.rewritten"] == "true"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"diabetes-train"}
    assert "config.yaml" in {a.path for a in c.list_artifacts(ghost)}


def test_a_trial_stopped_after_its_run_was_written_has_its_run_tagged_fail(
        plain, store, tmp_path: Path) -> None:
    """A stop that lands after a trial handed its finished run over, before Optuna heard of
    the trial's end, leaves the trial to the repair (FAIL) and a run written COMPLETE: the
    repair tags the run FAIL, so that the runs tell what the study kept."""
    import socket

    from expforge.runner import RunContext
    from expforge.search import run_search

    from .test_study import FAST_RF

    cfg = plain("search=optuna", *FAST_RF, "search.n_trials=2", "search.study_name=late",
                f"search.storage={tmp_path}/s.journal", "search.plots=false")
    run_search(cfg, RunContext())
    study = load(tmp_path / "s.journal", "late")
    c = client(store["uri"])
    exp_id = c.get_experiment_by_name(cfg["tracking"]["experiment"]).experiment_id
    written = c.create_run(exp_id, run_name="late-trial-2", tags={
        "mlflow.parentRunId": study.user_attrs["mlflow_parent_run_id"],
        "optuna.study_name": "late", "optuna.trial_number": "2", "expforge.role": "trial",
        "optuna.trial_state": "COMPLETE"}).info.run_id
    c.set_terminated(written, "FINISHED")
    dead = subprocess.Popen(["true"])  # its pid is free once it has exited
    dead.wait()
    first = study.trials[0]
    study.add_trial(optuna.trial.create_trial(
        params=first.params, distributions=first.distributions,
        state=optuna.trial.TrialState.RUNNING,
        user_attrs={"expforge.pid": dead.pid, "expforge.host": socket.gethostname(),
                    "mlflow_run_id": written}))
    run_search({**cfg, "search": {**cfg["search"], "n_trials": 3}}, RunContext())
    assert load(tmp_path / "s.journal", "late").trials[2].state == optuna.trial.TrialState.FAIL
    assert c.get_run(written).data.tags["optuna.trial_state"] == "FAIL"


def test_a_stale_trial_whose_run_id_never_arrived_has_its_run_ended(store) -> None:
    """Heartbeats fail the trial of a vanished worker (RDB storage) and end its run. A worker
    killed after its writer created the run, before the id reached the trial, leaves a run
    that only its tags name: it is found by them and ended too."""
    from expforge.search.recovery import FailedTrialRun
    from expforge.tracking import LocalStore

    c = client(store["uri"])
    exp_id = c.create_experiment("stale")
    parent = c.create_run(exp_id, run_name="stale").info.run_id
    study = optuna.create_study(study_name="stale")
    study.set_user_attr("mlflow_parent_run_id", parent)
    trial = study.ask()
    run = c.create_run(exp_id, run_name="stale-trial-0", tags={
        "mlflow.parentRunId": parent, "optuna.study_name": "stale",
        "optuna.trial_number": str(trial.number), "expforge.role": "trial"}).info.run_id
    FailedTrialRun(LocalStore(store["uri"]), exp_id)(study, study.trials[trial.number])
    assert c.get_run(run).info.status == "FAILED"
    assert c.get_run(run).data.tags["optuna.trial_state"] == "FAIL"


def test_an_interrupt_after_a_trial_handed_its_run_over_tags_the_run_fail(store) -> None:
    """Ctrl-C or SIGTERM inside the objective once its run was handed over finished: Optuna
    fails the trial itself (no RUNNING trial is left to repair), and the run, written
    COMPLETE, is tagged FAIL like the trial. A trial failed by its config keeps its run."""
    from expforge.search.recovery import tag_interrupted
    from expforge.tracking import LocalStore

    c = client(store["uri"])
    exp_id = c.create_experiment("interrupted")
    study = optuna.create_study(study_name="interrupted")
    runs = []
    for number, attrs in enumerate([{}, {"error": "ValueError: bad config"}]):
        run = c.create_run(exp_id, tags={
            "optuna.study_name": "interrupted", "optuna.trial_number": str(number),
            "expforge.role": "trial", "optuna.trial_state": "COMPLETE"}).info.run_id
        c.set_terminated(run, "FINISHED")
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL, user_attrs={"mlflow_run_id": run, **attrs}))
        runs.append(run)
    local = LocalStore(store["uri"])
    tag_interrupted(local, exp_id, study, 0)
    tag_interrupted(local, exp_id, study, 1)
    tag_interrupted(local, exp_id, study, None)  # no trial started yet
    local.flush()
    assert c.get_run(runs[0]).data.tags["optuna.trial_state"] == "FAIL"
    assert c.get_run(runs[0]).info.status == "FINISHED"  # its end stays as it was written
    assert c.get_run(runs[1]).data.tags["optuna.trial_state"] == "COMPLETE"


def test_a_best_run_killed_while_its_model_was_logged_is_ended_with_its_model(
        tmp_path: Path) -> None:
    """log_models=best logs the best model at a session's end. A SIGKILL then leaves the best
    trial's run RUNNING (resumed to log into) and without a model. The next start, with a
    bigger budget, ends that run FINISHED and logs the model, fitted again from the trial."""
    from .test_study import FAST_RF

    args = _cli(tmp_path, *FAST_RF, "search.plots=false", "tracking.log_plots=false")
    first = subprocess.run([*args, "search.n_trials=2", "search.log_models=none"],
                           capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    best_run = load(tmp_path / "s.journal", "cli").best_trial.user_attrs["mlflow_run_id"]
    c.update_run(best_run, status="RUNNING")  # what the kill leaves

    def models_of(run_id: str) -> list[Any]:
        return list(c.search_logged_models(experiment_ids=[exp_id],
                                           filter_string=f"source_run_id = '{run_id}'"))

    assert not models_of(best_run)
    again = subprocess.run([*args, "search.n_trials=3"], capture_output=True, text=True,
                           timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    study = load(tmp_path / "s.journal", "cli")
    assert len(study.trials) == 3
    run = c.get_run(best_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["expforge.rewritten"] == "true"
    assert run.data.params["search.n_trials"] == "2"  # as written by its own session
    assert study.best_trial.user_attrs["mlflow_run_id"] == best_run  # seeded: trial 2 is worse
    assert len(models_of(best_run)) == 1


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_a_dead_writer_stops_the_study_without_counting_its_trials(tmp_path: Path) -> None:
    """The writer process killed in the middle of a study: one line naming it, exit 1, and
    the trials it took down are not counted as failures of their configs, so the same
    command, run again, completes the budget."""
    args = _cli(tmp_path, "model=rf", "search_space.model.n_estimators.low=300",
                "search_space.model.n_estimators.high=400", "search.n_trials=4",
                "search.plots=false", "search.max_failure_ratio=0.1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "s.journal"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            trials = load(journal, "cli").trials if journal.exists() else []
        except KeyError:
            trials = []
        if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
            break
        time.sleep(0.1)
    writers = _children(proc.pid)
    assert writers, "the command has no writer process"
    for pid in writers:
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "the run writer process" in lines[0], err[-3000:]
    failed = [t for t in load(journal, "cli").trials
              if t.state == optuna.trial.TrialState.FAIL]
    assert not [t for t in failed if "error" in t.user_attrs]  # not a verdict on the configs
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_budget_exact(tmp_path, 4)
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = c.get_experiment_by_name("expforge").experiment_id
    assert not [r for r in c.search_runs([exp_id]) if r.info.status == "RUNNING"]


def test_a_journal_cut_by_a_crash_keeps_its_finished_trials(tmp_path: Path) -> None:
    """A process killed while appending leaves a torn last line: it is cut before anything is
    appended, and what came before is kept. A line damaged in the middle is named."""
    args = _cli(tmp_path, "model=linear", "search.plots=false", "search.n_trials=3")
    assert subprocess.run(args, capture_output=True, check=False).returncode == 0
    journal = tmp_path / "s.journal"
    whole = journal.read_bytes()
    # The last trial's end cut short, as a crash leaves it (nothing after it written: the
    # study's last attributes go).
    lines = whole.splitlines(keepends=True)
    end = max(i for i, line in enumerate(lines) if b'"op_code":6' in line)
    journal.write_bytes(b"".join(lines[:end + 1])[:-25])
    again = subprocess.run([*args, "search.n_trials=5"], capture_output=True, text=True,
                           check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    warning = [line for line in again.stderr.splitlines() if "was cut off" in line]
    torn = list(tmp_path.glob("s.journal.torn-*"))
    assert len(warning) == 1 and len(torn) == 1 and torn[0].read_bytes() in whole
    assert warning[0].startswith(f"warning: {journal}: its last line was cut off by a crash "
                                 f"during a write ({len(torn[0].read_bytes())} bytes, moved to "
                                 f"{torn[0].name}); the study's 2 finished trials")
    _assert_budget_exact(tmp_path, 5)

    lines = journal.read_bytes().splitlines(keepends=True)
    lines[7] = lines[7].replace(b",", b";", 1)
    journal.write_bytes(b"".join(lines))
    damaged = subprocess.run([*args, "search.n_trials=6"], capture_output=True, text=True,
                             check=False)
    assert damaged.returncode == 1
    assert damaged.stderr.strip().splitlines()[-1].startswith(
        f"error: search.storage={journal} is damaged at line 8 (")


def _server(port: int, backend: Path, artifacts: Path) -> subprocess.Popen[str]:
    from ..conftest import mlflow_server

    return mlflow_server(port, f"sqlite:///{backend}", artifacts)


def _kill(server: subprocess.Popen[str]) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def _after_trials(proc: subprocess.Popen[str], journal: Path, n: int, err: Path) -> None:
    """Wait for ``n`` COMPLETE trials; ``err`` is the process's stderr, a file (a pipe that
    no one reads while waiting would stall a process that writes much)."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done = [t for t in load(journal, "cli").trials if t.state.name == "COMPLETE"]
        except (KeyError, FileNotFoundError):
            done = []
        if len(done) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} trials finished: {err.read_text()[-2000:]}")


def test_a_tracking_server_that_dies_mid_study(tmp_path: Path) -> None:
    """Killed while two studies run on it: one gives up after tracking.retry_s with one
    line; the other, interrupted (SIGTERM, as Ctrl-C), stops within seconds, not after its
    120 s. Once the server is back, the same command completes the study and ends every
    run."""
    from ..conftest import client, free_port

    port = free_port()
    backend, artifacts = tmp_path / "server.db", tmp_path / "server-artifacts"
    uri = f"http://127.0.0.1:{port}"

    def command(name: str, *extra: str) -> list[str]:
        args = _cli(tmp_path / name, "model=rf", "search.plots=false", "search.n_trials=6",
                    "model.n_estimators=300", "search_space.model.n_estimators.low=300",
                    f"tracking.experiment={name}", *extra)
        return [a for a in args if not a.startswith("tracking.uri")] + [f"tracking.uri={uri}"]

    gives_up, interrupted = command("gives-up", "tracking.retry_s=3"), command("interrupted")
    server = _server(port, backend, artifacts)
    errs = [tmp_path / "gives-up.err", tmp_path / "interrupted.err"]
    procs = []
    for args, path in zip((gives_up, interrupted), errs, strict=True):
        with path.open("w") as err_file:
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err_file,
                                          text=True))
    for proc, name, path in zip(procs, ("gives-up", "interrupted"), errs, strict=True):
        _after_trials(proc, tmp_path / name / "s.journal", 2, path)
    _kill(server)
    died = time.monotonic()
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)  # Ctrl-C, as a scheduler sends it
    procs[1].wait(timeout=60)
    err = errs[1].read_text()
    assert time.monotonic() - died < 20  # not the 120 s of tracking.retry_s
    assert procs[1].returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: ")
    procs[0].wait(timeout=120)
    err = errs[0].read_text()
    assert time.monotonic() - died < 30
    assert procs[0].returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: tracking.uri={uri} stopped answering while "), last
    assert last.endswith("retried for about tracking.retry_s=3 s); once it answers again, run "
                         "the same command again: a study resumes"), last
    assert "Retrying" not in err and "Traceback" not in err

    server = _server(port, backend, artifacts)
    try:
        done = subprocess.run(gives_up, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        study = load(tmp_path / "gives-up" / "s.journal", "cli")
        assert [t.state.name for t in study.trials].count("COMPLETE") == 6
        assert "RUNNING" not in {t.state.name for t in study.trials}
        c = client(uri)
        runs = c.search_runs([c.get_experiment_by_name("gives-up").experiment_id],
                             max_results=1000)
        assert len(runs) > 6 and "RUNNING" not in {r.info.status for r in runs}
    finally:
        _kill(server)
