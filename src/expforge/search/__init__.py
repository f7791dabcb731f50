"""An Optuna study in which every trial is a full expforge run under one parent run.

One module a step, from the bottom up: ``settings`` (``cfg.search`` checked), ``space``
(search spaces), ``job`` (what the steps share), ``budget``, ``study`` (storage, sampler,
pruner), ``recovery`` (after a crash), ``trial`` (the objective), ``report`` (progress and
tables), ``parent`` (the parent run), ``loop`` (a worker's trials), ``workers`` (parallel
processes) and ``coordinator`` (``run_search``).
"""

from expforge.search.coordinator import SearchResult, run_search
from expforge.search.settings import SearchSettings, settings_of

__all__ = ["SearchResult", "SearchSettings", "run_search", "settings_of"]
