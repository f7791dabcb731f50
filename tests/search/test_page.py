"""The study report's page: Optuna's figures inlined, the Pareto front of two objectives,
and values shown as text, never as markup."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pandas as pd
import pytest

from expforge.plots import save_figures, study_figures
from expforge.search.page import report_page, write_report


def _two_objective_study() -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for i in range(8):
        x = i / 7
        study.add_trial(optuna.trial.create_trial(
            params={"model.alpha": x, "model.kind": "ab"[i % 2]},
            distributions={"model.alpha": optuna.distributions.FloatDistribution(0, 1),
                           "model.kind": optuna.distributions.CategoricalDistribution("ab")},
            values=[x, (1 - x) ** 2]))
    return study


def test_two_objectives_get_their_pareto_front() -> None:
    figures = study_figures(_two_objective_study(), ["val_rmse", "fit_time_s"])
    assert "plots/pareto_front.png" in figures
    folder = save_figures(figures)
    page = write_report(Path(folder), list(figures), "Study two", {"study": "two"}, None)
    text = page.read_text()
    shown = re.findall(r'<figure id="(\w+)">', text)
    assert shown == ["optimization_history", "param_importances", "slice",
                     "parallel_coordinate", "pareto_front"]
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', text)) == 5


def test_values_are_text_not_markup() -> None:
    table = pd.DataFrame([{"trial": 0, "data.note": "<script>alert(1)</script>", "v": 0.5}])
    text = report_page("Study <b>x</b>", {"storage": "<img src=x>"}, table, {})
    assert "<script>alert" not in text and "<img src=x>" not in text and "<b>x</b>" not in text
    assert "&lt;script&gt;" in text and "Study &lt;b&gt;x&lt;/b&gt;" in text


def test_figures_interrupted_while_saved_leave_no_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the command draws a study's figures (with workers, that is while the
    workers end, outside the command's deferred interrupts) leaves no folder in TMPDIR."""
    import tempfile

    from matplotlib.artist import Artist

    class Interrupted(Artist):  # Ctrl-C arriving while the figure is drawn
        def draw(self, renderer: object) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    figures = study_figures(_two_objective_study(), ["val_rmse", "fit_time_s"])
    list(figures.values())[1].add_artist(Interrupted())
    with pytest.raises(KeyboardInterrupt):
        save_figures(figures)
    assert list(tmp_path.iterdir()) == []
