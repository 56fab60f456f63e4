"""`binary_metrics` checked against scikit-learn's reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics

from fedcare.evaluation import METRICS, binary_metrics


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
