"""Simulated sites from one cohort: every row placed once, deterministically under a seed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.data.partition import (
    Partition,
    assign_rows,
    check_nonempty,
    site_proportions,
)
from fedcare.errors import ConfigError, DataError

SCHEMES = [Partition.IID, Partition.DIRICHLET, Partition.QUANTITY]

labels_strategy = st.integers(min_value=1, max_value=3).flatmap(
    lambda n_classes: st.tuples(
        st.just(n_classes),
        st.lists(st.integers(min_value=0, max_value=n_classes - 1), min_size=0, max_size=300),
    ))


def partition(scheme: Partition, labels: np.ndarray, n_classes: int, n_sites: int,
              alpha: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    proportions = site_proportions(scheme, n_sites, n_classes, alpha, rng)
    return assign_rows(labels, proportions, rng)


@settings(max_examples=50, deadline=None)
@given(
    data=labels_strategy,
    scheme=st.sampled_from(SCHEMES),
    n_sites=st.integers(min_value=1, max_value=12),
    alpha=st.floats(min_value=0.05, max_value=10.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_every_row_goes_to_exactly_one_site(data: tuple[int, list[int]], scheme: Partition,
                                            n_sites: int, alpha: float, seed: int) -> None:
    n_classes, label_list = data
    labels = np.array(label_list, dtype=np.int64)

    parts = partition(scheme, labels, n_classes, n_sites, alpha, seed)

    assert len(parts) == n_sites
    placed = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(placed), np.arange(len(labels)))
    for part in parts:
        np.testing.assert_array_equal(part, np.sort(part))


@settings(max_examples=50, deadline=None)
@given(
    data=labels_strategy,
    n_sites=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_iid_site_sizes_differ_by_at_most_one_per_class(data: tuple[int, list[int]],
                                                       n_sites: int, seed: int) -> None:
    n_classes, label_list = data
    labels = np.array(label_list, dtype=np.int64)

    parts = partition(Partition.IID, labels, n_classes, n_sites, 0.5, seed)

    for k in range(n_classes):
        per_site = [int((labels[part] == k).sum()) for part in parts]
        assert sum(per_site) == int((labels == k).sum())
        assert max(per_site) - min(per_site) <= 1


@settings(max_examples=50, deadline=None)
@given(
    data=labels_strategy,
    scheme=st.sampled_from(SCHEMES),
    n_sites=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_same_seed_gives_same_partition(data: tuple[int, list[int]], scheme: Partition,
                                        n_sites: int, seed: int) -> None:
    n_classes, label_list = data
    labels = np.array(label_list, dtype=np.int64)

    first = partition(scheme, labels, n_classes, n_sites, 0.5, seed)
    second = partition(scheme, labels, n_classes, n_sites, 0.5, seed)

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_another_seed_gives_another_partition(scheme: Partition) -> None:
    labels = np.arange(400) % 2

    first = partition(scheme, labels, 2, 5, 0.5, seed=0)
    second = partition(scheme, labels, 2, 5, 0.5, seed=1)

    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@settings(max_examples=50, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n_sites=st.integers(min_value=1, max_value=12),
    n_classes=st.integers(min_value=1, max_value=4),
    alpha=st.floats(min_value=0.05, max_value=10.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_proportions_of_each_class_sum_to_one(scheme: Partition, n_sites: int, n_classes: int,
                                              alpha: float, seed: int) -> None:
    proportions = site_proportions(scheme, n_sites, n_classes, alpha,
                                   np.random.default_rng(seed))

    assert proportions.shape == (n_sites, n_classes)
    assert (proportions >= 0).all()
    np.testing.assert_allclose(proportions.sum(axis=0), 1.0)


def test_quantity_partition_keeps_class_balance_per_site() -> None:
    proportions = site_proportions(Partition.QUANTITY, 6, 3, 0.5, np.random.default_rng(0))

    for column in proportions.T[1:]:
        np.testing.assert_array_equal(column, proportions[:, 0])


@pytest.mark.parametrize(
    ("scheme", "n_sites", "alpha", "match"),
    [(Partition.IID, 0, 0.5, "data.sites must be >= 1"),
     (Partition.DIRICHLET, 3, 0.0, "data.alpha must be > 0"),
     (Partition.QUANTITY, 3, -1.0, "data.alpha must be > 0"),
     (Partition.NATURAL, 3, 0.5, "natural sites")],
    ids=["no-sites", "dirichlet-zero-alpha", "quantity-negative-alpha", "natural"],
)
def test_site_proportions_refuses_bad_settings(scheme: Partition, n_sites: int, alpha: float,
                                               match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        site_proportions(scheme, n_sites, 2, alpha, np.random.default_rng(0))


def test_check_nonempty_names_empty_sites() -> None:
    parts = [np.array([0, 1]), np.array([], dtype=np.int64), np.array([2]),
             np.array([], dtype=np.int64)]
    names = ["site-0", "site-1", "site-2", "site-3"]

    with pytest.raises(DataError) as excinfo:
        check_nonempty(parts, names, Partition.DIRICHLET, alpha=0.1)

    message = str(excinfo.value)
    assert "['site-1', 'site-3']" in message
    assert "site-0" not in message
    assert "(2 of 4 sites)" in message
    assert "alpha=0.1" in message


def test_check_nonempty_lists_at_most_five_names() -> None:
    parts = [np.array([], dtype=np.int64)] * 7 + [np.arange(3)]
    names = [f"site-{i}" for i in range(8)]

    with pytest.raises(DataError) as excinfo:
        check_nonempty(parts, names, Partition.IID, alpha=0.5)

    message = str(excinfo.value)
    assert "'site-4']..." in message
    assert "site-5" not in message
    assert "(7 of 8 sites)" in message
    assert "alpha" not in message


def test_check_nonempty_accepts_sites_with_rows() -> None:
    check_nonempty([np.array([0]), np.array([1, 2])], ["a", "b"], Partition.IID, alpha=0.5)


def test_dirichlet_over_many_sites_leaves_no_site_empty() -> None:
    # The README's example: alpha 0.5 over 1,000 sites of about 80,000 training rows.
    labels = np.repeat([0, 1], [40_000, 40_000])
    rng = np.random.default_rng(0)
    proportions = site_proportions(Partition.DIRICHLET, 1000, 2, 0.5, rng)
    # The draw rounds some sites to no row at all: the case this test is about.
    assert ((proportions * 40_000).round().sum(axis=1) == 0).any()

    parts = assign_rows(labels, proportions, rng)

    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert sizes.max() > 50 * np.median(sizes) or sizes.std() > np.median(sizes)  # still skewed


def test_fewer_rows_than_sites_still_leaves_sites_empty_for_check_nonempty() -> None:
    labels = np.array([0, 1, 0])
    proportions = site_proportions(Partition.IID, 5, 2, 0.5, np.random.default_rng(0))

    parts = assign_rows(labels, proportions, np.random.default_rng(0))

    assert sum(len(p) == 0 for p in parts) >= 2  # 3 rows cannot fill 5 sites
    with pytest.raises(DataError, match="received no training rows"):
        check_nonempty(parts, [f"s{i}" for i in range(5)], Partition.IID, 0.5)
