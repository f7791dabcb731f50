"""Cross-validation (the ``cv`` config group): folds drawn from the train and val rows, each
fitted and scored in turn, then the model refitted on all of them and scored on the test
split, which no fold ever touches.

A cross-validated run records each fold's val metrics (the fold as their step), their mean
and standard deviation (``cv_val_rmse_mean``, ``cv_val_rmse_std``, the objective being the
mean), the folds' sizes (``cv_train_rows``, ``cv_val_rows``), and the refitted model's
train (all folds' rows) and test metrics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from expforge import config as config_mod
from expforge.data import ROW, Dataset, Split
from expforge.errors import ConfigError, DataError, first_line

if TYPE_CHECKING:
    from expforge.runner import Reporter
    from expforge.tracking import RunRecord

__all__ = ["STRIDE", "CVSettings", "Folds", "columns_of", "cross_validate", "folds_of",
           "pooled"]

_NEEDS = {"group": "groups", "splitter": "splitter"}
# Steps per fold where boosting rounds are reported within folds: more than any model's rounds.
STRIDE = 100_000


@dataclass(frozen=True)
class CVSettings:
    """``cfg.cv`` checked; ``from_config`` gives None for ``cv=none``."""

    name: str
    folds: int
    repeats: int
    groups: str | None
    order_by: str | None
    splitter: Mapping[str, Any] | None
    refit: bool

    @classmethod
    def from_config(cls, plain: Mapping[str, Any]) -> CVSettings | None:
        section = plain.get("cv") or {}
        if section.get("name", "none") == "none":
            return None  # no schema check: a run without cross-validation pays nothing
        s = config_mod.checked("cv", section)
        need = _NEEDS.get(s["name"])
        if need and not s[need]:
            raise ConfigError(f"cv={s['name']} needs cv.{need}; set it (cv.{need}=...)")
        splitter = dict(s["splitter"]) if s["name"] == "splitter" else None
        if splitter is not None:
            config_mod.check_target("cv.splitter._target_", splitter.get("_target_"),
                                    config_mod.allowed_targets(plain))
        return cls(s["name"], int(s["folds"]), int(s["repeats"]),
                   None if not s["groups"] else str(s["groups"]),
                   None if not s["order_by"] else str(s["order_by"]), splitter,
                   bool(s["refit"]))

    def describe(self) -> str:
        """The folds in words, as a study records what it was created for."""
        parts = [f"cv={self.name}"]
        if self.name == "splitter":
            parts.append(", ".join(f"{k}={v}" for k, v in (self.splitter or {}).items()))
        else:
            parts.append(f"folds={self.folds}")
        if self.name == "repeated":
            parts.append(f"repeats={self.repeats}")
        for key in ("groups", "order_by"):
            if getattr(self, key):
                parts.append(f"{key}={getattr(self, key)}")
        return " ".join(parts)

    def columns(self) -> dict[str, str]:
        """The columns ``load_data`` must keep beside the features, with the key naming each."""
        out: dict[str, str] = {}
        if self.groups:
            out[self.groups] = "cv.groups"
        if self.name == "time":
            out[self.order_by or ROW] = "cv.order_by"
        return out


def columns_of(plain: Mapping[str, Any]) -> dict[str, str]:
    """``CVSettings.columns`` of the config ``plain`` (none without cross-validation)."""
    settings = CVSettings.from_config(plain)
    return settings.columns() if settings else {}


@dataclass(frozen=True)
class Folds:
    """The folds of one dataset: row indices into ``pool`` (its train rows, then its val
    rows)."""

    settings: CVSettings
    pool: Split
    indices: tuple[tuple[np.ndarray, np.ndarray], ...]

    def __len__(self) -> int:
        return len(self.indices)

    def fold(self, dataset: Dataset, i: int) -> Dataset:
        """``dataset`` with fold ``i``'s rows as its train and val splits."""
        fit_rows, val_rows = self.indices[i]
        return replace(dataset, train=_take(self.pool, fit_rows),
                       val=_take(self.pool, val_rows))


def pooled(dataset: Dataset) -> Dataset:
    """``dataset`` with its train and val rows together as its train split: what a
    cross-validated run's model is refitted on."""
    return replace(dataset, train=_pool(dataset))


# One dataset's folds at a time: a worker's trials all ask for the same ones.
_CACHED: dict[str, tuple[Dataset, Folds]] = {}


def folds_of(settings: CVSettings, dataset: Dataset, seed: int) -> Folds:
    """The folds of ``dataset`` (drawn once per process and dataset); the one-line error
    for folds that cannot be drawn (too few rows of a class or groups, no such column)."""
    key = f"{id(dataset)}:{seed}:{settings!r}"
    hit = _CACHED.get(key)
    if hit is not None and hit[0] is dataset:
        return hit[1]
    pool = _pool(dataset)
    folds = Folds(settings, pool, _draw(settings, pool, dataset.task, dataset.classes, seed))
    _CACHED.clear()
    _CACHED[key] = (dataset, folds)
    return folds


def _pool(dataset: Dataset) -> Split:
    train, val = dataset.train, dataset.val
    meta = None
    if train.meta is not None and val.meta is not None:
        meta = pd.concat([train.meta, val.meta], ignore_index=True)
    return Split(pd.concat([train.X, val.X], ignore_index=True),
                 pd.concat([train.y, val.y], ignore_index=True), meta)


def _take(split: Split, rows: np.ndarray) -> Split:
    return Split(split.X.iloc[rows].reset_index(drop=True),
                 split.y.iloc[rows].reset_index(drop=True))


def _draw(settings: CVSettings, pool: Split, task: str, classes: tuple[str, ...],
          seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    from sklearn import model_selection as ms

    n, k, name = len(pool.y), settings.folds, settings.name
    classify = task != "regression"
    groups = _column(pool, settings.groups, "cv.groups") if settings.groups else None
    where = f"the {n} train and val rows"
    if name != "splitter" and k > n - (name == "time"):
        raise DataError(f"cv.folds={k} is more folds than {where} allow; lower cv.folds")
    order = None
    if name in ("kfold", "repeated") and classify:
        counts = np.bincount(pool.y.to_numpy(), minlength=len(classes))
        fewest = int(counts.argmin())
        if counts[fewest] < k:
            raise DataError(
                f"cv.folds={k} is more folds than the {counts[fewest]} row(s) of class "
                f"{classes[fewest]!r} in {where}; lower cv.folds (each fold needs a row of "
                "every class) or use more data")
    if groups is not None and name != "splitter":
        n_groups = len(pd.unique(groups))
        if n_groups < k:
            raise DataError(f"cv.groups={settings.groups} has {n_groups} group(s) in {where}, "
                            f"fewer than cv.folds={k}; lower cv.folds or choose another column")
    splitter: Any
    if name == "kfold":
        splitter = (ms.StratifiedKFold if classify else ms.KFold)(
            k, shuffle=True, random_state=seed)
    elif name == "repeated":
        splitter = (ms.RepeatedStratifiedKFold if classify else ms.RepeatedKFold)(
            n_splits=k, n_repeats=settings.repeats, random_state=seed)
    elif name == "group":
        splitter = (ms.StratifiedGroupKFold if classify else ms.GroupKFold)(
            k, shuffle=True, random_state=seed)
    elif name == "time":
        key = settings.order_by or ROW
        order = np.argsort(_column(pool, key, "cv.order_by"), kind="stable")
        splitter = ms.TimeSeriesSplit(k)
    else:
        from hydra.utils import instantiate

        assert settings.splitter is not None
        target = settings.splitter.get("_target_")
        examples = ("sklearn.model_selection.ShuffleSplit, StratifiedShuffleSplit, "
                    "LeaveOneGroupOut, PredefinedSplit")
        try:
            splitter = instantiate(dict(settings.splitter))
        except Exception as exc:
            raise ConfigError(
                f"cv.splitter._target_={target} cannot be built "
                f"({first_line(exc.__cause__ or exc)}); check its arguments "
                f"(cv.splitter.<name>=...), or use e.g. {examples}") from None
        if not callable(getattr(splitter, "split", None)):
            raise ConfigError(f"cv.splitter._target_={target} is not a splitter (it has no "
                              f"split method); use e.g. {examples}")
    try:
        drawn = list(splitter.split(pool.X, pool.y, groups))
    except (ValueError, TypeError) as exc:
        target = (settings.splitter or {}).get("_target_", f"cv={name}")
        raise DataError(f"cv.splitter._target_={target} cannot split {where}: "
                        f"{first_line(exc)}") from None
    if order is not None:
        drawn = [(order[fit], order[val]) for fit, val in drawn]
    if len(drawn) < 2 or any(len(fit) == 0 or len(val) == 0 for fit, val in drawn):
        raise DataError(f"cv={name} drew {len(drawn)} fold(s) from {where}, some empty; "
                        "a cross-validation needs at least 2 folds with rows to fit and "
                        "validate")
    return tuple((np.asarray(fit), np.asarray(val)) for fit, val in drawn)


def _column(pool: Split, column: str, key: str) -> np.ndarray:
    assert pool.meta is not None and column in pool.meta, "load_data was not asked to keep it"
    values = pool.meta[column].to_numpy()
    missing = int(pd.isna(values).sum())
    if missing:
        shown = "the row order" if column == ROW else column
        raise DataError(f"{key}={shown} has {missing} missing value(s) in the train and val "
                        "rows; fill them or choose another column")
    return values


# -- fitting ---------------------------------------------------------------------------------


def cross_validate(
    model: Any,
    dataset: Dataset,
    folds: Folds,
    model_cfg: Mapping[str, Any],
    record: RunRecord,
    reporter: Reporter | None = None,
    refitting: AbstractContextManager[None] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Fit a copy of ``model`` on each fold and score its val rows, into ``record`` as each
    fold ends (a pruned or failed run keeps the folds it finished, and no mean); then refit
    ``model`` itself on all the folds' rows (inside ``refitting``) and score its train and
    test splits.
    The seconds spent fitting, and the test predictions the plots reuse.

    A ``reporter`` gets each fold's score at step ``fold + 1``. Where boosting models also
    report their rounds within a fold (``reporter.folds_only`` false), those go to step
    ``fold x STRIDE + round`` and the fold's score to ``(fold + 1) x STRIDE``: the same step
    is the same point of every trial, whatever its number of rounds.
    """
    from sklearn.base import clone

    from expforge.metrics import score
    from expforge.runner import fit

    span = 1
    if reporter is not None and not reporter.folds_only and _boosts(model):
        span = STRIDE
    history = record.history
    seconds = 0.0
    for i in range(len(folds)):
        part = folds.fold(dataset, i)
        inner = None
        if reporter is not None:
            reporter.fold = i
            inner = None if span == 1 else _Offset(reporter, i * span)
        copy = clone(model)
        seconds += fit(copy, part, model_cfg, inner)
        values, _ = score(copy, part, only=("val",))
        for name, value in values.items():
            history.setdefault(name, []).append(value)
        history.setdefault("cv_train_rows", []).append(float(len(part.train.y)))
        history.setdefault("cv_val_rows", []).append(float(len(part.val.y)))
        if reporter is not None:
            reporter((i + 1) * span, values.get(reporter.metric, float("nan")))
    if reporter is not None:
        reporter.fold = None
    _summarise(record, history, len(folds))  # only a run that did every fold has them
    if not folds.settings.refit:
        return round(seconds, 4), {}
    refit = replace(dataset, train=folds.pool)  # pooled(dataset), drawn once
    start = time.perf_counter()
    with refitting or nullcontext():
        fit(model, refit, model_cfg)
    seconds += time.perf_counter() - start
    metrics, outputs = score(model, refit, only=("train", "test"), keep="test")
    record.metrics.update(metrics)
    return round(seconds, 4), outputs


def _summarise(record: RunRecord, history: Mapping[str, list[float]], done: int) -> None:
    """The folds' mean and standard deviation of each val metric every fold has."""
    for name, values in history.items():
        if name.startswith("val_") and len(values) == done:
            record.metrics[f"cv_{name}_mean"] = float(np.mean(values))
            record.metrics[f"cv_{name}_std"] = float(np.std(values))


def _boosts(model: Any) -> bool:
    """Whether the runner fits this model round by round (``runner._fit_reporting``)."""
    from expforge.runner import fits_by_rounds

    return fits_by_rounds(model.steps[-1][1])


class _Offset:
    """A fold's in-fit reports, shifted past the folds before it."""

    def __init__(self, reporter: Reporter, offset: int) -> None:
        self.reporter, self.offset = reporter, offset
        self.metric, self.every = reporter.metric, reporter.every
        self.fold, self.folds_only = reporter.fold, False

    def __call__(self, step: int, value: float) -> None:
        self.reporter(self.offset + step, value)
