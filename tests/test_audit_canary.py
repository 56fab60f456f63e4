"""The one-run canary audit: Steinke et al.'s bound, the canaries, the verdict, real runs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import logit
from scipy.stats import binom

from fedcare.audit import canary
from fedcare.audit.canary import (
    CanaryAuditResult,
    audit_canaries,
    count_correct,
    epsilon_lower_bound,
    guess_candidates,
    make_canaries,
    one_run_bound,
    p_value,
)
from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.errors import ConfigError, DataError


# --------------------------------------------------------------------------- the bound
def p_value_by_the_theorem(eps: float, delta: float, m: int, r: int, v: int) -> float:
    """Steinke et al.'s (epsilon, delta) bound written out term by term (max over i = 1..m)."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(k: int) -> float:  # P[Binomial(r, q) >= k]
        return float(binom.sf(k - 1, r, q))

    worst = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(1.0, f(v) + 2 * m * delta * worst)


@pytest.mark.parametrize(("eps", "delta", "m", "r", "v"), [
    (0.0, 0.0, 100, 50, 25), (1.0, 0.0, 100, 50, 40), (1.0, 1e-5, 100, 50, 40),
    (2.0, 1e-3, 200, 100, 95), (0.5, 1e-2, 50, 20, 20), (3.0, 1e-5, 1000, 100, 100),
    (1.0, 1e-5, 100, 50, 0),
])
def test_p_value_is_the_theorem(eps: float, delta: float, m: int, r: int, v: int) -> None:
    assert p_value(epsilon=eps, delta=delta, n_canaries=m, n_guesses=r, n_correct=v) == \
        pytest.approx(p_value_by_the_theorem(eps, delta, m, r, v), rel=1e-9, abs=1e-300)


def test_pure_dp_bound_has_a_closed_form_when_every_guess_is_right() -> None:
    # delta = 0, v = r: p = q^r, so the bound solves q^r = 1 - confidence.
    for r in (10, 50, 100, 1000):
        expected = logit(0.05 ** (1 / r))
        got = epsilon_lower_bound(n_canaries=r, n_guesses=r, n_correct=r, delta=0.0,
                                  confidence=0.95)
        assert got == pytest.approx(expected, abs=2e-6)


def test_chance_level_guessing_certifies_nothing() -> None:
    for r in (10, 100, 1000):
        assert epsilon_lower_bound(n_canaries=r, n_guesses=r, n_correct=r // 2,
                                   delta=1e-5) == 0.0
        # a few lucky guesses above chance are still nothing at 95%
        lucky = r // 2 + int(math.sqrt(r) / 2)
        assert epsilon_lower_bound(n_canaries=r, n_guesses=r, n_correct=lucky,
                                   delta=1e-5) < 0.1


def test_bound_grows_with_the_number_of_right_guesses() -> None:
    bounds = [epsilon_lower_bound(n_canaries=1000, n_guesses=r, n_correct=r, delta=1e-5)
              for r in (10, 20, 50, 100, 200, 500)]
    assert bounds[0] > 0
    assert all(a < b for a, b in itertools.pairwise(bounds))
    # all of r = 500 right: just below the pure-DP value logit(0.05^(1/500)) = 5.11
    # (delta = 1e-5 with m = 1000 forgives a little)
    assert 4.9 < bounds[-1] < logit(0.05 ** (1 / 500))


def test_bound_is_monotone_in_confidence_and_delta() -> None:
    counts = {"n_canaries": 1000, "n_guesses": 200, "n_correct": 180}
    by_confidence = [epsilon_lower_bound(**counts, delta=1e-5, confidence=c)
                     for c in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)]
    assert all(a > b for a, b in itertools.pairwise(by_confidence))
    by_delta = [epsilon_lower_bound(**counts, delta=d) for d in (0.0, 1e-6, 1e-5, 1e-4)]
    assert all(a >= b for a, b in itertools.pairwise(by_delta))
    assert by_delta[0] > by_delta[-1]


@pytest.mark.parametrize(("counts", "message"), [
    ({"n_canaries": 10, "n_guesses": 12, "n_correct": 5}, "guesses <= canaries"),
    ({"n_canaries": 10, "n_guesses": 4, "n_correct": 5}, "5 correct of 4 guesses"),
    ({"n_canaries": 10, "n_guesses": 0, "n_correct": 0}, "guesses >= 1"),
])
def test_impossible_counts_are_refused(counts: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        epsilon_lower_bound(**counts, delta=1e-5)


@pytest.mark.parametrize(("settings", "message"), [
    ({"delta": 1.0}, "delta must be in"), ({"delta": -1e-5}, "delta must be in"),
    ({"confidence": 1.0}, "confidence must be in"), ({"confidence": 0.0}, "confidence"),
])
def test_bad_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        epsilon_lower_bound(n_canaries=10, n_guesses=10, n_correct=10,
                            **{"delta": 1e-5, **settings})


# --------------------------------------------------------------------------- guesses
def test_guesses_take_the_top_as_in_and_the_bottom_as_out() -> None:
    included = np.array([True, False, True, False, True, False])
    scores = np.array([5.0, 0.0, 4.0, 1.0, 2.0, 3.0])
    # top 2: canaries 0, 2 (IN, IN); bottom 2: 1, 3 (OUT, OUT)
    assert count_correct(scores, included, 4) == 4
    assert count_correct(-scores, included, 4) == 0
    # top 3 (0, 2, 5) has one wrong; bottom 3 (1, 3, 4) has one wrong
    assert count_correct(scores, included, 6) == 4


def test_guess_candidates_are_even_and_within_the_canaries() -> None:
    assert guess_candidates(100) == (10, 20, 50, 100)
    assert guess_candidates(11) == (2, 6, 10)
    assert guess_candidates(2) == (2,)
    with pytest.raises(DataError, match="at least 2 canaries"):
        guess_candidates(1)


def test_one_run_bound_on_perfectly_separated_scores() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + rng.random(1000) * 0.5  # every IN above every OUT
    bound = one_run_bound(scores, included, delta=1e-5, confidence=0.95)
    assert bound.n_canaries == 1000 and bound.n_correct == bound.n_guesses
    assert len(bound.candidates) == 4
    # Bonferroni over 4 candidates: each tested at 98.75%, so no better than the best
    # candidate alone at 95% and no worse than it at 98.75%.
    best = bound.n_guesses
    alone = epsilon_lower_bound(n_canaries=1000, n_guesses=best, n_correct=best, delta=1e-5)
    strict = epsilon_lower_bound(n_canaries=1000, n_guesses=best, n_correct=best, delta=1e-5,
                                 confidence=1 - 0.05 / 4)
    assert strict == pytest.approx(bound.epsilon) and bound.epsilon < alone
    fixed = one_run_bound(scores, included, delta=1e-5, n_guesses=best)
    assert fixed.epsilon == pytest.approx(alone) and len(fixed.candidates) == 1


def test_one_run_bound_on_random_scores_is_about_zero() -> None:
    rng = np.random.default_rng(1)
    bound = one_run_bound(rng.normal(size=1000), rng.random(1000) < 0.5, delta=1e-5)
    assert bound.epsilon < 0.1


@pytest.mark.parametrize(("scores", "included", "error", "message"), [
    ([0.1, float("nan"), 0.3], [True, False, True], DataError, "index 1 is nan"),
    ([0.1, 0.2], [True, False, True], DataError, "one coin per canary"),
    ([0.1], [True], DataError, "at least 2 canaries"),
    ([0.1, 0.2], [3, 0], DataError, "boolean"),
])
def test_bad_canary_scores_are_refused(scores: Any, included: Any, error: type[Exception],
                                       message: str) -> None:
    with pytest.raises(error, match=message):
        one_run_bound(scores, included, delta=1e-5)


# --------------------------------------------------------------------------- verdict
def test_a_bound_above_the_claimed_epsilon_is_flagged_as_a_failure() -> None:
    # Counts that imply a higher epsilon than claimed: 1,000 canaries, every one of 400
    # guesses right, is epsilon >= 4.8 at 95% (an accountant claiming 1 must be wrong).
    included = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    scores = included.astype(float)
    bound = one_run_bound(scores, included, delta=1e-5, n_guesses=400)
    assert bound.epsilon > 4.8
    claimed_one = CanaryAuditResult(bound=bound, accountant_epsilon=1.0)
    assert claimed_one.failed and claimed_one.verdict.startswith("FAILED")
    assert claimed_one.to_dict()["failed"] is True
    honest = CanaryAuditResult(bound=bound, accountant_epsilon=8.0)
    assert not honest.failed and honest.verdict.startswith("Consistent")
    no_claim = CanaryAuditResult(bound=bound, accountant_epsilon=math.inf)
    assert not no_claim.failed and no_claim.to_dict()["accountant_epsilon"] == "inf"


# --------------------------------------------------------------------------- canaries
def small_config(**values: Any) -> RunConfig:
    c = RunConfig()
    c.baselines.enabled = False
    settings = {"data.dataset": "breast-cancer", "data.partition": "iid", "data.sites": 2,
                "model.name": "mlp", "model.hidden": [128, 128], "federation.rounds": 30,
                "federation.local_epochs": 10, "federation.lr": 0.2,
                "federation.batch_size": 32, **values}
    for key, value in settings.items():
        c.set_value(key, value)
    return c


def test_flipped_canaries_replace_their_originals_at_one_site() -> None:
    data = build_federation(small_config().data)
    canaries = make_canaries(data, n_canaries=40, seed=3)
    site = next(s for s in data.sites if s.name == canaries.site)
    assert site.n_train == max(s.n_train for s in data.sites)  # the largest by default
    np.testing.assert_array_equal(canaries.y.numpy(),
                                  1 - site.y_train[torch.from_numpy(canaries.source_rows)].numpy())
    planted = canaries.insert(data)
    after = next(s for s in planted.sites if s.name == canaries.site)
    n_in = int(canaries.included.sum())
    assert 10 < n_in < 30
    assert after.n_train == site.n_train - 40 + n_in
    # the included canaries are there with the flipped label, their originals are gone
    rows = {(tuple(x.tolist()), float(y)) for x, y in zip(after.x_train, after.y_train,
                                                          strict=True)}
    for x, y, inside in zip(canaries.x, canaries.y, canaries.included, strict=True):
        assert ((tuple(x.tolist()), float(y)) in rows) == inside
        assert (tuple(x.tolist()), 1 - float(y)) not in rows
    others = [s for s in planted.sites if s.name != canaries.site]
    assert all(o.n_train == s.n_train for o, s in zip(
        others, [s for s in data.sites if s.name != canaries.site], strict=True))
    again = make_canaries(data, n_canaries=40, seed=3)
    np.testing.assert_array_equal(again.included, canaries.included)


def test_ood_canaries_sit_at_corners_of_the_site_box() -> None:
    data = build_federation(small_config().data)
    canaries = make_canaries(data, n_canaries=30, site="site-1", kind="ood", seed=0)
    x = data.sites[1].x_train
    low, high = x.min(dim=0).values, x.max(dim=0).values
    assert ((canaries.x == low) | (canaries.x == high)).all()
    assert set(canaries.y.tolist()) == {0.0, 1.0} and len(canaries.source_rows) == 0


def test_canary_settings_are_checked() -> None:
    data = build_federation(small_config().data)
    with pytest.raises(ConfigError, match="not in the federation; the sites are"):
        make_canaries(data, n_canaries=10, site="cleveland")
    with pytest.raises(ConfigError, match="kind must be one of"):
        make_canaries(data, n_canaries=10, kind="poison")
    with pytest.raises(DataError, match="must keep at least one ordinary row"):
        make_canaries(data, n_canaries=1000)


# --------------------------------------------------------------------------- real runs
def audit(c: RunConfig, **kwargs: Any) -> CanaryAuditResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # privacy.secure = false warns
        return audit_canaries(c, **kwargs)


def test_an_overfitted_model_gives_a_positive_lower_bound() -> None:
    result = audit(small_config(), n_canaries=100, seed=0)
    assert result.canary_auc > 0.8
    assert result.epsilon_lower_bound > 0.5
    assert result.accountant_epsilon == math.inf and not result.failed
    assert result.privacy is None and result.verdict.startswith("No DP claim")
    record = json.loads(json.dumps(result.to_dict()))
    assert record["bound"]["n_canaries"] == 100 and record["site"] == result.site


def test_a_run_whose_privacy_claim_is_false_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug planted: the run trains without any noise, but its accounting claims
    # epsilon = 0.3 for every site (as if a DP setting were silently dropped).
    honest = canary.train_release

    def claims_too_little(config: RunConfig, data: Any) -> Any:
        release = honest(config, data)
        claim = {"level": "record", "epsilon": 0.3, "delta": 1e-5,
                 "epsilon_per_site": {s.name: 0.3 for s in data.sites}}
        return dataclasses.replace(release, privacy=claim)

    monkeypatch.setattr(canary, "train_release", claims_too_little)
    result = audit(small_config(), n_canaries=100, seed=0)
    assert result.accountant_epsilon == 0.3 < result.epsilon_lower_bound
    assert result.failed and result.to_dict()["verdict"].startswith("FAILED")


@pytest.mark.slow
def test_record_level_dp_gives_no_lower_bound_and_passes() -> None:
    c = small_config(**{"privacy.level": "record", "privacy.epsilon": 1.0,
                        "federation.rounds": 5, "federation.local_epochs": 2,
                        "federation.lr": 0.5, "federation.batch_size": 64,
                        "privacy.secure": False})
    result = audit(c, n_canaries=100, seed=0)
    site_epsilon = result.privacy["epsilon_per_site"][result.site]  # type: ignore[index]
    assert result.accountant_epsilon == site_epsilon and 0.9 < site_epsilon <= 1 + 1e-9
    assert result.epsilon_lower_bound < 0.3 and not result.failed
    assert abs(result.canary_auc - 0.5) < 0.2
