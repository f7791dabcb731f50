"""When a study stops: its budget (``search.n_trials`` trials COMPLETE or PRUNED, across
workers, machines and resumes), its stop rules (``search.target``, ``search.patience``,
``search.timeout``) and the share of failures that stops it.

A trial only starts while fewer than ``n_trials`` are finished or running (``taken``), so
several workers never overshoot the budget. FAIL trials without an ``error`` attribute are
not a verdict on their config (a budget race, Ctrl-C, a dead worker) and count for nothing.

Every worker asks its ``StopRules`` before each trial, of the same study, so all stop at the same
rule. The command records the rule that stopped the study on it (``STOP_ATTR``); the same
command run again finds the same rule still holding and starts no trial, while a larger
budget or another rule applies the rules to the trials finished after that stop only.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Any

from expforge.errors import SearchError
from expforge.metrics import better
from expforge.search.job import STOP_ATTR
from expforge.search.settings import SearchSettings

__all__ = ["BudgetReached", "Counts", "Stop", "StopRules", "Tally", "TooManyFailures",
           "check_failures", "counts", "record_stop", "since_of"]


class BudgetReached(Exception):
    """A worker asked for a trial after the last slot was taken."""


class TooManyFailures(SearchError):
    """More than ``search.max_failure_ratio`` of the finished trials failed."""


@dataclass(frozen=True)
class Stop:
    """Why a study stopped (``stop_reason`` on its parent run) and the line that says so."""

    reason: str  # budget, grid, target, patience, timeout (failures, interrupted: coordinator)
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

    def settled(self) -> tuple[list[Any], int]:
        """The study's trials, and how many at its front are finished and counted: those
        never change, so a reader may fold each of them in once (``StopRules``)."""
        trials = self._read()
        return trials, self._settled

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


class StopRules:
    """The rule that ends a study now, if one does (``check``), for a process that asks
    before every trial: the budget, ``search.target``, ``search.patience`` and the command's
    deadline. Target and patience go by the order in which trials finished: the target counts
    the trials finished after ``since`` (a time, ``since_of``), and patience the trials
    finished after both ``since`` and the best one (the best of all COMPLETE trials).

    They read the trials of ``tally``'s study, folded in once each as the tally settles them
    (``Tally.settled``), and look at the few beyond on each call, so a look does not grow with
    the study. A trial that finishes late (another worker's) may still become the best or
    the first to reach the target, since the order is the finish times', not the numbers'.
    """

    def __init__(self, settings: SearchSettings, tally: Tally, since: float = 0.0) -> None:
        from optuna.trial import TrialState

        self.settings = settings
        self.tally = tally
        self.since = since
        self._direction = settings.objective.direction
        self._folded = 0  # settled trials 0 .. _folded - 1 are folded in:
        self._reached: Any = None  # the first to finish that reached the target
        self._best: Any = None  # the first to finish with the best value (all COMPLETE)
        self._finished: list[float] = []  # finish times after since, sorted
        self._complete = TrialState.COMPLETE
        self._done = (TrialState.COMPLETE, TrialState.PRUNED)
        self._grid_asked: Counts | None = None  # the counts when a grid was last not covered

    def check(self, now: Counts, deadline: float) -> Stop | None:
        """The budget (from ``now``), the target, the patience, then the deadline."""
        settings = self.settings
        size = settings.grid_size
        if size is not None and now.taken + now.failed >= size and self._grid_covered(now):
            failed = f", {now.failed} of them failed" if now.failed else ""
            return Stop("grid", f"all {size} configs of the grid tried{failed}")
        if now.done >= settings.n_trials:
            return Stop("budget", f"search.n_trials={settings.n_trials} trials done")
        if settings.target is not None or settings.patience is not None:
            found = self._target_or_patience()
            if found is not None:
                return found
        if time.time() >= deadline:
            return Stop("timeout", f"search.timeout={settings.timeout:g} s passed")
        return None

    def _grid_covered(self, now: Counts) -> bool:
        """Every point of the grid has a verdict or a trial running (``grid.untried``): no
        trial is to start, as GridSampler would hand it a running point again. If not, and
        GridSampler has none left to hand out, the points it lost are enqueued
        (``grid.hand_back_lost``) for the next trials. Asked only once the trials finished or
        running are as many as the points, and again only when the counts change, so its
        reads of every trial are paid at the end of a grid alone."""
        from expforge.search.grid import hand_back_lost, untried

        grid = self.settings.grid
        assert grid is not None
        if now == self._grid_asked:
            return False
        self._grid_asked = now
        if not untried(self.tally.study, grid, running=True):
            return True
        hand_back_lost(self.tally.study, grid)
        return False

    def _target_or_patience(self) -> Stop | None:
        settings = self.settings
        trials, settled = self.tally.settled()
        for t in trials[self._folded:settled]:
            self._reached, self._best = self._fold(t, self._reached, self._best)
            if self._after_since(t):
                bisect.insort(self._finished, t.datetime_complete.timestamp())
        self._folded = settled
        reached, best, late = self._reached, self._best, []
        for t in trials[settled:]:  # finished out of order, or not yet
            reached, best = self._fold(t, reached, best)
            if self._after_since(t):
                late.append(t.datetime_complete.timestamp())
        if reached is not None:
            return Stop("target", f"search.target={settings.target:g} reached: "
                                  f"{reached.value:.6g} (trial {reached.number})")
        if settings.patience is None or best is None:
            return None
        start = max(self.since, best.datetime_complete.timestamp())
        stale = (len(self._finished) - bisect.bisect_right(self._finished, start)
                 + sum(1 for stamp in late if stamp > start))
        if stale >= settings.patience:
            return Stop("patience", f"search.patience={settings.patience}: no better value "
                                    f"than {best.value:.6g} (trial {best.number}) in the "
                                    f"{stale} trials since")
        return None

    def _after_since(self, t: Any) -> bool:
        """Whether ``t`` is COMPLETE or PRUNED, and finished after ``since``."""
        return t.state in self._done and t.datetime_complete.timestamp() >= self.since

    def _fold(self, t: Any, reached: Any, best: Any) -> tuple[Any, Any]:
        """``reached`` and ``best`` with trial ``t`` taken into account."""
        if t.state != self._complete:  # Optuna fails a NaN value, so no value is NaN
            return reached, best
        target, direction = self.settings.target, self._direction
        if (target is not None and self._after_since(t)
                and (t.value == target or better(t.value, target, direction))
                and (reached is None or t.datetime_complete < reached.datetime_complete)):
            reached = t
        if (best is None or better(t.value, best.value, direction)
                or (t.value == best.value and t.datetime_complete < best.datetime_complete)):
            best = t
        return reached, best


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
