"""The aggregator's round (selection, weighted mean, failures, quorum) and the site's payload."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.config import ModelConfig
from fedcare.data.site_data import SiteData
from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.federation.aggregator import Aggregator, RoundReport
from fedcare.federation.site import FitInstructions, FitResult, Site
from fedcare.federation.strategy import FedAvg, FedProx, Strategy
from fedcare.federation.training import LocalTrainer, TrainingPlan
from fedcare.models import FlatModel, ParamSpec, build_model
from fedcare.privacy.ledger import LedgerEntry, PrivacyLedger
from fedcare.privacy.plan import AGGREGATOR, FEDERATION
from fedcare.privacy.site_level import SitePrivacy
from fedcare.protection import PlainSum
from fedcare.seeding import LOCAL_TRAINING, torch_generator

SPEC = ParamSpec(("layer.weight", "layer.bias"), ((4,), (1,)))  # 5 values
PLAN = TrainingPlan(epochs=1, batch_size=8, lr=0.1)


# ----------------------------------------------------------------- fakes
class FakeSite:
    """A site that returns a fixed update ``delta`` weighted by ``n``, and records its calls."""

    def __init__(self, name: str, delta: torch.Tensor, n: int, loss: float = 0.5) -> None:
        self._name = name
        self.delta = delta
        self.n = n
        self.loss = loss
        self.calls: list[tuple[torch.Tensor, FitInstructions]] = []
        self.sent: list[torch.Tensor] = []

    @property
    def name(self) -> str:
        return self._name

    def payload(self) -> torch.Tensor:
        return torch.cat([self.delta * self.n, torch.tensor([float(self.n)])])

    def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        self.calls.append((global_params.clone(), instructions))
        payload = self.payload()
        self.sent.append(payload)
        return FitResult(self.name, payload, self.n, self.loss)


class NaNSite(FakeSite):
    def payload(self) -> torch.Tensor:
        payload = super().payload()
        payload[3] = math.nan
        return payload


class InfWeightSite(FakeSite):
    def payload(self) -> torch.Tensor:
        payload = super().payload()
        payload[-1] = math.inf
        return payload


class ShortPayloadSite(FakeSite):
    def payload(self) -> torch.Tensor:
        return super().payload()[:-2]


class ZeroWeightSite(FakeSite):
    def payload(self) -> torch.Tensor:
        return torch.cat([self.delta, torch.tensor([0.0])])


class RaisingSite(FakeSite):
    def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        self.calls.append((global_params.clone(), instructions))
        raise ProtocolError(f"site {self.name!r}: connection reset")


class SpyStrategy(Strategy):
    """FedAvg that records every argument it is given."""

    name = "spy"

    def __init__(self, proximal_mu: float = 0.0) -> None:
        self.proximal_mu = proximal_mu
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def apply(self, params: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        self.seen.append((params.clone(), update.clone()))
        return params + update


def deltas(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SPEC.size, generator=generator) for _ in range(count)]


def weighted_mean(sites: list[FakeSite]) -> torch.Tensor:
    total = sum(s.n for s in sites)
    return sum((s.n * s.delta for s in sites), torch.zeros(SPEC.size)) / total


def aggregator(strategy: Strategy | None = None, **kwargs: float) -> Aggregator:
    return Aggregator(strategy or SpyStrategy(), SPEC, PLAN, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------- weighted mean
def test_round_applies_the_weighted_mean_of_the_updates() -> None:
    d = deltas(3)
    sites = [FakeSite("a", d[0], 10, loss=1.0), FakeSite("b", d[1], 30, loss=2.0),
             FakeSite("c", d[2], 60, loss=4.0)]
    spy = SpyStrategy()
    params = torch.ones(SPEC.size)

    new, report = aggregator(spy).run_round(1, sites, params)

    expected = (10 * d[0] + 30 * d[1] + 60 * d[2]) / 100
    torch.testing.assert_close(new, params + expected)
    assert len(spy.seen) == 1
    torch.testing.assert_close(spy.seen[0][1], expected)
    assert report == RoundReport(1, ["a", "b", "c"], ["a", "b", "c"], {},
                                 pytest.approx((10 * 1 + 30 * 2 + 60 * 4) / 100), 100,
                                 received=report.received)
    # what arrived, for the audit log: one payload of SPEC.size + 1 values from each site
    assert list(report.received) == ["a", "b", "c"]
    sizes = {size for size, _ in report.received.values()}
    assert sizes == {(SPEC.size + 1) * params.element_size()}
    assert len({digest for _, digest in report.received.values()}) == 3


def test_every_site_gets_the_global_params_and_the_round_instructions() -> None:
    sites = [FakeSite(n, d, 5) for n, d in zip("abc", deltas(3), strict=True)]
    params = torch.arange(SPEC.size, dtype=torch.float32)

    aggregator(FedProx(mu=0.25)).run_round(4, sites, params)

    assert torch.equal(params, torch.arange(SPEC.size, dtype=torch.float32))
    for site in sites:
        (given, instructions), = site.calls
        assert torch.equal(given, params)
        assert instructions.round == 4
        # the aggregator passes the strategy's proximal term to local training
        assert instructions.plan == TrainingPlan(1, 8, 0.1, 0.0, proximal_mu=0.25)


def test_aggregation_does_not_alter_what_sites_sent() -> None:
    sites = [FakeSite(n, d, 3 + i) for i, (n, d) in enumerate(zip("abc", deltas(3), strict=True))]

    aggregator().run_round(1, sites, torch.zeros(SPEC.size))

    for site in sites:
        assert torch.equal(site.sent[0], site.payload())


def test_plain_protection_sums_without_aliasing() -> None:
    plain = PlainSum()
    first, second = torch.ones(3), torch.full((3,), 2.0)
    session = plain.aggregator_session(1, [0, 1], 3)
    assert session.setup(lambda messages: {}) == [0, 1]

    session.add(0, plain.site_session(1, 0).protect(first))
    session.add(1, plain.site_session(1, 1).protect(second))

    assert torch.equal(session.reveal(lambda messages: {}), torch.full((3,), 3.0))
    assert torch.equal(first, torch.ones(3))
    assert plain.site_session(1, 0).protect(first) is first


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
       failing=st.lists(st.booleans(), min_size=8, max_size=8),
       seed=st.integers(0, 2**16))
def test_aggregate_is_the_weighted_mean_of_the_usable_updates(sizes: list[int],
                                                              failing: list[bool],
                                                              seed: int) -> None:
    d = deltas(len(sizes), seed=seed)
    sites = [(RaisingSite if failing[i] else FakeSite)(f"s{i}", d[i], n)
             for i, n in enumerate(sizes)]
    good = [s for s in sites if type(s) is FakeSite]
    spy = SpyStrategy()
    agg = aggregator(spy)

    if not good:
        with pytest.raises(QuorumError):
            agg.run_round(1, sites, torch.zeros(SPEC.size))
        return
    _, report = agg.run_round(1, sites, torch.zeros(SPEC.size))

    assert report.participants == [s.name for s in good]
    assert sorted(report.failures) == sorted(s.name for s in sites if s not in good)
    assert report.n_examples == sum(s.n for s in good)
    torch.testing.assert_close(spy.seen[0][1], weighted_mean(good), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- selection
@pytest.mark.parametrize(("n_sites", "fraction", "min_sites", "expected"), [
    (10, 0.3, 1, 3), (10, 0.25, 1, 3), (10, 0.1, 1, 1), (10, 0.1, 4, 4), (7, 0.5, 2, 4),
    (100, 0.1, 1, 10), (5, 1.0, 1, 5), (5, 0.01, 5, 5),
])
def test_selection_size_is_max_of_quorum_and_fraction(n_sites: int, fraction: float,
                                                      min_sites: int, expected: int) -> None:
    agg = aggregator(fraction=fraction, min_sites=min_sites, seed=3)

    for round_number in (1, 2, 3):
        chosen = agg.select(n_sites, round_number)
        assert len(chosen) == expected == max(min_sites, math.ceil(fraction * n_sites))
        assert chosen == sorted(set(chosen))
        assert all(0 <= i < n_sites for i in chosen)


def test_selection_size_is_exact_for_decimal_fractions() -> None:
    agg = aggregator(fraction=0.07, min_sites=1, seed=0)

    assert len(agg.select(100, 1)) == 7


def test_selection_is_reproducible_and_varies_by_round_and_seed() -> None:
    agg = aggregator(fraction=0.3, seed=11)
    again = aggregator(fraction=0.3, seed=11)
    other_seed = aggregator(fraction=0.3, seed=12)

    rounds = [agg.select(20, r) for r in range(1, 11)]

    assert rounds == [again.select(20, r) for r in range(1, 11)]
    assert len({tuple(r) for r in rounds}) > 1
    assert rounds != [other_seed.select(20, r) for r in range(1, 11)]


def test_only_selected_sites_are_asked_to_fit() -> None:
    sites = [FakeSite(f"s{i}", d, 4) for i, d in enumerate(deltas(10))]
    agg = aggregator(fraction=0.3, seed=5)

    _, report = agg.run_round(2, sites, torch.zeros(SPEC.size))

    chosen = [f"s{i}" for i in agg.select(10, 2)]
    assert report.selected == report.participants == chosen
    assert [s.name for s in sites if s.calls] == chosen


def test_fewer_sites_than_the_quorum_is_refused_up_front() -> None:
    with pytest.raises(QuorumError, match=r"3 site\(s\) but federation.min_sites is 4"):
        aggregator(min_sites=4).select(3, 1)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"fraction": 0.0}, "federation.fraction"), ({"fraction": 1.5}, "federation.fraction"),
    ({"min_sites": 0}, "federation.min_sites"),
])
def test_constructor_refuses_bad_settings(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        aggregator(**kwargs)


# ----------------------------------------------------------------- failures and quorum
@pytest.mark.parametrize(("bad", "reason"), [
    (NaNSite, r"payload value 3 \(layer.weight\[3\]\) is nan; expected a finite number"),
    (InfWeightSite, r"payload value 5 \(weight\) is inf"),
    (ShortPayloadSite, r"payload of shape \(4,\); expected 6 values"),
    (ZeroWeightSite, r"aggregation weight 0.0; expected a positive row count"),
    (RaisingSite, r"connection reset"),
])
def test_a_bad_site_is_left_out_and_named(bad: type[FakeSite], reason: str) -> None:
    d = deltas(3)
    good = [FakeSite("a", d[0], 10), FakeSite("c", d[2], 30)]
    sites = [good[0], bad("b", d[1], 1000), good[1]]
    spy = SpyStrategy()
    params = torch.zeros(SPEC.size)

    new, report = aggregator(spy, min_sites=2).run_round(3, sites, params)

    assert report.selected == ["a", "b", "c"]
    assert report.participants == ["a", "c"]
    assert set(report.failures) == {"b"}
    assert "'b'" in report.failures["b"]
    assert re.search(reason, report.failures["b"]), report.failures["b"]
    assert report.n_examples == 40
    torch.testing.assert_close(new, weighted_mean(good))
    assert len(spy.seen) == 1


def test_below_quorum_raises_naming_round_site_and_min_sites() -> None:
    d = deltas(3)
    sites = [FakeSite("alpha", d[0], 10), RaisingSite("bravo", d[1], 10),
             NaNSite("charlie", d[2], 10)]
    spy = SpyStrategy()

    with pytest.raises(QuorumError) as excinfo:
        aggregator(spy, min_sites=2).run_round(7, sites, torch.zeros(SPEC.size))

    message = str(excinfo.value)
    assert "Round 7" in message
    assert "1 of 3" in message
    assert "federation.min_sites = 2" in message
    assert "bravo: site 'bravo': connection reset" in message
    assert "charlie" in message
    assert "round 6 is kept" in message
    assert spy.seen == []


def test_no_usable_update_at_all_is_a_quorum_error_even_with_min_sites_1() -> None:
    sites = [RaisingSite("a", deltas(1)[0], 3)]

    with pytest.raises(QuorumError, match=r"Round 1: 0 of 1"):
        aggregator(min_sites=1).run_round(1, sites, torch.zeros(SPEC.size))


def test_a_non_fedcare_exception_is_not_swallowed() -> None:
    class Broken(FakeSite):
        def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult:
            raise RuntimeError("bug in site code")

    with pytest.raises(RuntimeError, match="bug in site code"):
        aggregator().run_round(1, [Broken("a", deltas(1)[0], 3)], torch.zeros(SPEC.size))


# ----------------------------------------------------------------- fit loop
def test_strategy_only_ever_receives_one_aggregate_per_round() -> None:
    sites = [FakeSite(n, d, 2 + i) for i, (n, d) in enumerate(zip("abcd", deltas(4), strict=True))]
    spy = SpyStrategy()
    seen_rounds: list[RoundReport] = []
    seen_params: list[torch.Tensor] = []

    final = aggregator(spy).fit(sites, torch.zeros(SPEC.size), 3,
                                lambda p, r: (seen_params.append(p), seen_rounds.append(r)))

    assert len(spy.seen) == 3
    for params, update in spy.seen:
        assert params.shape == update.shape == (SPEC.size,)
        torch.testing.assert_close(update, weighted_mean(sites))
    assert [r.round for r in seen_rounds] == [1, 2, 3]
    assert torch.equal(seen_params[-1], final)
    torch.testing.assert_close(final, 3 * weighted_mean(sites))
    # the params a round starts from are the previous round's result
    assert torch.equal(spy.seen[1][0], seen_params[0])


def test_fit_runs_rounds_from_1_and_refuses_zero_rounds() -> None:
    sites = [FakeSite("a", deltas(1)[0], 3)]
    agg = aggregator()

    agg.fit(sites, torch.zeros(SPEC.size), 3)

    assert [c[1].round for c in sites[0].calls] == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"federation.rounds must be >= 1; got 0"):
        agg.fit(sites, torch.zeros(SPEC.size), 0)


# ----------------------------------------------------------------- real sites
N_FEATURES = 6


def site_data(name: str, n: int, seed: int, scale: float = 1.0) -> SiteData:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 10, N_FEATURES, generator=generator) * scale
    y = (x[:, 0] + 0.5 * torch.randn(n + 10, generator=generator) > 0).float()
    return SiteData(name, x[:n], y[:n], x[n:], y[n:])


def real_sites(config: ModelConfig, sizes: dict[str, int],
               seed: int = 0) -> tuple[FlatModel, list[Site]]:
    model = FlatModel(build_model(config, N_FEATURES))
    trainer = LocalTrainer(model)
    sites = [Site(site_data(name, n, seed=i), trainer, index=i, seed=seed, protection=PlainSum())
             for i, (name, n) in enumerate(sizes.items())]
    return model, sites


def test_site_payload_is_n_times_delta_then_n() -> None:
    model, (site,) = real_sites(ModelConfig("logreg"), {"north": 37})
    start = model.init_params(torch.Generator().manual_seed(0))
    plan = TrainingPlan(epochs=2, batch_size=8, lr=0.2)

    result = site.fit(start, FitInstructions(3, plan))

    reference, loss = LocalTrainer(FlatModel(build_model(ModelConfig("logreg"), N_FEATURES))).train(
        site.data.x_train, site.data.y_train, start, plan, torch_generator(0, LOCAL_TRAINING, 3, 0))
    assert result.site == "north"
    assert result.n_examples == 37
    assert result.train_loss == loss
    assert result.payload.shape == (model.spec.size + 1,)
    assert float(result.payload[-1]) == 37.0
    torch.testing.assert_close(result.payload[:-1], 37 * (reference - start))
    assert torch.equal(start, model.init_params(torch.Generator().manual_seed(0)))


def test_diverging_site_raises_protocol_error_naming_it() -> None:
    model, (site,) = real_sites(ModelConfig("mlp", [8]), {"far-away": 40})
    start = model.init_params(torch.Generator().manual_seed(0))

    with pytest.raises(ProtocolError, match=r"site 'far-away', round 2: local training diverged"):
        site.fit(start, FitInstructions(2, TrainingPlan(epochs=1, batch_size=8, lr=1e30)))


def test_diverging_site_is_dropped_from_the_round_and_the_rest_average() -> None:
    config = ModelConfig("logreg")
    model, sites = real_sites(config, {"a": 30, "b": 50, "c": 20})
    # Site b's records are off by many orders of magnitude, so its SGD overflows.
    sites[1] = Site(site_data("b", 50, seed=1, scale=1e20), sites[0].trainer, index=1, seed=0,
                    protection=PlainSum())
    start = model.init_params(torch.Generator().manual_seed(0))
    plan = TrainingPlan(epochs=1, batch_size=8, lr=1e20)
    agg = Aggregator(FedAvg(), model.spec, plan, min_sites=2)

    new, report = agg.run_round(1, sites, start)

    assert report.participants == ["a", "c"]
    assert "diverged" in report.failures["b"]
    payloads = [s.fit(start, FitInstructions(1, plan)).payload for s in (sites[0], sites[2])]
    expected = start + (payloads[0] + payloads[1])[:-1] / 50
    torch.testing.assert_close(new, expected)


def test_real_sites_round_equals_mean_of_local_models() -> None:
    config = ModelConfig("mlp", [5])
    model, sites = real_sites(config, {"a": 24, "b": 40, "c": 16}, seed=9)
    start = model.init_params(torch.Generator().manual_seed(1))
    agg = Aggregator(FedAvg(), model.spec, TrainingPlan(epochs=2, batch_size=8, lr=0.1), seed=9)

    new, report = agg.run_round(1, sites, start)

    locals_ = []
    for site in sites:
        trained, _ = LocalTrainer(FlatModel(build_model(config, N_FEATURES))).train(
            site.data.x_train, site.data.y_train, start, agg.plan,
            torch_generator(9, LOCAL_TRAINING, 1, site.index))
        locals_.append(trained)
    expected = (24 * locals_[0] + 40 * locals_[1] + 16 * locals_[2]) / 80
    torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-6)
    assert report.n_examples == 80



# ----------------------------------------------------------------- client-level DP
class DPSite(FakeSite):
    """A site of a client-level DP run: sends ``delta`` and a count slot of 1."""

    def payload(self) -> torch.Tensor:
        return torch.cat([self.delta, torch.tensor([1.0])])

    def planned_spend(self, round_number: int, plan: TrainingPlan) -> list[LedgerEntry]:
        return []

    def exchange(self, round_number: int, message: object) -> object:
        raise ProtocolError("plain protection exchanges no messages")


class FailingDPSite(DPSite):
    def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        raise ProtocolError(f"site {self.name!r}: connection reset")


def dp_aggregator(spy: Strategy, *, noise: str = "central", sample_rate: float = 1.0,
                  n_sites: int = 2, clip_norm: float = 1e39) -> Aggregator:
    import warnings

    from fedcare.privacy.noise import SeededNoise

    def noise_for(round_number: int, party: int) -> SeededNoise:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SeededNoise(round_number * 7 + party % 5)

    site_privacy = SitePrivacy(clip_norm, 1.0, sample_rate, n_sites, noise)
    ledger = PrivacyLedger(None, delta=1e-5, accountant="pld", caps={})
    return Aggregator(spy, SPEC, PLAN, site_privacy=site_privacy, ledger=ledger,
                      noise_for=noise_for)


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_a_revealed_sum_is_charged_even_when_the_round_is_then_refused(noise: str) -> None:
    # Issue 14.3.1: two finite payloads whose float32 sum overflows. The sum was revealed
    # (it is checked after), so the round is in the ledger although no model comes of it;
    # before, the spend was recorded only once the update was computed.
    big = torch.full((SPEC.size,), 3e38)
    sites = [DPSite("alpha", big, 1), DPSite("bravo", big, 1)]
    spy = SpyStrategy()
    agg = dp_aggregator(spy, noise=noise)
    with pytest.raises(ProtocolError, match="non-finite"):
        agg.run_round(1, sites, torch.zeros(SPEC.size))
    assert agg.ledger is not None
    assert [e.round for e in agg.ledger.entries(FEDERATION)] == [1]
    assert len(agg.ledger.entries(AGGREGATOR)) == (1 if noise == "distributed" else 0)
    assert spy.seen == []


def test_an_empty_cohort_is_a_noise_only_round_nobody_is_asked() -> None:
    # Issue 14.3.5: q so small that nobody is drawn. The round is released from noise on a
    # zero sum, charged, and the strategy applies it; no site is asked anything.
    sites = [DPSite(name, torch.ones(SPEC.size), 1) for name in ("alpha", "bravo")]
    spy = SpyStrategy()
    agg = dp_aggregator(spy, sample_rate=1e-6, n_sites=2, clip_norm=0.5)
    params, report = agg.run_round(1, sites, torch.zeros(SPEC.size))
    assert report.empty and report.selected == [] and report.participants == []
    assert all(s.calls == [] for s in sites)
    assert len(spy.seen) == 1 and torch.isfinite(params).all() and params.abs().sum() > 0
    assert agg.ledger is not None
    assert [e.round for e in agg.ledger.entries(FEDERATION)] == [1]
    assert agg.ledger.entries(AGGREGATOR) == []


def test_below_quorum_under_client_level_dp_is_a_noise_only_round() -> None:
    # min_sites = 2 and one of two sites fails: without DP a QuorumError (above); with
    # client-level DP the round is released from noise alone, not from the one update.
    d = deltas(2)
    sites = [DPSite("alpha", d[0], 1), FailingDPSite("bravo", d[1], 1)]
    spy = SpyStrategy()
    agg = dp_aggregator(spy)
    agg.min_sites = 2
    again = dp_aggregator(SpyStrategy())
    again.min_sites = 2
    alone = [DPSite("alpha", torch.zeros(SPEC.size), 1), FailingDPSite("bravo", d[1], 1)]
    params, report = agg.run_round(3, sites, torch.zeros(SPEC.size))
    reference, _ = again.run_round(3, alone, torch.zeros(SPEC.size))
    assert report.empty and report.participants == [] and "bravo" in report.failures
    # The same noise on a zero sum whatever alpha sent: its update is not in the result.
    assert torch.equal(params, reference)
