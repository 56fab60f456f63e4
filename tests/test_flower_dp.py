"""Client-level DP (``privacy.level = "site"``) in the Flower runtime: same model as local,
the aggregator's random cohort, the ledger across a resume, the summary, refusals."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.errors import BudgetExceeded, ConfigError, ProtocolError, QuorumError
from fedcare.federation.aggregator import Aggregator
from fedcare.models.params import ParamSpec
from fedcare.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedcare.privacy.plan import (
    FEDERATION,
    PrivacyPlan,
    build_site_level_plan,
    noise_factory,
)
from fedcare.privacy.site_level import SitePrivacy
from fedcare.protection.plain import PlainSum
from fedcare.report import rundir
from fedcare.report.auditlog import AUDIT_LOG_FILE
from fedcare.runtime.flower_server import (
    CohortKeeper,
    ServerSettings,
    check_client_level,
    round_retries,
)
from fedcare.runtime.flower_site import NodeSettings, SiteNode
from fedcare.runtime.local import LocalRuntime, build_aggregator

SITES = ["cleveland", "hungarian", "switzerland", "va"]


@pytest.fixture(autouse=True)
def quiet_seeded_noise() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded (test-only) noise source warns
        yield


def client_level_config(noise: str = "central", scheme: str = "plain", *, rounds: int = 3,
                        fraction: float = 0.75, **values: Any) -> RunConfig:
    config = RunConfig()
    config.baselines.enabled = False
    config.federation.rounds = rounds
    config.federation.fraction = fraction
    config.protection.scheme = scheme
    config.privacy.level, config.privacy.noise = "site", noise
    config.privacy.epsilon = 4.0
    config.privacy.secure = False  # seeded noise: comparable with the local runtime
    for key, value in values.items():
        config.set_value(key.replace("__", "."), value)
    return config


def local_run(config: RunConfig) -> tuple[torch.Tensor, LocalRuntime, list[list[str]]]:
    """The local runtime's final model, the runtime (plan, ledger) and each round's cohort."""
    runtime = LocalRuntime(build_federation(config.data, private=True), config)
    cohorts: list[list[str]] = []
    params = runtime.run(lambda _, report: cohorts.append(report.selected))
    return params, runtime, cohorts


def count_draws(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """How often the aggregator draws a round's Poisson cohort, by round."""
    from fedcare.federation import aggregator

    draws: Counter[int] = Counter()
    select = aggregator.Aggregator.select

    def counted(self: aggregator.Aggregator, n_sites: int, round_number: int) -> list[int]:
        draws[round_number] += 1
        return select(self, n_sites, round_number)

    monkeypatch.setattr(aggregator.Aggregator, "select", counted)
    return draws


def ledger_rounds(run_dir: Path, rounds: int) -> list[int]:
    ledger = PrivacyLedger(None, delta=1e-5, accountant="pld", caps={})
    ledger.resume_from(run_dir / LEDGER_FILE, rounds)
    return [e.round for e in ledger.entries(FEDERATION)]


# ----------------------------------------------------------------------------- same model
@pytest.mark.slow
@pytest.mark.parametrize(("noise", "scheme"), [("central", "plain"), ("distributed", "plain"),
                                               ("central", "secagg"),
                                               ("distributed", "secagg")])
def test_flower_simulation_reaches_the_local_runtimes_model_with_client_level_dp(
        noise: str, scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcare.runtime.flower import run_simulation

    config = client_level_config(noise, scheme)
    local, runtime, local_cohorts = local_run(config)
    # Seed 0 draws a round without one of the four sites: the cohort is really random.
    assert any(len(cohort) < len(SITES) for cohort in local_cohorts)
    draws = count_draws(monkeypatch)
    result = run_simulation(config, n_sites=4, run_dir=tmp_path / "run")
    assert result.rounds_completed == 3
    assert torch.allclose(result.params, local, atol=1e-6, rtol=0)
    assert [r.selected for r in result.reports] == local_cohorts
    # One draw per round, and only the drawn sites were asked anything in it.
    assert draws == {1: 1, 2: 1, 3: 1}
    for report in result.reports:
        asked = {site for site, r in result.traffic.sent if r == report.round}
        assert asked == set(report.selected)
    # The summary states the guarantee as `fedcare run` does, from the same ledger.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert runtime.privacy is not None and runtime.ledger is not None
    expected = runtime.privacy.guarantee(runtime.ledger)
    assert summary["privacy"]["epsilon"] == pytest.approx(expected["epsilon"], rel=1e-12)
    assert 0 < summary["privacy"]["epsilon"] <= config.privacy.epsilon
    assert summary["privacy"]["sentence"] == expected["sentence"]
    assert ledger_rounds(tmp_path / "run", 3) == [1, 2, 3]


@pytest.mark.slow
def test_client_level_dp_under_ckks_matches_the_local_runtime_within_the_flooding(
        tmp_path: Path) -> None:
    from fedcare.protection.ckks import generate_keys
    from fedcare.runtime.flower import run_simulation

    generate_keys(tmp_path / "keys")  # one key set for every node (in memory, each makes its own)
    config = client_level_config("distributed", "ckks", protection__keys=str(tmp_path / "keys"))
    local, runtime, local_cohorts = local_run(config)
    result = run_simulation(config, n_sites=4, run_dir=tmp_path / "run")
    assert result.rounds_completed == 3
    assert [r.selected for r in result.reports] == local_cohorts
    # The DP noise is the same seeded draw in both runtimes; each decryption adds fresh
    # flooding noise (std 2**-20 on the sum, from the CSPRNG), so the models agree to that.
    assert torch.allclose(result.params, local, atol=1e-5, rtol=0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert runtime.privacy is not None and runtime.ledger is not None
    expected = runtime.privacy.guarantee(runtime.ledger)
    assert summary["privacy"]["epsilon"] == pytest.approx(expected["epsilon"], rel=1e-12)
    assert summary["privacy"]["sentence"] == expected["sentence"]


@pytest.mark.slow
def test_with_the_secure_noise_source_each_round_draws_its_cohort_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Production noise (CSPRNG): a second draw would differ, so only one may be made."""
    from fedcare.runtime.flower import run_simulation
    from fedcare.runtime.flower_server import Traffic

    config = client_level_config("distributed", "plain", rounds=2)
    config.privacy.secure = True
    draws = count_draws(monkeypatch)
    # Who was sent what, seen in the aggregator's memory: under site-level DP summary.json
    # names no cohort, so it holds no per-site traffic.
    sent: set[tuple[str, int]] = set()
    add = Traffic.add

    def recording_add(self: Traffic, site: str, round_number: int, *sizes: int) -> None:
        sent.add((site, round_number))
        add(self, site, round_number, *sizes)

    monkeypatch.setattr(Traffic, "add", recording_add)
    run_dir = tmp_path / "run"
    # All four sites left out of a round (chance 1/256) stops the run, as locally; the
    # rounds before it are still checked.
    with contextlib.suppress(QuorumError):
        run_simulation(config, n_sites=4, run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    audit = [json.loads(line) for line in (run_dir / AUDIT_LOG_FILE).read_text().splitlines()]
    selected = {e["round"]: e["selected"] for e in audit if e["event"] == "round"}
    assert draws and set(draws.values()) == {1}
    assert "traffic" not in summary
    for round_number, sites in selected.items():
        asked = {site for site, r in sent if r == round_number}
        assert asked == set(sites)
    assert ledger_rounds(run_dir, 2) == sorted(selected)
    if summary["status"] == "completed":
        assert 0 < summary["privacy"]["epsilon"] <= config.privacy.epsilon


def test_a_kept_cohort_is_the_one_drawn_even_when_a_new_draw_would_differ() -> None:
    config = client_level_config(fraction=0.5, privacy__noise_multiplier=1.0)
    config.privacy.secure = True
    names = [f"site-{i}" for i in range(40)]
    plan = build_site_level_plan(config, names)
    keeper = build_aggregator(config, ParamSpec(("w",), ((3,),)), [], protection=PlainSum(),
                              privacy=plan, noise_for=noise_factory(config), kind=CohortKeeper)
    first = keeper.select(40, 1)
    assert keeper.select(40, 1) == first == keeper.cohort(1)  # a retry keeps it
    assert Aggregator.select(keeper, 40, 1) != first  # what a second draw gives
    assert keeper.select(40, 2) != first
    with pytest.raises(ProtocolError, match="no cohort was drawn for round 1"):
        keeper.cohort(1)


def test_central_noise_under_ckks_is_refused_before_the_run() -> None:
    # Issue 14.3.4: the decrypting site would read the sum before the aggregator noises it.
    with pytest.raises(ConfigError, match=r"decrypts the sum.*'distributed'.*'secagg'"):
        build_site_level_plan(client_level_config("central", "ckks"), ["a", "b"])


def test_distributed_noise_under_plain_protection_is_never_retried() -> None:
    settings = ServerSettings(round_retries=2)
    sites = ["a", "b", "c"]

    def plan(noise: str, scheme: str) -> PrivacyPlan:
        config = client_level_config(noise, scheme, privacy__noise_multiplier=1.0)
        return build_site_level_plan(config, sites)

    plain = plan("distributed", "plain")
    assert round_retries(settings, plain) == 0
    secagg, central = plan("distributed", "secagg"), plan("central", "plain")
    assert round_retries(settings, secagg) == round_retries(settings, central) == 2
    assert round_retries(settings, None) == 2


# ----------------------------------------------------------------------------- resume
class AggregatorDied(Exception):
    """Stands for the aggregator's process dying."""


@pytest.mark.slow
def test_a_resumed_client_level_run_counts_no_round_twice_and_reaches_the_same_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcare.runtime.flower import run_simulation

    # Adaptive clipping: the clip norm the next round uses must come back from the checkpoint.
    # Fraction 0.5: the aggregator's cap (every site in all 4 rounds) leaves room for the
    # round it sees twice; at 0.75 this seed's cohorts (3, 4, 4, 4 sites) fill it, and the
    # resumed run refuses round 4 (test_privacy_runs: ..._against_the_aggregator).
    config = client_level_config("distributed", "plain", rounds=4, fraction=0.5,
                                 privacy__target_quantile=0.5, privacy__count_noise=2.0,
                                 privacy__clip_norm=0.5)
    local, runtime, _ = local_run(config)
    run_dir = tmp_path / "run"
    save = rundir.RunWriter.save_checkpoint

    def die_at_round_3(self: rundir.RunWriter, round_number: int, *args: Any) -> None:
        if round_number == 3:  # round 3's spend is in the ledger, its checkpoint is not
            raise AggregatorDied
        save(self, round_number, *args)

    monkeypatch.setattr(rundir.RunWriter, "save_checkpoint", die_at_round_3)
    with pytest.raises(AggregatorDied):
        run_simulation(config, n_sites=4, run_dir=run_dir)
    monkeypatch.setattr(rundir.RunWriter, "save_checkpoint", save)
    spends = [json.loads(line) for line in (run_dir / LEDGER_FILE).read_text().splitlines()]
    assert [s["round"] for s in spends if s.get("party") == FEDERATION] == [1, 2, 3]

    resumed = run_simulation(config, n_sites=4, run_dir=run_dir)
    assert [r.round for r in resumed.reports] == [3, 4]
    assert torch.allclose(resumed.params, local, atol=1e-6, rtol=0)
    assert ledger_rounds(run_dir, 4) == [1, 2, 3, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert runtime.privacy is not None and runtime.ledger is not None
    uninterrupted = runtime.privacy.guarantee(runtime.ledger)
    assert summary["privacy"]["epsilon"] == pytest.approx(uninterrupted["epsilon"], rel=1e-12)
    # The aggregator read round 3's noised payloads twice: counted against it (issue 14.3.3).
    assert summary["privacy"]["discarded_rounds"] == [3]
    assert summary["privacy"]["epsilon_against_aggregator"] > \
        uninterrupted["epsilon_against_aggregator"]


# ----------------------------------------------------------------------------- refusals
def site_node(config: RunConfig, partition: int = 0, **settings: Any) -> SiteNode:
    return SiteNode(config, NodeSettings(partition=partition, **settings))


@pytest.mark.slow
def test_a_site_tells_the_client_level_settings_it_calibrated_and_they_match() -> None:
    config = client_level_config("distributed", privacy__dropout_tolerance=1)
    node = site_node(config, partition=2)
    told = node.hello().site_privacy
    assert told is not None and told["noise"] == "distributed"
    ours = build_site_level_plan(config, SITES).site
    assert ours is not None
    assert SitePrivacy(**told) == ours
    check_client_level(node.name, told, ours)  # no error


def test_the_aggregator_refuses_a_site_that_would_noise_otherwise() -> None:
    told = site_node(client_level_config("distributed")).hello().site_privacy
    ours = build_site_level_plan(client_level_config("central"), SITES).site
    assert ours is not None
    with pytest.raises(ConfigError, match="would clip and noise its update"):
        check_client_level("cleveland", told, ours)
    with pytest.raises(ProtocolError, match="has not told its client-level DP settings"):
        check_client_level("cleveland", None, ours)


def test_adaptive_clipping_with_a_site_that_counts_other_sites_says_set_count_noise() -> None:
    config = client_level_config(privacy__target_quantile=0.5, privacy__noise_multiplier=0.2)
    told = site_node(config).hello().site_privacy
    assert told is not None
    ours = build_site_level_plan(config, [*SITES, "fifth"]).site  # K = 5 at the aggregator
    assert ours is not None
    with pytest.raises(ConfigError, match=r"set privacy\.count_noise explicitly"):
        check_client_level("cleveland", told, ours)
    # With the count noise set, K no longer matters to what the site adds.
    config.privacy.count_noise = 1.0
    told = site_node(config).hello().site_privacy
    ours = build_site_level_plan(config, [*SITES, "fifth"]).site
    assert ours is not None
    check_client_level("cleveland", told, ours)


def test_a_site_with_a_lower_epsilon_cap_refuses_client_level_dp() -> None:
    with pytest.raises(BudgetExceeded, match="caps one job at epsilon 1"):
        site_node(client_level_config(), epsilon_cap=1.0).hello()  # privacy.epsilon is 4
    assert site_node(client_level_config(), epsilon_cap=4.0).hello().site_privacy is not None


def test_per_site_caps_are_refused_under_client_level_dp() -> None:
    config = client_level_config(privacy__site_epsilon={"cleveland": 1.0})
    with pytest.raises(ConfigError, match="one budget for the federation"):
        build_site_level_plan(config, SITES)


# ----------------------------------------------------------------------------- calibration
@pytest.mark.slow
@pytest.mark.parametrize("level", ["record", "site"])
def test_a_site_calibrates_once_per_run_not_once_per_message(
        level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SuperNode answers each message in a new process: the node state carries the
    noise multipliers, so the accountant (1-5 s a calibration) is asked only once."""
    from flwr.app import RecordDict

    from fedcare.privacy import plan
    from fedcare.runtime import flower_client

    config = client_level_config("distributed")
    config.privacy.level = level
    settings = NodeSettings.from_node_config({"partition-id": 1})
    state = RecordDict()

    def new_process() -> SiteNode:
        monkeypatch.setattr(plan, "_CALIBRATED", {})
        monkeypatch.setattr(flower_client, "_NODES", {})
        flower_client.recall_calibrations(state)
        node = flower_client.site_node(config, settings)
        flower_client.keep_calibrations(state)
        return node

    first = new_process()
    assert flower_client.CALIBRATIONS in state.config_records

    def no_accountant(**kwargs: Any) -> float:
        raise AssertionError(f"calibrated again: {kwargs}")

    monkeypatch.setattr(plan, "noise_multiplier", no_accountant)
    assert new_process().hello() == first.hello()


def test_an_unreadable_calibration_record_is_refused_naming_it() -> None:
    from flwr.app import ConfigRecord, RecordDict

    from fedcare.runtime import flower_client

    state = RecordDict({flower_client.CALIBRATIONS: ConfigRecord({"entries": "[[1, 2]]"})})
    with pytest.raises(ProtocolError, match="fedcare-calibrations"):
        flower_client.recall_calibrations(state)
