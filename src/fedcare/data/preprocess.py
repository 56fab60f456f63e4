"""From validated site tables to model-ready tensors, without pooling raw rows.

Each site splits its own rows into train and test (seeded by its name and
``data.split_seed``: `site_rng`, `split_key`), imputes from its own training
rows, one-hot encodes with the shared vocabulary and standardises its numeric
columns, so a site prepared alone gets the tensors it gets among all sites.
Standardisation statistics are either the site's own (``site``) or federated
(``federated``): every site contributes sums of its training rows
(`federated_mean_std`: ``[n, sum x]``, then ``sum (x - mean)^2``), only their
totals are used, so the statistics equal those of the pooled training data
while no site reveals a row. The totals go through the run's protection
scheme, as model updates do (`fedcare.federation.summation`).

Those statistics are exact functions of every patient's values, shared and
stored in the model file; they also tie each training row to all the others,
which breaks DP-SGD's one-record sensitivity. A private run therefore uses
``bounds``: each value clipped to the schema's public range and scaled to
[-1, 1], missing values filled with public constants (the range's midpoint,
the vocabulary's first category). Nothing about the data is computed or
shared, at no cost in privacy budget. (A DP estimate of the statistics was
the alternative; at the bundled hospitals' 100-300 training rows, the noise
that ε ≈ 0.4 buys is a quarter of the count, for a result bounds give free.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
import torch

from fedcare.data.loaders import SiteTable
from fedcare.data.schema import Schema
from fedcare.data.site_data import SiteData
from fedcare.errors import ConfigError, DataError

SumVectors = Callable[[Sequence[np.ndarray]], np.ndarray]


class Standardize(StrEnum):
    SITE = "site"  #: each site uses the mean and std of its own training rows
    FEDERATED = "federated"  #: the pooled training mean and std, from summed moments
    BOUNDS = "bounds"  #: the schema's public ranges, scaled to [-1, 1] (private runs)
    NONE = "none"
    AUTO = "auto"  #: bounds with differential privacy, federated without


def resolve_standardize(standardize: Standardize, *, private: bool) -> Standardize:
    """The method a run uses; refuses data-dependent statistics in a private run."""
    if standardize is Standardize.AUTO:
        return Standardize.BOUNDS if private else Standardize.FEDERATED
    if private and standardize in (Standardize.FEDERATED, Standardize.SITE):
        raise ConfigError(
            f"data.standardize = {standardize.value!r} computes means and standard deviations "
            "from the patients' values and stores them in the model, outside the differential "
            "privacy guarantee (one patient's value can be read back from them). With privacy "
            "use \"bounds\" (the schema's public ranges; the default) or \"none\".")
    return standardize


def split_rows(labels: np.ndarray, test_fraction: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of row indices into (train, test), sorted.

    Each class contributes ``round(test_fraction * n_class)`` rows to the test
    set (none from a class with a single row), as scikit-learn's stratified
    splitter does up to rounding.
    """
    test: list[np.ndarray] = []
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        rng.shuffle(rows)
        n_test = round(test_fraction * len(rows)) if len(rows) > 1 else 0
        test.append(rows[:n_test])
    test_rows = np.sort(np.concatenate(test)) if test else np.array([], dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_rows] = False
    return np.flatnonzero(train_mask), test_rows


def keyed_split(rows: np.ndarray, test_fraction: float, *,
                key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (train, test), each record by a keyed hash of its own row number.

    A record is held out when ``BLAKE2b(key, row) / 2^64 < test_fraction``: its side
    depends on nothing but its own position in its site's source and the key, never on
    another record's label, value or presence. A stratified split (`split_rows`) does:
    flipping one training patient's label there moves other patients between train and
    test, so exact test metrics of a private model would reveal that label. The test set's
    size is binomial, not exactly ``test_fraction`` of the rows.

    Parameters
    ----------
    rows : ndarray of int
        Each record's row number in its source (`SiteTable.rows`).
    test_fraction : float
        Probability that a record is held out, in [0, 1).
    key : bytes
        Up to 64 bytes (`split_key`): the same key splits the same rows the same way
        wherever the site runs.
    """
    threshold = int(test_fraction * 2**64)
    test_mask = np.fromiter(
        (int.from_bytes(hashlib.blake2b(int(row).to_bytes(8, "little"), key=key,
                                        digest_size=8).digest(), "little") < threshold
         for row in rows), dtype=bool, count=len(rows))
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def split_key(split_seed: int, site: str) -> bytes:
    """The key of a site's `keyed_split`: its name and ``data.split_seed``, nothing else."""
    return hashlib.sha256(f"fedcare-split/{split_seed}/{site}".encode()).digest()


def site_rng(split_seed: int, site: str) -> np.random.Generator:
    """The generator of a site's stratified split (`split_rows`): its name and ``data.split_seed``.

    Keyed by the site's name, not its position among the sites, so a site that
    splits alone (a deployed node reading its own file) draws the same rows as
    the same site among all the others (``fedcare run --data-dir``), whatever
    files sit beside it. Not secret: the split is reproducible by design.
    """
    digest = hashlib.sha256(f"fedcare-stratified/{split_seed}/{site}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def impute(train: SiteTable, others: Sequence[SiteTable], schema: Schema, *,
           public: bool = False) -> list[SiteTable]:
    """Fill missing values of `train` and `others` from `train` alone.

    Numeric: the training mean; categorical: the most frequent training
    category (lowest code on ties, so it is deterministic). With `public`,
    constants that depend on no data: the midpoint of the schema's bounds and
    the vocabulary's first category.
    """
    if public:
        low, high = schema.numeric_bounds('A private run (privacy.level = "record" or "site")')
        return _fill(train, others, (low + high) / 2,
                     np.zeros(len(schema.categorical), dtype=np.int64))
    for j, column in enumerate(schema.numeric):
        if np.isnan(train.numeric[:, j]).all():
            raise DataError(f"{train.source}: column {column!r} is missing in every training row "
                            f"of site {train.name!r}, so it cannot be imputed from the site's own "
                            "data; fill it or remove it from the schema.")
    for j, column in enumerate(schema.categorical):
        if (train.categorical[:, j] < 0).all():
            raise DataError(f"{train.source}: column {column!r} is missing in every training row "
                            f"of site {train.name!r}, so it cannot be imputed from the site's own "
                            "data; fill it or remove it from the schema.")
    means = np.nanmean(train.numeric, axis=0) if train.numeric.shape[1] else np.zeros(0)
    modes = np.array([
        np.bincount(col[col >= 0]).argmax() for col in train.categorical.T
    ], dtype=np.int64)
    return _fill(train, others, means, modes)


def _fill(train: SiteTable, others: Sequence[SiteTable], means: np.ndarray,
          modes: np.ndarray) -> list[SiteTable]:
    filled = []
    for table in (train, *others):
        numeric = np.where(np.isnan(table.numeric), means, table.numeric)
        categorical = np.where(table.categorical < 0, modes, table.categorical)
        filled.append(replace(table, numeric=numeric, categorical=categorical))
    return filled


def federated_mean_std(trains: Sequence[SiteTable],
                       sum_vectors: SumVectors) -> tuple[np.ndarray, np.ndarray]:
    """Pooled training mean and std of the numeric columns, from two summations.

    Round one sums ``[n, sum x]`` over sites (`count_and_sums`), giving the mean;
    round two sums ``sum (x - mean)^2`` (`squared_deviations`). Two passes
    instead of ``E[x^2] - mean^2`` because that difference cancels
    catastrophically (a constant column of 63.3 came out with std 1.5e-6 and
    blew up standardised values a million-fold), and because the second sum
    stays near ``n var`` where ``sum x^2`` would need ``n mean^2``: a secagg or
    ckks sum has a bounded range. A deployed site computes the same two
    vectors alone, from its own rows (`fedcare.runtime.flower_site`).
    """
    first = sum_vectors([count_and_sums(t) for t in trains])
    mean = pooled_mean(first)
    second = sum_vectors([squared_deviations(t, mean) for t in trains])
    return mean, pooled_std(first, second)


def count_and_sums(train: SiteTable) -> np.ndarray:
    """A site's first contribution to the pooled moments: ``[n, sum x_1, ..., sum x_p]``."""
    return np.concatenate([[float(len(train))], train.numeric.sum(axis=0)])


def squared_deviations(train: SiteTable, mean: np.ndarray) -> np.ndarray:
    """A site's second contribution: ``sum (x_j - mean_j)^2`` over its training rows."""
    return np.asarray(((train.numeric - mean) ** 2).sum(axis=0))


def pooled_mean(first: np.ndarray) -> np.ndarray:
    """The pooled mean from the summed `count_and_sums`."""
    if not first[0] >= 1:
        raise DataError(f"the summed row count of the federated statistics is {first[0]}; "
                        "expected at least one training row.")
    return np.asarray(first[1:] / first[0])


def pooled_std(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The pooled standard deviation from the two sums (a column with none: 1).

    A sum revealed under ckks carries flooding noise (about 1e-6), which can take
    the sum of squares of a constant column just below 0: clipped at 0 first.
    """
    return _safe_std(np.sqrt(np.maximum(second, 0.0) / first[0]))


def _plain_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    return np.asarray(np.sum(vectors, axis=0))


def _safe_std(std: np.ndarray) -> np.ndarray:
    # A constant column (e.g. a site where everyone is male) keeps its values
    # centred instead of dividing by zero.
    return np.where(std > 1e-9, std, 1.0)


@dataclass(frozen=True)
class Encoder:
    """One-hot encoding and standardisation shared by all sites' rows."""

    schema: Schema

    def encode(self, table: SiteTable, mean: np.ndarray, std: np.ndarray,
               clip: bool = False) -> torch.Tensor:
        """Standardised numeric columns (clipped to ``mean ± std`` when `clip`), then one-hot."""
        numeric = (table.numeric - mean) / std
        if clip:
            numeric = np.clip(numeric, -1.0, 1.0)
        blocks = [numeric]
        for j, vocabulary in enumerate(self.schema.categorical.values()):
            onehot = np.eye(len(vocabulary))[table.categorical[:, j]]
            blocks.append(onehot[:, 1:] if self.schema.drop_first else onehot)
        return torch.from_numpy(np.concatenate(blocks, axis=1).astype(np.float32))


def prepare_sites(
    splits: Sequence[tuple[SiteTable, SiteTable]],
    schema: Schema,
    standardize: Standardize,
    sum_vectors: SumVectors | None = None,
    *,
    private: bool = False,
) -> tuple[list[SiteData], dict[str, dict[str, list[float]]]]:
    """Impute, encode and standardise each site's (train, test) tables.

    Parameters
    ----------
    splits : sequence of (train, test) site tables
        Each site's rows, already split; missing features are imputed here
        from the site's own training rows (`impute_sites`).
    schema : Schema
    standardize : Standardize
    sum_vectors : callable, optional
        How sites' contributions are totalled for federated statistics; plain
        summation (the default) in tests, the protection scheme's aggregation
        in a run (`fedcare.runtime.local.protected_sum`).
    private : bool
        A differentially private run: missing values are filled with public
        constants (`impute`), never from the data.

    Returns
    -------
    sites : list of SiteData
    standardization : dict
        Per site, the ``mean`` and ``std`` applied to its numeric columns, so
        the model can be used on new records of that site.
    """
    return standardize_sites(impute_sites(splits, schema, private=private), schema,
                             standardize, sum_vectors)


def impute_sites(splits: Sequence[tuple[SiteTable, SiteTable]], schema: Schema, *,
                 private: bool = False) -> list[tuple[SiteTable, SiteTable]]:
    """Each site's (train, test) with missing values filled from its own training rows."""
    filled = []
    for train, test in splits:
        train_filled, test_filled = impute(train, [test], schema, public=private)
        filled.append((train_filled, test_filled))
    return filled


def standardize_sites(
    filled: Sequence[tuple[SiteTable, SiteTable]],
    schema: Schema,
    standardize: Standardize,
    sum_vectors: SumVectors | None = None,
) -> tuple[list[SiteData], dict[str, dict[str, list[float]]]]:
    """Encode and standardise imputed (train, test) tables (see `prepare_sites`).

    Only ``federated`` reads more than one site's rows, and only through
    `sum_vectors`; ``site``, ``bounds`` and ``none`` give each site the same
    tensors whether it is prepared alone or among all the others.
    """
    if standardize is Standardize.AUTO:
        raise ValueError("resolve data.standardize = 'auto' first (resolve_standardize)")
    p = len(schema.numeric)
    if standardize is Standardize.BOUNDS:
        low, high = schema.numeric_bounds('data.standardize = "bounds"')
        stats = [((low + high) / 2, (high - low) / 2)] * len(filled)
    elif standardize is Standardize.FEDERATED:
        mean, std = federated_mean_std([train for train, _ in filled],
                                       sum_vectors or _plain_sum)
        stats = [(mean, std)] * len(filled)
    elif standardize is Standardize.SITE:
        stats = [(train.numeric.mean(axis=0), _safe_std(train.numeric.std(axis=0)))
                 for train, _ in filled]
    else:
        stats = [(np.zeros(p), np.ones(p))] * len(filled)
    sites = []
    standardization = {}
    for (train, test), (mean, std) in zip(filled, stats, strict=True):
        standardization[train.name] = {"mean": mean.tolist(), "std": std.tolist()}
        sites.append(encode_site(train, test, schema, mean, std,
                                 clip=standardize is Standardize.BOUNDS))
    return sites, standardization


def encode_site(train: SiteTable, test: SiteTable, schema: Schema, mean: np.ndarray,
                std: np.ndarray, *, clip: bool = False) -> SiteData:
    """One site's imputed tables as model-ready tensors, standardised with (`mean`, `std`)."""
    encoder = Encoder(schema)
    return SiteData(
        name=train.name,
        x_train=encoder.encode(train, mean, std, clip=clip),
        y_train=torch.from_numpy(train.target.astype(np.float32)),
        x_test=encoder.encode(test, mean, std, clip=clip),
        y_test=torch.from_numpy(test.target.astype(np.float32)),
    )
