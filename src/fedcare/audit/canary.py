"""Empirical epsilon from one training run: a canary audit held next to the accountant's epsilon.

The accountant's epsilon is an upper bound proven on paper; an audit gives a
lower bound measured on the code as it runs. If the measured lower bound is
above the claimed epsilon, the implementation or its accounting is wrong.

Procedure (Steinke, Nasr and Jagielski, NeurIPS 2023, "Privacy Auditing with
One (1) Training Run")
----------------------------------------------------------------------------
1. Make ``m`` canaries: records the model would not fit by accident, here
   the site's own training records with their outcome flipped (``kind =
   "flip"``; the originals leave the training data) or
   corners of the site's feature box with a random outcome (``kind = "ood"``).
2. Insert each canary at one site independently with probability 1/2. The
   coin flips are seeded: this is an experiment, not a privacy mechanism.
3. Train once, exactly as configured (fedcare's local runtime, DP included).
4. Score every canary by its logit margin on the final model (large when the
   model fits the canary's flipped outcome, i.e. has memorised it). Guess IN
   for the ``k`` highest scores and OUT for the ``k`` lowest (``r = 2k``
   guesses, the rest abstain); count the correct guesses ``v``.
5. If the run were (epsilon, delta)-DP with respect to each canary, ``v``
   could exceed a Binomial(r, e^eps / (1 + e^eps)) count only with a
   probability bounded through delta (their bound for approximate DP). The lower bound is
   the largest epsilon for which the observed ``v`` is still too unlikely
   (p-value below ``1 - confidence``): the run is not (epsilon', delta)-DP
   for any smaller epsilon', with that confidence.

The number of guesses is fixed in advance, or picked from a few candidates
(`GUESS_FRACTIONS`) with a Bonferroni correction, so choosing the best ``k``
after seeing the scores does not overstate the confidence.

What is compared with what
--------------------------
Record level: the canary site's epsilon from the ledger; site level: the
federation's epsilon (a site's whole contribution covers any one of its
records). Without DP the claimed epsilon is infinite and the audit only
measures. A one-run audit can certify only a few units of epsilon: 100
canaries, every one of 100 guesses right, is epsilon >= 3.5 at 95% (3.1 after
the correction for trying 4 numbers of guesses); 1,000 canaries and 500 right
guesses, 5.1. DP trained on real data usually leaks far less than its worst
case, so a lower bound near 0 under DP is the expected result, not a proof
that the accountant is tight.

The site's number of training rows includes the included canaries; record
level DP-SGD calibrates its sampling rate from it (fedcare treats each site's
size as public, as standard DP-SGD does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit
from scipy.stats import binom

from fedcare.audit.membership import (
    accountant_epsilon,
    bool_flags,
    check_finite,
    float64_array,
    json_number,
    logit_margin,
    roc_auc,
    train_release,
)
from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.data.site_data import FederatedData, SiteData
from fedcare.errors import ConfigError, DataError

BoolArray = NDArray[np.bool_]

KINDS = ("flip", "ood")
GUESS_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)
"""Default candidates for the number of guesses, as shares of the canaries (Bonferroni)."""
_CANARY_STREAM = 0x43414E41  # "CANA": keys the canary draw and the coin flips
_MAX_EPSILON = 64.0  # e^64 / (1 + e^64) is 1 in float64: no count can reject beyond it


# --------------------------------------------------------------------------- the bound
def p_value(*, epsilon: float, delta: float, n_canaries: int, n_guesses: int,
            n_correct: int) -> float:
    """Probability of at least `n_correct` right guesses if the run were (epsilon, delta)-DP.

    Steinke, Nasr and Jagielski (2023, arXiv:2305.08846), the bound for
    approximate DP, as their appendix computes it: with ``m`` canaries each
    included with probability 1/2 and ``r`` guesses, ``P[W >= v] <= f(v) +
    2 m delta max_{i >= 1} (f(v - i) - f(v)) / i``, where ``f(v) = P[Binomial(r,
    q) >= v]`` and ``q = e^eps / (1 + e^eps)``, the accuracy of
    eps-DP randomised response. For ``i >= v``, ``f(v - i) = 1``, so the
    maximum is reached at some ``i <= v``.

    Parameters
    ----------
    epsilon : float
        The epsilon under test (>= 0).
    delta : float
        Its delta, in [0, 1).
    n_canaries : int
        m, the canaries whose inclusion was randomised (guessed or not).
    n_guesses : int
        r, guesses made (1 <= r <= m).
    n_correct : int
        v, correct guesses (0 <= v <= r).

    Returns
    -------
    float
        The p-value, in [0, 1].
    """
    _check_counts(n_canaries, n_guesses, n_correct)
    if not epsilon >= 0:
        raise ConfigError(f"epsilon must be >= 0; got {epsilon}.")
    _check_delta(delta)
    q = float(expit(epsilon))
    r, v = n_guesses, n_correct
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # window[i - 1] = P[v - i <= Binomial(r, q) < v] = f(v - i) - f(v), for i = 1..v
    window = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * n_canaries * delta * alpha)


def epsilon_lower_bound(*, n_canaries: int, n_guesses: int, n_correct: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest epsilon the observed counts reject at `confidence`; 0 if none.

    The run is not (epsilon, delta)-DP for any epsilon below the returned
    value, unless an event of probability at most ``1 - confidence`` occurred
    (`p_value` below ``1 - confidence``). Found by bisection to 1e-6.
    """
    level = 1.0 - _check_confidence(confidence)

    def rejected(eps: float) -> bool:
        return p_value(epsilon=eps, delta=delta, n_canaries=n_canaries, n_guesses=n_guesses,
                       n_correct=n_correct) < level

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2 * high
        if high > _MAX_EPSILON:
            return _MAX_EPSILON
    while high - low > 1e-6:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def count_correct(scores: ArrayLike, included: ArrayLike, n_guesses: int) -> int:
    """Correct guesses when the top ``ceil(r/2)`` scores are guessed IN and the bottom ``r//2`` OUT.

    Ties are broken by canary order, which is independent of inclusion
    (every canary's coin is flipped independently), so they do not bias the
    count.
    """
    s, inside = _check_canary_scores(scores, included)
    _check_counts(len(s), n_guesses, 0)
    order = np.argsort(-s, kind="stable")
    n_out = n_guesses // 2
    guessed_in = order[:n_guesses - n_out]
    guessed_out = order[len(s) - n_out:]
    return int(inside[guessed_in].sum() + (~inside[guessed_out]).sum())


@dataclass(frozen=True)
class OneRunBound:
    """An epsilon lower bound from one run's canary scores.

    Attributes
    ----------
    epsilon : float
        The lower bound (0: nothing certified).
    delta, confidence : float
        The delta assumed and the confidence of the bound.
    n_canaries : int
        m.
    n_guesses, n_correct : int
        r and v of the candidate that gave the bound.
    candidates : tuple of (int, int, float)
        Every candidate ``(r, v, epsilon)`` tried, each at confidence
        ``1 - (1 - confidence) / len(candidates)`` (Bonferroni).
    """

    epsilon: float
    delta: float
    confidence: float
    n_canaries: int
    n_guesses: int
    n_correct: int
    candidates: tuple[tuple[int, int, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon_lower_bound": self.epsilon, "delta": self.delta,
                "confidence": self.confidence, "n_canaries": self.n_canaries,
                "n_guesses": self.n_guesses, "n_correct": self.n_correct,
                "candidates": [{"n_guesses": r, "n_correct": v, "epsilon": e}
                               for r, v, e in self.candidates]}


def guess_candidates(n_canaries: int,
                     fractions: Sequence[float] = GUESS_FRACTIONS) -> tuple[int, ...]:
    """Numbers of guesses to try: each fraction of the canaries, even, at least 2, distinct."""
    out = []
    for fraction in fractions:
        r = min(n_canaries - n_canaries % 2, 2 * max(1, round(fraction * n_canaries / 2)))
        if r >= 2 and r not in out:
            out.append(r)
    if not out:
        raise DataError(f"A one-run audit needs at least 2 canaries; got {n_canaries}.")
    return tuple(out)


def one_run_bound(scores: ArrayLike, included: ArrayLike, *, delta: float,
                  confidence: float = 0.95,
                  n_guesses: int | Sequence[int] | None = None) -> OneRunBound:
    """Steinke et al.'s one-run epsilon lower bound from canary scores.

    Parameters
    ----------
    scores : array-like of shape (m,)
        Each canary's score on the trained model (higher = more likely IN).
    included : array-like of bool, shape (m,)
        Whether each canary was in the training data (the coin flips).
    delta : float
        The delta of the guarantee under test, in [0, 1).
    confidence : float
        Confidence of the bound, in (0, 1), e.g. 0.95.
    n_guesses : int or sequence of int, optional
        Guesses ``r`` (half IN at the top, half OUT at the bottom). Several:
        the best is kept, with a Bonferroni correction. Default:
        `guess_candidates` (10%, 20%, 50% and 100% of the canaries).
    """
    s, inside = _check_canary_scores(scores, included)
    m = len(s)
    if n_guesses is None:
        rs: tuple[int, ...] = guess_candidates(m)
    elif isinstance(n_guesses, int):
        rs = (n_guesses,)
    else:
        rs = tuple(n_guesses)
    if not rs:
        raise ConfigError("n_guesses must name at least one number of guesses.")
    per_candidate = 1.0 - (1.0 - _check_confidence(confidence)) / len(rs)
    candidates = []
    for r in rs:
        v = count_correct(s, inside, r)
        candidates.append((r, v, epsilon_lower_bound(n_canaries=m, n_guesses=r, n_correct=v,
                                                     delta=delta, confidence=per_candidate)))
    r, v, eps = max(candidates, key=lambda c: c[2])
    return OneRunBound(eps, delta, confidence, m, r, v, tuple(candidates))


# --------------------------------------------------------------------------- canaries
@dataclass(frozen=True)
class Canaries:
    """Records planted at one site, each included with probability 1/2.

    Attributes
    ----------
    site : str
        Where the included canaries are added to the training rows.
    kind : str
        ``flip`` or ``ood``.
    x : Tensor of float32, shape (m, n_features)
        Encoded features.
    y : Tensor of float32, shape (m,)
        The canaries' (flipped or random) outcomes, the ones they are trained with.
    included : ndarray of bool, shape (m,)
        The coin flips.
    source_rows : ndarray of int, shape (m,)
        ``flip``: the site's training rows they were made from, which leave
        its ordinary training data; ``ood``: empty.
    """

    site: str
    kind: str
    x: torch.Tensor
    y: torch.Tensor
    included: BoolArray
    source_rows: NDArray[np.int64]

    def insert(self, data: FederatedData) -> FederatedData:
        """`data` with the included canaries in the site's training rows.

        The rows the canaries were made from (``source_rows``) are removed
        first, so no canary is also trained on with its true outcome.
        """
        keep = torch.from_numpy(self.included)
        sites = []
        for s in data.sites:
            if s.name == self.site:
                ordinary = np.ones(s.n_train, dtype=bool)
                ordinary[self.source_rows] = False
                rows = torch.from_numpy(ordinary)
                s = SiteData(s.name, torch.cat([s.x_train[rows], self.x[keep]]),
                             torch.cat([s.y_train[rows], self.y[keep]]), s.x_test, s.y_test)
            sites.append(s)
        return FederatedData(data.schema, data.feature_names, sites, data.description,
                             data.standardization)


def make_canaries(data: FederatedData, *, n_canaries: int, site: str | None = None,
                  kind: str = "flip", seed: int = 0) -> Canaries:
    """Draw `n_canaries` canaries for `site` and flip each one's inclusion coin.

    Parameters
    ----------
    data : FederatedData
    n_canaries : int
        m (>= 2). ``flip`` draws them without replacement from the site's
        training rows, so the site needs more than m.
    site : str, optional
        Default: the site with the most training rows.
    kind : {"flip", "ood"}
        ``flip``: the site's own records with their outcome flipped (a
        mislabelled patient the model can only fit by memorising it). ``ood``: each
        feature at the minimum or the maximum of the site's training rows
        (a corner of the data's box, far from every patient), outcome at random.
    seed : int
        Seed of the draw and the coin flips.
    """
    if kind not in KINDS:
        raise ConfigError(f"The canary kind must be one of {list(KINDS)}; got {kind!r}.")
    if n_canaries < 2:
        raise ConfigError(f"n_canaries must be >= 2; got {n_canaries}.")
    names = [s.name for s in data.sites]
    if site is None:
        site = max(data.sites, key=lambda s: s.n_train).name
    elif site not in names:
        raise ConfigError(f"Canary site {site!r} is not in the federation; the sites are "
                          f"{names}.")
    rng = np.random.default_rng([seed, _CANARY_STREAM])
    train = data.sites[names.index(site)]
    if kind == "flip":
        if n_canaries >= train.n_train:
            raise DataError(f"{n_canaries} flipped-label canaries are drawn from site {site!r}'s "
                            f"{train.n_train} training rows, which must keep at least one "
                            f"ordinary row. Use fewer canaries, a larger site, or kind = \"ood\".")
        rows = np.sort(rng.choice(train.n_train, size=n_canaries, replace=False))
        index = torch.from_numpy(rows)
        x, y = train.x_train[index], 1.0 - train.y_train[index]
    else:
        low, high = train.x_train.min(dim=0).values, train.x_train.max(dim=0).values
        corner = torch.from_numpy(rng.random((n_canaries, train.x_train.shape[1])) < 0.5)
        x = torch.where(corner, high, low)
        y = torch.from_numpy((rng.random(n_canaries) < 0.5).astype(np.float32))
        rows = np.zeros(0, dtype=np.int64)
    included = np.asarray(rng.random(n_canaries) < 0.5)
    return Canaries(site, kind, x.contiguous(), y.contiguous(), included, rows)


# --------------------------------------------------------------------------- the audit
@dataclass(frozen=True)
class CanaryAuditResult:
    """A one-run lower bound next to the accountant's epsilon of the same run.

    Attributes
    ----------
    bound : OneRunBound
        The measured lower bound and the counts behind it.
    accountant_epsilon : float
        What the run's accountant claims for one canary (``inf`` without DP).
    canary_auc : float
        ROC AUC of the canary scores, IN against OUT (NaN if all landed on one side).
    dataset, site, kind, privacy_level : str
        What was audited.
    n_included : int
        Canaries whose coin came up IN.
    accuracy : float
        The audited model's accuracy on the pooled test set.
    privacy : dict or None
        The run's guarantee as its accountant states it (``summary["privacy"]``).
    seed : int
    seconds : float
    config : dict
    """

    bound: OneRunBound
    accountant_epsilon: float
    canary_auc: float = math.nan
    dataset: str = ""
    site: str = ""
    kind: str = "flip"
    privacy_level: str = "none"
    n_included: int = 0
    accuracy: float = math.nan
    privacy: dict[str, Any] | None = None
    seed: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def epsilon_lower_bound(self) -> float:
        return self.bound.epsilon

    @property
    def failed(self) -> bool:
        """True if the measured lower bound exceeds the claimed epsilon: the claim is wrong."""
        return self.bound.epsilon > self.accountant_epsilon

    @property
    def verdict(self) -> str:
        b = self.bound
        measured = (f"epsilon >= {b.epsilon:.2f} at {b.confidence:.0%} confidence "
                    f"({b.n_correct} of {b.n_guesses} guesses right, {b.n_canaries} canaries)")
        if math.isinf(self.accountant_epsilon):
            return f"No DP claim to check; measured {measured}."
        if self.failed:
            return (f"FAILED: measured {measured}, above the accountant's epsilon = "
                    f"{self.accountant_epsilon:.2f}: the implementation or its accounting "
                    "leaks more than claimed.")
        return (f"Consistent: measured {measured}, not above the accountant's epsilon = "
                f"{self.accountant_epsilon:.2f}.")

    def to_dict(self) -> dict[str, Any]:
        return {"audit": "one-run canary audit (Steinke, Nasr and Jagielski 2023)",
                "dataset": self.dataset, "site": self.site, "kind": self.kind,
                "privacy_level": self.privacy_level,
                "epsilon_lower_bound": self.bound.epsilon,
                "accountant_epsilon": json_number(self.accountant_epsilon),
                "failed": self.failed, "verdict": self.verdict,
                "bound": self.bound.to_dict(), "canary_auc": self.canary_auc,
                "n_included": self.n_included, "accuracy": self.accuracy,
                "privacy": self.privacy, "seed": self.seed, "seconds": self.seconds,
                "config": self.config}


def audit_canaries(config: RunConfig, *, n_canaries: int = 100, site: str | None = None,
                   confidence: float = 0.95, seed: int = 0, kind: str = "flip",
                   n_guesses: int | Sequence[int] | None = None) -> CanaryAuditResult:
    """Train `config` once with canaries planted at `site`; bound epsilon from below.

    Parameters
    ----------
    config : RunConfig
        The run to audit, trained exactly as configured.
    n_canaries : int
        m, canaries drawn (about half are included).
    site : str, optional
        Where the canaries go; default the site with the most training rows.
    confidence : float
        Confidence of the lower bound, in (0, 1).
    seed : int
        Seed of the canary draw and the inclusion coins.
    kind : {"flip", "ood"}
        See `make_canaries`.
    n_guesses : int or sequence of int, optional
        See `one_run_bound`.

    Returns
    -------
    CanaryAuditResult
        ``failed`` is True when the lower bound exceeds the accountant's epsilon.
    """
    started = time.perf_counter()
    _check_confidence(confidence)
    data = build_federation(config.data, private=config.privacy.level != "none")
    canaries = make_canaries(data, n_canaries=n_canaries, site=site, kind=kind, seed=seed)
    release = train_release(config, canaries.insert(data))
    scores = logit_margin(release.logits(canaries.x), canaries.y)
    delta = float(release.privacy["delta"]) if release.privacy else config.privacy.delta
    bound = one_run_bound(scores, canaries.included, delta=delta, confidence=confidence,
                          n_guesses=n_guesses)
    n_in = int(canaries.included.sum())
    auc = roc_auc(scores, canaries.included) if 0 < n_in < n_canaries else math.nan
    x_test, y_test = data.pooled_test()
    correct = logit_margin(release.logits(x_test), y_test) > 0
    return CanaryAuditResult(
        bound=bound, accountant_epsilon=accountant_epsilon(release.privacy, canaries.site),
        canary_auc=auc, dataset=config.data.dataset_name, site=canaries.site, kind=kind,
        privacy_level=config.privacy.level, n_included=n_in,
        accuracy=float(correct.mean()) if correct.size else math.nan, privacy=release.privacy,
        seed=seed, seconds=time.perf_counter() - started, config=config.to_dict())


# --------------------------------------------------------------------------- checks
def _check_counts(n_canaries: int, n_guesses: int, n_correct: int) -> None:
    if not 0 <= n_correct <= n_guesses <= n_canaries or n_guesses < 1:
        raise ConfigError(f"One-run audit counts must satisfy 0 <= correct <= guesses <= "
                          f"canaries and guesses >= 1; got {n_correct} correct of {n_guesses} "
                          f"guesses with {n_canaries} canaries.")


def _check_delta(delta: float) -> None:
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1); got {delta}.")


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}.")
    return float(confidence)


def _check_canary_scores(scores: ArrayLike, included: ArrayLike) -> tuple[NDArray[np.float64],
                                                                           BoolArray]:
    s = float64_array(scores)
    if s.ndim != 1:
        raise DataError(f"Canary scores must be one score per canary (shape (m,)); got shape "
                        f"{s.shape}.")
    inside = bool_flags(included, s.shape, "included", "one coin per canary")
    check_finite(s, "Canary scores")
    if len(s) < 2:
        raise DataError(f"A one-run audit needs at least 2 canaries; got {len(s)}.")
    return s, inside
