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

__all__ = ["BudgetReached", "Counts", "Stop", "Tally", "TooManyFailures", "check_failures",
           "counts", "record_stop", "since_of", "stop_rule"]


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


class Tally:
    """A study's counts, budget ranks and best trial, for a process that asks after every
    trial: the same answers as reading all its trials, in the time of reading the few from
    the first unfinished one on.

    A finished trial never changes (Optuna refuses to update one), so the trials up to the
    first one still waiting or running are counted once, as they finish, and only the rest
    are read again (about one per worker). Each reader keeps its own tally of its study.
    """

    def __init__(self, study: Any) -> None:
        from optuna.study import StudyDirection
        from optuna.trial import TrialState

        self.study = study
        self._settled = 0  # trials 0 .. _settled - 1 are finished, and counted here:
        self._totals: list[Any] = [0, 0, 0, 0, ""]  # as Counts' fields, in their order
        self._held = [0]  # _held[n]: of the trials before number n, those holding a slot
        self._best: Any = None  # their best COMPLETE trial (a single objective)
        directions = study.directions
        self._maximize = (directions[0] == StudyDirection.MAXIMIZE if len(directions) == 1
                          else None)  # None: several objectives
        # Counts' field of each state that is counted (not WAITING)
        self._fields = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2,
                        TrialState.RUNNING: 3}
        self._fail, self._complete = TrialState.FAIL, TrialState.COMPLETE

    def counts(self) -> Counts:
        """The trials by state (``counts``)."""
        trials = self._read()
        now = list(self._totals)
        for t in trials[self._settled:]:
            self._add(now, t)
        return Counts(*now)

    def rank(self, number: int) -> int:
        """How many trials before ``number`` hold a budget slot (finished or running)."""
        trials = self._read()
        if number <= self._settled:
            return self._held[number]
        return self._held[-1] + sum(1 for t in trials[self._settled:number] if self._holds(t))

    def best(self) -> Any:
        """``study.best_trial``: the first COMPLETE trial with the best value; ValueError if
        none is complete, RuntimeError for several objectives."""
        trials = self._read()
        if self._maximize is None:
            raise RuntimeError("a study of several objectives has no single best trial")
        best = self._best
        for t in trials[self._settled:]:
            best = self._better(best, t)
        if best is None:
            raise ValueError("No trials are completed yet.")
        if any(x > 0.0 for x in best.constraints.values()):
            return self.study.best_trial  # Optuna's rule for infeasible trials
        return best

    def _read(self) -> list[Any]:
        """The study's trials, those newly finished at the front counted."""
        trials = self.study.get_trials(deepcopy=False)
        while (self._settled < len(trials) and trials[self._settled].state.is_finished()
               and trials[self._settled].number == self._settled):
            t = trials[self._settled]
            self._add(self._totals, t)
            self._held.append(self._held[-1] + self._holds(t))
            self._best = self._better(self._best, t)
            self._settled += 1
        return trials

    def _add(self, totals: list[Any], t: Any) -> None:
        """Trial ``t`` counted into ``totals``. FAIL trials without an ``error`` attribute
        count for nothing (see the module's docstring)."""
        if t.state == self._fail:
            if "error" not in t.user_attrs:
                return
            totals[4] = t.user_attrs["error"] or totals[4]
        field = self._fields.get(t.state)
        if field is not None:
            totals[field] += 1

    def _holds(self, t: Any) -> bool:
        """Whether trial ``t`` holds a budget slot (finished or running)."""
        return t.state != self._fail and t.state in self._fields

    def _better(self, best: Any, t: Any) -> Any:
        if t.state != self._complete or self._maximize is None:
            return best
        if best is None or (t.value > best.value if self._maximize else t.value < best.value):
            return t
        return best


def counts(study: Any) -> Counts:
    """The study's trials by state, read once (``Tally`` for a reader that asks again)."""
    return Tally(study).counts()


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
