"""When a study stops: its budget (``search.n_trials`` trials COMPLETE or PRUNED, across
workers, machines and resumes), its stop rules (``search.target``, ``search.patience``,
``search.timeout``) and the share of failures that stops it.

A trial only starts while fewer than ``n_trials`` are finished or running (``taken``), so
several workers never overshoot the budget. FAIL trials without an ``error`` attribute are
not a verdict on their config (a budget race, Ctrl-C, a dead worker) and count for nothing.

Every worker asks ``stop_rule`` before each trial, of the same study, so all stop at the same
rule. The command records the rule that stopped the study on it (``STOP_ATTR``); the same
command run again finds the same rule still holding and starts no trial, while a larger
budget or another rule applies the rules to the trials finished after that stop only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from expforge.errors import SearchError
from expforge.metrics import better
from expforge.search.job import STOP_ATTR
from expforge.search.settings import SearchSettings

__all__ = ["BudgetReached", "Counts", "Stop", "TooManyFailures", "check_failures", "counts",
           "rank", "record_stop", "since_of", "stop_rule"]


class BudgetReached(Exception):
    """A worker asked for a trial after the last slot was taken."""


class TooManyFailures(SearchError):
    """More than ``search.max_failure_ratio`` of the finished trials failed."""


@dataclass(frozen=True)
class Stop:
    """Why a study stopped (``stop_reason`` on its parent run) and the line that says so."""

    reason: str  # budget, target, patience, timeout (failures, interrupted: see coordinator)
    detail: str


@dataclass(frozen=True)
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    last_error: str = ""

    @property
    def done(self) -> int:
        return self.complete + self.pruned

    @property
    def taken(self) -> int:
        return self.done + self.running


def counts(study: Any) -> Counts:
    from optuna.trial import TrialState

    c = {TrialState.COMPLETE: 0, TrialState.PRUNED: 0, TrialState.FAIL: 0, TrialState.RUNNING: 0}
    last_error = ""
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            continue  # not a verdict on the config
        if t.state in c:
            c[t.state] += 1
        if t.state == TrialState.FAIL and t.user_attrs.get("error"):
            last_error = t.user_attrs["error"]
    return Counts(c[TrialState.COMPLETE], c[TrialState.PRUNED], c[TrialState.FAIL],
                  c[TrialState.RUNNING], last_error)


def rank(study: Any, number: int) -> int:
    """How many trials before ``number`` hold a budget slot (finished or running)."""
    from optuna.trial import TrialState

    holding = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=holding) if t.number < number)


def check_failures(settings: SearchSettings, counts: Counts) -> None:
    """Stop the study when more than ``search.max_failure_ratio`` of its finished trials
    failed (after four)."""
    finished = counts.done + counts.failed
    if finished >= 4 and counts.failed / finished > settings.max_failure_ratio:
        detail = f"; last error: {counts.last_error}" if counts.last_error else ""
        raise TooManyFailures(
            f"search.max_failure_ratio={settings.max_failure_ratio} exceeded: {counts.failed} of "
            f"{finished} trials failed{detail} (the failed child runs hold the tracebacks)"
        )


def stop_rule(settings: SearchSettings, study: Any, now: Counts, deadline: float,
              since: float = 0.0) -> Stop | None:
    """The rule that ends the study now, if one does: the budget, the target, the patience
    (over the trials finished after ``since``, a time) or the command's deadline."""
    if now.done >= settings.n_trials:
        return Stop("budget", f"search.n_trials={settings.n_trials} trials done")
    if settings.target is not None or settings.patience is not None:
        found = _target_or_patience(settings, study, since)
        if found is not None:
            return found
    if time.time() >= deadline:
        return Stop("timeout", f"search.timeout={settings.timeout:g} s passed")
    return None


def _target_or_patience(settings: SearchSettings, study: Any, since: float) -> Stop | None:
    from optuna.trial import TrialState

    direction = settings.objective.direction
    finished = sorted(
        (t for t in study.get_trials(deepcopy=False,
                                     states=(TrialState.COMPLETE, TrialState.PRUNED))
         if t.datetime_complete is not None and t.datetime_complete.timestamp() >= since),
        key=lambda t: t.datetime_complete)
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    if settings.target is not None:
        for t in complete:
            if t.value == settings.target or better(t.value, settings.target, direction):
                return Stop("target", f"search.target={settings.target:g} reached: "
                                      f"{t.value:.6g} (trial {t.number})")
    if settings.patience is not None:
        best = None  # the first trial, in the order they finished, to reach the best value
        for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                        key=lambda t: t.datetime_complete):
            if best is None or better(t.value, best.value, direction):
                best = t
        if best is None:
            return None
        start = max(since, best.datetime_complete.timestamp())
        stale = sum(1 for t in finished if t.datetime_complete.timestamp() > start)
        if stale >= settings.patience:
            return Stop("patience", f"search.patience={settings.patience}: no better value "
                                    f"than {best.value:.6g} (trial {best.number}) in the "
                                    f"{stale} trials since")
    return None


def since_of(settings: SearchSettings, study: Any) -> float:
    """From when the target and patience count: the whole study, unless a target or patience
    stopped it before and the budget or the rules have changed since (then the trials after
    that stop)."""
    stopped = study.user_attrs.get(STOP_ATTR)
    if not stopped or stopped.get("reason") not in ("target", "patience"):
        return 0.0
    same = (stopped.get("n_trials"), stopped.get("target"), stopped.get("patience")) == (
        settings.n_trials, settings.target, settings.patience)
    return 0.0 if same else float(stopped.get("at", 0.0))


def record_stop(settings: SearchSettings, study: Any, stop: Stop) -> None:
    """Keep on the study the rule that stopped it, with the settings it stopped under."""
    study.set_user_attr(STOP_ATTR, {"reason": stop.reason, "n_trials": settings.n_trials,
                                    "target": settings.target, "patience": settings.patience,
                                    "at": time.time()})
