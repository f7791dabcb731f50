"""The study's budget: ``search.n_trials`` trials COMPLETE or PRUNED, across workers,
machines and resumes, and the share of failures that stops a study.

A trial only starts while fewer than ``n_trials`` are finished or running (``taken``), so
several workers never overshoot the budget. FAIL trials without an ``error`` attribute are
not a verdict on their config (a budget race, Ctrl-C, a dead worker) and count for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from expforge.errors import SearchError
from expforge.search.settings import SearchSettings

__all__ = ["BudgetReached", "Counts", "check_failures", "counts", "rank"]


class BudgetReached(Exception):
    """A worker asked for a trial after the last slot was taken."""


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
        raise SearchError(
            f"search.max_failure_ratio={settings.max_failure_ratio} exceeded: {counts.failed} of "
            f"{finished} trials failed{detail} (the failed child runs hold the tracebacks)"
        )
