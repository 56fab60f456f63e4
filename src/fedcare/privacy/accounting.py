"""Privacy accounting for the subsampled Gaussian mechanism: pure functions over frozen events.

A DP release in fedcare (a DP-SGD step at a site, or a noised aggregate at the
server) is ``steps`` compositions of the Gaussian mechanism with noise
multiplier sigma (noise standard deviation / L2 sensitivity), applied to a
Poisson sample of rate q. `GaussianEvent` describes such releases as frozen
data; `epsilon` composes any number of them into one (epsilon, delta)
guarantee, and `noise_multiplier` finds the smallest sigma that meets a target.
The maths is Google's dp-accounting (0.6.0); `to_dp_event` builds its event tree.

Accountants (`ACCOUNTANTS`, picked by name):

``pld`` (default)
    Privacy loss distributions: the privacy loss of each mechanism is
    discretised and composed by FFT convolution, and delta(epsilon) is read off
    the composed distribution (Koskela, Jälkö & Honkela 2020, "Computing tight
    differential privacy guarantees using FFT"; Doroshenko, Ghazi, Kamath,
    Kumar & Manurangsi 2022, "Connect the Dots: Tighter Discrete Approximations
    of Privacy Loss Distributions", which dp-accounting implements). It is the
    default because it is tight: the discretisation is pessimistic (never
    under-reports epsilon), here within 0.5% of the exact value for epsilon >=
    0.02, and typically 7-15% below what RDP reports for the same mechanism.
``rdp``
    Rényi DP (Mironov 2017, "Rényi Differential Privacy"; for the sampled
    Gaussian, Mironov, Talwar & Zhang 2019): RDP adds up exactly under
    composition and is converted to (epsilon, delta) at the best of a list of
    orders (Canonne, Kamath & Steinke 2020 conversion). Simple and robust, but
    looser than PLD; kept for comparison with papers and tools that report it.

Both give the add/remove-one neighbouring relation: the guarantee covers the
presence or absence of one record (with Poisson sampling, one record's
inclusion is an independent coin of probability q). Substituting one record
for another costs at most twice as much (group privacy of size 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedcare.errors import ConfigError

if TYPE_CHECKING:
    import dp_accounting
# dp-accounting (and the scipy it pulls in) takes about 1 s of CPU to import; it is imported
# where an epsilon is computed, so that a run or a Flower ClientApp process without DP never
# pays for it.

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
"""Valid accountant names; ``pld`` (tight) is the default."""

# RDP orders. dp-accounting 0.6.0 computes the sampled Gaussian's RDP exactly at
# integer orders (a finite binomial sum, Mironov et al. 2019, Sec. 3.2) but at
# fractional orders it sums an infinite series (Sec. 3.3) by the magnitudes of
# its terms (`_log_comb` drops the sign of binom(alpha, i) for i > alpha), which
# over-estimates. Checked against high-precision quadrature of A_alpha over
# q in [0.001, 0.9], sigma in [0.6, 8], alpha in (1.1, 40.5): the fractional
# values are never below the exact ones but up to 13x above them (alpha = 1.1),
# 1-30% above at alpha = 1.5, < 1% above for alpha > 2.5; and at small sigma
# with alpha < 2 the series does not converge (order dropped, warning logged).
# So every order's value is a valid upper bound and the minimum over more
# orders is still sound. Integer orders alone are exact but too coarse where the
# optimal order is below ~10 (epsilon >~ 2): for q = 0.01, sigma = 0.5, 100
# steps they give epsilon 10.66 against 8.03 with the fractional order 2.5. We
# therefore use exact integer orders 2..64 (and sparser up to 1024 for small
# epsilon) plus dp-accounting's fractional orders 1.1..10.9, and silence only
# the convergence warning of the orders the library then drops.
_RDP_ORDERS: tuple[float, ...] = tuple(sorted(
    {float(a) for a in range(2, 65)}
    | {float(a) for a in range(68, 257, 4)}
    | {320.0, 384.0, 512.0, 768.0, 1024.0}
    | {1 + x / 10 for x in range(1, 100) if x % 10}))

# PLD discretisation. The (pessimistic) discretisation error grows with the
# interval relative to epsilon and with the number of compositions; the cost
# grows as the width of the privacy loss support / interval. A coarse pass
# (interval 0.01, ~30 ms) gives an upper bound on epsilon; the interval is that
# bound times _PLD_RELATIVE_INTERVAL, but no finer than _PLD_FEW_STEPS_INTERVAL /
# sqrt(steps) (few compositions accumulate little error, and one wide-support
# mechanism at 1e-5 takes seconds) nor _PLD_MIN_INTERVAL. Measured against an
# interval of 1e-5 on q in [1e-4, 1], sigma in [0.7, 20], steps in {1, 100,
# 10,000}: relative error < 0.5% whenever epsilon >= 0.02 (< 0.05% for epsilon
# >= 0.3), absolute error < 6e-4 below that, always over-reporting; q = 0.01,
# sigma = 1, 10,000 steps takes ~0.25 s.
_PLD_COARSE_INTERVAL = 1e-2
_PLD_PLOT_INTERVAL = 3e-3  # `epsilon_for_plot`
_PLD_RELATIVE_INTERVAL = 1e-4
_PLD_MIN_INTERVAL = 1e-5
_PLD_FEW_STEPS_INTERVAL = 1e-3

# Calibration searches sigma in this range, to this relative width.
MIN_NOISE_MULTIPLIER = 0.05
MAX_NOISE_MULTIPLIER = 1e4
_CALIBRATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class GaussianEvent:
    """`steps` compositions of the subsampled Gaussian mechanism.

    Attributes
    ----------
    noise_multiplier : float
        Sigma, > 0: the noise standard deviation divided by the L2 sensitivity (clip norm).
    sample_rate : float
        q in (0, 1]: the Poisson sampling rate of each step (1: no sampling).
    steps : int
        Number of steps, >= 0.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon(events: Sequence[GaussianEvent], *, delta: float, accountant: str = "pld") -> float:
    """Epsilon of the composition of all `events` at this `delta`.

    Parameters
    ----------
    events : sequence of GaussianEvent
        The releases to compose, in any order; events with the same noise
        multiplier and sample rate are merged first (their steps added).
    delta : float
        In (0, 1).
    accountant : str
        A name in `ACCOUNTANTS`.

    Returns
    -------
    float
        Epsilon >= 0 (add/remove-one neighbouring); 0.0 when there are no steps.

    Raises
    ------
    ConfigError
        An event, `delta` or `accountant` is out of range.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    merged = _merge(events)
    if not merged:
        return 0.0
    return _epsilon_merged(merged, delta, accountant)


def epsilon_for_plot(events: Sequence[GaussianEvent], *, delta: float) -> float:
    """A quick PLD upper bound on `epsilon` of `events`, for charts, not for guarantees.

    One PLD on a coarse grid (3e-3): about 0.04 s instead of 0.3 s, and
    measured within 0.1% above `epsilon` (0.59367 vs 0.59357 at q = 0.16,
    sigma = 3.1, 7 steps; 2.6769 vs 2.6761 at 140 steps).
    """
    _check_delta(delta)
    merged = _merge(events)
    if not merged:
        return 0.0
    return _pld_epsilon(_tree(_without_sampling_as_one(merged)), delta, _PLD_PLOT_INTERVAL)


def noise_multiplier(*, epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "pld") -> float:
    """The smallest noise multiplier that keeps `steps` sampled Gaussian steps within `epsilon`.

    Parameters
    ----------
    epsilon : float
        Target epsilon, > 0.
    delta : float
        In (0, 1).
    sample_rate : float
        Poisson sampling rate q in (0, 1].
    steps : int
        Number of steps, >= 1.
    accountant : str
        A name in `ACCOUNTANTS`.

    Returns
    -------
    float
        Sigma with ``epsilon(sigma) <= epsilon`` (always: it errs on the safe
        side), within a relative 1e-3 of the smallest such sigma. If even
        `MIN_NOISE_MULTIPLIER` meets the target, that is returned.

    Raises
    ------
    ConfigError
        An argument is out of range, or the target needs sigma above `MAX_NOISE_MULTIPLIER`.
    """
    target = epsilon
    _check_accountant(accountant)
    if not (math.isfinite(target) and target > 0):
        raise ConfigError(f"epsilon must be a finite number > 0; got {target!r}.")
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1 to calibrate noise; got {steps!r}.")

    def meets(sigma: float, by: str) -> bool:
        spent = _epsilon_merged({(sigma, float(sample_rate)): steps}, delta, by)
        return spent <= target

    # RDP first: its cost does not grow with epsilon (a PLD's does, with its support), and
    # for PLD its answer is a close start (RDP is looser, so a little above). The PLD search
    # then decides the result with the accurate `epsilon` itself.
    sigma = _smallest_sigma(lambda sigma: meets(sigma, "rdp"), start=1.0, factor=2.0,
                            tolerance=_CALIBRATION_TOLERANCE if accountant == "rdp" else 1e-2)
    if sigma is not None and accountant == "pld":
        sigma = _smallest_sigma(lambda sigma: meets(sigma, "pld"), start=sigma, factor=1.05,
                                tolerance=_CALIBRATION_TOLERANCE)
    if sigma is None:
        raise ConfigError(
            f"epsilon = {target:g} at delta = {delta:g} is unreachable for {steps} steps at "
            f"sample_rate {sample_rate:g}: it needs a noise_multiplier above "
            f"{MAX_NOISE_MULTIPLIER:g}. Allow a larger epsilon, fewer steps or a smaller "
            "sample rate.")
    return sigma


def _smallest_sigma(meets: Callable[[float], bool], *, start: float, factor: float,
                    tolerance: float) -> float | None:
    """Smallest sigma in [MIN, MAX]_NOISE_MULTIPLIER with `meets(sigma)`, to `tolerance`.

    `meets` must be monotone (false below some sigma, true above). The search
    brackets from `start` in steps of `factor`, then bisects geometrically; the
    returned sigma was checked. None if even MAX_NOISE_MULTIPLIER does not meet it.
    """
    high = start
    while not meets(high):
        if high >= MAX_NOISE_MULTIPLIER:
            return None
        high = min(high * factor, MAX_NOISE_MULTIPLIER)
    low = max(high / factor, MIN_NOISE_MULTIPLIER)
    while low < high and meets(low):
        high = low
        low = max(high / factor, MIN_NOISE_MULTIPLIER)
    if low >= high:
        return MIN_NOISE_MULTIPLIER
    while high / low > 1 + tolerance:
        middle = math.sqrt(low * high)
        if meets(middle):
            high = middle
        else:
            low = middle
    return high


def to_dp_event(events: Sequence[GaussianEvent]) -> dp_accounting.DpEvent:
    """The dp-accounting event tree of `events`, identical (sigma, q) merged.

    Returns
    -------
    dp_accounting.DpEvent
        ``ComposedDpEvent`` of ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
        GaussianDpEvent(sigma)), steps)``, one per distinct (sigma, q), in first-seen
        order; ``GaussianDpEvent(sigma)`` without sampling when q = 1. Events
        with 0 steps are left out.

    Raises
    ------
    ConfigError
        An event is out of range.
    """
    return _tree(_merge(events))


def _epsilon_merged(merged: dict[tuple[float, float], int], delta: float,
                    accountant: str) -> float:
    """Epsilon of validated, merged events (`_merge`)."""
    event = _tree(_without_sampling_as_one(merged))
    if accountant == "rdp":
        from dp_accounting.rdp import rdp_privacy_accountant

        rdp = rdp_privacy_accountant.RdpAccountant(orders=list(_RDP_ORDERS))
        with _quiet_fractional_orders():
            rdp.compose(event)
            return float(rdp.get_epsilon(delta))
    rough = _pld_epsilon(event, delta, _PLD_COARSE_INTERVAL)
    finest = max(_PLD_MIN_INTERVAL, _PLD_FEW_STEPS_INTERVAL / math.sqrt(sum(merged.values())))
    interval = max(finest, rough * _PLD_RELATIVE_INTERVAL)
    return _pld_epsilon(event, delta, interval)


def _without_sampling_as_one(merged: dict[tuple[float, float], int]
                             ) -> dict[tuple[float, float], int]:
    """Fold all unsampled (q = 1) steps into one Gaussian step, which is exact.

    T_i steps of the Gaussian mechanism with multipliers sigma_i release the same
    as one with sigma = (sum_i T_i / sigma_i^2)^(-1/2) (the Gaussian privacy loss
    is closed under composition; Dong, Roth & Su 2022, Cor. 3.3). Without this, a
    PLD of 10,000 unsampled steps at sigma = 1 (epsilon ~ 5,400) takes 30 s.
    """
    precision = sum(count / sigma**2 for (sigma, q), count in merged.items() if q == 1)
    if precision == 0:
        return merged
    folded = {key: count for key, count in merged.items() if key[1] < 1}
    folded[(1 / math.sqrt(precision), 1.0)] = 1
    return folded


def _merge(events: Sequence[GaussianEvent]) -> dict[tuple[float, float], int]:
    """Steps per distinct (sigma, q), validated; events with 0 steps dropped."""
    steps: dict[tuple[float, float], int] = {}
    for index, event in enumerate(events):
        if not isinstance(event, GaussianEvent):
            raise ConfigError(f"events[{index}] must be a GaussianEvent; got "
                              f"{type(event).__name__}.")
        where = f"events[{index}]." if len(events) > 1 else ""
        sigma = event.noise_multiplier
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"{where}noise_multiplier must be a finite number > 0; got "
                              f"{sigma!r}.")
        _check_sample_rate(event.sample_rate, where)
        count = event.steps
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"{where}steps must be an integer >= 0; got {count!r}.")
        if count:
            key = (float(sigma), float(event.sample_rate))
            steps[key] = steps.get(key, 0) + count
    return steps


def _tree(merged: dict[tuple[float, float], int]) -> dp_accounting.DpEvent:
    import dp_accounting

    parts: list[dp_accounting.DpEvent] = []
    for (sigma, q), count in merged.items():
        mechanism: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier=sigma)
        if q < 1:
            mechanism = dp_accounting.PoissonSampledDpEvent(sampling_probability=q,
                                                            event=mechanism)
        parts.append(dp_accounting.SelfComposedDpEvent(event=mechanism, count=count))
    return dp_accounting.ComposedDpEvent(events=parts)


def _pld_epsilon(event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    from dp_accounting.pld import pld_privacy_accountant

    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    pld.compose(event)
    return max(0.0, float(pld.get_epsilon(delta)))


class _FractionalOrderFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


@contextlib.contextmanager
def _quiet_fractional_orders() -> Iterator[None]:
    """Drop dp-accounting's warning for fractional RDP orders it excludes (see _RDP_ORDERS)."""
    logger = logging.getLogger("absl")
    quiet = _FractionalOrderFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {list(ACCOUNTANTS)}; got {accountant!r}.")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1); got {delta!r}.")


def _check_sample_rate(sample_rate: float, where: str = "") -> None:
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise ConfigError(f"{where}sample_rate must be in (0, 1]; got {sample_rate!r}.")
