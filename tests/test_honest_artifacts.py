"""Issue 14: every stated guarantee is true, and nothing around the model leaks.

Each attack is played against a real run directory: it succeeds where the
run published too much and fails once the artefacts say and hold only what
the guarantee allows.
"""

from __future__ import annotations

import json
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.cli.main import main
from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.experiment import run_experiment
from fedcare.federation.aggregator import AGGREGATOR_PARTY, RoundReport
from fedcare.federation.site import FitInstructions
from fedcare.models import FlatModel, build_model
from fedcare.privacy.noise import noise_source
from fedcare.privacy.plan import NOT_PRIVATE
from fedcare.protection.base import wire_digest
from fedcare.report.auditlog import AUDIT_KEY_FILE, AUDIT_LOG_FILE, payload_digest
from fedcare.report.html import MODEL_CARD_FILE, REPORT_FILE
from fedcare.runtime.local import LocalRuntime
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
    # and it says what it publishes about the sites, and who knows the cohorts
    assert ("Public: the number of hospitals, the number of rounds, the sampling rate. Not "
            "released to users of the model: which hospitals took part in each round and "
            "each hospital's number of training records; the coordinator knows the cohorts"
            in privacy["sentence"])


@pytest.mark.slow
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


# ------------------------------------------------------------ 3. audit log digests
def logged_payloads(run_dir: Path) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in
               (run_dir / AUDIT_LOG_FILE).read_text(encoding="utf-8").splitlines()]
    return [e for e in entries if e["event"] == "payload_received"]


def guessed_payload_digest(run_dir: Path, site: str, *, flip_label: bool = False) -> str:
    """The oracle attack: from config.toml and a guess of `site`'s records (here the true
    ones, or with one label flipped), recompute its round-1 payload and digest it."""
    config = RunConfig.load(run_dir / "config.toml")
    data = build_federation(config.data, private=config.privacy.level != "none")
    runtime = LocalRuntime(data, config)
    target = next(s for s in runtime.sites if s.name == site)
    if flip_label:
        target.data.y_train[0] = 1 - target.data.y_train[0]
    instructions = FitInstructions(1, runtime.aggregator.plan, cohort=len(runtime.sites),
                                   clip_norm=runtime.aggregator.clip_norm)
    return wire_digest(target.fit(runtime.initial_params(), instructions).payload)


@pytest.mark.parametrize("privacy", [{}, {"level": "site", "noise": "central",
                                          "epsilon": 1.0}])
def test_the_audit_log_is_no_oracle_on_a_sites_data(privacy: dict[str, Any],
                                                    tmp_path: Path) -> None:
    config = RunConfig.from_dict({"federation": {"rounds": 1}, "baselines": {"enabled": False},
                                  "privacy": privacy})
    reports: list[RoundReport] = []
    result = run_experiment(config, out=tmp_path / "run",
                            on_round=lambda report, _: reports.append(report))
    run_dir = result.run_dir
    guess = guessed_payload_digest(run_dir, "hungarian")
    # Before: the log held the payload's SHA-256, which the right guess reproduces exactly
    # and a guess one label off does not: a yes/no answer to any guess of the records.
    old_entry = reports[0].received["hungarian"][1]
    assert guess == old_entry
    assert guessed_payload_digest(run_dir, "hungarian", flip_label=True) != old_entry
    # Now: the log holds only an HMAC under the aggregator's key; the guess matches nothing.
    logged = logged_payloads(run_dir)
    assert logged and all("sha256" not in e and len(e["hmac_sha256"]) == 64 for e in logged)
    log_text = (run_dir / AUDIT_LOG_FILE).read_text(encoding="utf-8")
    assert guess not in log_text
    # The key stays with the aggregator (mode 0600, never in the log): with it the digest
    # still proves what arrived.
    key_file = run_dir / AUDIT_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    assert key.hex() not in log_text
    hungarian = next(e for e in logged if e["site"] == "hungarian")
    assert payload_digest(guess, key) == ("hmac_sha256", hungarian["hmac_sha256"])
    started = json.loads(log_text.splitlines()[0])
    assert started["payload_digest"] == "hmac-sha256"
    # and `fedcare verify` checks the chain as before
    assert main(["verify", str(run_dir)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {"privacy": {"level": "record", "epsilon": 1.0}},  # each payload carries the site's noise
    {"protection": {"scheme": "secagg"}},  # each payload is masked
])
def test_protected_payloads_keep_their_plain_digest(settings: dict[str, Any],
                                                    tmp_path: Path) -> None:
    config = RunConfig.from_dict({"federation": {"rounds": 1},
                                  "baselines": {"enabled": False}, **settings})
    run_dir = run_experiment(config, out=tmp_path / "run").run_dir
    logged = logged_payloads(run_dir)
    assert logged and all(len(e["sha256"]) == 64 and "hmac_sha256" not in e for e in logged)
    assert not (run_dir / AUDIT_KEY_FILE).exists()
    assert main(["verify", str(run_dir)]) == 0


def test_seeded_site_noise_is_no_protection_for_the_digest(tmp_path: Path) -> None:
    # record-level DP from a seeded source: the payload is again a function of the data
    config = RunConfig.from_dict({"federation": {"rounds": 1}, "baselines": {"enabled": False},
                                  "privacy": {"level": "record", "secure": False}})
    run_dir = quietly_run(config, tmp_path / "run")
    assert all("hmac_sha256" in e for e in logged_payloads(run_dir))


# ------------------------------------------------------------ 4. site-level DP artefacts
AGGREGATOR_ONLY = {AUDIT_LOG_FILE, AUDIT_KEY_FILE}
"""The coordinator's own files: its audit log keeps the cohorts (the guarantee says so)."""


def released_texts(run_dir: Path) -> dict[str, str]:
    """Every artefact a user of the model may be given, as text (model.pt: its metadata)."""
    texts = {name: text for name, text in run_files(run_dir).items()
             if name not in AGGREGATOR_ONLY}
    meta = torch.load(run_dir / "model.pt", weights_only=True)
    texts["model.pt"] = json.dumps({k: v for k, v in meta.items() if k != "params"})
    return texts


def leaks(run_dir: Path, sizes: dict[str, int], cohorts: list[list[str]]) -> list[str]:
    """Where the run directory names a site's training size or a round's cohort."""
    found = []
    for name, text in released_texts(run_dir).items():
        for site, n in sizes.items():
            if re.search(rf'"n_train": {n}\b|\| {site} \| {n} \|', text):
                found.append(f"{name}: {site}'s n_train {n}")
        if '"participants"' in text or '"failures"' in text:
            found.append(f"{name}: per-round participants or failures")
        for cohort in cohorts:
            if json.dumps(cohort) in text:
                found.append(f"{name}: cohort {cohort}")
    return found


def run_with_cohorts(level: str, out: Path) -> tuple[Path, dict[str, int], list[list[str]]]:
    """A private run of 8 sites of different sizes, half of them sampled per round."""
    config = RunConfig.from_dict({
        "data": {"dataset": "breast-cancer", "sites": 8, "partition": "quantity",
                 "alpha": 2.0},
        "federation": {"rounds": 4, "fraction": 0.5}, "baselines": {"enabled": False},
        # seeded: the same cohorts at every run of the test
        "privacy": {"level": level, "epsilon": 4.0, "secure": False}})
    reports: list[RoundReport] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_experiment(config, out=out,
                                on_round=lambda report, _: reports.append(report))
    sizes = {s.name: s.n_train for s in result.data.sites}
    return result.run_dir, sizes, [r.participants for r in reports]


def test_site_level_artefacts_name_no_cohort_and_no_site_size(tmp_path: Path) -> None:
    run_dir, sizes, cohorts = run_with_cohorts("site", tmp_path / "site")
    # Poisson cohorts: at least one round is a proper subset, which naming would reveal.
    assert any(0 < len(c) < len(sizes) for c in cohorts)
    assert leaks(run_dir, sizes, cohorts) == []
    summary = summary_of(run_dir)
    assert [set(s) for s in summary["sites"]] == [{"name", "n_test"}] * 8
    rounds = [json.loads(line) for line in
              (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    # The guarantee says what is public, what is not released, and who knows the cohorts.
    privacy = summary["privacy"]
    assert privacy["public"] == ["the number of hospitals", "the number of rounds",
                                 "the sampling rate"]
    assert "which hospitals took part in each round" in privacy["not_released"]
    card = (run_dir / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert all(f"| {site} | not released |" in card for site in sizes)
    for text in (card, (run_dir / REPORT_FILE).read_text(encoding="utf-8")):
        assert "not covered by the site-level differential privacy guarantee" in text
    # The coordinator's audit log keeps them, as the sentence says.
    selected = [json.loads(line)["selected"] for line in
                (run_dir / AUDIT_LOG_FILE).read_text(encoding="utf-8").splitlines()
                if '"event": "round"' in line]
    assert len(selected) == 4


@pytest.mark.slow
def test_the_leak_detector_finds_what_a_record_level_run_publishes(tmp_path: Path) -> None:
    # Record-level DP treats sizes and cohorts as public: the same search finds them, so
    # the empty result above is not the search's blindness.
    run_dir, sizes, cohorts = run_with_cohorts("record", tmp_path / "record")
    found = leaks(run_dir, sizes, cohorts)
    assert any("n_train" in f for f in found) and any("cohort" in f for f in found)
