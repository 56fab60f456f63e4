"""Membership inference: metrics with known answers, the attacks, and audits of real runs."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from sklearn import metrics

from fedcare.audit.membership import (
    LiRA,
    MembershipAuditResult,
    NotFittedError,
    ThresholdAttack,
    audit_membership,
    log_likelihood,
    logit_margin,
    membership_masks,
    membership_metrics,
    roc_auc,
    tpr_at_fpr,
)
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError, FedcareError


# --------------------------------------------------------------------------- signals
def test_margin_is_the_logit_scaled_confidence_of_the_true_outcome() -> None:
    logits = torch.tensor([2.0, -3.0, 0.5], dtype=torch.float32)
    labels = torch.tensor([1.0, 1.0, 0.0])
    margin = logit_margin(logits, labels)
    assert margin.dtype == np.float64
    np.testing.assert_allclose(margin, [2.0, -3.0, -0.5])
    p = 1 / (1 + np.exp(-np.array([2.0, -3.0, 0.5])))
    p_true = np.where(labels.numpy() == 1, p, 1 - p)
    np.testing.assert_allclose(margin, np.log(p_true / (1 - p_true)), rtol=1e-12)
    np.testing.assert_allclose(log_likelihood(logits, labels), np.log(p_true), rtol=1e-12)


@pytest.mark.parametrize("logits", [[20.0, 30.0, 40.0], [110.0, 120.0, 130.0]])
def test_log_likelihood_keeps_confident_records_apart_where_float32_loss_ties(
        logits: list[float]) -> None:
    z, labels = torch.tensor(logits), torch.ones(3)
    # The ties the float64 scores avoid: the loss from a float32 probability is 0 past a
    # margin of about 17, and even torch's stable BCE with logits past about 104.
    from_probability = -torch.log(torch.sigmoid(z))
    from_logits = F.binary_cross_entropy_with_logits(z, labels, reduction="none")
    assert (from_probability == 0).all() and (z[0] < 100 or (from_logits == 0).all())
    ours = log_likelihood(z, labels)
    assert len(set(ours.tolist())) == 3 and (np.diff(ours) > 0).all()


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", range(4))
def test_auc_and_tpr_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    member = rng.random(400) < 0.4
    scores = np.round(rng.normal(size=400) + member, 1)  # many ties
    assert roc_auc(scores, member) == pytest.approx(metrics.roc_auc_score(member, scores),
                                                    abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(member, scores, drop_intermediate=False)
    for rate in (0.001, 0.01, 0.05, 0.2):
        assert tpr_at_fpr(scores, member, rate) == pytest.approx(tpr[fpr <= rate].max())


def test_tpr_at_fpr_by_hand() -> None:
    non_members = np.arange(100.0)  # 0..99
    members = np.r_[np.full(30, 100.5), np.full(20, 98.5), np.full(50, -1.0)]
    scores = np.r_[non_members, members]
    member = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    result = membership_metrics(scores, member, fprs=(0.01, 0.001))
    # no false positive: only the 30 above every non-member; one (99): 50 members
    assert result.tpr_at_fpr == {0.01: 0.5, 0.001: 0.3}
    assert (result.n_members, result.n_non_members) == (100, 100)
    assert result.fpr_resolution == 0.01


def test_metrics_on_gaussian_scores_have_the_known_answer() -> None:
    # members ~ N(d, 1), non-members ~ N(0, 1): AUC = Phi(d / sqrt 2) and
    # TPR at FPR a = 1 - Phi(z_{1-a} - d).
    rng = np.random.default_rng(0)
    d, n = 1.0, 200_000
    scores = np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)]
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    result = membership_metrics(scores, member)
    assert result.roc_auc == pytest.approx(norm.cdf(d / math.sqrt(2)), abs=0.003)
    for rate in (0.01, 0.001):
        expected = norm.sf(norm.isf(rate) - d)
        assert result.tpr_at_fpr[rate] == pytest.approx(expected, rel=0.08)


def test_perfect_and_useless_scores() -> None:
    member = np.r_[np.ones(5, bool), np.zeros(5, bool)]
    assert roc_auc(np.r_[np.ones(5), np.zeros(5)], member) == 1.0
    assert roc_auc(np.r_[np.zeros(5), np.ones(5)], member) == 0.0
    assert roc_auc(np.zeros(10), member) == 0.5
    assert tpr_at_fpr(np.zeros(10), member, 0.01) == 0.0  # a tie never splits


def test_result_serialises_the_counts_next_to_the_rates() -> None:
    member = np.r_[np.ones(3, bool), np.zeros(4, bool)]
    d = membership_metrics(np.arange(7.0)[::-1], member).to_dict()
    assert d["tpr_at_fpr"] == {"0.01": 1.0, "0.001": 1.0}
    assert d["n_members"] == 3 and d["n_non_members"] == 4 and d["fpr_resolution"] == 0.25


@pytest.mark.parametrize(("scores", "member", "message"), [
    ([0.1, 0.2, 0.3], [True, True, True], "no non-member"),
    ([0.1, 0.2, 0.3], [False, False, False], "no member"),
    ([0.1, float("nan"), 0.3], [True, False, True], "index 1 is nan"),
    ([0.1, float("inf")], [True, False], "index 1 is inf"),
    ([0.1, 0.2], [True, False, True], "one flag per score"),
    ([[0.1, 0.2]], [[True, False]], "one score per record"),
    ([0.1, 0.2], [2, 0], "boolean"),
])
def test_bad_scores_are_refused(scores: Any, member: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        membership_metrics(scores, member)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, float("nan")])
def test_fpr_out_of_range_is_refused(rate: float) -> None:
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        tpr_at_fpr([0.1, 0.2], [True, False], rate)


# --------------------------------------------------------------------------- attacks
def synthetic_world(n: int = 2000, n_models: int = 33, shift: float = 1.0, noise: float = 0.5,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Margins of models on records of varied difficulty; training on a record adds `shift`.

    A record's margin under any model is its own difficulty (spread 2), plus
    `shift` if the model trained on it, plus model noise: the setting where
    Carlini et al. show a per-record test beats a global threshold.
    """
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 2, n)
    masks = membership_masks([n], n_models, rng)
    margins = difficulty + shift * masks + rng.normal(0, noise, (n_models, n))
    labels = (rng.random(n) < 0.5).astype(np.float64)
    logits = np.where(labels == 1, margins, -margins)
    return logits, masks, labels


def test_lira_beats_a_global_threshold_when_records_differ_in_difficulty() -> None:
    logits, masks, labels = synthetic_world()
    target, refs = 0, slice(1, None)
    member = masks[target]
    threshold = ThresholdAttack("margin").fit(logits[refs][~masks[refs]],
                                              np.broadcast_to(labels, masks[refs].shape)
                                              [~masks[refs]])
    global_auc = threshold.score(logits[target], labels, member)
    online = LiRA().fit(logits[refs], masks[refs], labels)
    offline = LiRA(online=False).fit(logits[refs], masks[refs], labels)
    # Ideal per-record test: N(1, 0.5) vs N(0, 0.5) -> AUC = Phi(1 / (0.5 sqrt 2)) = 0.92
    ideal = norm.cdf(1 / (0.5 * math.sqrt(2)))
    assert online.score(logits[target], member) == pytest.approx(ideal, abs=0.03)
    assert offline.score(logits[target], member) == pytest.approx(ideal, abs=0.03)
    assert global_auc < 0.7  # difficulty (spread 2) drowns the shift of 1
    per_record = LiRA(variance="per_record").fit(logits[refs], masks[refs], labels)
    assert per_record.score(logits[target], member) == pytest.approx(ideal, abs=0.04)


def test_lira_threshold_is_calibrated_on_reference_non_members() -> None:
    logits, masks, labels = synthetic_world(n=4000)
    lira = LiRA(fpr=0.05).fit(logits[1:], masks[1:], labels)
    guessed = lira.predict(logits[0])
    false_positive_rate = guessed[~masks[0]].mean()
    assert 0.02 < false_positive_rate < 0.08
    assert guessed[masks[0]].mean() > 0.4


def test_threshold_attack_signals_rank_alike_and_predict_at_the_calibrated_rate() -> None:
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(0, 3, 5000), (rng.random(5000) < 0.5).astype(float)
    member = rng.random(5000) < 0.5
    loss = ThresholdAttack("loss", fpr=0.1).fit(logits[~member], labels[~member])
    margin = ThresholdAttack("margin", fpr=0.1).fit(logits[~member], labels[~member])
    assert loss.score(logits, labels, member) == pytest.approx(
        margin.score(logits, labels, member))
    assert margin.predict(logits, labels)[~member].mean() == pytest.approx(0.1, abs=0.002)


def test_attacks_must_be_fitted_first() -> None:
    with pytest.raises(NotFittedError, match="LiRA is not fitted"):
        LiRA().score_samples(np.zeros(3))
    with pytest.raises(NotFittedError, match="ThresholdAttack is not fitted"):
        ThresholdAttack().predict(np.zeros(3), np.zeros(3))
    assert issubclass(NotFittedError, FedcareError)


def test_attack_settings_are_checked_at_fit() -> None:
    logits, masks, labels = synthetic_world(n=50, n_models=5)
    LiRA(variance="per-record")  # __init__ only stores
    with pytest.raises(ConfigError, match="'variance' parameter of LiRA"):
        LiRA(variance="per-record").fit(logits, masks, labels)
    with pytest.raises(ConfigError, match="'signal' parameter of ThresholdAttack"):
        ThresholdAttack("confidence").fit(logits[0], labels)
    with pytest.raises(ConfigError, match="'fpr' parameter of LiRA"):
        LiRA(fpr=1.5).fit(logits, masks, labels)


def test_lira_names_a_record_without_reference_models_on_one_side() -> None:
    logits, masks, labels = synthetic_world(n=30, n_models=16)
    masks = masks.copy()
    masks[:, 7] = True  # record 7 is in every reference model: no OUT observation
    with pytest.raises(DataError, match="OUT of every record; record 7 has 0"):
        LiRA().fit(logits, masks, labels)
    masks[:, 7] = False  # in none: offline still works, online does not
    LiRA(online=False).fit(logits, masks, labels)
    with pytest.raises(DataError, match="IN of every record; record 7 has 0"):
        LiRA().fit(logits, masks, labels)


def test_lira_refuses_misshapen_or_non_finite_input() -> None:
    logits, masks, labels = synthetic_world(n=20, n_models=5)
    with pytest.raises(DataError, match="shape"):
        LiRA().fit(logits, masks[:, :10], labels)
    bad = logits.copy()
    bad[2, 3] = np.nan
    with pytest.raises(DataError, match=r"index \(2, 3\) is nan"):
        LiRA().fit(bad, masks, labels)
    with pytest.raises(DataError, match="0 or 1"):
        LiRA().fit(logits, masks, np.full(20, 2.0))
    lira = LiRA().fit(logits, masks, labels)
    with pytest.raises(DataError, match="20 records"):
        lira.score_samples(np.zeros(19))


def test_every_model_trains_on_half_of_each_site() -> None:
    sizes = [101, 40, 7]
    masks = membership_masks(sizes, 400, np.random.default_rng(0))
    assert masks.shape == (400, 148)
    for begin, end in ((0, 101), (101, 141), (141, 148)):
        assert (masks[:, begin:end].sum(axis=1) == (end - begin) // 2).all()
    # each record is in a model with probability n // 2 / n, independently across models
    assert abs(masks[:, :101].mean(axis=0) - 50 / 101).max() < 0.09
    assert abs(masks[:, 101:141].mean(axis=0) - 0.5).max() < 0.09
    with pytest.raises(DataError, match="1 row"):
        membership_masks([10, 1], 4, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="at least 2 models"):
        membership_masks([10], 1, np.random.default_rng(0))


# --------------------------------------------------------------------------- real runs
def overfit_config(**values: Any) -> RunConfig:
    """Breast cancer over 2 IID sites, a small MLP trained far past convergence."""
    c = RunConfig()
    c.baselines.enabled = False
    settings = {"data.dataset": "breast-cancer", "data.partition": "iid", "data.sites": 2,
                "model.name": "mlp", "model.hidden": [64, 64], "federation.rounds": 10,
                "federation.local_epochs": 10, "federation.lr": 0.5,
                "federation.batch_size": 32, **values}
    for key, value in settings.items():
        c.set_value(key, value)
    return c


def audit(c: RunConfig, **kwargs: Any) -> MembershipAuditResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # privacy.secure = false warns
        return audit_membership(c, **kwargs)


def test_lira_finds_members_of_an_overfitted_model() -> None:
    result = audit(overfit_config(), n_reference=8, seed=0)
    assert result.n_targets == 9 and result.n_records == 569
    lira = result.attacks["lira_online"]
    assert lira.n_members + lira.n_non_members + result.n_unscored == 9 * 569
    assert result.n_unscored < 9 * 569 * 0.02  # about 2^-7 of the records
    # Breast cancer generalises well (non-members 97% right), so even LiRA finds little:
    # 0.529-0.543 over seeds 0-5 (the loss threshold 0.50-0.52), against 0.48-0.51 at
    # epsilon 1 below. Deterministic for a seed; the margin is for other platforms.
    assert lira.roc_auc > 0.515
    assert result.accuracy["members"] > 0.99
    assert result.accountant_epsilon == math.inf and result.privacy is None
    assert json.loads(json.dumps(result.to_dict()))["accountant_epsilon"] == "inf"


@pytest.mark.slow
def test_lira_finds_nothing_under_record_level_dp_at_epsilon_1() -> None:
    c = overfit_config(**{"privacy.level": "record", "privacy.epsilon": 1.0,
                          "federation.rounds": 5, "federation.local_epochs": 2,
                          "federation.batch_size": 64, "privacy.secure": False})
    result = audit(c, n_reference=8, seed=0)
    assert result.privacy is not None and result.privacy["level"] == "record"
    assert 0.9 < result.accountant_epsilon <= 1.0 + 1e-9
    # LiRA AUC 0.479-0.513 over seeds 0-5 (online), 0.493-0.517 (offline). DP at epsilon 1
    # permits far more (an advantage of up to tanh(1/2) = 0.46), so "near 0.5" is what
    # this model shows, not what epsilon 1 guarantees. The loss threshold reached 0.525.
    for name in ("lira_online", "lira_offline"):
        assert abs(result.attacks[name].roc_auc - 0.5) < 0.035, name


def test_audit_settings_are_checked_before_training() -> None:
    with pytest.raises(ConfigError, match="n_reference must be >= 3"):
        audit_membership(overfit_config(), n_reference=2)
    with pytest.raises(ConfigError, match="n_targets"):
        audit_membership(overfit_config(), n_reference=4, n_targets=6)
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        audit_membership(overfit_config(), n_reference=4, fprs=(0.0,))
