"""Private runs end to end: record- and site-level DP, the ledger, the budget, resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.config import RunConfig
from fedcare.errors import BudgetExceeded, ConfigError, ProtocolError
from fedcare.experiment import run_experiment
from fedcare.privacy.accounting import GaussianEvent, epsilon
from fedcare.privacy.ledger import LEDGER_FILE
from fedcare.report import rundir


def config(**values: Any) -> RunConfig:
    c = RunConfig()
    c.baselines.enabled = False
    c.federation.rounds = 3
    c.privacy.secure = False  # seeded noise: reproducible (and not private), for tests
    for key, value in values.items():
        c.set_value(key.replace("__", "."), value)
    return c


def run(c: RunConfig, out: Path, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_experiment(c, out=out, **kwargs)


def ledger_lines(run_dir: Path) -> list[dict[str, Any]]:
    """The spend lines of the run's ledger (not its format and discard lines)."""
    lines = [json.loads(x) for x in (run_dir / LEDGER_FILE).read_text().splitlines()]
    return [x for x in lines if x["type"] == "spend"]


@pytest.mark.slow
def test_record_level_run_spends_what_it_was_calibrated_for(tmp_path: Path) -> None:
    # secure noise: the guarantee it states is the one this test checks
    c = config(privacy__level="record", privacy__epsilon=2.0, privacy__secure=True)
    result = run(c, tmp_path / "run")
    privacy = result.summary["privacy"]
    assert privacy["level"] == "record" and privacy["private"] is True
    # calibrated for exactly these rounds: each site ends just under its cap
    for site, spent in privacy["epsilon_per_site"].items():
        assert 1.9 < spent <= 2.0 * (1 + 1e-9), site
    assert "Each patient's record" in privacy["sentence"] and "epsilon = " in privacy["sentence"]
    lines = ledger_lines(result.run_dir)
    assert len(lines) == 3 * 4  # one spend per round per hospital
    assert {x["party"] for x in lines} == {s.name for s in result.data.sites}
    # the file alone gives back the summary's numbers
    cleveland = [x for x in lines if x["party"] == "cleveland"]
    events = [GaussianEvent(noise_multiplier=x["noise_multiplier"],
                            sample_rate=x["sample_rate"], steps=x["steps"]) for x in cleveland]
    assert epsilon(events, delta=c.privacy.delta) == pytest.approx(
        privacy["epsilon_per_site"]["cleveland"])
    on_disk = json.loads((result.run_dir / "summary.json").read_text())
    assert on_disk["privacy"]["sentence"] == privacy["sentence"]


@pytest.mark.slow
def test_record_level_dp_costs_accuracy_but_learns(tmp_path: Path) -> None:
    plain = run(config(federation__rounds=10), tmp_path / "plain")
    private = run(config(federation__rounds=10, privacy__level="record",
                         privacy__epsilon=0.05), tmp_path / "dp")
    acc_plain = plain.federated.pooled["accuracy"]
    acc_private = private.federated.pooled["accuracy"]
    assert acc_plain > 0.75
    assert acc_private < acc_plain  # epsilon 0.05 is noisy enough to cost something


@pytest.mark.slow
def test_a_site_cap_lowers_that_site_budget_only(tmp_path: Path) -> None:
    c = config(privacy__level="record", privacy__epsilon=2.0,
               privacy__site_epsilon={"switzerland": 0.5})
    spent = run(c, tmp_path / "run").summary["privacy"]["epsilon_per_site"]
    assert 0.45 < spent["switzerland"] <= 0.5 * (1 + 1e-9)
    assert spent["cleveland"] > 1.9


def test_unknown_site_in_a_cap_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown site"):
        run(config(privacy__level="record", privacy__site_epsilon={"mayo": 1.0}),
            tmp_path / "run")


def test_an_overspend_is_refused_before_the_round_and_nothing_is_lost(tmp_path: Path) -> None:
    # a fixed noise multiplier: the cap of 1 is reached after a few rounds
    c = config(data__dataset="breast-cancer", data__sites=2, data__partition="iid",
               federation__rounds=20, privacy__level="record", privacy__epsilon=1.0,
               privacy__noise_multiplier=3.0)
    with pytest.raises(BudgetExceeded, match="would be overspent") as info:
        run(c, tmp_path / "run")
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "would be overspent" in summary["error"]
    done = summary["rounds_completed"]
    assert 1 <= done < 20
    assert f"round {done + 1}" in str(info.value)
    assert all(v <= 1.0 for v in summary["privacy"]["epsilon_per_site"].values())
    assert {x["round"] for x in ledger_lines(run_dir)} == set(range(1, done + 1))
    assert (run_dir / "model.pt").exists()


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_site_level_run(tmp_path: Path, noise: str) -> None:
    c = config(data__dataset="breast-cancer", data__sites=20, data__partition="iid",
               federation__rounds=5, privacy__level="site", privacy__epsilon=8.0,
               privacy__noise=noise, privacy__clip_norm=0.5, privacy__secure=True)
    result = run(c, tmp_path / "run")
    privacy = result.summary["privacy"]
    assert 7.5 < privacy["epsilon"] <= 8.0 * (1 + 1e-9)
    assert "Each hospital's whole contribution" in privacy["sentence"]
    if noise == "central":
        assert privacy["epsilon_against_aggregator"] is None
        assert "trusted to add the noise" in privacy["sentence"]
    else:  # each plain payload carries only a 1/sqrt(20) share of the noise
        assert privacy["epsilon_against_aggregator"] > privacy["epsilon"]
    parties = [x["party"] for x in ledger_lines(result.run_dir)]
    assert parties.count("federation") == 5
    # what the aggregator read of each site, one entry a round (distributed only)
    assert parties.count("aggregator") == (5 if noise == "distributed" else 0)


@pytest.mark.parametrize("scheme", ["secagg", "ckks"])
def test_distributed_noise_under_a_protected_sum_holds_against_the_aggregator(
        tmp_path: Path, scheme: str) -> None:
    c = config(data__dataset="breast-cancer", data__sites=20, data__partition="iid",
               federation__rounds=5, privacy__level="site", privacy__epsilon=8.0,
               privacy__noise="distributed", privacy__clip_norm=0.5, protection__scheme=scheme,
               privacy__secure=True)
    privacy = run(c, tmp_path / "run").summary["privacy"]
    plain = run(config(data__dataset="breast-cancer", data__sites=20, data__partition="iid",
                       federation__rounds=5, privacy__level="site", privacy__epsilon=8.0,
                       privacy__noise="distributed", privacy__clip_norm=0.5),
                tmp_path / "plain").summary["privacy"]
    # The sum carries the full noise; every site takes part (fraction 1), so there is no
    # sampling amplification for the aggregator to lose: the same epsilon holds against it.
    assert privacy["epsilon_against_aggregator"] == pytest.approx(privacy["epsilon"])
    assert privacy["epsilon_against_aggregator"] < plain["epsilon_against_aggregator"] / 3
    assert f"sees only the sum of the hospitals' noised updates ({scheme})" in privacy["sentence"]
    assert ("colludes" in privacy["sentence"]) == (scheme == "ckks")


def dropping_sites(monkeypatch: pytest.MonkeyPatch, dropped: int) -> list[str]:
    """Sites of index < `dropped` fail at fit; returns the names of the messages sites got."""
    from fedcare.federation.site import Site

    fit, exchange = Site.fit, Site.exchange
    messages: list[str] = []

    def flaky(self: Site, params: torch.Tensor, instructions: Any) -> Any:
        if self.index < dropped:
            raise ProtocolError(f"site {self.name!r} dropped out")
        return fit(self, params, instructions)

    def recording(self: Site, round_number: int, message: object) -> object:
        messages.append(type(message).__name__)
        return exchange(self, round_number, message)

    monkeypatch.setattr(Site, "fit", flaky)
    monkeypatch.setattr(Site, "exchange", recording)
    return messages


def empty_rounds(run_dir: Path) -> list[bool]:
    """Which rounds were released from noise alone: under client-level DP only the
    coordinator's audit log says (it is cohort information)."""
    audit = [json.loads(x) for x in (run_dir / "audit_log.jsonl").read_text().splitlines()]
    return [e["empty"] for e in audit if e.get("event") == "round"]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_too_few_distributed_shares_are_never_unmasked_and_the_round_is_charged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 14.3.1. Before: the under-noised sum of 8 shares (9 needed) was unmasked, then
    # the round was refused and nothing was charged. Now the aggregator checks first: no
    # site is asked to unmask, the round is released from noise alone and charged.
    messages = dropping_sites(monkeypatch, dropped=2)
    c = config(data__dataset="breast-cancer", data__sites=10, data__partition="iid",
               privacy__level="site", privacy__noise="distributed",
               privacy__dropout_tolerance=1, protection__scheme="secagg")
    result = run(c, tmp_path / "run")
    assert result.summary["status"] == "completed"
    assert "RoundSetup" in messages and "UnmaskRequest" not in messages
    assert empty_rounds(result.run_dir) == [True] * 3
    parties = [x["party"] for x in ledger_lines(result.run_dir)]
    assert parties.count("federation") == 3  # every round charged
    assert parties.count("aggregator") == 0  # no sum was revealed to it
    # Two dropouts are covered by over-noising with tolerance 2: sums are unmasked.
    messages.clear()
    c.privacy.dropout_tolerance = 2
    covered = run(c, tmp_path / "covered")
    assert messages.count("UnmaskRequest") == 3 * 8
    assert empty_rounds(covered.run_dir) == [False] * 3
    assert [x["party"] for x in ledger_lines(covered.run_dir)].count("aggregator") == 3


def test_under_plain_protection_payloads_read_before_a_short_round_are_charged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Plain payloads are read as they arrive, so a round with too few shares still showed
    # the aggregator 8 noised updates: charged to what it saw, though no sum is formed.
    dropping_sites(monkeypatch, dropped=2)
    c = config(data__dataset="breast-cancer", data__sites=10, data__partition="iid",
               privacy__level="site", privacy__noise="distributed",
               privacy__dropout_tolerance=1)
    result = run(c, tmp_path / "run")
    assert empty_rounds(result.run_dir) == [True] * 3
    parties = [x["party"] for x in ledger_lines(result.run_dir)]
    assert parties.count("federation") == parties.count("aggregator") == 3
    assert result.summary["privacy"]["epsilon_against_aggregator"] > 0


def crash_before_checkpoint(c: RunConfig, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                            at_round: int) -> None:
    """Run `c` until round `at_round`'s spend is in the ledger and its checkpoint is not."""
    save = rundir.RunWriter.save_checkpoint

    def crash(self: rundir.RunWriter, round_number: int, *args: Any) -> None:
        if round_number == at_round:
            raise KeyboardInterrupt
        save(self, round_number, *args)

    monkeypatch.setattr(rundir.RunWriter, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run(c, run_dir)
    monkeypatch.setattr(rundir.RunWriter, "save_checkpoint", save)


@pytest.mark.slow
def test_resume_reaches_the_same_model_and_counts_every_round_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed noise multiplier under a cap with room for the round run twice (the cap
    # counts what the aggregator saw: test_a_resumed_run_refuses_a_redo_over_the_cap).
    c = config(federation__rounds=5, privacy__level="record", privacy__epsilon=50.0,
               privacy__noise_multiplier=1.0, federation__strategy="fedadam")
    whole = run(c, tmp_path / "whole")
    crash_before_checkpoint(c, tmp_path / "cut", monkeypatch, at_round=3)
    assert {x["round"] for x in ledger_lines(tmp_path / "cut")} == {1, 2, 3}

    resumed = run(RunConfig.load(tmp_path / "cut" / "config.toml"), None,
                  resume=tmp_path / "cut")
    final_whole = torch.load(whole.run_dir / "model.pt")["params"]
    final_resumed = torch.load(resumed.run_dir / "model.pt")["params"]
    assert torch.equal(final_whole, final_resumed)
    privacy, uncut = resumed.summary["privacy"], whole.summary["privacy"]
    # the released model's epsilon counts round 3 once ...
    assert privacy["epsilon_per_site"] == pytest.approx(uncut["epsilon_per_site"])
    # ... the aggregator saw it twice (issue 14.3.3), and the summary says so
    assert privacy["discarded_rounds"] == [3] and uncut["discarded_rounds"] == []
    assert uncut["epsilon_against_aggregator"] == pytest.approx(uncut["epsilon"])
    for site, seen in privacy["epsilon_against_aggregator_per_site"].items():
        assert seen > privacy["epsilon_per_site"][site] * 1.02
    # (the run's noise is seeded, so its sentence says NOT private; a secure run's says
    # what the coordinator saw: test_site_level_resume_counts_the_discarded_sum...)
    assert privacy["sentence"].startswith("NOT private")
    rounds = [json.loads(x)["round"]
              for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_resumed_run_refuses_a_redo_over_the_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 14.3.3: calibrated so that 5 rounds exactly fill the cap. The aggregator saw
    # round 3 before the crash; with its redo it would see 6 rounds of DP-SGD updates.
    # Before, the resumed run completed (6 rounds seen, the cap exceeded); now it stops
    # before round 5, naming the discarded round, and the aggregator's epsilon <= cap.
    c = config(federation__rounds=5, privacy__level="record", privacy__epsilon=3.0)
    crash_before_checkpoint(c, tmp_path / "cut", monkeypatch, at_round=3)
    with pytest.raises(BudgetExceeded, match=r"round 5: .*round\(s\) \[3\], discarded"):
        run(RunConfig.load(tmp_path / "cut" / "config.toml"), None, resume=tmp_path / "cut")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["rounds_completed"] == 4
    privacy = summary["privacy"]
    assert max(privacy["epsilon_against_aggregator_per_site"].values()) <= 3.0 * (1 + 1e-9)
    assert privacy["epsilon_against_aggregator"] > privacy["epsilon"]


def test_site_level_resume_counts_the_discarded_sum_against_the_aggregator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Client-level distributed noise under secagg: the aggregator saw round 2's noised sum
    # before the crash. The released model's epsilon is that of 3 rounds, the aggregator's
    # that of 4 sums; the cap on it (what an uninterrupted run can reach) refuses round 3.
    c = config(data__dataset="breast-cancer", data__sites=6, data__partition="iid",
               privacy__level="site", privacy__epsilon=8.0, privacy__noise="distributed",
               protection__scheme="secagg", privacy__secure=True)
    crash_before_checkpoint(c, tmp_path / "cut", monkeypatch, at_round=2)
    lines = ledger_lines(tmp_path / "cut")
    assert [x["party"] for x in lines] == ["federation", "aggregator"] * 2
    with pytest.raises(BudgetExceeded, match="'aggregator' would be overspent in round 3"):
        run(RunConfig.load(tmp_path / "cut" / "config.toml"), None, resume=tmp_path / "cut")
    privacy = json.loads((tmp_path / "cut" / "summary.json").read_text())["privacy"]
    assert privacy["discarded_rounds"] == [2]
    sigma = privacy["noise_multiplier"]
    three_sums = epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=3)],
                         delta=1e-5)
    assert privacy["epsilon_against_aggregator"] == pytest.approx(three_sums, rel=1e-6)
    two_released = epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=2)],
                           delta=1e-5)
    assert privacy["epsilon"] == pytest.approx(two_released, rel=1e-6)
    assert "ran again" in privacy["sentence"]
    assert f"{privacy['epsilon_against_aggregator']:.2f}" in privacy["sentence"]


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(config(), None, resume=tmp_path / "empty")


def test_adaptive_clipping_moves_the_bound_and_checkpoints_it(tmp_path: Path) -> None:
    c = config(data__dataset="breast-cancer", data__sites=50, data__partition="iid",
               federation__rounds=6, privacy__level="site", privacy__epsilon=8.0,
               privacy__clip_norm=5.0, privacy__target_quantile=0.5, privacy__count_noise=5.0)
    result = run(c, tmp_path / "run")
    clips = [json.loads(x)["clip_norm"]
             for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert clips[0] == 5.0
    assert clips[-1] < clips[0]  # 5 is far above the median update norm: C shrinks
    checkpoint = torch.load(result.run_dir / "checkpoint.pt")
    assert checkpoint["clip_norm"] < clips[-1]  # the bound the next round would use
    assert result.summary["privacy"]["adaptive_clipping_quantile"] == 0.5


def test_a_private_run_standardises_with_public_bounds_only(tmp_path: Path) -> None:
    result = run(config(privacy__level="record", privacy__epsilon=2.0), tmp_path / "run")
    bounds = result.data.schema.bounds
    for stats in result.data.standardization.values():  # what model.pt stores
        assert stats["mean"] == [(lo + hi) / 2 for lo, hi in bounds.values()]
        assert stats["std"] == [(hi - lo) / 2 for lo, hi in bounds.values()]
    for site in result.data.sites:
        assert site.x_train[:, :len(bounds)].abs().max() <= 1.0


def test_a_private_run_refuses_shared_statistics_before_writing(tmp_path: Path) -> None:
    c = config(privacy__level="record", data__standardize="federated")
    with pytest.raises(ConfigError, match="outside the differential privacy guarantee"):
        run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_client_level_sites_do_not_report_their_size(tmp_path: Path) -> None:
    c = config(data__dataset="breast-cancer", data__sites=10, data__partition="iid",
               federation__rounds=2, privacy__level="site", privacy__epsilon=8.0)
    result = run(c, tmp_path / "run")
    rounds = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and not any("n_examples" in r for r in rounds)


def test_the_count_slot_of_adaptive_clipping_is_counted_against_the_aggregator(
        tmp_path: Path) -> None:
    # Issue 14.3.2. The aggregator reads the noised count sum as well as the update sum:
    # together one Gaussian of multiplier sigma (Andrew et al. 2021, Thm 1). Before, only
    # the update's larger multiplier sigma_u was counted: 7.44 reported where 7.99 holds.
    c = config(data__dataset="breast-cancer", data__sites=20, data__partition="iid",
               federation__rounds=5, privacy__level="site", privacy__epsilon=8.0,
               privacy__noise="distributed", privacy__clip_norm=0.5,
               privacy__target_quantile=0.5, privacy__count_noise=2.0,
               protection__scheme="secagg")
    privacy = run(c, tmp_path / "run").summary["privacy"]
    sigma = privacy["noise_multiplier"]
    sigma_update = (sigma ** -2 - (2 * 2.0) ** -2) ** -0.5
    counted = epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=5)],
                      delta=1e-5)
    update_only = epsilon([GaussianEvent(noise_multiplier=sigma_update, sample_rate=1.0,
                                         steps=5)], delta=1e-5)
    assert privacy["epsilon_against_aggregator"] == pytest.approx(counted, rel=1e-6)
    assert privacy["epsilon_against_aggregator"] == pytest.approx(privacy["epsilon"], rel=1e-6)
    assert update_only < 0.95 * counted  # what was reported before


@pytest.mark.slow
def test_plain_payloads_are_counted_with_each_rounds_actual_cohort(tmp_path: Path) -> None:
    # Issue 14.3.2. Under plain protection each payload carries sigma / sqrt(n - t) of the
    # noise for the round's actual Poisson cohort n, not for round(q K).
    c = config(data__dataset="breast-cancer", data__sites=12, data__partition="iid",
               federation__rounds=6, federation__fraction=0.5, privacy__level="site",
               privacy__epsilon=8.0, privacy__noise="distributed", privacy__dropout_tolerance=1)
    result = run(c, tmp_path / "run")
    audit = [json.loads(x) for x in (result.run_dir / "audit_log.jsonl").read_text()
             .splitlines()]
    cohorts = {e["round"]: len(e["selected"]) for e in audit if e.get("event") == "round"}
    assert len(set(cohorts.values())) > 1  # the cohort really varies
    sigma = result.summary["privacy"]["noise_multiplier"]
    seen = {x["round"]: x["noise_multiplier"] for x in ledger_lines(result.run_dir)
            if x["party"] == "aggregator"}
    assert seen == {r: pytest.approx(sigma / (n - 1) ** 0.5) for r, n in cohorts.items()}
    actual = epsilon([GaussianEvent(noise_multiplier=sigma / (n - 1) ** 0.5, sample_rate=1.0,
                                    steps=1) for n in cohorts.values()], delta=1e-5)
    planned = epsilon([GaussianEvent(noise_multiplier=sigma / (6 - 1) ** 0.5, sample_rate=1.0,
                                     steps=6)], delta=1e-5)  # round(q K) = 6, as before
    against = result.summary["privacy"]["epsilon_against_aggregator"]
    assert against == pytest.approx(actual, rel=1e-6)
    assert against != pytest.approx(planned, rel=1e-3)


def test_central_noise_under_ckks_is_refused(tmp_path: Path) -> None:
    # Issue 14.3.4. With 2 sites the decrypting one would read the other's exact update.
    c = config(data__dataset="breast-cancer", data__sites=2, data__partition="iid",
               privacy__level="site", privacy__noise="central", protection__scheme="ckks")
    with pytest.raises(ConfigError, match="sees it before the aggregator adds the noise"):
        run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    c.privacy.noise = "distributed"  # the way out the message names
    assert run(c, tmp_path / "ok").summary["status"] == "completed"


@pytest.mark.parametrize("scheme", ["plain", "secagg"])
def test_an_empty_cohort_is_released_from_noise_alone_and_the_run_completes(
        tmp_path: Path, scheme: str) -> None:
    # Issue 14.3.5. At q = 0.1 with 4 sites two thirds of the rounds draw nobody (and under
    # secagg a cohort of one cannot be summed). Before, the first such round stopped the
    # run, so whether it completed depended on who was in the federation.
    rounds = 8
    c = config(federation__rounds=rounds, federation__fraction=0.1, privacy__level="site",
               privacy__noise_multiplier=1.0, privacy__epsilon=50.0, privacy__clip_norm=0.5,
               privacy__noise="distributed", protection__scheme=scheme)
    result = run(c, tmp_path / "run")
    assert result.summary["status"] == "completed"
    assert result.summary["rounds_completed"] == rounds
    rows = metrics(result.run_dir)
    # Which rounds were empty is cohort information: only the coordinator's audit log has it.
    assert len(rows) == rounds and not any("empty_round" in r for r in rows)
    audit = [json.loads(x) for x in (result.run_dir / "audit_log.jsonl").read_text()
             .splitlines()]
    empty = {e["round"] for e in audit if e.get("event") == "round" and e["empty"]}
    assert len(empty) >= rounds // 2
    lines = ledger_lines(result.run_dir)
    assert [x["round"] for x in lines if x["party"] == "federation"] == list(range(1, rounds + 1))
    # nothing of any site was seen in an empty round
    seen = {x["round"] for x in lines if x["party"] == "aggregator"}
    assert seen == set(range(1, rounds + 1)) - empty
    assert 0 < result.summary["privacy"]["epsilon"] <= 50.0
