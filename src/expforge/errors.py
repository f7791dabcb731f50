"""The exception tree of expforge.

Every error a user can cause is an ``ExpforgeError``; entry points print its message as one
line and exit non-zero. Anything else is a bug and keeps its traceback.

    ExpforgeError
    ├── ConfigError      a config key or value is wrong (names the key, the value, the fix)
    ├── DataError        a data file is missing, empty or unusable
    ├── ModelError       the estimator rejects a hyperparameter
    ├── TrackingError    the tracking store cannot be reached or written
    ├── SearchError      the search space or the study cannot proceed
    └── RegistryError    no candidate, or the winner cannot be registered
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "ExpforgeError",
    "ModelError",
    "RegistryError",
    "SearchError",
    "TrackingError",
    "error_line",
    "first_line",
]


class ExpforgeError(Exception):
    """A problem the user can fix; its message is the whole report."""


class ConfigError(ExpforgeError):
    """A config key or value is wrong."""


class DataError(ExpforgeError):
    """A data source is missing, empty or unusable."""


class ModelError(ExpforgeError):
    """The estimator rejects its configuration."""


class TrackingError(ExpforgeError):
    """The tracking store cannot be reached or written."""


class SearchError(ExpforgeError):
    """The search space or the study cannot proceed."""


class RegistryError(ExpforgeError):
    """Selection, gating or registration cannot proceed."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what
    an error of ours quotes from a library's."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message``: a failed run's ``error`` tag."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:5000]
