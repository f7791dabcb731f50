"""Re-run a recorded run from its record alone: ``python run.py reproduce=<run_id>``.

The run's resolved ``config.yaml`` is fetched and trained again as a new run tagged with the
source run id; the metrics are shown side by side, with a warning for each thing that can make
them differ: the dataset digest, the git commit or dirty state, the versions of key packages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from expforge.config import MASK, flatten
from expforge.errors import ConfigError
from expforge.runner import RunContext, RunResult, run_one
from expforge.tracking import TrackingSettings, check_reachable, queries, reader

__all__ = ["Reproduction", "reproduce_run"]


@dataclass
class Reproduction:
    source: Any  # mlflow.entities.Run
    result: RunResult
    warnings: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, float, float]]:
        old = self.source.data.metrics
        return [(k, old[k], self.result.metrics[k]) for k in sorted(self.result.metrics)
                if k in old and k != "fit_time_s"]


def reproduce_run(run_id: str, current: Mapping[str, Any]) -> Reproduction:
    """Train the recorded config of ``run_id`` again (in ``current``'s store and root)."""
    import yaml

    tracking = TrackingSettings.from_config(current["tracking"])
    check_reachable(tracking.uri)
    client = reader(tracking.uri)
    source = queries.require_run(client, run_id, "reproduce")
    role = source.data.tags.get("expforge.role")
    if role in queries.PARENT_ROLES:
        best = source.data.tags.get("best_run_id")
        hint = f"reproduce=<a child run id> (the best: reproduce={best})" if best else \
            "reproduce=<a child run id>"
        raise ConfigError(
            f"reproduce={run_id} is the parent run of a {role}, not a run that trained a "
            f"model; give {hint}, or run the {role}'s command again to repeat it"
        )
    text = queries.read_text(client, run_id, "config.yaml")
    if text is None:
        raise ConfigError(
            f"reproduce={run_id}: the run has no config.yaml artifact (it was not recorded by "
            "expforge, or it is a study/sweep parent); pick a single run or a trial"
        )
    cfg = yaml.safe_load(text)
    masked = [k for k, v in flatten(cfg).items() if v == MASK]
    if masked:
        raise ConfigError(
            f"reproduce={run_id}: {', '.join(masked)} were masked in the record (secrets are "
            "never stored), so this run cannot be re-run from its record alone"
        )
    cfg["search"] = {"name": "none"}  # a trial is reproduced as the single run it was
    cfg["tracking"] = {**cfg["tracking"], "uri": tracking.uri,
                       "artifact_root": tracking.artifact_root,
                       "run_name": f"reproduce-{source.info.run_name}",
                       "reuse": False}  # a reproduction trains again, by definition
    cfg["paths"] = {**cfg.get("paths", {}), **current["paths"]}
    tags = source.data.tags
    context = RunContext(choices={k: tags[k] for k in ("model", "data") if k in tags})
    result, _ = run_one(cfg, context, extra_tags={"reproduced_from": run_id},
                        log_plots=False)
    new_tags = client.get_run(result.run_id).data.tags
    return Reproduction(source, result, _differences(tags, new_tags))


def _differences(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    out = []
    if old.get("dataset_digest") != new.get("dataset_digest"):
        out.append(f"dataset digest differs: {old.get('dataset_digest')} -> "
                   f"{new.get('dataset_digest')} (the data changed since the original run)")
    commit = "mlflow.source.git.commit"
    if old.get(commit) != new.get(commit):
        out.append(f"git commit differs: {old.get(commit, '?')[:12]} -> "
                   f"{new.get(commit, '?')[:12]}")
    if new.get("git_dirty") == "true" or old.get("git_dirty") == "true":
        out.append(f"uncommitted changes: original dirty={old.get('git_dirty', '?')}, "
                   f"now dirty={new.get('git_dirty', '?')}")
    for key in sorted(k for k in new if k.startswith("versions.")):
        if old.get(key) != new.get(key):
            out.append(f"{key.removeprefix('versions.')} version differs: {old.get(key, '?')} "
                       f"-> {new[key]}")
    return out


def print_reproduction(rep: Reproduction) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"reproduce {rep.source.info.run_id} -> {rep.result.run_id}",
                  title_justify="left")
    for col in ("metric", "original", "reproduced", "difference"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for name, old, new in rep.rows():
        diff = new - old
        table.add_row(name, f"{old:.6g}", f"{new:.6g}",
                      "identical" if diff == 0 or (math.isnan(old) and math.isnan(new))
                      else f"{diff:+.3g}")
    console.print(table)
    for warning in rep.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
