"""The terminal table: one row per model; many sites summarised; the chance flag and the
intervals. The sweep's table and plot: no spread from one seed."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from fedcare.config import RunConfig
from fedcare.evaluation import Evaluation
from fedcare.experiment import run_experiment
from fedcare.report.tables import CHANCE, UNDEFINED, results_table
from fedcare.sweep import sweep_html, sweep_markdown


def test_many_sites_show_best_median_and_worst_single_site(tmp_path: Path) -> None:
    config = RunConfig()
    config.data.dataset = "breast-cancer"
    config.data.partition = "iid"
    config.data.sites = 12
    config.federation.rounds = 2
    result = run_experiment(config, out=tmp_path / "run")

    lines = results_table(result).splitlines()

    body = lines[3:lines.index("")]  # the notes follow a blank line
    assert [line.split()[0] for line in body] == ["federated", "pooled", *[
        line.split()[0] for line in body[2:]]]
    assert len(body) == 5
    assert "(best of 12)" in body[2] and "(median of 12)" in body[3] and "(worst of 12)" in body[4]
    assert "site acc min" in lines[1]
    accuracies = [float(line.split("alone")[1].split()[3]) for line in body[2:]]
    assert accuracies == sorted(accuracies, reverse=True)
    # 12 single-site models: a confusion matrix and a verdict each, no bootstrap (too slow)
    local = next(iter(result.local_baselines.values())).details
    assert local is not None and local["intervals"] is None and "threshold" in local
    assert result.federated.details["intervals"]["resamples"] == 1000  # type: ignore[index]


def test_few_sites_show_every_site_and_its_accuracy_column(tmp_path: Path) -> None:
    config = RunConfig()
    config.federation.rounds = 2
    result = run_experiment(config, out=tmp_path / "run")

    table = results_table(result)

    for site in ("cleveland", "hungarian", "switzerland", "va"):
        assert f"{site} alone" in table
        assert f"acc@{site}" in table
    # no model of the default job is flagged, and the federated one's intervals follow
    assert CHANCE not in table and "flag" not in table.splitlines()[1]
    low, high = result.summary["federated"]["intervals"]["accuracy"]
    assert (f"95% intervals of the federated model (1000 bootstrap resamples of the test "
            f"patients): accuracy {low:.3f}-{high:.3f}") in table


def one_seed_sweep(seeds: list[int], runs: int) -> dict[str, object]:
    row = {"settings": {"privacy.epsilon": 1}, "runs": runs, "failed": 0,
           "accuracy_mean": 0.8, "accuracy_std": 0.0, "roc_auc_mean": 0.9, "roc_auc_std": 0.0}
    return {"grid": {"privacy.epsilon": [1, 4]}, "seeds": seeds, "runs": [],
            "table": [row, {**row, "settings": {"privacy.epsilon": 4}}]}


def test_a_sweep_with_one_seed_shows_no_spread() -> None:
    sweep = one_seed_sweep([0], runs=1)
    table = sweep_markdown(sweep)
    assert "| 1 | 1 | 0 | 0.800 (1 seed) | 0.900 (1 seed) |" in table
    assert "± 0.000" not in table and "no spread over seeds is shown" in table
    page = sweep_html(sweep)
    assert "errorbar" not in page and "(1 seed: no spread shown)" in page
    assert "mean ± 1 sd" not in page


def test_a_sweep_with_seeds_shows_their_spread() -> None:
    table = sweep_markdown(one_seed_sweep([0, 1], runs=2))
    assert "| 1 | 2 | 0 | 0.800 ± 0.000 | 0.900 ± 0.000 |" in table  # two seeds that agree


def test_a_dash_in_the_console_table_has_its_note() -> None:
    one_class = {"accuracy": 0.9, "roc_auc": math.nan, "balanced_accuracy": math.nan,
                 "brier": 0.1, "log_loss": 0.3, "n": 10}
    result = SimpleNamespace(
        data=SimpleNamespace(sites=[SimpleNamespace(name="north")], description="one class"),
        federated=Evaluation(one_class, {"north": one_class}), pooled_baseline=None,
        local_baselines={}, summary={"strategy": "fedavg"})
    table = results_table(result)  # type: ignore[arg-type]
    assert table.splitlines()[3].split()[3:5] == ["-", "-"]
    assert UNDEFINED in table
    assert CHANCE not in table  # one class in the test set: no verdict either way
