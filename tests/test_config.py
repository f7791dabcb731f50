"""Settings typed by their schemas: one line naming the key, the value and the fix."""

from __future__ import annotations

import pytest

from expforge.config import checked, mask_secrets, mask_uri, schema_error, slug
from expforge.errors import ConfigError

from .conftest import compose


@pytest.mark.parametrize(("values", "message"), [
    ({"n_trials": "many"}, "search.n_trials=many is invalid; give a whole number >= 1"),
    ({"n_trials": 2.5}, "search.n_trials=2.5 is invalid; give a whole number >= 1"),
    ({"n_trials": 0}, "search.n_trials=0 is invalid; give a whole number >= 1"),
    ({"n_workers": -1}, "search.n_workers=-1 is invalid; give a whole number >= 1"),
    ({"timeout": "soon"}, "search.timeout=soon is invalid; give seconds > 0 or null"),
    ({"timeout": 0}, "search.timeout=0.0 is invalid; give seconds > 0 or null"),
    ({"log_models": "some"}, "search.log_models=some is invalid; choose one of: all, best, none"),
    ({"max_failure_ratio": 1}, "search.max_failure_ratio=1.0 is invalid; give a share in [0, 1)"),
    ({"plots": "maybe"}, "search.plots=maybe is invalid; give true or false"),
])
def test_a_search_setting_of_the_wrong_type_or_range_is_one_line(values, message) -> None:
    with pytest.raises(ConfigError) as caught:
        checked("search", values)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_checked_types_what_it_can_and_keeps_the_defaults() -> None:
    s = checked("search", {"n_trials": "7", "timeout": 30})
    assert s["n_trials"] == 7 and s["timeout"] == 30.0
    assert s["log_models"] == "best" and s["max_failure_ratio"] == 0.5
    assert checked("tracking", {"writer": "inline"})["writer"] == "inline"
    with pytest.raises(ConfigError, match=r"tracking.writer=thread is invalid; choose one of"):
        checked("tracking", {"writer": "thread"})


def test_hydra_types_values_as_it_composes_and_the_error_reads_as_ours() -> None:
    cfg = compose("search=optuna", "search.n_trials=5")
    assert cfg.search.n_trials == 5 and cfg.tracking.writer == "auto"
    with pytest.raises(Exception) as caught:
        compose("search=optuna", "tracking.log_model=perhaps")
    assert str(schema_error("tracking", caught.value)) == (
        "tracking.log_model=perhaps is invalid; give true or false")


@pytest.mark.parametrize("value", ["5", "{model.max_depth: 6}", "[5]", "[{model.max_depth: 6}, 3]"])
def test_an_enqueue_that_is_not_a_list_of_configs_is_one_line(value: str) -> None:
    """A number, a mapping, or an item that is not a mapping: OmegaConf names the list's item
    (or no value at all); the line names the command line's key and value."""
    from expforge.cli import check_overrides

    from .conftest import ROOT

    with pytest.raises(ConfigError) as caught:
        check_overrides(["search=optuna", f"search.enqueue={value}"], ROOT, "config")
    assert str(caught.value) == (f"search.enqueue={value} is invalid; give a list of {{dotted "
                                 "key: value} configs, e.g. search.enqueue=[{model.max_depth: 6}]")


def test_slug_and_masking() -> None:
    assert slug("my study / v2") == "my-study-v2" and slug("///") == "default"
    assert mask_uri("postgresql://bob:secret@db/x") == "postgresql://bob:***@db/x"
    assert mask_secrets({"data": {"password": "pw", "path": "a.csv"}}) == {
        "data": {"password": "***", "path": "a.csv"}}


def test_a_warm_start_that_is_not_a_mapping_is_one_line() -> None:
    from expforge.cli import check_overrides

    from .conftest import ROOT

    with pytest.raises(ConfigError, match=r"^search\.warm_start=5 is invalid; set its keys, "
                                          r"e\.g\. search\.warm_start\.from=<study name"):
        check_overrides(["search=optuna", "search.warm_start=5"], ROOT, "config")


def test_a_key_below_a_plain_value_is_not_a_config_key() -> None:
    from expforge.cli import check_overrides

    from .conftest import ROOT

    with pytest.raises(ConfigError, match=r"^search\.n_trials\.x=1 names search\.n_trials\.x, "
                                          r"which is not a config key; did you mean "
                                          r"search\.n_trials\?"):
        check_overrides(["search=optuna", "search.n_trials.x=1"], ROOT, "config")
