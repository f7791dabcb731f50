"""Bad input: one line naming the key, the value and the fix; non-zero exit; nothing lost.

Each row of the README's error table is a case here, run as a user types it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from expforge.runner import run_one

from .conftest import ROOT, client, compose, free_port, run_cli


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    out = {"empty": tmp_path / "empty.csv", "nan": tmp_path / "nan.csv",
           "nofeat": tmp_path / "nofeat.csv", "notadb": tmp_path / "broken.db"}
    out["empty"].write_text("")
    out["notadb"].write_text("not a database\n" * 100)
    out["folder"] = tmp_path / "a-folder.csv"
    out["folder"].mkdir()
    out["oneclass"], out["inf"] = tmp_path / "oneclass.csv", tmp_path / "inf.csv"
    pd.DataFrame({"x": range(20), "y": ["spam"] * 20}).to_csv(out["oneclass"], index=False)
    pd.DataFrame({"x": [1.0, float("inf")] * 10, "y": [0.5, 1.5] * 10}).to_csv(
        out["inf"], index=False)
    pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": [1.0, None, 2.0, 3.0]}).to_csv(
        out["nan"], index=False)
    pd.DataFrame({"when": ["2021-01-01"] * 4, "y": [1.0, 2.0, 3.0, 4.0]}).to_csv(
        out["nofeat"], index=False)
    out["fewclass"] = tmp_path / "fewclass.csv"  # 3 rows of class "rare" among 60
    pd.DataFrame({"x": range(60), "shop": ["a", "b", "c"] * 20,
                  "y": ["rare"] * 3 + ["common"] * 57}).to_csv(out["fewclass"], index=False)
    pd.read_csv(out["nofeat"], parse_dates=["when"]).to_parquet(tmp_path / "nofeat.parquet")
    out["nofeat"] = tmp_path / "nofeat.parquet"
    return out


@pytest.fixture()
def immutable(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write, root included (chattr +i)."""
    folder = tmp_path / "readonly-project"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=False)


CASES = {
    "unknown-option": (["model=xgbb"], "error: model=xgbb is not an option of the model "
                                       "group (no conf/model/xgbb.yaml); choose one of: hgb, "
                                       "linear, rf, xgb"),
    "unknown-option-of-a-group-with-a-schema": (
        ["cv=nope"], "error: cv=nope is not an option of the cv group (no conf/cv/nope.yaml); "
                     "choose one of: group, kfold, none, repeated, splitter, time\n"),
    "misspelt-key": (["model.max_dept=3"],
                     "error: model.max_dept=3 names model.max_dept, which is not a config key; "
                     "did you mean model.max_depth?"),
    "misspelt-top-level-key": (["serch=optuna"],
                               "error: serch=optuna names serch, which is neither a config "
                               "group nor a config key; did you mean search?"),
    "wrong-type": (["search=optuna", "search.n_trials=many"],
                   "error: search.n_trials=many is invalid; give a whole number >= 1"),
    "negative-budget": (["search=optuna", "search.n_trials=-3"],
                        "error: search.n_trials=-3 is invalid"),
    "missing-file": (["data=tabular", "data.path=nope.csv", "data.target=y"],
                     "error: data.path=nope.csv does not exist"),
    "empty-file": (["data=tabular", "data.path={empty}", "data.target=y"],
                   "is empty; it needs a header and at least one row"),
    "nan-target": (["data=tabular", "data.path={nan}", "data.target=y"],
                   "error: data.target=y has 1 missing value(s)"),
    "unknown-experiment": (["experiment=nope"],
                           "error: experiment=nope is not an option of the experiment group "
                           "(no conf/experiment/nope.yaml); choose one of: nyc_taxi_duration,"),
    "unknown-option-in-a-sweep": (["-m", "model=rf,xgbb"],
                                  "error: model=xgbb is not an option of the model group"),
    "folder-as-data-file": (["data=tabular", "data.path={folder}", "data.target=y"],
                            "error: data.path={folder} is a folder, not a data file"),
    "single-class-target": (["data=tabular", "data.path={oneclass}", "data.target=y",
                             "data.task=binary"],
                            "error: data.target=y has a single class (spam)"),
    "data-the-model-refuses": (["data=tabular", "data.path={inf}", "data.target=y"],
                               "error: model=rf cannot be fitted on data=tabular: Input X "
                               "contains infinity"),
    "no-features": (["data=tabular", "data.path={nofeat}", "data.target=y"],
                    "error: the data has no usable feature besides the target y"),
    "space-key": (["search=optuna", '+search_space.model.max_dept="int(interval(1, 3))"'],
                  "error: search_space.model.max_dept: model.max_dept is not a key of the "
                  "config; did you mean model.max_depth?"),
    "low-above-high": (["search=optuna", "search_space.model.max_depth.low=30"],
                       "error: search_space.model.max_depth: low=30 > high=20; swap them"),
    "unlogged-search-metric": (["search=optuna", "search.metrics=[val_nope]"],
                               "error: search.metrics lists val_nope, which a regression run "
                               "does not log; choose from: fit_time_s,"),
    "enqueued-value-outside-its-range": (
        ["search=optuna", "model=linear", "search.enqueue=[{{model.regressor.alpha: 5000}}]"],
        "error: search.enqueue[0].model.regressor.alpha=5000 is outside the search space "
        "(model.regressor.alpha: from 0.0001 to 100.0, log); give a value inside it, or widen "
        "search_space.model.regressor.alpha"),
    "unknown-warm-start-source": (
        ["search=optuna", "model=linear", "search.warm_start.from=nope"],
        "error: search.warm_start.from=nope is neither a study in "),
    "fewer-than-two-folds": (["cv=kfold", "cv.folds=1"],
                             "error: cv.folds=1 is invalid; give a whole number >= 2 (cv=none "
                             "keeps one validation split)"),
    "more-folds-than-rows-of-a-class": (
        ["data=tabular", "data.path={fewclass}", "data.target=y", "cv=kfold", "cv.folds=5"],
        "error: cv.folds=5 is more folds than the 2 row(s) of class 'rare' in the 48 train and "
        "val rows; lower cv.folds (each fold needs a row of every class) or use more data"),
    "group-column-that-does-not-exist": (
        ["data=tabular", "data.path={fewclass}", "data.target=y", "cv=group",
         "cv.groups=store"],
        "error: cv.groups=store is not a column of data.path={fewclass}; choose one of: x, "
        "shop, y"),
    "register-criteria-not-a-list-before-the-study": (
        ["search=optuna", "register.enabled=true", "register.criteria=5"],
        "error: register.criteria=5 is invalid; give a list, e.g. [{{metric: val_rmse, "
        "threshold: 60, higher_is_better: false}}]"),
    "register-criterion-without-threshold-before-the-sweep": (
        ["-m", "seed=1,2", "model=linear", "register.enabled=true",
         "register.criteria=[{{metric: val_rmse, thresh: 5}}]"],
        "error: register.criteria[0]={{'metric': 'val_rmse', 'thresh': 5}} is invalid"),
    "unknown-sampler": (["search=optuna", "search.sampler._target_=optuna.samplers.Nope"],
                        "error: search.sampler._target_=optuna.samplers.Nope cannot be built"),
    "blocked-target": (["model.regressor._target_=os.system"],
                       "error: model.regressor._target_=os.system is not an allowed target"),
    "unreachable-server": (["tracking.uri=http://127.0.0.1:{port}"],
                           "error: tracking.uri=http://127.0.0.1:{port} is unreachable"),
    "missing-database": (["tracking.uri=postgresql://postgres@127.0.0.1:5432/no_such_db"],
                         "error: tracking.uri=postgresql://postgres@127.0.0.1:5432/no_such_db "
                         "cannot be opened (connection to server at \"127.0.0.1\", port 5432 "
                         "failed: FATAL:  database \"no_such_db\" does not exist); start the "
                         "database, create it, or fix tracking.uri"),
    "missing-study-database": (["search=optuna",
                                "search.storage=postgresql://postgres@127.0.0.1:5432/no_db"],
                               "error: search.storage=postgresql://postgres@127.0.0.1:5432/"
                               "no_db cannot be opened (connection to server"),
    "unwritable-project": (["paths.root={readonly}"], "is not writable"),
    "broken-store": (["tracking.uri=sqlite:///{notadb}"],
                     "error: tracking.uri=sqlite:///{notadb} cannot be opened ("),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_row(case: str, tmp_path: Path, files, request) -> None:
    args, message = CASES[case]
    if "database" in case:
        from .search.test_scale_out import postgres_reachable

        if not postgres_reachable():
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    # a free port: nothing listens there
    values = {k: str(v) for k, v in files.items()} | {"port": str(free_port())}
    if case == "unwritable-project":
        values["readonly"] = str(request.getfixturevalue("immutable"))
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
             f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out",
             f"search.storage={tmp_path}/s.journal"]
    if case in ("unreachable-server", "broken-store", "missing-database"):
        store = store[1:]
    if case == "missing-study-database":
        store = store[:-1]
    if case == "unwritable-project":
        store = []
    if not any(a.startswith("search=") for a in args):
        store = [a for a in store if not a.startswith("search.")]
    start = time.monotonic()
    done = run_cli(*(a.format(**values) for a in args), *store, timeout=60)
    assert time.monotonic() - start < 30  # MLflow alone retries a dead store for minutes
    assert done.returncode == 1, (done.stdout[-1000:], done.stderr[-2000:])
    assert message.format(**values) in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if (tmp_path / "mlflow.db").exists():
        c = client(f"sqlite:///{tmp_path}/mlflow.db")
        runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert not c.search_registered_models()
        if "-before-the-" in case:  # found before anything ran
            assert not runs


def test_a_config_file_with_a_yaml_error_is_one_line(tmp_path: Path) -> None:
    import shutil

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "run.py", project / "run.py")
    shutil.copytree(ROOT / "conf", project / "conf")  # the experiment link copied as a folder
    (project / "conf" / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nmodel:\n  max_depth: [3, 4\n")
    done = subprocess.run([sys.executable, str(project / "run.py"), "experiment=typo"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()  # the problem's words are libyaml's
    assert line.startswith("error: conf/experiment/typo.yaml is not valid YAML (while parsing "
                           "a flow sequence: ")
    assert line.endswith(" at line 4, column 1); fix the file")
    assert not (project / "mlflow.db").exists()


def test_a_study_refuses_another_model_space_or_objective(tmp_path: Path) -> None:
    """Optuna would fail every trial of the other config inside suggest, without end."""
    import optuna

    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"paths.outputs={tmp_path}/out",
             f"tracking.artifact_root={tmp_path}/art", f"search.storage={tmp_path}/s.journal",
             "search=optuna", "search.study_name=kept", "search.n_trials=2", "search.plots=false",
             "model=rf", "model.n_estimators=5"]
    assert run_cli(*store).returncode == 0
    fix = ("; run it with the config it was created for, or start a new study with "
           "search.study_name=<new name> (its trials are kept either way)")
    for change, difference in [
        (["model=xgb"], "model=rf, not model=xgb"),
        (["search_space.model.n_estimators.log=false"],
         "search_space.model.n_estimators=int(10, 300, log=True), not int(10, 300)"),
        (["metric=val_mae"], "the objective val_rmse (minimize), not val_mae (minimize)"),
        (["cv=kfold", "cv.folds=3"], "the objective val_rmse (minimize), not cv_val_rmse_mean "
                                     "(minimize); the folds cv=none, not cv=kfold folds=3"),
    ]:
        done = run_cli(*store, *change, timeout=60)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: search.study_name=kept was created for {difference}{fix}")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.journal")))
    trials = optuna.load_study(study_name="kept", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)


def test_register_cli_errors(tmp_path: Path) -> None:
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
             f"tracking.artifact_root={tmp_path}/art", f"paths.outputs={tmp_path}/out"]
    done = run_cli(*store, script="register.py")
    assert done.returncode == 1 and "error: tracking.experiment=expforge does not exist" \
        in done.stderr
    from expforge.config import to_plain

    cfg = to_plain(compose(*store[:2], "model=linear"))
    run_one(cfg, log_plots=False)
    done = run_cli(*store, "register.metric=val_auc", script="register.py")
    assert done.returncode == 1
    assert "error: register.metric=val_auc is not logged by the candidate runs" in done.stderr
    assert "Traceback" not in done.stderr
    assert not client(store[0].split("=", 1)[1]).search_registered_models()
    # Re-evaluated candidates: expforge's lines, not MLflow's download bars.
    done = run_cli(*store, "register.top_n=1", "register.select_by=test_rmse",
                   script="register.py")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "re-evaluated" in done.stdout and "Downloading artifacts" not in done.stderr
