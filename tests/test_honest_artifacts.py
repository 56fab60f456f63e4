"""Issue 14: every stated guarantee is true, and nothing around the model leaks.

Each attack is played against a real run directory: it succeeds where the
run published too much and fails once the artefacts say and hold only what
the guarantee allows.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.cli.main import main
from fedcare.config import RunConfig
from fedcare.experiment import run_experiment
from fedcare.federation.aggregator import AGGREGATOR_PARTY
from fedcare.models import FlatModel, build_model
from fedcare.privacy.noise import noise_source
from fedcare.privacy.plan import NOT_PRIVATE
from fedcare.report.html import MODEL_CARD_FILE, REPORT_FILE
from fedcare.seeding import INIT, NOISE, derive_seed, torch_generator

CLAIMS = ("protected by differential privacy", "reveals almost nothing",
          "reveal almost nothing", "is held to epsilon")
"""Phrases with which a guarantee sentence claims protection."""


def summary_of(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return summary


def quietly_run(config: RunConfig, out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded noise warns, as it must
        return run_experiment(config, out=out).run_dir


# ------------------------------------------------------------ 1. seeded noise is not private
def site_level_config(*, secure: bool) -> RunConfig:
    """One round of client-level DP, central noise, every site: the simplest release."""
    config = RunConfig()
    config.federation.rounds = 1
    config.privacy.level = "site"
    config.privacy.epsilon = 0.3
    config.privacy.clip_norm = 0.1
    config.privacy.secure = secure
    config.baselines.enabled = False
    return config


def subtract_regenerated_noise(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The attack: regenerate the aggregator's seeded noise from config.toml and remove it.

    Under FedAvg (server learning rate 1) the released model is
    ``init + (sum of clipped updates + noise) / (q K)``. Everything but the sum
    is public or, with seeded noise, a function of the public seed: the
    initialisation (`INIT` stream), q K, and the noise (`NOISE` stream of round
    1, aggregator party). Returns (what the attacker takes for the exact sum of
    the sites' clipped updates, the noise it regenerated).
    """
    config = RunConfig.load(run_dir / "config.toml")
    released = torch.load(run_dir / "model.pt", weights_only=True)
    model = FlatModel(build_model(config.model, len(released["feature_names"])))
    start = model.init_params(torch_generator(config.seed, INIT))
    privacy = summary_of(run_dir)["privacy"]
    n_sites = len(summary_of(run_dir)["sites"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        noise = noise_source(secure=False, seed=derive_seed(
            config.seed, NOISE, 1, AGGREGATOR_PARTY)).gaussian(
            start.numel(), privacy["noise_multiplier"] * privacy["clip_norm"])
    denominator = privacy["sample_rate"] * n_sites
    return (released["params"] - start) * denominator - noise, noise


def test_seeded_noise_is_regenerated_from_the_config_and_removed(tmp_path: Path) -> None:
    run_dir = quietly_run(site_level_config(secure=False), tmp_path / "seeded")
    recovered, noise = subtract_regenerated_noise(run_dir)
    bound = 4 * 0.1  # 4 hospitals, each update clipped to C = 0.1
    # The noise dwarfs the sum it hides ...
    assert float(noise.norm()) > 5 * bound
    # ... yet what is left after subtracting the regenerated noise is a sum of 4 clipped
    # updates: the attacker holds the exact, un-noised aggregate.
    assert float(recovered.norm()) <= bound * 1.001


def test_the_same_attack_fails_against_secure_noise(tmp_path: Path) -> None:
    run_dir = quietly_run(site_level_config(secure=True), tmp_path / "secure")
    recovered, _ = subtract_regenerated_noise(run_dir)
    # Regenerated and real noise are independent: the residue is noise, far outside the bound.
    assert float(recovered.norm()) > 5 * 4 * 0.1
    privacy = summary_of(run_dir)["privacy"]
    assert privacy["private"] is True and privacy["noise_source"] == "secure"
    assert "protected by differential privacy" in privacy["sentence"]


@pytest.mark.parametrize("level", ["record", "site"])
def test_a_seeded_run_says_not_private_in_every_artefact(
        level: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="NOT differentially private"):
        assert main(["run", "--rounds", "2", "--privacy", level, "--epsilon", "1",
                     "--set", "privacy.secure=false", "--quiet", "--out", str(out)]) == 0
    console = capsys.readouterr().out
    privacy = summary_of(out)["privacy"]
    # the numbers stay, labelled: what secure noise would give, not a guarantee
    assert privacy["private"] is False and privacy["noise_source"] == "seeded"
    assert privacy["epsilon"] > 0 and "not_a_guarantee" in privacy
    assert privacy["protects"] == "nobody (seeded noise)"
    assert privacy["sentence"].startswith(NOT_PRIVATE)
    artefacts = {"console": console,
                 "summary.json": (out / "summary.json").read_text(encoding="utf-8"),
                 REPORT_FILE: (out / REPORT_FILE).read_text(encoding="utf-8"),
                 MODEL_CARD_FILE: (out / MODEL_CARD_FILE).read_text(encoding="utf-8")}
    for name, text in artefacts.items():
        assert NOT_PRIVATE in text, name
        for claim in CLAIMS:
            assert claim not in text, (name, claim)
    assert "<p class='warning'>NOT private" in artefacts[REPORT_FILE]
    assert "<p class='guarantee'>" not in artefacts[REPORT_FILE]

    assert main(["runs", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert f"{level}: NOT private (seeded noise)" in listed and " eps " not in listed


def test_a_sweep_of_seeded_runs_says_not_private(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["sweep", "--grid", "privacy.epsilon=1,4", "--seeds", "0",
                     "--set", "federation.rounds=1", "--set", "privacy.level=site",
                     "--set", "privacy.secure=false", "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [r["private"] for r in sweep["runs"]] == [False, False]
    for text in (printed, (tmp_path / "s" / "sweep.md").read_text(),
                 (tmp_path / "s" / "sweep.html").read_text()):
        assert "NOT private (seeded noise, for testing): 2 of 2 runs" in text


# ------------------------------------------------------------ 2. no baselines in private runs
def run_files(run_dir: Path) -> dict[str, str]:
    """Every text file of a run directory, by name."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(run_dir.iterdir())
            if p.suffix in {".json", ".jsonl", ".html", ".md", ".toml"}}


@pytest.mark.parametrize("level", ["record", "site"])
def test_a_private_run_trains_and_publishes_no_baseline_by_default(
        level: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", "--rounds", "2", "--privacy", level, "--epsilon", "1", "--quiet",
                 "--out", str(out)]) == 0
    console = capsys.readouterr().out
    summary = summary_of(out)
    assert summary["baselines"] is None
    assert summary["config"]["baselines"]["enabled"] == "auto"
    for name, text in {"console": console, **run_files(out)}.items():
        for label in ("pooled (centralised", "cleveland alone", "va alone", "Baselines:"):
            assert label not in text, (name, label)


def test_without_dp_the_default_still_trains_the_baselines(tmp_path: Path) -> None:
    summary = summary_of(quietly_run(RunConfig.from_dict({"federation": {"rounds": 1}}),
                                     tmp_path / "run"))
    assert set(summary["baselines"]) == {"pooled", "local"}  # nothing private to label


def test_explicit_baselines_in_a_private_run_are_labelled_not_private(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", "--rounds", "2", "--privacy", "record", "--epsilon", "1", "--quiet",
                 "--set", "baselines.enabled=true", "--out", str(out)]) == 0
    console = capsys.readouterr().out
    baselines = summary_of(out)["baselines"]
    assert baselines["private"] is False and baselines["note"].startswith("NOT private")
    assert set(baselines["local"]) == {"cleveland", "hungarian", "switzerland", "va"}
    rows = [line.split("  ")[0] for line in console.splitlines()]
    assert "pooled (centralised, NOT private)" in rows
    assert "cleveland alone (NOT private)" in rows
    assert "\nBaselines: NOT private: the pooled and single-site baselines" in console
    page = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert "<td>pooled (centralised, NOT private)</td>" in page
    assert "<td>va alone (NOT private)</td>" in page
    assert "<p class='warning'>NOT private: the pooled and single-site" in page
    card = (out / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert "Baselines: NOT private: the pooled and single-site baselines" in card
