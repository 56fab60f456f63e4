"""L2 clipping that provably stays within the bound and never divides by zero.

The sensitivity every DP mechanism here relies on is the clip norm ``C``: a
record's gradient (DP-SGD) or a site's update (site-level DP) is scaled by
``min(1, C / ||v||)`` (Abadi et al. 2016, Algorithm 1, "clip gradient"). Two details
decide whether ``C`` is really a bound:

- **Zero norms.** ``C / ||v||`` is undefined at ``v = 0``; a zero row must get
  factor 1, without a division that produces inf or NaN on the way.
- **Rounding.** ``v * (C / ||v||)`` is computed in float32, and every product
  is rounded, so the result can land just above ``C``. The factor is therefore
  shrunk by a relative margin, ``1 - 2**-20``, and rounded *down* when cast to
  float32. Opacus adds ``1e-6`` to the norm instead; an additive margin is
  ``1e-6 / ||v||`` in relative terms, which vanishes below float32's rounding
  error (2**-24) as soon as ``||v||`` exceeds about 17, exactly where clipping
  happens. A relative margin is the same size at every scale: for a float32
  vector of length ``d`` the clipped norm is at most
  ``C (1 - 2**-20)(1 + 2**-24)(1 + d 2**-53) < C`` for any ``d < 2**32``
  (products that underflow to subnormals add at most 2**-150 each, which the
  margin absorbs for any ``C`` above 1e-30).

`clip_l2` computes the norm itself and decides "within the bound" exactly:
the float64 norm settles all but the vectors within ``~d 2**-53`` of ``C``,
and those are compared in rational arithmetic. `clip_factors` takes the norms
as given (DP-SGD computes them in float32), so its bound is only as exact as
they are: a row whose rounded norm is at most ``C`` is left as it is.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from fedcare.errors import ConfigError, ProtocolError

_SHRINK = 1.0 - 2.0**-20
"""Relative safety margin on every clip factor below 1 (16x float32's unit roundoff)."""


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Per-row scale factors that bring rows of the given L2 norms within `clip_norm`.

    Parameters
    ----------
    norms : Tensor
        L2 norms of the rows, float32 or float64, >= 0; any shape. The bound
        holds for the norms as given: a norm computed in float32 should be
        accurate to well under 2**-20 relative (a float32 sum of squares over
        thousands of values is).
    clip_norm : float
        The bound ``C``, finite and > 0, in the units of the rows.

    Returns
    -------
    Tensor
        Same shape and dtype as `norms`. Exactly 1 where ``norm <= C``
        (including ``norm == 0``); otherwise slightly less than ``C / norm``,
        so that ``row * factor`` (computed in the row's dtype) has an L2 norm
        at most ``C``. Factors are in (0, 1], except that a row more than
        ~1e45 times longer than ``C`` gets 0 in float32 (``C / norm``
        underflows); an infinite norm gets 0 and a NaN norm gets NaN.

    Raises
    ------
    ConfigError
        If `clip_norm` is not finite and > 0.
    """
    _check_clip_norm(clip_norm)
    norms64 = norms.to(torch.float64)
    # The clamp keeps the denominator >= C > 0: no division by zero even in the
    # branch that torch.where discards.
    shrunk = (clip_norm * _SHRINK) / norms64.clamp(min=clip_norm)
    factors = torch.where(norms64 <= clip_norm, 1.0, shrunk)
    return _round_toward_zero(factors, norms.dtype)


def clip_l2(vector: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """A copy of `vector` scaled to an L2 norm of at most `clip_norm`, and its original norm.

    Parameters
    ----------
    vector : Tensor
        1-D float vector, e.g. a site's model update (float32).
    clip_norm : float
        The bound ``C``, finite and > 0.

    Returns
    -------
    clipped : Tensor
        A new tensor of the same dtype: bit-identical to `vector` if its exact
        L2 norm is at most ``C``, else ``vector * factor`` with ``factor``
        slightly below ``C / norm``, rounded toward zero, so that the exact L2
        norm of the result is at most ``C``.
    norm : float
        The L2 norm of `vector`, computed in float64.

    Raises
    ------
    ConfigError
        If `clip_norm` is not finite and > 0.
    ProtocolError
        If `vector` is not 1-D, holds NaN or inf (the first bad index is
        named), or its norm overflows float64.
    """
    _check_clip_norm(clip_norm)
    if vector.dim() != 1:
        raise ProtocolError(f"Expected a 1-D vector to clip; got shape {tuple(vector.shape)}.")
    norm = float(torch.linalg.vector_norm(vector, dtype=torch.float64))
    if not math.isfinite(norm):
        bad = (~torch.isfinite(vector)).nonzero()
        if len(bad) == 0:
            raise ProtocolError(f"The vector's L2 norm overflows float64 (length {len(vector)}).")
        index = int(bad[0, 0])
        raise ProtocolError(
            f"Expected finite values in the vector to clip; got {float(vector[index])} at "
            f"index {index} ({len(bad)} non-finite values in all).")
    # The float64 norm of d values is within about d * 2**-53 (relative) of the
    # exact one (Higham 2002, sec. 4.2), so near clip_norm it cannot say on
    # which side the exact norm lies; that rare case is settled in exact
    # rational arithmetic, so a vector is returned untouched iff it is within.
    if _within(vector, norm, clip_norm):
        return vector.clone(), norm
    # As in clip_factors, but also right for a rounded norm at or just below
    # clip_norm whose exact value is above it (clip_factors would return 1).
    factor = torch.tensor([clip_norm * _SHRINK / norm], dtype=torch.float64)
    clipped = vector * _round_toward_zero(factor, vector.dtype)
    # The product rounds to nearest. For normal floats the margin in _SHRINK
    # absorbs that; among subnormals (|x| < 2**-126) one unit is a large
    # relative step, so step toward zero until the result is provably within.
    while not _within(clipped, float(torch.linalg.vector_norm(clipped, dtype=torch.float64)),
                      clip_norm):
        clipped = torch.nextafter(clipped, torch.zeros_like(clipped))
    return clipped, norm


def _within(vector: torch.Tensor, norm: float, clip_norm: float) -> bool:
    """Whether the exact L2 norm of `vector` (rounded: `norm`) is at most `clip_norm`."""
    slack = (len(vector) + 4) * 2.0**-52
    return norm * (1 + slack) <= clip_norm or (
        norm * (1 - slack) <= clip_norm and _exactly_within(vector, clip_norm))


def _exactly_within(vector: torch.Tensor, clip_norm: float) -> bool:
    """Whether the exact L2 norm of `vector` is at most `clip_norm` (no rounding at all)."""
    squares = sum((Fraction(value) ** 2 for value in vector.double().tolist()), Fraction(0))
    return squares <= Fraction(clip_norm) ** 2


def _round_toward_zero(factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast nonnegative float64 factors to `dtype`, never rounding up."""
    if dtype == torch.float64:
        return factors
    cast = factors.to(dtype)
    rounded_up = cast.to(torch.float64) > factors
    return torch.where(rounded_up, torch.nextafter(cast, torch.zeros_like(cast)), cast)


def _check_clip_norm(clip_norm: float) -> None:
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"clip_norm must be finite and > 0; got {clip_norm!r}.")
