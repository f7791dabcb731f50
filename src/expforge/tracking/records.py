"""What a run records, as plain values: built where the work is done, written by a store.

The bottom of the package: it imports nothing of its siblings and nothing of MLflow, so a
record can be built in a process that never loads MLflow and sent to one that does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DatasetDescription", "RunRecord", "describe_dataset"]


@dataclass(frozen=True)
class DatasetDescription:
    """A run's dataset inputs: turned into MLflow's dataset entities where the run is
    written (``tracking.datasets``)."""

    name: str
    source: str
    digest: str
    sample: Any  # the first 100 training rows with the target, for the schema
    splits: tuple[tuple[str, int, int], ...]  # (split, rows, elements)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.source, self.digest)


@dataclass
class RunRecord:
    """What a run records once its work is done, written in one go: params, metrics and tags
    in one batch, the texts as artifacts, the dataset inputs, and the run's end.

    ``status=None`` writes without ending the run (a parent run as its study goes on)."""

    run_id: str
    status: str | None = "FINISHED"
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact path -> text
    dataset: DatasetDescription | None = None  # logged as the run's train/val/test inputs
    step: int = 0  # of the metrics
    history: dict[str, list[float]] = field(default_factory=dict)  # metrics at steps 0, 1, ...
    end_time: int = field(default_factory=lambda: int(time.time() * 1000))


def describe_dataset(dataset: Any) -> DatasetDescription:
    """A loaded ``expforge.data.Dataset`` as its runs' inputs record it."""
    sample = dataset.train.X.head(100).assign(**{dataset.target: dataset.train.y.head(100)})
    splits = tuple((name, len(split.X), int(split.X.size + len(split.y)))
                   for name, split in dataset.splits.items())
    return DatasetDescription(dataset.name, dataset.source, dataset.digest, sample=sample,
                              splits=splits)
