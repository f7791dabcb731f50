"""A grid's coverage goes by verdicts: a trial cut short tries no point, and the points that
GridSampler lost that way are handed back once it has none left."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.samplers import GridSampler
from optuna.trial import TrialState, create_trial

from expforge.search.grid import hand_back_lost, untried

GRID = {"model.booster": ["gbtree", "dart"], "model.max_depth": [2, 4]}


def _trial(study: optuna.Study, state: TrialState, error: str | None = None,
           suggest: bool = True) -> None:
    """One trial as expforge's loop runs it (``optimize`` of one trial): GridSampler picks
    its point as it starts."""

    def objective(trial: optuna.Trial) -> float:
        if suggest:  # a budget race fails the trial before it suggests anything
            for key, values in GRID.items():
                trial.suggest_categorical(key, values)
        if error is not None:
            trial.set_user_attr("error", error)
        if state == TrialState.FAIL:
            raise RuntimeError("cut short")
        return 1.0

    study.optimize(objective, n_trials=1, catch=(RuntimeError,))


def test_points_cut_short_are_handed_back_once_gridsampler_has_none_left() -> None:
    study = optuna.create_study(sampler=GridSampler(GRID, seed=0))
    _trial(study, TrialState.COMPLETE)
    _trial(study, TrialState.FAIL, "ValueError: bad")  # a verdict on its config
    assert hand_back_lost(study, GRID) == 0  # GridSampler still has points to hand out
    _trial(study, TrialState.FAIL)  # an interrupt
    _trial(study, TrialState.FAIL, suggest=False)  # a budget race: a point, no params
    assert study.sampler.is_exhausted(study) and len(untried(study, GRID)) == 2

    assert hand_back_lost(study, GRID) == 2
    assert hand_back_lost(study, GRID) == 0  # waiting already
    for _ in range(2):
        _trial(study, TrialState.COMPLETE)  # the enqueued points
    assert untried(study, GRID) == set()


def test_a_trial_without_a_key_stands_for_every_value_of_it() -> None:
    """A `when` that did not hold: the trial has no value for the key."""
    study = optuna.create_study()
    booster = CategoricalDistribution(GRID["model.booster"])
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"model.booster": "dart"},
                                 distributions={"model.booster": booster}))
    assert untried(study, GRID) == {("gbtree", 2), ("gbtree", 4)}
