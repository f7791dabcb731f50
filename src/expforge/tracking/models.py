"""Models in the store: a fitted pipeline logged into its run, and registered versions with
their aliases."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from importlib import metadata
from typing import Any

from expforge.tracking.provenance import installed

__all__ = ["alias_version", "attach_model", "autologged", "load_model", "log_model",
           "register_version"]


def attach_model(uri: str, run_id: str, model: Any, input_example: Any) -> str:
    """Log a fitted model into the run ``run_id`` (written or still running); its URI. The
    run is ended FINISHED again, or FAILED or KILLED if the logging fails."""
    import mlflow

    mlflow.set_tracking_uri(uri)  # log_model logs into the fluent API's active run
    mlflow.set_registry_uri(uri)
    mlflow.start_run(run_id=run_id)
    status = "FAILED"
    try:
        uri_of_model = str(log_model(model, input_example).model_uri)
        status = "FINISHED"
        return uri_of_model
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def log_model(model: Any, input_example: Any, name: str = "model") -> Any:
    """Log the fitted Pipeline into the active run, with signature, example and explicit pip
    requirements.

    Giving the requirements skips MLflow's inference subprocess. The format is cloudpickle:
    MLflow's default, skops, scans every loaded module at import, and these models are our
    own output in our own store.
    """
    import mlflow
    from mlflow.models import infer_signature

    _quiet_pickle_warning()
    example = input_example.head(5)
    signature = infer_signature(example, model.predict(example))
    return mlflow.sklearn.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(model),
        serialization_format="cloudpickle",
    )


@functools.lru_cache(maxsize=1)
def _quiet_pickle_warning() -> None:
    """Drop MLflow's per-call pickle warning; the README explains the choice once."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pickle or cloudpickle format" not in record.getMessage()

    logging.getLogger("mlflow.sklearn").addFilter(_Filter())


def _pip_requirements(model: Any) -> list[str]:
    packages = ["scikit-learn", "pandas", "numpy", "scipy", "cloudpickle"]
    estimator = type(model.steps[-1][1]).__module__
    if estimator.startswith("xgboost"):
        packages.append("xgboost")
    return [f"{p}=={metadata.version(p)}" for p in packages if installed(p)]


def load_model_code() -> None:
    """MLflow's model logging, loaded ahead: its sklearn flavor, and the map of every
    installed module to its package that its first call builds."""
    import contextlib

    with contextlib.suppress(Exception):  # a private cache of MLflow's; only a warm-up
        import mlflow.sklearn  # noqa: F401
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()


def alias_version(client: Any, name: str, alias: str) -> Any:
    """The version of registered model ``name`` that holds ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_version(client: Any, name: str, model_uri: str, run_id: str,
                     tags: Mapping[str, str], description: str, alias: str,
                     current: Any) -> tuple[str, bool]:
    """The version of ``name`` for the run ``run_id`` (its model ``model_uri``), holding
    ``alias``; ``current`` (the version that held it) gets ``previous``. Its number, and
    whether this call created it.

    One version per run, also when several commands register the same run at the same
    moment: each creates its version, then all keep the lowest version of the run and the
    others are deleted, so every command ends on the same version. Nothing is left
    half-registered: a failure removes the new version (and a registered model created for
    it) and gives the alias back.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    # MLflow resolves a version's models:/ source through the fluent API's store.
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client.tracking_uri)
    created_model = False
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Registered by expforge.")
            created_model = True
        except MlflowException as exc:  # another command created it a moment ago
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    existing = _versions_of_run(client, name, run_id)
    if existing:
        number, created = existing[0], False
    else:
        try:
            version = client.create_model_version(
                name, source=model_uri, run_id=run_id, tags=dict(tags),
                description=description, model_id=model_uri.removeprefix("models:/"),
            )
        except BaseException:
            if created_model and not client.search_model_versions(f"name = '{name}'"):
                client.delete_registered_model(name)  # no empty registered model either
            raise
        number, created = int(version.version), True
        first = _versions_of_run(client, name, run_id)[0]
        if first != number:  # another command registered the same run first
            client.delete_model_version(name, str(number))
            number, created = first, False
    try:
        if current is not None and int(current.version) != number:
            _set_alias(client, name, "previous", str(current.version))
        _set_alias(client, name, alias, str(number))
    except BaseException:
        if created:
            client.delete_model_version(name, str(number))
        if current is not None:
            client.set_registered_model_alias(name, alias, current.version)
        raise
    return str(number), created


def _set_alias(client: Any, name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version``. Two commands that set the same new alias at once
    race on MLflow's insert (a UNIQUE constraint): the loser finds the alias set, and sets
    it again where the winner chose another version."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.1 * (attempt + 1))


def _versions_of_run(client: Any, name: str, run_id: str) -> list[int]:
    """The version numbers of ``name`` made from the run ``run_id``, lowest first."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted(int(v.version) for v in found)


@contextmanager
def autologged(uri: str, run_id: str, log_models: bool) -> Iterator[None]:
    """MLflow's own sklearn and xgboost autologging into the run ``run_id``, for the block
    only (``tracking.autolog=true``): it logs into the fluent API's active run. The API turns
    all autologging off for its calls (``fluent.kept``); it is on here."""
    import mlflow
    from mlflow.utils import autologging_utils

    from expforge.tracking.fluent import autologging_switched

    mlflow.set_tracking_uri(uri)
    flavors = {"sklearn": mlflow.sklearn, "xgboost": mlflow.xgboost}
    # The caller's own autologging (a notebook's), as MLflow keeps it, to give back after.
    previous = {name: dict(autologging_utils.AUTOLOGGING_INTEGRATIONS.get(name) or {})
                for name in flavors}
    with ExitStack() as undo:  # whatever of the set-up was done is undone, also on an error
        undo.enter_context(autologging_switched(True))
        undo.callback(_autologging_given_back, flavors, previous)
        for flavor in flavors.values():
            flavor.autolog(log_models=log_models, log_datasets=False, silent=True)
        mlflow.start_run(run_id=run_id)
        undo.callback(mlflow.end_run)
        yield


def _autologging_given_back(flavors: Mapping[str, Any], previous: Mapping[str, dict]) -> None:
    from mlflow.utils import autologging_utils

    by_all = autologging_utils.AUTOLOGGING_CONF_KEY_IS_GLOBALLY_CONFIGURED
    for name, flavor in flavors.items():
        if previous[name] and not previous[name].get("disable", False):
            # mlflow.autolog() marks what it configured; the mark is no autolog argument
            flavor.autolog(**{k: v for k, v in previous[name].items() if k != by_all})
            if previous[name].get(by_all):
                autologging_utils.AUTOLOGGING_INTEGRATIONS[name][by_all] = True
        else:
            flavor.autolog(disable=True, silent=True)


def load_model(uri: str, model_uri: str) -> Any:
    """The fitted pipeline logged as ``model_uri`` (``models:/<id>``) in the store ``uri``."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.sklearn.load_model(model_uri)
