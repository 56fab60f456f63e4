"""From site tables to tensors: stratified split, imputation, federated standardisation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.data.loaders import SiteTable
from fedcare.data.preprocess import (
    Standardize,
    federated_mean_std,
    impute,
    keyed_split,
    prepare_sites,
    resolve_standardize,
    split_key,
    split_rows,
)
from fedcare.data.schema import Schema
from fedcare.errors import ConfigError, DataError, SchemaError

NAN = np.nan
SCHEMA = Schema(numeric=("age", "chol"), categorical={"cp": ("1", "2", "3")}, target="y",
                positive=("1",), negative=("0",))


def site_table(name: str, numeric: list[list[float]], categorical: list[list[int]],
               target: list[float] | None = None) -> SiteTable:
    n = len(numeric)
    return SiteTable(
        name=name,
        source=f"{name}.csv",
        rows=np.arange(n),
        lines=np.arange(n) + 2,
        numeric=np.array(numeric, dtype=np.float64).reshape(n, -1),
        categorical=np.array(categorical, dtype=np.int64).reshape(n, -1),
        target=np.array([i % 2 for i in range(n)] if target is None else target,
                        dtype=np.float64),
    )


def random_site(name: str, n: int, seed: int, shift: float) -> SiteTable:
    rng = np.random.default_rng(seed)
    numeric = rng.normal(loc=[50 + shift, 200 - 3 * shift], scale=[10, 40 + shift], size=(n, 2))
    categorical = rng.integers(0, 3, size=(n, 1))
    return site_table(name, numeric.tolist(), categorical.tolist())


# ------------------------------------------------------------------ split
@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(min_value=0, max_value=2), min_size=1, max_size=200),
    test_fraction=st.floats(min_value=0.0, max_value=0.9),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_split_rows_is_stratified_disjoint_and_complete(labels: list[int], test_fraction: float,
                                                        seed: int) -> None:
    y = np.array(labels, dtype=np.float64)

    train, test = split_rows(y, test_fraction, np.random.default_rng(seed))

    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    np.testing.assert_array_equal(train, np.sort(train))
    np.testing.assert_array_equal(test, np.sort(test))
    for k in np.unique(y):
        n_class = int((y == k).sum())
        expected = round(test_fraction * n_class) if n_class > 1 else 0
        assert int((y[test] == k).sum()) == expected


def test_split_rows_depends_on_the_seed_only() -> None:
    y = np.arange(100) % 2

    first = split_rows(y, 0.3, np.random.default_rng(7))
    again = split_rows(y, 0.3, np.random.default_rng(7))
    other = split_rows(y, 0.3, np.random.default_rng(8))

    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_split_rows_keeps_a_single_row_class_in_training() -> None:
    y = np.array([0, 0, 0, 0, 1])

    train, test = split_rows(y, 0.5, np.random.default_rng(0))

    assert 4 in train
    assert len(test) == 2


# ------------------------------------------------------------------ impute
def test_impute_fills_from_training_rows_only() -> None:
    train = site_table("a", [[50, 200], [NAN, 220], [70, NAN], [60, 240]],
                       [[1], [-1], [1], [0]])
    test = site_table("a", [[NAN, NAN], [10, 10]], [[-1], [2]])

    filled_train, filled_test = impute(train, [test], SCHEMA)

    np.testing.assert_allclose(filled_train.numeric,
                               [[50, 200], [60, 220], [70, 220], [60, 240]])
    np.testing.assert_array_equal(filled_train.categorical[:, 0], [1, 1, 1, 0])
    np.testing.assert_allclose(filled_test.numeric, [[60, 220], [10, 10]])
    np.testing.assert_array_equal(filled_test.categorical[:, 0], [1, 2])
    np.testing.assert_array_equal(filled_test.target, test.target)


def test_impute_breaks_mode_ties_with_the_lowest_code() -> None:
    train = site_table("a", [[1, 1]] * 5, [[2], [1], [2], [1], [-1]])

    (filled,) = impute(train, [], SCHEMA)

    assert filled.categorical[4, 0] == 1


def test_impute_refuses_column_missing_in_every_training_row() -> None:
    train = site_table("north", [[50, NAN], [60, NAN]], [[0], [1]])

    with pytest.raises(DataError) as excinfo:
        impute(train, [], SCHEMA)

    message = str(excinfo.value)
    assert "north.csv" in message
    assert "'chol'" in message
    assert "site 'north'" in message


# ------------------------------------------------------------------ standardise
def three_sites() -> list[tuple[SiteTable, SiteTable]]:
    splits = []
    for i, n in enumerate((40, 75, 13)):
        train = random_site(f"site-{i}", n, seed=i, shift=15.0 * i)
        test = random_site(f"site-{i}", 5, seed=100 + i, shift=15.0 * i)
        splits.append((train, test))
    return splits


def test_federated_standardisation_equals_pooled_statistics() -> None:
    splits = three_sites()
    pooled = np.concatenate([train.numeric for train, _ in splits])
    pooled_mean, pooled_std = pooled.mean(axis=0), pooled.std(axis=0)

    sites, stats = prepare_sites(splits, SCHEMA, Standardize.FEDERATED)

    x_train = torch.cat([s.x_train for s in sites]).double().numpy()[:, :2]
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(x_train, (pooled - pooled_mean) / pooled_std, atol=1e-5)
    for (_, test), site in zip(splits, sites, strict=True):
        np.testing.assert_allclose(site.x_test.numpy()[:, :2],
                                   (test.numeric - pooled_mean) / pooled_std, atol=1e-5)
    for name in ("site-0", "site-1", "site-2"):
        np.testing.assert_allclose(stats[name]["mean"], pooled_mean)
        np.testing.assert_allclose(stats[name]["std"], pooled_std)
    # The sites differ, so no single site is standardised to mean 0 on its own.
    assert abs(sites[2].x_train[:, 0].mean().item()) > 0.5


def test_federated_standardisation_uses_only_summed_contributions() -> None:
    splits = three_sites()
    received: list[list[np.ndarray]] = []

    def sum_vectors(vectors: Sequence[np.ndarray]) -> np.ndarray:
        received.append(list(vectors))
        return np.asarray(np.sum(received[-1], axis=0))

    prepare_sites(splits, SCHEMA, Standardize.FEDERATED, sum_vectors=sum_vectors)

    # Two summations: [n, sum x] per site, then sum (x - pooled mean)^2 per site.
    counts_and_sums, squares = received
    assert len(counts_and_sums) == len(squares) == 3
    trains = [train for train, _ in splits]
    pooled_mean = np.concatenate([t.numeric for t in trains]).mean(axis=0)
    for train, first, second in zip(trains, counts_and_sums, squares, strict=True):
        np.testing.assert_allclose(first, [len(train), *train.numeric.sum(axis=0)])
        np.testing.assert_allclose(second, ((train.numeric - pooled_mean) ** 2).sum(axis=0))


def test_site_standardisation_centres_each_site() -> None:
    splits = three_sites()

    sites, stats = prepare_sites(splits, SCHEMA, Standardize.SITE)

    for (train, _), site in zip(splits, sites, strict=True):
        x = site.x_train.double().numpy()[:, :2]
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-5)
        np.testing.assert_allclose(stats[site.name]["mean"], train.numeric.mean(axis=0))


def test_no_standardisation_keeps_values() -> None:
    splits = three_sites()

    sites, _ = prepare_sites(splits, SCHEMA, Standardize.NONE)

    np.testing.assert_allclose(sites[0].x_train.numpy()[:, :2], splits[0][0].numeric,
                               rtol=1e-6)


@pytest.mark.parametrize("standardize", [Standardize.SITE, Standardize.FEDERATED])
def test_constant_column_does_not_divide_by_zero(standardize: Standardize) -> None:
    splits = []
    for i in range(2):
        train = site_table(f"s{i}", [[63.3, 200.0 + 10 * j] for j in range(20)], [[0]] * 20)
        test = site_table(f"s{i}", [[63.3, 210.0], [70.0, 190.0]], [[1], [2]])
        splits.append((train, test))

    sites, stats = prepare_sites(splits, SCHEMA, standardize)

    for site in sites:
        assert torch.isfinite(site.x_train).all()
        assert torch.isfinite(site.x_test).all()
        np.testing.assert_allclose(site.x_train[:, 0].numpy(), 0.0, atol=1e-6)
        np.testing.assert_allclose(site.x_test[:, 0].numpy(), [0.0, 70.0 - 63.3], atol=1e-4)
        assert stats[site.name]["std"][0] == 1.0


def test_federated_mean_std_matches_numpy_on_pooled_rows() -> None:
    x = np.random.default_rng(3).normal(5.0, 2.0, size=(500, 3))
    tables = [site_table("a", x[:200].tolist(), [[0]] * 200),
              site_table("b", x[200:].tolist(), [[0]] * 300)]

    mean, std = federated_mean_std(tables, lambda vs: np.sum(vs, axis=0))

    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_allclose(std, x.std(axis=0))


@pytest.mark.parametrize("drop_first", [False, True])
def test_encoding_lays_out_inputs_as_the_schema_names_them(drop_first: bool) -> None:
    schema = Schema(numeric=("age", "chol"), categorical={"cp": ("1", "2", "3")}, target="y",
                    positive=("1",), negative=("0",), drop_first=drop_first)
    train = site_table("a", [[50, 200], [60, 220], [70, 240]], [[0], [2], [1]], [1, 0, 1])
    test = site_table("a", [[55, 210]], [[-1]], [0])

    (site,), _ = prepare_sites([(train, test)], schema, Standardize.NONE)

    assert site.x_train.shape == (3, schema.n_features)
    assert site.x_train.dtype == torch.float32
    onehot = [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    expected = [row[1:] if drop_first else row for row in onehot]
    np.testing.assert_array_equal(site.x_train[:, 2:].numpy(), expected)
    # The test row's missing category is imputed with the training mode (all tie: code 0).
    assert site.x_test[0, 2:].tolist() == ([0, 0] if drop_first else [1, 0, 0])
    np.testing.assert_array_equal(site.y_train.numpy(), [1, 0, 1])
    assert (site.n_train, site.n_test) == (3, 1)


# ------------------------------------------------------------------ private runs
BOUNDED = Schema(numeric=("age", "chol"), categorical={"cp": ("1", "2", "3")}, target="y",
                 positive=("1",), negative=("0",), bounds={"age": (20, 100), "chol": (100, 300)})


def test_bounds_scale_to_unit_range_and_clip_outliers() -> None:
    train = site_table("a", [[20, 100], [60, 200], [100, 300], [140, 50]], [[0], [1], [2], [0]])
    test = site_table("a", [[0, 1000]], [[1]])

    [site], stats = prepare_sites([(train, test)], BOUNDED, Standardize.BOUNDS)

    np.testing.assert_allclose(site.x_train.numpy()[:, :2],
                               [[-1, -1], [0, 0], [1, 1], [1, -1]])
    np.testing.assert_allclose(site.x_test.numpy()[:, :2], [[-1, 1]])
    assert stats["a"] == {"mean": [60.0, 200.0], "std": [40.0, 100.0]}


def test_private_preprocessing_ties_each_encoded_row_to_its_own_record_only() -> None:
    # DP-SGD's sensitivity counts one record changing one training row. Data-
    # dependent statistics (or imputation) would move every row with it.
    def encoded(standardize: Standardize, private: bool, age: float) -> torch.Tensor:
        train = site_table("a", [[age, 200], [50, NAN], [70, 240], [NAN, 150]],
                           [[0], [-1], [1], [2]])
        sites, _ = prepare_sites([(train, site_table("a", [[60, 180]], [[1]]))], BOUNDED,
                                 standardize, private=private)
        return sites[0].x_train

    private_rows = (encoded(Standardize.BOUNDS, True, 30) != encoded(Standardize.BOUNDS, True, 90))
    assert private_rows.any(dim=1).tolist() == [True, False, False, False]
    shared_rows = (encoded(Standardize.FEDERATED, False, 30)
                   != encoded(Standardize.FEDERATED, False, 90))
    assert shared_rows.any(dim=1).sum() >= 3  # the check above can fail


def test_private_imputation_uses_public_constants() -> None:
    train = site_table("a", [[NAN, 120], [90, NAN]], [[-1], [2]])
    test = site_table("a", [[NAN, NAN]], [[-1]])

    filled_train, filled_test = impute(train, [test], BOUNDED, public=True)

    np.testing.assert_allclose(filled_train.numeric, [[60, 120], [90, 200]])
    np.testing.assert_array_equal(filled_train.categorical[:, 0], [0, 2])
    np.testing.assert_allclose(filled_test.numeric, [[60, 200]])


def test_bounds_without_ranges_name_the_columns() -> None:
    splits = three_sites()
    with pytest.raises(SchemaError, match=r"\['age', 'chol'\] have none"):
        prepare_sites(splits, SCHEMA, Standardize.BOUNDS)


@pytest.mark.parametrize("method", [Standardize.FEDERATED, Standardize.SITE])
def test_private_run_refuses_data_dependent_statistics(method: Standardize) -> None:
    with pytest.raises(ConfigError, match="outside the differential privacy guarantee"):
        resolve_standardize(method, private=True)


def test_auto_standardisation_depends_on_privacy() -> None:
    assert resolve_standardize(Standardize.AUTO, private=True) is Standardize.BOUNDS
    assert resolve_standardize(Standardize.AUTO, private=False) is Standardize.FEDERATED
    assert resolve_standardize(Standardize.NONE, private=True) is Standardize.NONE


# ----------------------------------------------------------------------------- keyed split
@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(0, 10**6), min_size=1, max_size=200, unique=True),
       drop=st.integers(0, 199), test_fraction=st.floats(0.0, 0.9))
def test_a_keyed_split_decides_each_record_by_itself(rows: list[int], drop: int,
                                                     test_fraction: float) -> None:
    """Removing any other record (or changing its label: labels are not read) moves nobody."""
    key = split_key(3, "va")
    everyone = np.array(rows)
    train, test = keyed_split(everyone, test_fraction, key=key)
    assert sorted([*train, *test]) == list(range(len(rows)))
    held_out = set(everyone[test].tolist())
    fewer = np.delete(everyone, drop % len(rows))
    _, test_fewer = keyed_split(fewer, test_fraction, key=key)
    assert set(fewer[test_fewer].tolist()) == held_out - {int(everyone[drop % len(rows)])}


def test_a_keyed_split_holds_out_the_fraction_and_depends_on_the_key() -> None:
    rows = np.arange(20_000)
    _, test = keyed_split(rows, 0.34, key=split_key(0, "cleveland"))
    assert abs(len(test) / len(rows) - 0.34) < 0.015  # binomial: sd 0.0033
    _, other = keyed_split(rows, 0.34, key=split_key(1, "cleveland"))
    _, elsewhere = keyed_split(rows, 0.34, key=split_key(0, "va"))
    assert not np.array_equal(test, other) and not np.array_equal(test, elsewhere)
    assert len(keyed_split(rows, 0.0, key=split_key(0, "va"))[1]) == 0


def test_one_changed_label_moves_no_other_patient_in_a_private_run(tmp_path: Path) -> None:
    """The attack: under a stratified split, flipping one training label reshuffles the
    test set, so exact test metrics of a private model depend on that label."""
    from fedcare.config import DataConfig
    from fedcare.data.datasets import build_federation

    rng = np.random.default_rng(0)
    ages, labels = rng.integers(30, 80, 300), rng.integers(0, 2, 300)
    schema = tmp_path / "schema.toml"
    schema.write_text('target = "y"\npositive = ["1"]\nnegative = ["0"]\n'
                      '[numeric]\ncolumns = ["age"]\n'
                      "[categorical]\n[bounds]\nage = [0, 120]\n")

    def test_ages(flip: int | None, private: bool) -> list[tuple[int, float]]:
        flipped = labels.copy()
        if flip is not None:
            flipped[flip] = 1 - flipped[flip]
        folder = tmp_path / f"{flip}-{private}"
        folder.mkdir()
        (folder / "va.csv").write_text("age,y\n" + "".join(
            f"{a},{y}\n" for a, y in zip(ages, flipped, strict=True)))
        data = build_federation(DataConfig(data_dir=str(folder), schema=str(schema),
                                           standardize="none"), private=private)
        site = data.sites[0]
        return sorted(zip(site.x_test[:, 0].tolist(), site.y_test.tolist(), strict=True))

    for private in (False, True):
        before = test_ages(None, private)
        training_row = next(i for i in range(300) if (ages[i], labels[i]) not in
                            {(round(a), round(y)) for a, y in before})
        after = test_ages(training_row, private)
        moved = len(set(before) ^ set(after))
        if private:
            assert moved == 0
        else:
            assert moved > 10  # what the keyed split removes


def test_data_split_keyed_gives_a_run_without_dp_the_private_runs_test_patients() -> None:
    from fedcare.config import DataConfig
    from fedcare.data.datasets import build_federation

    private = build_federation(DataConfig(), private=True)
    keyed = build_federation(DataConfig(split="keyed"), private=False)
    stratified = build_federation(DataConfig(), private=False)
    assert [s.n_train for s in keyed.sites] == [s.n_train for s in private.sites]
    for a, b in zip(private.sites, keyed.sites, strict=True):
        assert torch.equal(a.y_test, b.y_test)
    assert [s.n_train for s in stratified.sites] != [s.n_train for s in private.sites]
    with pytest.raises(ConfigError, match=r"stratified.*refused in a private run"):
        build_federation(DataConfig(split="stratified"), private=True)
    with pytest.raises(ConfigError, match=r"data.split must be one of"):
        build_federation(DataConfig(split="random"))
