"""A new study tries known configs first, through the CLI: ``search.enqueue`` and the best
trials of an earlier study (of another space), by its name or its parent run id; once, not
again on resume."""

from __future__ import annotations

from pathlib import Path

from ..conftest import client, run_cli
from .test_budget import RANDOM
from .test_study import load


def _search(tmp_path: Path, name: str, *args: str):
    done = run_cli("search=optuna", "model=linear", RANDOM, "search.plots=false",
                   f"search.study_name={name}", f"search.storage={tmp_path}/{name}.journal",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out",
                   *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_enqueued_configs_and_an_earlier_studys_best_come_first(tmp_path: Path) -> None:
    key, extra = "model.regressor.alpha", "model.preprocessing.scale_numeric"
    # The earlier study searched one key more than the later ones do.
    first = _search(tmp_path, "small", "search.n_trials=5", f"search.enqueue=[{{{key}: 0.5}}]",
                    f'+search_space.{extra}="choice(true, false)"')
    assert "study small: tries 1 config first (1 of search.enqueue)" in first.stdout
    small = load(tmp_path / "small.journal", "small")
    assert small.trials[0].params[key] == 0.5
    best_two = [{key: t.params[key]} for t in sorted(small.trials, key=lambda t: t.value)[:2]]

    # By name: the study of that name beside this one. Enqueued trials use the budget; the
    # key this space lacks is dropped, with a warning that names it.
    done = _search(tmp_path, "big", "search.n_trials=3", "search.warm_start.from=small",
                   "search.warm_start.top_k=2")
    assert "study big: tries 2 configs first (2 best of small)" in done.stdout
    assert (f"warning: search.warm_start.from=small: dropped keys not in this space: {extra}"
            in done.stderr)
    big = load(tmp_path / "big.journal", "big")
    assert [t.params for t in big.trials[:2]] == best_two and len(big.trials) == 3

    # Resumed with a larger budget: nothing is enqueued again.
    again = _search(tmp_path, "big", "search.n_trials=4", "search.warm_start.from=small",
                    "search.warm_start.top_k=2")
    assert "tries" not in again.stdout
    big = load(tmp_path / "big.journal", "big")
    assert len(big.trials) == 4 and big.trials[3].params not in best_two

    # By the earlier study's parent run id.
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("expforge")
    (parent,) = c.search_runs([exp.experiment_id], "tags.`optuna.study_name` = 'small' and "
                                                   "tags.`expforge.role` = 'study'")
    _search(tmp_path, "other", "search.n_trials=1", f"search.warm_start.from={parent.info.run_id}",
            "search.warm_start.top_k=1")
    assert load(tmp_path / "other.journal", "other").trials[0].params == best_two[0]
