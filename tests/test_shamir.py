"""Shamir secret sharing over GF(2^521 - 1)."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.protection import shamir


def test_field_is_the_mersenne_prime_2_521_minus_1() -> None:
    p = shamir.PRIME
    assert p == 2**521 - 1
    # Fermat test in a few bases: a sanity check on the constant, not a proof (it is a
    # known Mersenne prime).
    assert all(pow(a, p - 1, p) == 1 for a in (2, 3, 5, 7, 11, 13))
    assert shamir.SHARE_BYTES == 66


@st.composite
def sharing(draw: st.DrawFn) -> tuple[int, list[int], int, list[int]]:
    n = draw(st.integers(1, 12))
    holders = draw(st.lists(st.integers(1, 2**32), min_size=n, max_size=n, unique=True))
    threshold = draw(st.integers(1, n))
    subset = draw(st.lists(st.sampled_from(holders), min_size=threshold, unique=True))
    secret = draw(st.integers(0, shamir.PRIME - 1))
    return secret, holders, threshold, subset


@settings(max_examples=150, deadline=None)
@given(sharing())
def test_any_threshold_subset_reconstructs(case: tuple[int, list[int], int, list[int]]) -> None:
    secret, holders, threshold, subset = case
    shares = shamir.split(secret, threshold=threshold, holders=holders)
    assert set(shares) == set(holders)
    picked = {x: shares[x] for x in subset}
    assert shamir.reconstruct(picked, threshold=threshold) == secret
    weights = shamir.lagrange_at_zero(sorted(picked)[:threshold])
    assert shamir.reconstruct(picked, threshold=threshold, weights=weights) == secret


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 10), st.integers(0, shamir.PRIME - 1))
def test_fewer_than_threshold_shares_fit_every_secret(threshold: int, other: int) -> None:
    """t - 1 shares plus any claimed secret lie on some degree t - 1 polynomial.

    So t - 1 shares do not determine the secret: we build the t-th share that
    makes an arbitrary `other` the reconstruction.
    """
    holders = list(range(1, threshold + 1))
    shares = shamir.split(secrets.randbelow(shamir.PRIME), threshold=threshold, holders=holders)
    known = {x: shares[x] for x in holders[:-1]}
    # f(0) = sum l_i y_i over holders; solve for the last y given f(0) = other.
    weights = shamir.lagrange_at_zero(holders)
    partial = sum(w * known[x] for w, x in zip(weights, holders[:-1], strict=False))
    forged = (other - partial) * pow(weights[-1], -1, shamir.PRIME) % shamir.PRIME
    assert shamir.reconstruct({**known, holders[-1]: forged}, threshold=threshold) == other
    with pytest.raises(QuorumError, match=f"needs {threshold} shares; got {threshold - 1}"):
        shamir.reconstruct(known, threshold=threshold)


def test_share_bytes_round_trip_and_checks() -> None:
    value = shamir.PRIME - 1
    assert shamir.share_from_bytes(shamir.share_to_bytes(value)) == value
    with pytest.raises(ProtocolError, match="66 bytes; got 65"):
        shamir.share_from_bytes(bytes(65))
    with pytest.raises(ProtocolError, match="not a field element"):
        shamir.share_from_bytes(b"\xff" * 66)


@pytest.mark.parametrize(("holders", "threshold"), [([1, 1, 2], 2), ([0, 1, 2], 2),
                                                    ([1, 2], 3), ([1, 2], 0)])
def test_bad_holders_or_threshold(holders: list[int], threshold: int) -> None:
    with pytest.raises(ConfigError):
        shamir.split(5, threshold=threshold, holders=holders)


def test_secret_out_of_field() -> None:
    with pytest.raises(ConfigError):
        shamir.split(shamir.PRIME, threshold=1, holders=[1])
