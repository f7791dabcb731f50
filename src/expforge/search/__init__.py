"""An Optuna study in which every trial is a full expforge run under one parent run.

One module a step, from the bottom up: ``settings`` (``cfg.search`` checked), ``space``
(search spaces), ``job`` (what the steps share), ``budget``, ``recovery`` (after a crash),
``study`` (storage, sampler, pruner), ``trial`` (the objective), ``report`` (progress and
tables), ``parent`` (the parent run), ``loop`` (a worker's trials), ``workers`` (parallel
processes) and ``coordinator`` (``run_search``).
"""

import sys
import types
from typing import Any

from expforge.search.coordinator import SearchResult, run_search
from expforge.search.settings import SearchSettings, settings_of

__all__ = ["SearchResult", "SearchSettings", "run_search", "settings_of"]


class _CallableModule(types.ModuleType):
    """Importing this package makes it the attribute ``expforge.search``, where the Python
    API's function of that name was: calling it still runs ``expforge.api.search``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from expforge.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
