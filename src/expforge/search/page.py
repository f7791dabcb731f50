"""The study report: one HTML file that opens anywhere, offline: a summary, the leaderboard
and Optuna's figures, inlined as PNG images (no scripts, no links out, so the MLflow UI's
artifact view and a mail attachment show it alike).

A study's parent run gets one at the end of each command (``search.parent``); a sweep's parent
run gets one of its jobs (``expforge.sweep``), drawn from an Optuna study made of the jobs.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPORT", "report_page", "write_report"]

REPORT = "study_report.html"

_CAPTIONS = {
    "optimization_history": "Optimisation history",
    "param_importances": "Parameter importances",
    "parallel_coordinate": "Parallel coordinates",
    "slice": "Slice plot",
    "pareto_front": "Pareto front",
}

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { color: #666; } dd { margin: 0; font-family: ui-monospace, monospace; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .25em .6em; border-bottom: 1px solid #ddd; text-align: right;
         white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
tbody tr:first-child { background: #eef6ee; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-weight: 600; margin-bottom: .3em; }
"""


def report_page(title: str, facts: Mapping[str, str], table: Any,
                figures: Mapping[str, bytes]) -> str:
    """The page: ``facts`` (label -> value), ``table`` (a DataFrame, best row first, or
    None) and ``figures`` (``plots/<name>.png`` -> PNG bytes) under ``title``."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>", "<dl>",
        *(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts.items()), "</dl>",
        "<h2>Leaderboard</h2>",
    ]
    if table is None or len(table) == 0:
        parts.append("<p>No trial has completed yet.</p>")
    else:
        parts.append('<div class="scroll">' + table.to_html(
            index=False, border=0, classes="leaderboard", na_rep="",
            float_format=lambda v: f"{v:.6g}") + "</div>")
    if figures:
        parts.append('<h2>Figures</h2><div class="figures">')
        for path, png in figures.items():
            name = Path(path).stem
            caption = _CAPTIONS.get(name, name.replace("_", " ").capitalize())
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure id="{e(name)}"><figcaption>{e(caption)}</figcaption>'
                         f'<img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                         "</figure>")
        parts.append("</div>")
    elif table is not None and len(table) < 2:
        parts.append("<p>Figures need two completed trials.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: Path, figures: Sequence[str], title: str, facts: Mapping[str, str],
                 table: Any, name: str = REPORT) -> Path:
    """``folder/<name>``: the page of the figures saved under ``folder`` (their paths
    relative to it, in order); its path."""
    pngs = {path: (folder / path).read_bytes() for path in figures if (folder / path).is_file()}
    page = folder / name
    page.write_text(report_page(title, facts, table, pngs), encoding="utf-8")
    return page
