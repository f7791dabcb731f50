"""A GridSampler study's coverage: which points of its grid have a verdict.

Optuna's GridSampler hands trial ``k < N`` the ``k``-th point of its shuffled grid, later
trials an unvisited point, and counts every finished trial as a visit, also one that an
interrupt or a dead worker ended without a verdict. expforge goes by verdicts instead: a
point is tried once a trial with its params is COMPLETE, PRUNED or FAILed with an ``error``
(the config's own failure). The study stops when every point is tried (``budget.StopRules``),
and a command that resumes it enqueues again the points whose only trials were cut short,
which GridSampler itself would never hand out again.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["retry_cut_short", "untried"]

Point = tuple[Any, ...]


def untried(study: Any, grid: Mapping[str, Sequence[Any]]) -> set[Point]:
    """The points of ``grid`` (values in the order of its sorted keys) without a verdict."""
    names = sorted(grid)
    left = set(itertools.product(*(grid[k] for k in names)))
    for t in study.get_trials(deepcopy=False):
        if not left:
            break
        if _verdict(t):
            _cover(left, t.params, names)
    return left


def retry_cut_short(study: Any, grid: Mapping[str, Sequence[Any]]) -> int:
    """Enqueue again the points whose trials all ended without a verdict, unless a trial of
    theirs is running or waiting; how many."""
    from optuna.trial import TrialState

    names = sorted(grid)
    cut: set[Point] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and not _verdict(t) and set(names) <= set(t.params):
            cut.add(_point(t.params, names))
    for t in study.get_trials(deepcopy=False):
        if _verdict(t) or t.state in (TrialState.RUNNING, TrialState.WAITING):
            _cover(cut, t.params or t.system_attrs.get("fixed_params") or {}, names)
    for point in sorted(cut, key=repr):
        study.enqueue_trial(dict(zip(names, point, strict=True)))
    return len(cut)


def _verdict(t: Any) -> bool:
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs)


def _cover(points: set[Point], params: Mapping[str, Any], names: list[str]) -> None:
    """Take out of ``points`` those that ``params`` stand for: a trial without a key (its
    ``when`` did not hold) stands for every value of that key."""
    if all(k in params for k in names):
        points.discard(_point(params, names))
        return
    if not params:
        return  # no param yet (a trial just started): it stands for no point known here
    given = [(i, params[k]) for i, k in enumerate(names) if k in params]
    points.difference_update([p for p in points if all(p[i] == v for i, v in given)])


def _point(params: Mapping[str, Any], names: list[str]) -> Point:
    return tuple(params.get(k) for k in names)
