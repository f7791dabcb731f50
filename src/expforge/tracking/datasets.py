"""A run's dataset inputs: MLflow dataset entities for the train, val and test splits."""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

from expforge.tracking.records import DatasetDescription

__all__ = ["dataset_inputs", "log_inputs"]


def dataset_inputs(description: DatasetDescription) -> tuple[Any, ...]:
    """The splits as MLflow ``DatasetInput``s (digest, source, schema, row counts)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.utils import _infer_schema

    with warnings.catch_warnings():  # MLflow's hint about integer columns is for model inputs
        warnings.simplefilter("ignore")
        schema = json.dumps({"mlflow_colspec": _infer_schema(description.sample).to_dict()})
    source_type = "local" if "/" in description.source else "code"
    inputs = []
    for split_name, rows, elements in description.splits:
        entity = Dataset(
            name=f"{description.name}-{split_name}",
            digest=f"{description.digest}-{split_name}"[:36],
            source_type=source_type,
            source=json.dumps({"uri": description.source}),
            schema=schema,
            profile=json.dumps({"num_rows": rows, "num_elements": elements}),
        )
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", split_name)]))
    return tuple(inputs)


def log_inputs(client: Any, run_id: str, inputs: tuple[Any, ...]) -> None:
    """The dataset inputs onto a run."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=list(inputs))
    except MlflowException:
        # Processes that log runs at once may create the same dataset entity at once (the
        # first trials of parallel workers); the loser's insert fails (MLflow's get-or-create
        # is not atomic), and now it exists.
        time.sleep(0.5)
        client.log_inputs(run_id, datasets=list(inputs))
