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
    return [json.loads(x) for x in (run_dir / LEDGER_FILE).read_text().splitlines()]


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


def test_record_level_dp_costs_accuracy_but_learns(tmp_path: Path) -> None:
    plain = run(config(federation__rounds=10), tmp_path / "plain")
    private = run(config(federation__rounds=10, privacy__level="record",
                         privacy__epsilon=0.05), tmp_path / "dp")
    acc_plain = plain.federated.pooled["accuracy"]
    acc_private = private.federated.pooled["accuracy"]
    assert acc_plain > 0.75
    assert acc_private < acc_plain  # epsilon 0.05 is noisy enough to cost something


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
    assert len(ledger_lines(result.run_dir)) == 5


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


def test_distributed_noise_refuses_a_round_with_too_few_shares(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcare.federation.site import Site

    fit = Site.fit

    def flaky(self: Site, params: torch.Tensor, instructions: Any) -> Any:
        if self.index < 2:
            raise ProtocolError(f"site {self.name!r} dropped out")
        return fit(self, params, instructions)

    monkeypatch.setattr(Site, "fit", flaky)
    c = config(data__dataset="breast-cancer", data__sites=10, data__partition="iid",
               privacy__level="site", privacy__noise="distributed",
               privacy__dropout_tolerance=1)
    with pytest.raises(ProtocolError, match="too little noise"):
        run(c, tmp_path / "run")
    c.privacy.dropout_tolerance = 2  # two dropouts are now covered by over-noising
    result = run(c, tmp_path / "run2")
    assert result.summary["rounds_completed"] == 3


def test_resume_reaches_the_same_model_and_counts_every_round_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = config(federation__rounds=5, privacy__level="record", privacy__epsilon=3.0,
               federation__strategy="fedadam")
    whole = run(c, tmp_path / "whole")

    save = rundir.RunWriter.save_checkpoint

    def crash_at_round_3(self: rundir.RunWriter, round_number: int, *args: Any) -> None:
        if round_number == 3:  # round 3's spend is in the ledger, its checkpoint is not
            raise KeyboardInterrupt
        save(self, round_number, *args)

    monkeypatch.setattr(rundir.RunWriter, "save_checkpoint", crash_at_round_3)
    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "cut")
    monkeypatch.setattr(rundir.RunWriter, "save_checkpoint", save)
    assert {x["round"] for x in ledger_lines(tmp_path / "cut")} == {1, 2, 3}

    resumed = run(RunConfig.load(tmp_path / "cut" / "config.toml"), None,
                  resume=tmp_path / "cut")
    final_whole = torch.load(whole.run_dir / "model.pt")["params"]
    final_resumed = torch.load(resumed.run_dir / "model.pt")["params"]
    assert torch.equal(final_whole, final_resumed)
    assert resumed.summary["privacy"]["epsilon_per_site"] == pytest.approx(
        whole.summary["privacy"]["epsilon_per_site"])
    rounds = [json.loads(x)["round"]
              for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5]


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
