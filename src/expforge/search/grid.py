"""A GridSampler study's coverage: which points of its grid have a verdict.

Optuna's GridSampler hands trial ``k < N`` the ``k``-th point of its shuffled grid, later
trials an unvisited point, and counts every finished trial as a visit, also one that an
interrupt or a dead worker ended without a verdict. expforge goes by verdicts instead: a
point is tried once a trial with its params is COMPLETE, PRUNED or FAILed with an ``error``
(the config's own failure). The study stops when every point is tried (``budget.StopRules``);
points that GridSampler lost (it counts a trial cut short as a visit, and never hands its
point out again) are enqueued once it has nothing left to hand out (``hand_back_lost``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["hand_back_lost", "is_point", "untried"]

Point = tuple[Any, ...]


def untried(study: Any, grid: Mapping[str, Sequence[Any]], running: bool = False
            ) -> set[Point]:
    """The points of ``grid`` (values in the order of its sorted keys) without a verdict,
    nor, with ``running``, a trial running."""
    from optuna.trial import TrialState

    names = sorted(grid)
    left = set(itertools.product(*(grid[k] for k in names)))
    seen: set[frozenset[tuple[str, Any]]] = set()
    for t in study.get_trials(deepcopy=False):
        if not left:
            break
        if _verdict(t) or (running and t.state == TrialState.RUNNING):
            _cover(left, t.params, grid, names, seen)
    return left


def hand_back_lost(study: Any, grid: Mapping[str, Sequence[Any]]) -> int:
    """Once GridSampler has no point left to hand out (``is_exhausted``: a finished trial
    for every one of its points), enqueue the points still without a verdict that no trial
    is running or waiting for; how many. Those are the points GridSampler lost: a trial cut
    short by an interrupt, a dead worker or a budget race, or a point that another shuffle
    (a changed seed) gave to a trial number already used."""
    from optuna.trial import TrialState

    if not study.sampler.is_exhausted(study):
        return 0
    left = untried(study, grid)
    names, seen = sorted(grid), set[frozenset[tuple[str, Any]]]()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        _cover(left, t.params or t.system_attrs.get("fixed_params") or {}, grid, names, seen)
    for point in sorted(left, key=repr):
        study.enqueue_trial(dict(zip(names, point, strict=True)))
    return len(left)


def is_point(config: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> bool:
    """Whether an enqueued ``config`` is a point of ``grid``: GridSampler would count the
    enqueued trial for no point and try the point again."""
    return set(config) == set(grid) and all(config[k] in grid[k] for k in grid)


def _verdict(t: Any) -> bool:
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs)


def _cover(points: set[Point], params: Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
           names: list[str], seen: set[frozenset[tuple[str, Any]]]) -> None:
    """Take out of ``points`` those that ``params`` stand for: a trial without a key (its
    ``when`` did not hold) stands for every value of that key. ``seen``: params already
    taken out."""
    given = {k: params[k] for k in names if k in params}
    if not given:
        return  # no param yet (a trial just started): it stands for no point known here
    key = frozenset((k, repr(v)) for k, v in given.items())
    if key in seen:
        return
    seen.add(key)
    for values in itertools.product(*([given[k]] if k in given else grid[k] for k in names)):
        points.discard(values)
