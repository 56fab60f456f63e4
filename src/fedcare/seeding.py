"""Reproducible (non-secret) randomness: data splits, shuffling, site sampling, initialisation.

Everything here is seeded and reproducible by design. Privacy noise never comes
from here: it needs a cryptographically secure source.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser (Steele, Lea and Flood 2014): a bijective 64-bit mix
    # whose outputs for neighbouring inputs are statistically independent.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for the stream named by `keys` (e.g. round, site index).

    Hash-chained SplitMix64: about a microsecond, so deriving one seed per
    site and round costs nothing next to training even with 10,000 sites.
    """
    h = _splitmix64(seed & _MASK64)
    for key in keys:
        h = _splitmix64(h ^ (key & _MASK64))
    return h >> 1


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# Stream names, so that two uses of one seed never share a stream. NOISE keys the
# seeded DP noise of `privacy.secure = false`, which is for tests and NOT private.
INIT, SAMPLING, LOCAL_TRAINING, BASELINE, NOISE = 1, 2, 3, 4, 5
# BOOTSTRAP keys the resampling of a test set for the report's confidence intervals.
BOOTSTRAP = 6
