"""`binary_metrics` checked against scikit-learn's reference implementations; the confusion
matrix, bootstrap intervals, chance verdict and odds ratios of issue 22."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics

from fedcare.evaluation import (
    INTERVAL_METRICS,
    METRICS,
    binary_metrics,
    bootstrap_intervals,
    chance_reason,
    logistic_covariance,
    odds_ratios,
    pooled_details,
    threshold_metrics,
)
from fedcare.seeding import BOOTSTRAP, derive_seed


def sklearn_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    z = logits.to(torch.float64).numpy()
    y = labels.to(torch.float64).numpy().astype(int)
    p = 1 / (1 + np.exp(-z))
    predicted = (p >= 0.5).astype(int)
    return {
        "accuracy": metrics.accuracy_score(y, predicted),
        "roc_auc": metrics.roc_auc_score(y, z),
        "balanced_accuracy": metrics.balanced_accuracy_score(y, predicted),
        "brier": metrics.brier_score_loss(y, p),
        "log_loss": metrics.log_loss(y, p, labels=[0, 1]),
    }


def assert_matches_sklearn(logits: torch.Tensor, labels: torch.Tensor) -> None:
    ours = binary_metrics(logits, labels)
    reference = sklearn_metrics(logits, labels)
    assert ours["n"] == len(labels)
    for name in METRICS:
        assert ours[name] == pytest.approx(reference[name], rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_data(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(200, generator=generator) < 0.3).float()
    logits = 2 * labels - 1 + 1.5 * torch.randn(200, generator=generator)

    assert_matches_sklearn(logits, labels)


def test_matches_sklearn_with_many_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(300, generator=generator) < 0.5).float()
    # five distinct logits only, one of them exactly 0 (probability 0.5)
    logits = torch.randint(-2, 3, (300,), generator=generator).float()

    assert_matches_sklearn(logits, labels)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-6, 6), st.booleans()), min_size=2, max_size=40)
       .filter(lambda rows: len({label for _, label in rows}) == 2))
def test_matches_sklearn_for_any_tied_sample(rows: list[tuple[int, bool]]) -> None:
    logits = torch.tensor([z / 2 for z, _ in rows], dtype=torch.float32)
    labels = torch.tensor([float(label) for _, label in rows])

    assert_matches_sklearn(logits, labels)


def test_probability_one_half_counts_as_positive() -> None:
    result = binary_metrics(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))

    assert result["accuracy"] == 0.5
    assert result["roc_auc"] == 0.5  # a tie between the only positive and the only negative
    assert result["brier"] == pytest.approx(0.25)
    assert result["log_loss"] == pytest.approx(math.log(2))


def test_perfect_and_reversed_rankings() -> None:
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])

    assert binary_metrics(torch.tensor([-3.0, -1.0, 1.0, 3.0]), labels)["roc_auc"] == 1.0
    assert binary_metrics(torch.tensor([3.0, 1.0, -1.0, -3.0]), labels)["roc_auc"] == 0.0


def test_confident_mistakes_do_not_overflow_the_log_loss() -> None:
    result = binary_metrics(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 1.0]))

    assert result["log_loss"] == pytest.approx(100.0)
    assert result["accuracy"] == 0.0
    assert result["brier"] == pytest.approx(1.0)


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_one_class_gives_nan_auc_and_balanced_accuracy(label: float) -> None:
    logits = torch.tensor([-1.0, 0.5, 2.0])
    labels = torch.full((3,), label)

    result = binary_metrics(logits, labels)

    assert math.isnan(result["roc_auc"])
    assert math.isnan(result["balanced_accuracy"])
    expected_accuracy = 2 / 3 if label == 1.0 else 1 / 3
    assert result["accuracy"] == pytest.approx(expected_accuracy)
    p = 1 / (1 + np.exp(-logits.double().numpy()))
    assert result["brier"] == pytest.approx(float(np.mean((p - label) ** 2)))
    assert result["log_loss"] == pytest.approx(
        metrics.log_loss(labels.numpy().astype(int), p, labels=[0, 1]))
    assert result["n"] == 3


def test_no_rows_gives_nan_everywhere_and_n_0() -> None:
    result = binary_metrics(torch.empty(0), torch.empty(0))

    assert result["n"] == 0
    assert set(result) == {*METRICS, "n"}
    assert all(math.isnan(result[name]) for name in METRICS)


def test_values_are_plain_floats() -> None:
    result = binary_metrics(torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.0]))

    assert all(type(result[name]) is float for name in METRICS)
    assert type(result["n"]) is int


# ------------------------------------------------ threshold, intervals, chance (issue 22)
def test_the_confusion_matrix_and_its_rates_match_sklearn() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = (torch.rand(300, generator=generator) < 0.4).float()
    logits = labels - 0.5 + torch.randn(300, generator=generator)
    counts = threshold_metrics(logits, labels)
    predicted = (1 / (1 + np.exp(-logits.double().numpy())) >= 0.5).astype(int)
    tn, fp, fn, tp = metrics.confusion_matrix(labels.numpy().astype(int), predicted).ravel()
    assert (counts["true_positives"], counts["false_positives"], counts["true_negatives"],
            counts["false_negatives"]) == (tp, fp, tn, fn)
    assert counts["threshold"] == 0.5
    assert counts["sensitivity"] == pytest.approx(metrics.recall_score(labels, predicted))
    assert counts["specificity"] == pytest.approx(tn / (tn + fp))
    assert counts["ppv"] == pytest.approx(metrics.precision_score(labels, predicted))
    assert counts["npv"] == pytest.approx(tn / (tn + fn))


def test_bootstrap_intervals_are_percentiles_of_the_metrics_on_each_resample() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = (torch.rand(80, generator=generator) < 0.5).float()
    logits = torch.randint(-3, 4, (80,), generator=generator).float() + labels  # many ties
    ours = bootstrap_intervals(logits, labels, seed=7, resamples=200)
    # The same draws, each resample evaluated the slow way.
    draws = np.random.default_rng(derive_seed(7, BOOTSTRAP)).integers(0, 80, size=(200, 80))
    per_resample: dict[str, list[float]] = {m: [] for m in INTERVAL_METRICS}
    for rows in draws:
        index = torch.from_numpy(rows)
        point = binary_metrics(logits[index], labels[index]) | threshold_metrics(
            logits[index], labels[index])
        for m in INTERVAL_METRICS:
            per_resample[m].append(point[m])
    for m in INTERVAL_METRICS:
        values = np.array(per_resample[m])
        values = values[np.isfinite(values)]
        assert ours[m] == pytest.approx([np.percentile(values, 2.5),
                                         np.percentile(values, 97.5)], abs=1e-12), m
    assert ours["resamples"] == 200 and ours["level"] == 0.95


def test_bootstrap_intervals_are_seeded_and_contain_the_estimate() -> None:
    generator = torch.Generator().manual_seed(2)
    labels = (torch.rand(250, generator=generator) < 0.5).float()
    logits = 2 * labels - 1 + 1.5 * torch.randn(250, generator=generator)
    first = bootstrap_intervals(logits, labels, seed=0)
    assert first == bootstrap_intervals(logits, labels, seed=0)
    assert first != bootstrap_intervals(logits, labels, seed=1)
    point = binary_metrics(logits, labels) | threshold_metrics(logits, labels)
    for m in INTERVAL_METRICS:
        low, high = first[m]
        assert low < point[m] < high, m


def test_a_constant_model_is_no_better_than_chance() -> None:
    labels = torch.tensor([0.0, 1.0] * 20)
    logits = torch.full((40,), -2.0)  # every patient negative: accuracy 0.5, AUC 0.5
    pooled = binary_metrics(logits, labels)
    counts = threshold_metrics(logits, labels)
    reason = chance_reason(pooled, counts, bootstrap_intervals(logits, labels, seed=0))
    assert "every patient is predicted negative" in reason
    assert "balanced accuracy 0.500" in reason and "includes 0.5" in reason


def test_a_random_ranking_is_flagged_by_its_auc_interval_alone() -> None:
    generator = torch.Generator().manual_seed(4)
    labels = (torch.rand(60, generator=generator) < 0.5).float()
    logits = torch.randn(60, generator=generator)  # unrelated to the labels
    intervals = bootstrap_intervals(logits, labels, seed=0)
    assert intervals["roc_auc"][0] < 0.5 < intervals["roc_auc"][1]
    assert "includes 0.5" in chance_reason({"balanced_accuracy": 0.9}, None, intervals)


def test_a_good_model_is_not_flagged() -> None:
    generator = torch.Generator().manual_seed(5)
    labels = (torch.rand(200, generator=generator) < 0.5).float()
    logits = 4 * (labels - 0.5) + torch.randn(200, generator=generator)
    details = pooled_details(logits, labels, seed=0)
    assert details["chance"] is None
    assert chance_reason({"balanced_accuracy": math.nan}) == ""  # one class: no verdict


def test_odds_ratios_per_unit_and_against_the_reference_category() -> None:
    schema = {"numeric": {"columns": ["age", "sex"]},
              "categorical": {"cp": ["1", "2", "3"]},
              "labels": {"sex": {"0": "female", "1": "male"}, "cp": {"1": "typical"}}}
    names = ["age", "sex", "cp=1", "cp=2", "cp=3"]  # no drop_first: only differences count
    params = torch.tensor([0.5, 0.2, 0.3, 1.3, -0.7, 9.0])  # weights, then the bias
    standardization = {"a": {"mean": [50.0, 0.5], "std": [10.0, 0.5]},
                       "b": {"mean": [50.0, 0.5], "std": [10.0, 0.5]}}
    rows = {(r["feature"], r["per"]): r["odds_ratio"] for r in
            odds_ratios(params, names, schema, standardization, "bounds")}
    assert rows[("age", "half the public range (10)")] == pytest.approx(math.exp(0.5))
    assert rows[("sex", "1 (male) vs 0 (female)")] == pytest.approx(math.exp(0.2 / 0.5))
    assert rows[("cp = 2", "vs cp = 1 (typical)")] == pytest.approx(math.exp(1.0))
    assert rows[("cp = 3", "vs cp = 1 (typical)")] == pytest.approx(math.exp(-1.0))
    assert len(rows) == 5  # no ratio for the bias, none for the reference category
    # Wald intervals: the variance of a contrast with the reference category's weight
    covariance = np.diag([0.04, 0.01, 0.09, 0.16, 0.25, 1.0])
    covariance[2, 3] = covariance[3, 2] = 0.05
    with_intervals = {(r["feature"], r["per"]): r for r in
                      odds_ratios(params, names, schema, standardization, "bounds",
                                  covariance.tolist())}
    cp2 = with_intervals[("cp = 2", "vs cp = 1 (typical)")]
    half = 1.959964 * math.sqrt(0.09 + 0.16 - 2 * 0.05)
    assert (cp2["low"], cp2["high"]) == pytest.approx((math.exp(1.0 - half), math.exp(1.0 + half)))
    sex = with_intervals[("sex", "1 (male) vs 0 (female)")]
    assert sex["high"] == pytest.approx(math.exp((0.2 + 1.959964 * 0.1) / 0.5))


def test_the_covariance_is_the_inverse_hessian_of_the_log_likelihood_summed_over_sites() -> None:
    generator = torch.Generator().manual_seed(6)
    sites = [torch.randn(n, 3, generator=generator, dtype=torch.float64) for n in (40, 25)]
    params = torch.tensor([0.5, -1.0, 0.2, 0.1], dtype=torch.float64)
    labels = [(torch.rand(len(x), generator=generator) < 0.5).double() for x in sites]

    def negative_log_likelihood(w: torch.Tensor) -> torch.Tensor:
        x, y = torch.cat(sites), torch.cat(labels)
        z = x @ w[:3] + w[3]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")

    hessian = torch.autograd.functional.hessian(negative_log_likelihood, params)
    assert logistic_covariance(params, sites) == pytest.approx(
        np.linalg.inv(hessian.numpy()), rel=1e-9, abs=1e-12)
