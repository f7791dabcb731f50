from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from expforge.errors import SearchError
from expforge.search.space import apply_params, for_task, parse_space, suggest

CONFIG = {"seed": 1, "model": {"name": "xgb", "max_depth": 6, "learning_rate": 0.1,
                               "booster": "gbtree", "rate_drop": 0.0, "n_estimators": 100}}


def test_explicit_and_grammar_forms_give_the_same_distributions() -> None:
    explicit = parse_space({
        "model.max_depth": {"type": "int", "low": 2, "high": 12},
        "model.learning_rate": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
        "model.booster": {"type": "categorical", "choices": ["gbtree", "dart"]},
        "model.n_estimators": {"type": "int", "low": 10, "high": 50},
    }, CONFIG)
    grammar = parse_space({
        "model.max_depth": "int(interval(2, 12))",
        "model.learning_rate": "tag(log, interval(0.01, 0.3))",
        "model.booster": "choice(gbtree, dart)",
        "model.n_estimators": "range(10, 50)",
    }, CONFIG)
    assert [p.distribution for p in explicit] == [p.distribution for p in grammar]
    assert grammar[0].distribution == IntDistribution(2, 12)
    assert grammar[1].distribution == FloatDistribution(0.01, 0.3, log=True)
    assert grammar[2].distribution == CategoricalDistribution(["gbtree", "dart"])


def test_steps_and_float_intervals() -> None:
    (a, b, c) = parse_space({
        "model.n_estimators": {"type": "int", "low": 50, "high": 400, "step": 50},
        "model.learning_rate": "interval(0.1, 0.5)",
        "model.rate_drop": "range(0.0, 0.3, 0.1)",
    }, CONFIG)
    assert a.distribution == IntDistribution(50, 400, step=50)
    assert b.distribution == FloatDistribution(0.1, 0.5)
    assert c.distribution.step == pytest.approx(0.1) and c.distribution.high == pytest.approx(0.3)


def test_conditional_param_only_when_condition_holds() -> None:
    params = parse_space({
        "model.booster": "choice(gbtree, dart)",
        "model.rate_drop": {"type": "float", "low": 0.0, "high": 0.3,
                            "when": {"model.booster": "dart"}},
    }, CONFIG)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        chosen = suggest(trial, params, CONFIG, "regression")
        seen.add(tuple(sorted(chosen)))
        assert ("model.rate_drop" in chosen) == (chosen["model.booster"] == "dart")
        study.tell(trial, 0.0)
    assert len(seen) == 2
    cfg = apply_params(CONFIG, {"model.max_depth": 3})
    assert cfg["model"]["max_depth"] == 3 and CONFIG["model"]["max_depth"] == 6


def test_task_condition() -> None:
    space = {"model.learning_rate": {"type": "float", "low": 0.1, "high": 0.2,
                                     "when": {"task": ["binary", "multiclass"]}}}
    params = parse_space(space, CONFIG)
    trial = optuna.create_study().ask()
    assert suggest(trial, params, CONFIG, "regression") == {}
    assert "model.learning_rate" in suggest(trial, params, CONFIG, "binary")
    # the params a trial of the data's task may suggest (a grid counts only these)
    depth = {"model.max_depth": {"type": "int", "low": 2, "high": 4,
                                 "when": {"task": "regression"}}}
    both = parse_space({**space, **depth}, CONFIG)
    assert [p.key for p in for_task(both, "regression")] == ["model.max_depth"]
    assert [p.key for p in for_task(both, "binary")] == ["model.learning_rate"]
    with pytest.raises(SearchError, match=r"nothing to search for the regression task: the "
                                          r"when\.task of model\.learning_rate excludes it"):
        for_task(params, "regression")


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"model.max_dept": "int(interval(2, 5))"},
         "search_space.model.max_dept: model.max_dept is not a key of the config; did you mean "
         "model.max_depth"),
        ({"model.max_depth": {"type": "int", "low": 9, "high": 2}}, "low=9 > high=2"),
        ({"model.learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}},
         "log=true needs low > 0"),
        ({"model.learning_rate": "tag(log, interval(-1, 1))"}, "log=true needs low > 0"),
        ({"model.booster": {"type": "categorical", "choices": []}}, "choices is empty"),
        ({"model.booster": {"type": "bool"}}, "type=bool is not a type"),
        ({"model.booster": "choice(a, b"}, "cannot be parsed"),
        ({"model.booster": {"sweep": "gbtree"}}, "is a fixed value, not a distribution"),
        ({"model.booster": "gbtree"}, "has nothing to search"),
        ({"model.rate_drop": {"type": "float", "low": 0, "high": 1, "when": {"model.nope": 1}}},
         "model.nope is not a key of the config"),
        ({}, "search_space is empty"),
    ],
)
def test_invalid_space_is_one_clear_error(space: dict, message: str) -> None:
    with pytest.raises(SearchError, match=message.replace("(", r"\(")):
        parse_space(space, CONFIG)


def test_an_enqueued_key_the_task_does_not_search_is_a_warning(
        capsys: pytest.CaptureFixture[str]) -> None:
    from expforge.search.warm import check_enqueued

    params = parse_space({"model.learning_rate": {"type": "float", "low": 0.1, "high": 0.2,
                                                  "when": {"task": "binary"}},
                          "model.max_depth": "int(interval(2, 5))"}, CONFIG)
    check_enqueued([{"model.learning_rate": 0.15, "model.max_depth": 3}], params,
                   for_task(params, "binary"), "binary")
    assert capsys.readouterr().err == ""
    check_enqueued([{"model.learning_rate": 0.15}], params, for_task(params, "regression"),
                   "regression")
    assert ("warning: search.enqueue[0].model.learning_rate=0.15 is not searched for the "
            "regression task (its when.task: binary)") in capsys.readouterr().err
