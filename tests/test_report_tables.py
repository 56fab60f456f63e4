"""The terminal table: one row per model; many sites summarised."""

from __future__ import annotations

from pathlib import Path

from fedcare.config import RunConfig
from fedcare.experiment import run_experiment
from fedcare.report.tables import results_table


def test_many_sites_show_best_median_and_worst_single_site(tmp_path: Path) -> None:
    config = RunConfig()
    config.data.dataset = "breast-cancer"
    config.data.partition = "iid"
    config.data.sites = 12
    config.federation.rounds = 2
    result = run_experiment(config, out=tmp_path / "run")

    lines = results_table(result).splitlines()

    body = lines[3:]
    assert [line.split()[0] for line in body] == ["federated", "pooled", *[
        line.split()[0] for line in body[2:]]]
    assert len(body) == 5
    assert "(best of 12)" in body[2] and "(median of 12)" in body[3] and "(worst of 12)" in body[4]
    assert "site acc min" in lines[1]
    accuracies = [float(line.split("alone")[1].split()[3]) for line in body[2:]]
    assert accuracies == sorted(accuracies, reverse=True)


def test_few_sites_show_every_site_and_its_accuracy_column(tmp_path: Path) -> None:
    config = RunConfig()
    config.federation.rounds = 2
    result = run_experiment(config, out=tmp_path / "run")

    table = results_table(result)

    for site in ("cleveland", "hungarian", "switzerland", "va"):
        assert f"{site} alone" in table
        assert f"acc@{site}" in table
