"""When a study stops, through the CLI on real stores: at its target, out of patience, at the
command's timeout across two workers; the parent run and the console say why, and the same
command run again starts no trial until the budget or a rule changes."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from expforge.runner import Objective
from expforge.search.settings import SearchSettings

from ..conftest import client, run_cli
from .test_study import FAST_RF, load

RANDOM = "search.sampler._target_=optuna.samplers.RandomSampler"


def _search(tmp_path: Path, *args: str):
    return run_cli("search=optuna", "search.plots=false", "search.study_name=rules",
                   f"search.storage={tmp_path}/s.journal",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out",
                   *args)


def _parent(tmp_path: Path):
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("expforge")
    runs = c.search_runs([exp.experiment_id], "tags.`expforge.role` = 'study'")
    assert len(runs) == 1
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    return runs[0]


def _finished(study: optuna.Study) -> list:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_a_study_stops_at_its_target_and_the_same_command_says_so(tmp_path: Path) -> None:
    # Every Ridge on diabetes has val_rmse under 60: the first trial reaches it.
    args = ["model=linear", RANDOM, "search.n_trials=10", "search.target=60"]
    first = _search(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopped: target (search.target=60 reached: " in first.stdout
    assert len(_finished(load(tmp_path / "s.journal", "rules"))) == 1
    assert _parent(tmp_path).data.tags["stop_reason"] == "target"

    again = _search(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stopped already: target" in again.stdout and "search.n_trials" in again.stdout
    assert len(load(tmp_path / "s.journal", "rules").trials) == 1

    # Another target: the rules apply to the trials after the stop; none reaches 1.
    harder = _search(tmp_path, "model=linear", RANDOM, "search.n_trials=4", "search.target=1")
    assert harder.returncode == 0, harder.stderr[-2000:]
    assert "stopped: budget (search.n_trials=4 trials done)" in harder.stdout
    assert len(_finished(load(tmp_path / "s.journal", "rules"))) == 4
    assert _parent(tmp_path).data.tags["stop_reason"] == "budget"


def test_a_study_stops_when_its_best_has_not_improved_for_patience_trials(
        tmp_path: Path) -> None:
    done = _search(tmp_path, "model=linear", RANDOM, "search.n_trials=60",
                   "search.patience=3")
    assert done.returncode == 0, done.stderr[-2000:]
    study = load(tmp_path / "s.journal", "rules")
    finished = sorted(_finished(study), key=lambda t: t.datetime_complete)
    after_best = [t for t in finished if t.datetime_complete > study.best_trial.datetime_complete]
    assert len(after_best) == 3 and len(finished) < 60
    assert "stopped: patience (search.patience=3: no better value than" in done.stdout
    assert _parent(tmp_path).data.tags["stop_reason"] == "patience"


def test_the_timeout_is_the_whole_commands_across_its_workers(tmp_path: Path) -> None:
    start = time.monotonic()
    done = _search(tmp_path, *FAST_RF, "search.n_workers=2", "search.n_trials=1000",
                   "search.timeout=6", "model.n_jobs=1")
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped: timeout (search.timeout=6 s passed)" in done.stdout
    study = load(tmp_path / "s.journal", "rules")
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    workers = {t.user_attrs["expforge.pid"] for t in _finished(study)}
    assert len(workers) == 2 and 2 <= len(_finished(study)) < 1000
    # One deadline for both workers, from when the trials could start: not 6 s after each
    # worker's own first trial (a trial takes well under a second).
    last = max(t.datetime_complete for t in study.trials).timestamp()
    first = min(t.datetime_start for t in study.trials).timestamp()
    assert last - first < 6 + 2 and took < 90
    assert _parent(tmp_path).data.tags["stop_reason"] == "timeout"


def _full_read(study: optuna.Study, number: int) -> tuple:
    """What the tally must answer, from every trial read again: counts, rank, best."""
    counted = [t for t in study.trials
               if t.state != TrialState.FAIL or "error" in t.user_attrs]
    by = {s: sum(t.state == s for t in counted) for s in TrialState}
    errors = [t.user_attrs["error"] for t in counted
              if t.state == TrialState.FAIL and t.user_attrs["error"]]
    holding = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    held = sum(t.state in holding for t in study.trials if t.number < number)
    try:
        best = study.best_trial.number
    except ValueError:
        best = None
    return (by[TrialState.COMPLETE], by[TrialState.PRUNED], by[TrialState.FAIL],
            by[TrialState.RUNNING], errors[-1] if errors else "", held, best)


def _two_handles(tmp_path: Path, direction: str = "minimize"
                 ) -> tuple[optuna.Study, optuna.Study]:
    """A new study on a journal, and a second handle on it, as another worker's."""
    from optuna.storages.journal import JournalFileBackend

    def storage() -> optuna.storages.JournalStorage:
        return optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "t.journal")))

    mine = optuna.create_study(study_name="t", storage=storage(), direction=direction)
    return mine, optuna.load_study(study_name="t", storage=storage())


def test_the_tally_answers_as_a_full_read_while_two_processes_add_trials(
        tmp_path: Path) -> None:
    # Two handles on one journal, as two workers: trials finish out of order, some stay
    # running, one waits (enqueued, as search.enqueue does), some fail with and without an
    # error, values tie; after each change the tally of the first handle answers what
    # reading every trial again answers.
    from expforge.search.budget import Tally

    mine, other = _two_handles(tmp_path)
    tally = Tally(mine)
    open_trials = []
    plan = [(mine, "complete", 3.0), (other, "running", None), (mine, "complete", 2.0),
            (other, "enqueue", None), (other, "pruned", None), (mine, "fail", "boom"),
            (other, "fail", None), (mine, "complete", 2.0), (other, "running", None),
            (mine, "complete", 5.0)]
    for handle, action, value in plan:
        if action == "enqueue":  # WAITING until the next ask takes it
            handle.enqueue_trial({})
        elif action == "running":
            open_trials.append((handle, handle.ask()))
        elif action == "complete":
            handle.tell(handle.ask(), value)
        elif action == "pruned":
            handle.tell(handle.ask(), state=TrialState.PRUNED)
        else:
            trial = handle.ask()
            if value is not None:
                trial.set_user_attr("error", value)
            handle.tell(trial, state=TrialState.FAIL)
        for number in range(len(mine.trials) + 1):
            c = tally.counts()
            best = tally.best().number if c.complete else None
            assert (c.complete, c.pruned, c.failed, c.running, c.last_error,
                    tally.rank(number), best) == _full_read(mine, number)
    # The running trials finish late, one of them with a new best.
    for (handle, trial), value in zip(open_trials, (1.0, 9.0), strict=True):
        handle.tell(trial, value)
        c = tally.counts()
        assert (c.complete, c.pruned, c.failed, c.running, c.last_error,
                tally.rank(len(mine.trials)), tally.best().number) == _full_read(
                    mine, len(mine.trials))
    assert tally.best().number == 1 and tally.best().value == 1.0


def _settings(target: float | None = None, patience: int | None = None,
              direction: str = "minimize") -> SearchSettings:
    return SearchSettings(
        n_trials=100, timeout=None, study_name="t", storage="", n_workers=2,
        objectives=(Objective("val_rmse", direction),), sampler={}, pruner=None,
        report_every=1, log_models="best", max_failure_ratio=1.0, heartbeat_interval=None,
        grace_period=None, top_k=5, plots=False, target=target, patience=patience)


def test_target_and_patience_go_by_the_order_trials_finished_in_while_two_processes_add_them(
        tmp_path: Path) -> None:
    # Two handles on one journal, as two workers. The rules of the first are asked after
    # every change, and answer as new rules reading every trial at once; a trial of the
    # other handle that finishes late counts where it finished, not where its number is.
    from expforge.search.budget import StopRules, Tally

    mine, other = _two_handles(tmp_path)
    tally = Tally(mine)
    rules = {"patience": StopRules(_settings(patience=2), tally),
             "target": StopRules(_settings(target=1.0), tally)}

    def said() -> tuple[str | None, ...]:
        now = tally.counts()
        answers = []
        for r in rules.values():
            stop = r.check(now, deadline=float("inf"))
            fresh = StopRules(r.settings, Tally(mine), r.since).check(now, float("inf"))
            assert stop == fresh
            answers.append(None if stop is None else stop.detail)
        return tuple(answers)

    late = other.ask()  # trial 0, running while the others finish
    mine.tell(mine.ask(), 5.0)  # 1
    assert said() == (None, None)
    mine.tell(mine.ask(), 6.0)  # 2
    assert said() == (None, None)
    other.tell(late, 4.0)  # 0 finishes third, the new best: nothing since
    assert said() == (None, None)
    rules["patience, from now"] = StopRules(_settings(patience=2), tally, time.time())
    failed = mine.ask()  # 3: a failure is not a trial without progress
    failed.set_user_attr("error", "boom")
    mine.tell(failed, state=TrialState.FAIL)
    mine.tell(mine.ask(), state=TrialState.PRUNED)  # 4
    assert said() == (None, None, None)
    late = other.ask()  # 5, running
    mine.tell(mine.ask(), 4.0)  # 6: the same value as trial 0, finished later
    stale = "search.patience=2: no better value than 4 (trial 0) in the 2 trials since"
    assert said() == (stale, None, stale)
    mine.tell(mine.ask(), 0.9)  # 7 reaches the target
    reached = "search.target=1 reached: 0.9 (trial 7)"
    assert said() == (None, reached, None)
    other.tell(late, 0.5)  # 5 reaches it too, but after 7
    assert said() == (None, reached, None)
    mine.tell(mine.ask(), 3.0)  # 8
    mine.tell(mine.ask(), 3.0)  # 9
    stale = "search.patience=2: no better value than 0.5 (trial 5) in the 2 trials since"
    assert said() == (stale, reached, stale)


def test_target_and_patience_of_a_maximized_objective(tmp_path: Path) -> None:
    from expforge.search.budget import StopRules, Tally

    study, _ = _two_handles(tmp_path, "maximize")
    tally = Tally(study)
    patience = StopRules(_settings(patience=2, direction="maximize"), tally)
    target = StopRules(_settings(target=3.5, direction="maximize"), tally)
    for value in (1.0, 3.0, 2.0, 3.0):
        study.tell(study.ask(), value)
    now = tally.counts()
    stop = patience.check(now, float("inf"))
    assert stop is not None and stop.detail == (
        "search.patience=2: no better value than 3 (trial 1) in the 2 trials since")
    assert target.check(now, float("inf")) is None
    study.tell(study.ask(), 4.0)
    stop = target.check(tally.counts(), float("inf"))
    assert stop is not None and stop.detail == "search.target=3.5 reached: 4 (trial 4)"
    assert patience.check(tally.counts(), float("inf")) is None
