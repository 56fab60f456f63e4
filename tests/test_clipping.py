"""Tests of L2 clipping: the bound holds for every input, zero norms are safe."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.clipping import clip_factors, clip_l2

SHRINK = 1.0 - 2.0**-20
BIG = float(np.float32(1e30))


def exact_norm(values: np.ndarray) -> float:
    """L2 norm in float64 with a correctly rounded sum of squares."""
    squares = values.astype(np.float64) ** 2
    return math.sqrt(math.fsum(squares.tolist()))


def within(values: np.ndarray, clip_norm: float) -> bool:
    """Whether the exact L2 norm of `values` is at most `clip_norm` (rational arithmetic)."""
    norm = exact_norm(values)
    if norm < clip_norm * (1 - 1e-9):  # far from the bound: the float answer is certain
        return True
    squares = sum((Fraction(v) ** 2 for v in values.astype(np.float64).tolist()), Fraction(0))
    return squares <= Fraction(clip_norm) ** 2


magnitudes = st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30])
elements = st.one_of(
    st.just(0.0),
    st.floats(-1.0, 1.0, width=32),
    st.floats(-BIG, BIG, width=32),  # includes subnormals and values near 1e30
)


def float32_vectors(max_length: int = 2000) -> st.SearchStrategy[np.ndarray]:
    """Hypothesis's float32 arrays, some of their entries replaced by random ones of any size.

    Hypothesis fills long arrays with one repeated value plus a few chosen ones;
    the random entries, with magnitudes log-uniform over 1e-45..1e30 (subnormal
    to huge), make every vector also a realistic mix of scales.
    """

    def build(base: np.ndarray, seed: int, share: float, scale: float) -> np.ndarray:
        rng = np.random.default_rng(seed)
        mixed = rng.standard_normal(len(base)) * 10.0 ** rng.uniform(-45, 30, len(base))
        vector = np.where(rng.random(len(base)) < share, mixed, base.astype(np.float64) * scale)
        return vector.astype(np.float32)

    return st.builds(
        build,
        arrays(np.float32, st.integers(1, max_length), elements=elements),
        st.integers(0, 2**32 - 1),
        st.sampled_from([0.0, 0.1, 1.0]),
        st.sampled_from([1.0, 1e-20]),  # 1e-20: all-tiny vectors, many subnormal
    )


clip_norms = st.floats(1e-6, 1e6)


@settings(max_examples=80, deadline=None)
@given(vector=float32_vectors(), clip_norm=clip_norms)
def test_clip_l2_never_exceeds_the_bound(vector: np.ndarray, clip_norm: float) -> None:
    original = vector.copy()
    clipped, norm = clip_l2(torch.from_numpy(vector), clip_norm)
    out = clipped.numpy()

    assert isinstance(norm, float)
    assert norm == pytest.approx(exact_norm(original), rel=1e-12)
    assert clipped.dtype == torch.float32
    assert not np.isnan(out).any()
    assert within(out, clip_norm)
    assert vector.tobytes() == original.tobytes()  # the input is untouched
    if within(original, clip_norm):
        assert out.tobytes() == original.tobytes()  # bit-identical, -0.0 included
    else:
        factor = exact_norm(out) / norm
        assert 0 < factor < 1
        # Direction kept: a nonnegative multiple, up to float32 rounding (and
        # gradual underflow for products below 2**-126).
        expected = factor * original.astype(np.float64)
        assert np.all(np.abs(out - expected) <= 2.0**-22 * np.abs(expected) + 2.0**-148)
        assert np.all(np.sign(out) * np.sign(original) >= 0)
        # Clipped to the bound, not far below it: the margin is tiny.
        assert exact_norm(out) >= clip_norm * (1 - 2.0**-18)


@settings(max_examples=40, deadline=None)
@given(vector=float32_vectors(max_length=200))
def test_clip_l2_at_its_own_norm_boundary(vector: np.ndarray) -> None:
    # The hardest case for rounding: the bound just below the norm, so the factor
    # is just below 1 and a naive C / norm product can round up past C.
    norm = exact_norm(vector)
    if norm == 0:
        return
    for clip_norm in (norm * (1 - 1e-12), norm * (1 - 2.0**-24), math.nextafter(norm, 0.0),
                      norm, math.nextafter(norm, math.inf)):
        clipped, _ = clip_l2(torch.from_numpy(vector), clip_norm)
        assert within(clipped.numpy(), clip_norm)
        if within(vector, clip_norm):
            assert clipped.numpy().tobytes() == vector.tobytes()


def test_clip_l2_leaves_a_vector_exactly_at_the_bound_alone() -> None:
    for values, clip_norm in [([1.0], 1.0), ([3.0, 4.0], 5.0), ([-0.5] * 4, 1.0)]:
        vector = torch.tensor(values)
        clipped, norm = clip_l2(vector, clip_norm)
        assert norm == clip_norm
        assert torch.equal(clipped, vector)


def test_clip_l2_zero_vector_stays_zero() -> None:
    clipped, norm = clip_l2(torch.zeros(5), 1e-6)
    assert norm == 0.0
    assert torch.equal(clipped, torch.zeros(5))
    assert not bool(clipped.isnan().any())


def test_clip_l2_returns_a_copy_when_within_the_bound() -> None:
    vector = torch.tensor([3.0, 4.0])
    clipped, norm = clip_l2(vector, 10.0)
    assert norm == 5.0
    clipped[0] = 100.0
    assert vector[0] == 3.0


def test_clip_l2_known_value() -> None:
    clipped, norm = clip_l2(torch.tensor([3.0, -4.0], dtype=torch.float64), 1.0)
    assert norm == 5.0
    assert clipped.dtype == torch.float64
    assert clipped.tolist() == pytest.approx([0.6 * SHRINK, -0.8 * SHRINK], rel=1e-15)


@pytest.mark.parametrize(("bad", "shown"), [(math.nan, "nan"), (math.inf, "inf"),
                                            (-math.inf, "-inf")])
def test_clip_l2_names_the_first_non_finite_index(bad: float, shown: str) -> None:
    vector = torch.ones(10)
    vector[3] = bad
    vector[7] = math.nan
    with pytest.raises(ProtocolError, match=rf"got {shown} at index 3 \(2 non-finite"):
        clip_l2(vector, 1.0)


def test_clip_l2_norm_overflow_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="overflows float64"):
        clip_l2(torch.full((4,), 1e300, dtype=torch.float64), 1.0)


def test_clip_l2_wants_a_1d_vector() -> None:
    with pytest.raises(ProtocolError, match=r"1-D vector.*shape \(2, 3\)"):
        clip_l2(torch.ones(2, 3), 1.0)


@pytest.mark.parametrize(("clip_norm", "shown"), [(0.0, "0.0"), (-1.0, "-1.0"),
                                                  (math.nan, "nan"), (math.inf, "inf")])
def test_bad_clip_norm_raises(clip_norm: float, shown: str) -> None:
    message = rf"^clip_norm must be finite and > 0; got {shown}\.$"
    with pytest.raises(ConfigError, match=message):
        clip_l2(torch.ones(3), clip_norm)
    with pytest.raises(ConfigError, match=message):
        clip_factors(torch.ones(3), clip_norm)


# --- clip_factors ---------------------------------------------------------------------------


def test_clip_factors_match_the_definition() -> None:
    clip_norm = 1.5
    above = float(np.nextafter(np.float32(1.5), np.float32(2.0)))
    norms = torch.tensor([0.0, 0.0, 1e-30, 1.0, 1.5, above, 3.0, 1e6, 1e30, 1e38, 3e38],
                         dtype=torch.float32)
    factors = clip_factors(norms, clip_norm)
    assert factors.dtype == torch.float32
    assert factors.shape == norms.shape
    assert not bool(factors.isnan().any())

    n64, f64 = norms.double(), factors.double()
    within = n64 <= clip_norm
    assert bool((f64[within] == 1.0).all())
    ideal = clip_norm / n64[~within]
    assert bool((f64[~within] > 0).all())
    assert bool((f64[~within] < 1).all())
    assert bool((f64[~within] <= ideal * SHRINK).all())  # rounded toward zero
    # ... but only just (3e38 gets a subnormal factor: absolute precision 2**-149).
    assert bool((f64[~within] >= ideal * SHRINK * (1 - 2.0**-23) - 2.0**-149).all())
    assert within.tolist() == [True] * 5 + [False] * 6


def test_clip_factors_keep_shape_and_float64() -> None:
    norms = torch.tensor([[0.0, 2.0], [4.0, 0.5]], dtype=torch.float64)
    factors = clip_factors(norms, 1.0)
    assert factors.dtype == torch.float64
    assert factors.tolist() == [[1.0, 0.5 * SHRINK], [0.25 * SHRINK, 1.0]]


def test_clip_factors_extreme_norms() -> None:
    # C / norm underflows float32 for an infinite norm or one > ~1e45 C: factor 0.
    assert clip_factors(torch.tensor([math.inf, 3e38]), 1e-10).tolist() == [0.0, 0.0]
    assert math.isnan(clip_factors(torch.tensor([math.nan]), 1.0).item())


def test_clip_l2_at_the_edge_of_float32() -> None:
    vector = torch.full((2000,), 3.0e38)
    clipped, norm = clip_l2(vector, 1e-10)
    assert norm == pytest.approx(3.0e38 * math.sqrt(2000))
    assert exact_norm(clipped.numpy()) <= 1e-10
    assert not clipped.any()  # the factor, ~7e-50, underflows float32 to 0
    clipped, _ = clip_l2(vector, 1.0)
    assert exact_norm(clipped.numpy()) <= 1.0
    assert bool((clipped > 0).all())  # a subnormal factor, ~7e-41, but not 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), clip_norm=clip_norms, scale=magnitudes)
def test_clip_factors_bound_rows_of_a_batch(seed: int, clip_norm: float, scale: float) -> None:
    # The DP-SGD use: per-record gradients as rows, norms in float32, rows
    # multiplied by their factor in float32.
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(64, 300, generator=generator)
    rows *= scale * torch.logspace(-3, 3, 64).unsqueeze(1)
    rows[::9] = 0.0
    norms = torch.linalg.vector_norm(rows, dim=1)  # float32, as DP-SGD computes them
    clipped = (rows * clip_factors(norms, clip_norm)[:, None]).numpy()
    for row, original, norm in zip(clipped, rows.numpy(), norms.tolist(), strict=True):
        assert exact_norm(row) <= clip_norm
        assert not np.isnan(row).any()
        if norm <= clip_norm:  # zero rows included
            assert row.tobytes() == original.tobytes()
