"""Reproducible (non-secret) randomness: data splits, shuffling, site sampling, initialisation.

Everything here is seeded and reproducible by design. Privacy noise never comes
from here: it needs a cryptographically secure source.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for the stream named by `keys` (e.g. round, site index)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# Stream names, so that two uses of one seed never share a stream.
INIT, SAMPLING, LOCAL_TRAINING, BASELINE = 1, 2, 3, 4
