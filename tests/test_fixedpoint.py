"""Fixed-point encoding into Z_{2^64}: range check, exact sums, no wrap at the bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.errors import ConfigError, ProtocolError
from fedcare.protection.fixedpoint import FixedPoint


def test_round_trip_is_rounding_to_the_grid() -> None:
    code = FixedPoint(frac_bits=20, max_sites=4)
    x = np.random.default_rng(0).normal(scale=100.0, size=1000).astype(np.float32)
    decoded = code.decode(code.encode(x, site="a"))
    np.testing.assert_array_equal(decoded, np.rint(x.astype(np.float64) * 2**20) / 2**20)
    assert np.max(np.abs(decoded - x)) <= 2.0**-21


@settings(max_examples=200, deadline=None)
@given(frac_bits=st.integers(0, 62), max_sites=st.integers(1, 10_000),
       signs=st.lists(st.sampled_from([-1, 1]), min_size=1, max_size=50))
def test_sum_of_max_sites_values_at_the_bound_does_not_wrap(frac_bits: int, max_sites: int,
                                                            signs: list[int]) -> None:
    code = FixedPoint(frac_bits=frac_bits, max_sites=max_sites)
    values = np.array(signs, dtype=np.float64) * code.bound
    encoded = code.encode(values, site="a")
    total = encoded * np.uint64(max_sites)  # = max_sites additions in Z_{2^64}
    exact = [s * int(code.bound * 2**frac_bits) * max_sites for s in signs]
    assert code.decode_integers(total).tolist() == exact
    assert all(abs(e) <= 2**63 - 1 for e in exact)


@given(frac_bits=st.integers(0, 62), max_sites=st.integers(1, 10_000))
def test_bound_is_tight(frac_bits: int, max_sites: int) -> None:
    code = FixedPoint(frac_bits=frac_bits, max_sites=max_sites)
    assert round(code.bound * code.scale) <= code.max_encoded
    above = float(np.nextafter(code.bound, np.inf))
    with pytest.raises(ProtocolError):
        code.encode(np.array([0.0, above]), site="a")


@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=30),
       st.integers(2, 8))
def test_ring_sum_decodes_to_the_fixed_point_sum_exactly(values: list[float], n: int) -> None:
    code = FixedPoint(frac_bits=32, max_sites=n)
    rng = np.random.default_rng(len(values))
    vectors = [np.array(values, dtype=np.float32) * rng.uniform(-1, 1) for _ in range(n)]
    vectors = [v.astype(np.float32) for v in vectors]
    total = np.zeros(len(values), dtype=np.uint64)
    for v in vectors:
        total += code.encode(v, site="a")
    expected = [sum(round(float(v[i]) * 2**32) for v in vectors) for i in range(len(values))]
    assert code.decode_integers(total).tolist() == expected


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_refusal_names_site_index_and_value(bad: float) -> None:
    code = FixedPoint(frac_bits=32, max_sites=10)
    x = np.array([0.5, -1.0, bad, bad], dtype=np.float32)
    with pytest.raises(ProtocolError, match=r"site 'st-mary': value 2 is ") as info:
        code.encode(x, site="st-mary")
    assert "sum cannot wrap" in str(info.value)


def test_refuses_matrices() -> None:
    with pytest.raises(ProtocolError, match="1-D"):
        FixedPoint().encode(np.zeros((2, 2)), site="a")


@pytest.mark.parametrize(("frac_bits", "max_sites"), [(-1, 1), (63, 1), (10, 0)])
def test_bad_parameters(frac_bits: int, max_sites: int) -> None:
    with pytest.raises(ConfigError):
        FixedPoint(frac_bits=frac_bits, max_sites=max_sites)
