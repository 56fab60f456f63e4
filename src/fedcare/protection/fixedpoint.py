"""Fixed-point encoding of float vectors into the ring Z_{2^64}, for masked summation.

A value ``x`` is encoded as ``q = rint(x * 2**frac_bits)``, a signed integer,
stored in two's complement as a ``uint64``: the ring Z_{2^64}, whose addition
is numpy's wrapping ``uint64`` addition. Masks are uniform in the same ring, so
a masked value carries no information about ``q`` on its own.

Range. A sum of at most ``max_sites`` encodings must not wrap, or the unmasked
sum would be off by a multiple of 2^64. Each encoding is therefore bounded by
``|q| <= q_max = (2**63 - 1) // max_sites``, which keeps every partial sum in
the signed range [-2^63, 2^63). Encoding checks the bound (and finiteness)
and raises `ProtocolError` naming the site and the first offending index and
value, *before* anything is masked or sent.

Exactness. Decoding a ring sum gives the integer ``sum(q)`` exactly (as
``int64``); its float value ``sum(q) * 2**-frac_bits`` is exact in float64
while ``|sum(q)| < 2**53``. Quantisation error per value is at most
``2**-(frac_bits + 1)``.

With the default ``frac_bits = 32`` and 100 sites, the bound is about
``2.1e7`` and the resolution ``2.3e-10``; float32 inputs keep their 24-bit
mantissa for any ``|x| >= 2**-8``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedcare.errors import ConfigError, ProtocolError

RING_BITS = 64
"""Encodings and masks live in Z_{2^RING_BITS} (numpy ``uint64``)."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point code of one round: scale ``2**frac_bits``, at most ``max_sites`` summands.

    Parameters
    ----------
    frac_bits : int
        Fractional bits, in [0, 62]; resolution is ``2**-frac_bits``.
    max_sites : int
        Largest number of encodings that will be summed (>= 1); sets the bound.
    """

    frac_bits: int = 32
    max_sites: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 62:
            raise ConfigError(f"FixedPoint.frac_bits must be an integer in [0, 62]; "
                              f"got {self.frac_bits}.")
        if self.max_sites < 1:
            raise ConfigError(f"FixedPoint.max_sites must be >= 1; got {self.max_sites}.")

    @property
    def scale(self) -> float:
        """``2**frac_bits``: encodings are values times this, rounded to the nearest integer."""
        return float(2**self.frac_bits)

    @property
    def max_encoded(self) -> int:
        """Largest ``|q|`` any one site may send: ``(2**63 - 1) // max_sites``."""
        return (2**63 - 1) // self.max_sites

    @property
    def bound(self) -> float:
        """Largest ``|x|`` (float64) accepted: ``max_encoded / scale`` rounded down."""
        return _float_floor(self.max_encoded) / self.scale

    def encode(self, values: ArrayLike, *, site: str) -> NDArray[np.uint64]:
        """Encode a vector into the ring; refuse non-finite or out-of-range values.

        Parameters
        ----------
        values : array_like
            One-dimensional float vector (float32 or float64).
        site : str
            Who is encoding, named in the error message.

        Returns
        -------
        ndarray of uint64
            Two's-complement encodings ``rint(x * 2**frac_bits) mod 2**64``.

        Raises
        ------
        ProtocolError
            If a value is not finite or ``|x| > bound`` (its sum could wrap).
        """
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise ProtocolError(f"site {site!r}: secure aggregation encodes a 1-D vector; got "
                                f"shape {x.shape}.")
        scaled = x * self.scale  # exact: a power-of-two scale only shifts the exponent
        # NaN compares False, so `~(|scaled| <= limit)` flags NaN, inf and overflow at once.
        bad = ~(np.abs(scaled) <= _float_floor(self.max_encoded))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ProtocolError(
                f"site {site!r}: value {i} is {float(x[i])!r}; secure aggregation encodes "
                f"finite values with |x| <= {self.bound!r} (frac_bits={self.frac_bits}, up to "
                f"{self.max_sites} sites, so that their sum cannot wrap modulo 2^64). Nothing "
                "was sent.")
        return np.rint(scaled).astype(np.int64).view(np.uint64)

    def decode_integers(self, ring_sum: NDArray[np.uint64]) -> NDArray[np.int64]:
        """The exact integer sum ``sum(q)`` of a ring sum of at most `max_sites` encodings."""
        return np.asarray(ring_sum, dtype=np.uint64).view(np.int64)

    def decode(self, ring_sum: NDArray[np.uint64]) -> NDArray[np.float64]:
        """The float64 value ``sum(q) * 2**-frac_bits`` of a ring sum (exact below 2^53)."""
        return self.decode_integers(ring_sum).astype(np.float64) / self.scale


def _float_floor(n: int) -> float:
    """The largest float64 that is <= the integer `n` (float(n) may round up)."""
    f = float(n)
    return f if int(f) <= n else float(np.nextafter(f, 0.0))
