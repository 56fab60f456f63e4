"""Shamir secret sharing over the prime field GF(2^521 - 1).

A secret ``s`` is the constant term of a random polynomial ``f`` of degree
``threshold - 1``; party ``x`` (a positive integer, the site id) holds
``f(x)``. Any ``threshold`` shares give ``s`` back by Lagrange interpolation at
0; fewer are uniformly distributed whatever ``s`` is (Shamir 1979, "How to
share a secret", CACM 22(11)), so they reveal nothing.

The field is GF(p) with the Mersenne prime ``p = 2^521 - 1`` (the field of
NIST P-521): it holds any 32-byte key or seed as an integer without
reduction, and its primality is textbook. A share is 66 bytes.

Coefficients come from `secrets` (the operating system's CSPRNG): there is no
seeded mode, because a predictable coefficient leaks the secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from fedcare.errors import ConfigError, ProtocolError, QuorumError

PRIME = 2**521 - 1
"""Field modulus (a Mersenne prime)."""

SHARE_BYTES = (PRIME.bit_length() + 7) // 8
"""Length of a share value serialised big-endian: 66."""


def split(secret: int, *, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    """Share `secret` among `holders` so that any `threshold` of them can rebuild it.

    Parameters
    ----------
    secret : int
        Value in [0, PRIME).
    threshold : int
        Number of shares needed, in [1, len(holders)].
    holders : sequence of int
        Distinct x coordinates in [1, PRIME); each receives one share.

    Returns
    -------
    dict
        ``{holder: f(holder)}``.
    """
    if not 0 <= secret < PRIME:
        raise ConfigError("Shamir secret must be in [0, 2^521 - 1); got a value out of range.")
    _check_holders(holders)
    if not 1 <= threshold <= len(holders):
        raise ConfigError(f"Shamir threshold must be in [1, {len(holders)}] (the number of "
                          f"holders); got {threshold}.")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in holders}


def lagrange_at_zero(holders: Sequence[int]) -> list[int]:
    """Coefficients ``l_i`` with ``f(0) = sum(l_i * f(x_i)) mod PRIME`` for these x coordinates.

    They depend only on the holders, so reconstructing many secrets from the
    same holders computes them once.
    """
    _check_holders(holders)
    weights = []
    for i, xi in enumerate(holders):
        numerator, denominator = 1, 1
        for j, xj in enumerate(holders):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return weights


def reconstruct(shares: Mapping[int, int], *, threshold: int,
                weights: Sequence[int] | None = None) -> int:
    """Rebuild a secret from at least `threshold` shares ``{holder: value}``.

    Exactly `threshold` shares are used (the lowest holder ids), so that the
    result does not depend on how many more arrived. Pass `weights` (from
    `lagrange_at_zero` of those holders) to skip recomputing them.

    Raises
    ------
    QuorumError
        If fewer than `threshold` shares are given: the secret is not determined.
    """
    if len(shares) < threshold:
        raise QuorumError(f"Shamir reconstruction needs {threshold} shares; got {len(shares)}.")
    holders = sorted(shares)[:threshold]
    if weights is None:
        weights = lagrange_at_zero(holders)
    elif len(weights) != threshold:
        raise ConfigError(f"{len(weights)} Lagrange weights given for {threshold} shares.")
    total = 0
    for w, x in zip(weights, holders, strict=True):
        value = shares[x]
        if not 0 <= value < PRIME:
            raise ProtocolError(f"Shamir share of holder {x} is not a field element.")
        total += w * value
    return total % PRIME


def share_to_bytes(value: int) -> bytes:
    """A share value as `SHARE_BYTES` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of `share_to_bytes`; refuses wrong lengths and values >= PRIME."""
    if len(data) != SHARE_BYTES:
        raise ProtocolError(f"A Shamir share is {SHARE_BYTES} bytes; got {len(data)}.")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ProtocolError("Shamir share is not a field element (>= 2^521 - 1).")
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for c in reversed(coefficients):  # Horner
        result = (result * x + c) % PRIME
    return result


def _check_holders(holders: Sequence[int]) -> None:
    if len(set(holders)) != len(holders):
        raise ConfigError(f"Shamir holders must be distinct; got {sorted(holders)}.")
    for x in holders:
        # x = 0 would hand out the secret itself; x >= PRIME aliases another holder.
        if not 0 < x < PRIME:
            raise ConfigError(f"Shamir holder ids must be in [1, 2^521 - 1); got {x}.")
