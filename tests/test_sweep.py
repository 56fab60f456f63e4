"""fedcare sweep: a grid of runs, its table and its privacy-utility plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedcare.cli.main import main
from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.sweep import GridAxis, run_sweep


def test_grid_values_are_typed_and_short_keys_resolve() -> None:
    assert GridAxis.parse("epsilon=0.5,1,8") == GridAxis("privacy.epsilon", (0.5, 1, 8))
    assert GridAxis.parse("strategy=fedavg,fedadam") == GridAxis("federation.strategy",
                                                                 ("fedavg", "fedadam"))
    for bad in ("privacy.epsilon", "privacy.epsilon=", "=1,2", "lr=0.1,0.1"):
        with pytest.raises(ConfigError, match="--grid"):
            GridAxis.parse(bad)


def test_a_sweep_runs_every_cell_and_seed_and_summarises_them(tmp_path: Path) -> None:
    base = RunConfig()
    base.federation.rounds = 2
    grid = [GridAxis.parse("federation.lr=0.1,1.0"), GridAxis.parse("strategy=fedavg,fedprox")]
    seen: list[str] = []
    sweep = run_sweep(base, grid, [0, 1], tmp_path / "sweep",
                      on_run=lambda i, n, name: seen.append(f"{i + 1}/{n}"))
    assert seen == [f"{i}/8" for i in range(1, 9)]
    runs = sweep["runs"]
    assert [(r["settings"]["federation.lr"], r["settings"]["federation.strategy"], r["seed"])
            for r in runs] == [(lr, s, seed) for lr in (0.1, 1.0) for s in ("fedavg", "fedprox")
                               for seed in (0, 1)]
    for run in runs:  # each is an ordinary run directory, configured as the grid says
        summary = json.loads((tmp_path / "sweep" / run["run"] / "summary.json").read_text())
        assert summary["config"]["federation"]["lr"] == run["settings"]["federation.lr"]
        assert summary["seed"] == run["seed"]
        assert summary["federated"]["pooled"]["accuracy"] == run["accuracy"]
    cell = sweep["table"][0]
    values = [r["accuracy"] for r in runs[:2]]
    assert cell["accuracy_mean"] == pytest.approx(sum(values) / 2)
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("\n| ") == 4
    page = (tmp_path / "sweep" / "sweep.html").read_text()
    # accuracy and AUC against the numeric key, one line per strategy, with error bars
    assert re.findall(r'aria-label="([^"]+)"', page) == [
        "Accuracy vs federation.lr (mean ± 1 sd over seeds)",
        "ROC AUC vs federation.lr (mean ± 1 sd over seeds)"]
    assert page.count("<polyline") == 4 and "errorbar" in page


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    # a quorum of 9 sites cannot be met by 4 hospitals: that run fails, the other stands
    code = main(["sweep", "--grid", "federation.min_sites=1,9", "--seeds", "0",
                 "--set", "federation.rounds=1", "--out", str(tmp_path / "s")])
    assert code == 0
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [r["status"] for r in sweep["runs"]] == ["completed", "failed"]
    assert "federation.min_sites is 9" in sweep["runs"][1]["error"]
    assert "| 9 | 0 | 1 | - | - |" in capsys.readouterr().out
    assert main(["sweep", "--out", str(tmp_path / "t")]) == 2


def test_a_privacy_grid_without_a_privacy_level_is_refused_before_any_run(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"privacy.epsilon \(--grid\).*--privacy record"):
        run_sweep(RunConfig(), [GridAxis.parse("epsilon=1,8")], [0], tmp_path / "sweep")

    assert not (tmp_path / "sweep").exists()


def test_a_privacy_override_for_a_grid_without_a_level_is_refused(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["sweep", "--grid", "strategy=fedavg,fedadam", "--set", "privacy.epsilon=2",
                 "--seeds", "0", "--out", str(tmp_path / "sweep")])

    assert code == 2
    assert "privacy.epsilon (--set)" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
