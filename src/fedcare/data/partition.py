"""Splitting one cohort into simulated sites, deterministically under a seed.

Every scheme is a matrix of proportions (site x class): which share of each
class's rows goes to each site. The same matrix splits the training and the
test rows, so each site's test set looks like its training set.

- ``iid``: equal shares of every class.
- ``dirichlet``: label skew; each class's shares ~ Dirichlet(alpha) (Hsu et al. 2019).
- ``quantity``: size skew; one Dirichlet(alpha) draw of site sizes for all classes.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from fedcare.errors import ConfigError, DataError


class Partition(StrEnum):
    NATURAL = "natural"
    IID = "iid"
    DIRICHLET = "dirichlet"
    QUANTITY = "quantity"


def site_proportions(scheme: Partition, n_sites: int, n_classes: int, alpha: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Shares of each class per site, shape (n_sites, n_classes), columns summing to 1."""
    if n_sites < 1:
        raise ConfigError(f"data.sites must be >= 1 to partition; got {n_sites}.")
    if scheme in (Partition.DIRICHLET, Partition.QUANTITY) and not alpha > 0:
        raise ConfigError(f"data.alpha must be > 0 for the {scheme.value} partition; got {alpha}.")
    if scheme is Partition.IID:
        return np.full((n_sites, n_classes), 1.0 / n_sites)
    if scheme is Partition.DIRICHLET:
        return rng.dirichlet(np.full(n_sites, alpha), size=n_classes).T
    if scheme is Partition.QUANTITY:
        sizes = rng.dirichlet(np.full(n_sites, alpha))
        return np.repeat(sizes[:, None], n_classes, axis=1)
    raise ConfigError(f"The {scheme.value!r} partition needs data with natural sites.")


def assign_rows(labels: np.ndarray, proportions: np.ndarray,
                rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of each site: each class's shuffled rows cut by the proportions.

    Counts use largest-remainder rounding, so shares are as close to the
    proportions as whole rows allow and every row goes to exactly one site.
    A site whose shares round to no row at all (a skewed Dirichlet draw over
    many sites: alpha 0.5 over 1,000 sites leaves a few) gets one row from the
    largest site, if there are rows enough for every site (`_fill_empty_sites`).
    """
    n_sites = proportions.shape[0]
    shuffled: list[np.ndarray] = []
    counts = np.zeros((n_sites, proportions.shape[1]), dtype=np.int64)
    for k in range(proportions.shape[1]):
        rows = np.flatnonzero(labels == k)
        rng.shuffle(rows)
        shuffled.append(rows)
        counts[:, k] = _largest_remainder(proportions[:, k], len(rows), rng)
    if len(labels) >= n_sites:
        _fill_empty_sites(counts)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for k, rows in enumerate(shuffled):
        for site, chunk in enumerate(np.split(rows, np.cumsum(counts[:, k])[:-1])):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _fill_empty_sites(counts: np.ndarray) -> None:
    """Give each site without rows one row of the largest site's largest class, in place.

    Deterministic (no draw), and it moves at most one row per empty site, so the
    partition keeps its skew; the rows themselves stay those of a random shuffle.
    """
    for site in np.flatnonzero(counts.sum(axis=1) == 0):
        donor = int(np.argmax(counts.sum(axis=1)))
        k = int(np.argmax(counts[donor]))
        counts[donor, k] -= 1
        counts[site, k] += 1


def _largest_remainder(shares: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        # Ties broken at random, not always in favour of the first sites.
        order = np.lexsort((rng.random(len(shares)), -(exact - counts)))
        counts[order[:short]] += 1
    return np.asarray(counts, dtype=np.int64)


def check_nonempty(parts: list[np.ndarray], names: list[str], scheme: Partition,
                   alpha: float) -> None:
    empty = [names[i] for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        hint = f" (alpha={alpha}); raise data.alpha or" if scheme is not Partition.IID else ";"
        raise DataError(f"The {scheme.value} partition{hint} lower data.sites: site(s) "
                        f"{empty[:5]}{'...' if len(empty) > 5 else ''} received no training rows "
                        f"({len(empty)} of {len(parts)} sites).")
