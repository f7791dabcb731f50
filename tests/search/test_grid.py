"""A grid's coverage goes by verdicts: a trial cut short by an interrupt tries no point."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from expforge.search.grid import retry_cut_short, untried

GRID = {"model.booster": ["gbtree", "dart"], "model.max_depth": [2, 4]}
DISTRIBUTIONS = {k: CategoricalDistribution(v) for k, v in GRID.items()}


def _trial(state: TrialState, error: str | None = None,
           **params: object) -> optuna.trial.FrozenTrial:
    named = {f"model.{k}": v for k, v in params.items()}
    return create_trial(state=state, params=named,
                        distributions={k: DISTRIBUTIONS[k] for k in named},
                        value=1.0 if state == TrialState.COMPLETE else None,
                        user_attrs={"error": error} if error is not None else {})


def test_points_without_a_verdict_are_untried_and_those_cut_short_are_enqueued() -> None:
    study = optuna.create_study()
    study.add_trial(_trial(TrialState.COMPLETE, booster="gbtree", max_depth=2))
    study.add_trial(_trial(TrialState.FAIL, "ValueError: bad", booster="gbtree", max_depth=4))
    study.add_trial(_trial(TrialState.FAIL, booster="dart", max_depth=2))  # an interrupt
    assert untried(study, GRID) == {("dart", 2), ("dart", 4)}

    assert retry_cut_short(study, GRID) == 1  # the interrupted point, not the one never run
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [
        {"model.booster": "dart", "model.max_depth": 2}]
    assert retry_cut_short(study, GRID) == 0  # waiting already

    # a trial without a key (its `when` did not hold) stands for every value of that key
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"model.booster": "dart"},
                                 distributions={"model.booster": DISTRIBUTIONS["model.booster"]}))
    assert untried(study, GRID) == set()
