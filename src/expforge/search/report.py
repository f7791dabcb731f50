"""What a study shows: the live progress bar, a failed trial's line, the top-trials table."""

from __future__ import annotations

import sys
from typing import Any

from expforge.metrics import ranking_key
from expforge.search.budget import Counts, Stop, Tally
from expforge.search.job import RUN_ATTR
from expforge.search.settings import SearchSettings

__all__ = ["Progress", "print_report", "report_failure", "top_trials"]


def report_failure(study: Any, trial: Any) -> None:
    """After each trial (an Optuna callback): a failed trial's error, in one line."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL and "error" in trial.user_attrs:
        print(f"trial {trial.number} failed: {trial.user_attrs['error']}", file=sys.stderr)


def top_trials(study: Any, settings: SearchSettings, limit: int | None = None) -> Any:
    """The best ``limit`` (default ``search.top_k``) COMPLETE trials as a DataFrame (None
    without any)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return None
    import pandas as pd

    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "run_id": t.user_attrs.get(RUN_ATTR, "")}
        for o, v in zip(settings.objectives, t.values, strict=True):
            row[o.metric] = v
        row.update(t.params)
        rows.append(row)
    first = settings.objective
    frame = pd.DataFrame(rows).sort_values(
        first.metric, key=lambda column: column.map(lambda v: ranking_key(v, first.direction)))
    return frame.head(limit or settings.top_k).reset_index(drop=True)


def print_report(settings: SearchSettings, done: Counts, table: Any, parent_id: str,
                 report: str | None = None, ui: str | None = None, stop: Stop | None = None,
                 already: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if table is not None:
        headers, cells = _readable(table)
        keep, hidden = _fitting(headers, cells, console.width)
        shown = Table(title=f"top trials of {settings.study_name}", title_justify="left")
        for i in keep:
            shown.add_column(headers[i], justify="right", no_wrap=True)
        for row in cells:
            shown.add_row(*(row[i] for i in keep))
        console.print(shown)
        if hidden:
            console.print(f"(+{hidden} more columns in top_trials.csv on the parent run)")
    console.print(
        f"study {settings.study_name}: {done.complete} complete, {done.pruned} pruned, "
        f"{done.failed} failed of {settings.n_trials}; parent run {parent_id}",
        soft_wrap=True,  # a run id cut in two cannot be copied
    )
    if stop is not None and already and stop.reason == "grid":
        console.print(f"stopped already: {stop.reason} ({stop.detail}); no new trial: for "
                      "more configs, start a new study (search.study_name=<new name>) with a "
                      "wider search_space", soft_wrap=True)
    elif stop is not None and already and stop.reason in ("target", "patience", "budget"):
        console.print(f"stopped already: {stop.reason} ({stop.detail}); no new trial: raise "
                      "search.n_trials, or change search.target or search.patience, to go on",
                      soft_wrap=True)
    elif stop is not None:
        console.print(f"stopped: {stop.reason} ({stop.detail})", soft_wrap=True)
    if report is not None:
        console.print(f"study report: {report}", soft_wrap=True)
    if ui is not None:
        console.print(f"open the UI: {ui}", soft_wrap=True)


def _readable(table: Any) -> tuple[list[str], list[list[str]]]:
    """Headers (each param by the shortest end of its key that no other column shares:
    ``max_depth``, or ``regressor.alpha`` beside ``data.alpha``) and cells (numbers to 4
    significant digits, run ids to 8 characters)."""
    keys = [str(c) for c in table.columns]
    headers = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            end = ".".join(parts[-n:])
            if sum(1 for k in keys if k == end or k.endswith(f".{end}")) == 1:
                break
        headers.append(end)
    cells = [[_cell(key, v) for key, v in zip(keys, row, strict=True)]
             for row in table.itertuples(index=False)]
    return headers, cells


def _cell(key: str, value: Any) -> str:
    if key == "run_id":
        return str(value)[:8]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fitting(headers: list[str], cells: list[list[str]], width: int) -> tuple[list[int], int]:
    """The columns that fit ``width`` whole, in order (trial, run id and the objectives
    first); how many are left out."""
    used = 1  # the table's left border
    keep: list[int] = []
    for i, header in enumerate(headers):
        column = max([len(header), *(len(row[i]) for row in cells)]) + 3  # padding, border
        if used + column > width and keep:
            return keep, len(headers) - len(keep)
        keep.append(i)
        used += column
    return keep, 0


class Progress:
    """A live bar: trials done/pruned/failed of the budget, best value and its trial."""

    def __init__(self, settings: SearchSettings, study: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as Bar

        self.settings, self.study = settings, study
        self.tally = Tally(study)  # read after every trial
        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), transient=False)
        self.task = self.bar.add_task(settings.study_name, total=settings.n_trials, status="")

    def __enter__(self) -> Progress:
        self.bar.start()
        self.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        self.refresh()
        self.bar.stop()

    def callback(self, study: Any, trial: Any) -> None:
        self.refresh()

    def refresh(self) -> Counts:
        """The bar brought up to date; the counts it shows."""
        now = self.tally.counts()
        status = f"pruned {now.pruned} failed {now.failed}"
        if not self.settings.multi_objective and now.complete:
            try:
                best = self.tally.best()
                status += f" best {best.value:.5g} (trial {best.number})"
            except ValueError:
                pass
        self.bar.update(self.task, completed=min(now.done, self.settings.n_trials),
                        status=status)
        return now
