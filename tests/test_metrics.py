"""Metric names, directions, and which value is better."""

from __future__ import annotations

import math

import pytest

from expforge.errors import ConfigError, RegistryError
from expforge.metrics import better, check_direction, direction_of, ranking_key, score_split


def test_direction_of_a_metric_name() -> None:
    assert direction_of("val_rmse") == "minimize" and direction_of("test_r2") == "maximize"
    assert direction_of("val_roc_auc") == "maximize" and direction_of("fit_time_s") == "minimize"


def test_better_in_each_direction_nan_never_and_anything_beats_nothing() -> None:
    assert better(1.0, 2.0, "minimize") and not better(2.0, 1.0, "minimize")
    assert better(2.0, 1.0, "maximize") and not better(1.0, 1.0, "maximize")
    assert better(5.0, None, "minimize") and better(5.0, math.nan, "maximize")
    assert not better(math.nan, 1.0, "minimize") and not better(math.nan, None, "maximize")


def test_ranking_key_sorts_best_first_and_nan_last() -> None:
    values = [3.0, math.nan, 1.0, 2.0]
    assert sorted(values, key=lambda v: ranking_key(v, "minimize"))[:3] == [1.0, 2.0, 3.0]
    assert sorted(values, key=lambda v: ranking_key(v, "maximize"))[:3] == [3.0, 2.0, 1.0]
    assert math.isnan(sorted(values, key=lambda v: ranking_key(v, "maximize"))[-1])


def test_check_direction_names_the_key() -> None:
    assert check_direction("direction", "maximize") == "maximize"
    with pytest.raises(ConfigError, match=r"^direction=up is not a direction; use minimize"):
        check_direction("direction", "up")
    with pytest.raises(RegistryError, match=r"^register.direction=down is not a direction"):
        check_direction("register.direction", "down", RegistryError)


def test_regression_scores_match_their_definitions() -> None:
    values = score_split("regression", [1.0, 2.0, 3.0], [1.0, 2.0, 5.0], None)
    assert values["rmse"] == pytest.approx(math.sqrt(4 / 3))
    assert values["mae"] == pytest.approx(2 / 3)
    assert values["r2"] == pytest.approx(1 - 4 / 2)
