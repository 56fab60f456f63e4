"""Membership inference against the released model: was this patient in the training data?

Threat model
------------
Anyone who holds the released (global) model and a patient's record (features
and outcome), and who can train models like it: fedcare's code and the
configuration are public, and the attacker has records from the same
population. That is every user of the model, under every protection scheme
(``plain``, ``secagg`` and ``ckks`` hide updates, not the released model); only
differential privacy bounds what this attacker learns.

Attacks
-------
- **Threshold** (Yeom et al. 2018, "Privacy risk in machine learning"): a
  training record tends to get a lower loss, or a larger logit margin, than a
  record the model never saw. The score is the record's log-likelihood
  ``log p(y | x)`` (the negated loss) or its logit margin.
- **LiRA**, the likelihood ratio attack (Carlini et al. 2022, "Membership
  inference attacks from first principles"): train reference (shadow) models
  on random halves of a data pool, with fedcare's own runtime and the
  target's configuration, and model each record's logit margin under models
  trained with it (IN) and without it (OUT) as two Gaussians. *Online*
  scores a record by the likelihood ratio of the target's margin under IN
  and OUT; *offline* uses OUT alone (a one-sided test of how far above the
  OUT mean the target's margin lies). With few reference
  models (the paper says fewer than about 64) one variance shared by all
  records ("global") works better than one per record; it is the default.

Scores are computed in float64 from the float32 logits. For a binary model
with one logit ``z``, the margin ``z`` (``-z`` for a negative label) is exactly
Carlini et al.'s logit-scaled confidence ``log(p / (1 - p))``; the loss is
``log(1 + exp(-margin))`` in float64, because a float32 loss rounds to exactly
0 once the margin passes about 17, which ties every confident record.

Metrics
-------
ROC AUC over members and non-members, and the true positive rate at a low
false positive rate (1% and 0.1%), the figure of merit Carlini et al. argue
for: an attack that confidently identifies a few patients matters even when
its AUC is near 0.5. The numbers of members and non-members are reported
with them: with ``n`` non-members the smallest non-zero false positive rate
is ``1 / n``, so a TPR at 0.1% FPR from fewer than 1,000 non-members is the
TPR at zero false positives.

The experiment (`audit_membership`)
-----------------------------------
The data pool is every site's rows as the configuration builds them (its
training and its test rows). ``n_reference + 1`` models are trained, each by
`LocalRuntime` with the same configuration on its own uniformly random half
of each site's pool (``n // 2`` of a site's ``n`` rows), drawn independently
per model: each record is a member of a model with probability 1/2, every
model has the same number of rows at each site (so DP noise is calibrated
once, not once per model), and a target's members are independent of its
references' training sets. Each of the first ``n_targets`` models in turn is
the target and the others are its references (Carlini et al. evaluate the
same way); members are the target's training rows, non-members the rest of
the pool: the same sites, the same distribution. Model ``j`` trains with seed
``config.seed + j`` (model 0 as ``fedcare run`` would); the split comes from
`seed`. Metrics pool every target's records.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.data.site_data import FederatedData, SiteData
from fedcare.errors import ConfigError, DataError, FedcareError
from fedcare.models import FlatModel
from fedcare.runtime.local import LocalRuntime

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

FPRS: tuple[float, ...] = (0.01, 0.001)
"""False positive rates at which the true positive rate is reported."""
SIGNALS = ("margin", "loss")
VARIANCES = ("global", "per_record")
ATTACKS = ("loss", "margin", "lira_online", "lira_offline")
"""Attacks `audit_membership` runs, as named in its result."""
_SPLIT_STREAM = 0x4D454D42  # "MEMB": keys the membership split's generator


class NotFittedError(FedcareError, AttributeError):
    """An attack's `score_samples` or `predict` was called before its `fit`."""


# --------------------------------------------------------------------------- signals
def logit_margin(logits: ArrayLike, labels: ArrayLike) -> FloatArray:
    """Each record's logit margin ``log(p(y|x) / (1 - p(y|x)))``, in float64.

    Parameters
    ----------
    logits : array-like of shape (..., n)
        The model's one logit per record (any float dtype).
    labels : array-like of shape (n,)
        Outcomes, 0 or 1.

    Returns
    -------
    ndarray of float64, shape of `logits`
        ``z`` for a positive record, ``-z`` for a negative one: large when the
        model is confident in the true outcome.
    """
    z = float64_array(logits)
    y = _labels(labels, z.shape[-1])
    return np.where(y, z, -z)


def log_likelihood(logits: ArrayLike, labels: ArrayLike) -> FloatArray:
    """Each record's ``log p(y | x)`` (the negated binary cross-entropy), in float64.

    Computed as ``-log(1 + exp(-margin))`` without overflow, so confident
    records keep distinct values (a float32 loss is exactly 0 beyond a margin
    of about 17).
    """
    return -np.logaddexp(0.0, -logit_margin(logits, labels))


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class MembershipMetrics:
    """How well a membership score separates members from non-members.

    Attributes
    ----------
    roc_auc : float
        Area under the ROC curve, in [0, 1]; 0.5 is guessing.
    tpr_at_fpr : dict of float to float
        False positive rate -> the largest true positive rate reached with at
        most that rate of false positives.
    n_members, n_non_members : int
        Records scored. ``1 / n_non_members`` is the smallest non-zero false
        positive rate: below it, ``tpr_at_fpr`` is the TPR at zero false
        positives.
    """

    roc_auc: float
    tpr_at_fpr: dict[float, float]
    n_members: int
    n_non_members: int

    @property
    def fpr_resolution(self) -> float:
        """The smallest non-zero false positive rate these records can show."""
        return 1.0 / self.n_non_members

    def to_dict(self) -> dict[str, Any]:
        return {"roc_auc": self.roc_auc,
                "tpr_at_fpr": {f"{fpr:g}": tpr for fpr, tpr in self.tpr_at_fpr.items()},
                "n_members": self.n_members, "n_non_members": self.n_non_members,
                "fpr_resolution": self.fpr_resolution}


def roc_auc(scores: ArrayLike, is_member: ArrayLike) -> float:
    """ROC AUC of membership scores (higher = more likely a member), ties counted half.

    Raises
    ------
    DataError
        If a score is not finite, the lengths differ, or there is no member
        or no non-member.
    """
    s, member = _check_scores(scores, is_member)
    n_pos, n_neg = int(member.sum()), int((~member).sum())
    # Mann-Whitney U with average ranks for ties.
    ranks = rankdata(s)
    return float((ranks[member].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores: ArrayLike, is_member: ArrayLike, fpr: float) -> float:
    """The largest true positive rate over thresholds whose false positive rate is <= `fpr`.

    Records with equal scores are on the same side of every threshold, so
    ties never split (no interpolation between ROC points).
    """
    return _tpr_at(*_check_scores(scores, is_member), [_check_fpr(fpr)])[0]


def membership_metrics(scores: ArrayLike, is_member: ArrayLike,
                       fprs: Sequence[float] = FPRS) -> MembershipMetrics:
    """ROC AUC and TPR at each of `fprs` of membership scores, with the counts behind them."""
    s, member = _check_scores(scores, is_member)
    rates = [_check_fpr(f) for f in fprs]
    return MembershipMetrics(roc_auc(s, member), dict(zip(rates, _tpr_at(s, member, rates),
                                                          strict=True)),
                             int(member.sum()), int((~member).sum()))


def _tpr_at(s: FloatArray, member: BoolArray, fprs: Sequence[float]) -> list[float]:
    order = np.argsort(-s, kind="stable")
    s, member = s[order], member[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # one ROC point per distinct score
    tpr = np.r_[0.0, np.cumsum(member)[last] / member.sum()]
    fp = np.r_[0, np.cumsum(~member)[last]]
    n_neg = int((~member).sum())
    # Compare counts, not rates: fp / n <= fpr without rounding at the boundary.
    return [float(tpr[fp <= math.floor(fpr * n_neg + 1e-9)].max()) for fpr in fprs]


# --------------------------------------------------------------------------- attacks
class ThresholdAttack:
    """Yeom et al. (2018): a record is a member if its loss is low (or its margin high).

    Parameters
    ----------
    signal : {"margin", "loss"}
        ``margin``: the logit margin; ``loss``: the log-likelihood ``log p(y|x)``
        (the negated loss), both float64. The two rank records identically;
        both are offered because papers report either.
    fpr : float
        False positive rate in (0, 1) that `fit` calibrates the threshold of
        `predict` to.

    Attributes
    ----------
    threshold_ : float
        Scores above it are predicted members (set by `fit`).
    """

    def __init__(self, signal: str = "margin", fpr: float = 0.01) -> None:
        self.signal = signal
        self.fpr = fpr

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> ThresholdAttack:
        """Calibrate the threshold on records known not to be members.

        Parameters
        ----------
        logits : array-like of shape (n,)
            A model's logits on records it was not trained on (the attacker's
            own population data, or a reference model's held-out records).
        labels : array-like of shape (n,)
        """
        self._check_settings()
        s = self._signal(logits, labels)
        if len(s) == 0:
            raise DataError("ThresholdAttack.fit needs at least one non-member record; got 0.")
        self.threshold_ = float(np.quantile(s, 1.0 - self.fpr))
        return self

    def score_samples(self, logits: ArrayLike, labels: ArrayLike) -> FloatArray:
        """Membership score of each record (higher = more likely a member)."""
        _check_fitted(self, "threshold_")
        return self._signal(logits, labels)

    def predict(self, logits: ArrayLike, labels: ArrayLike) -> BoolArray:
        """Whether each record is guessed to be a member."""
        return np.asarray(self.score_samples(logits, labels) > self.threshold_)

    def score(self, logits: ArrayLike, labels: ArrayLike, is_member: ArrayLike) -> float:
        """ROC AUC of the attack on records whose membership is known."""
        return roc_auc(self.score_samples(logits, labels), is_member)

    def _check_settings(self) -> None:
        if self.signal not in SIGNALS:
            raise ConfigError(f"The 'signal' parameter of ThresholdAttack must be one of "
                              f"{list(SIGNALS)}. Got {self.signal!r} instead.")
        _check_fpr(self.fpr, "The 'fpr' parameter of ThresholdAttack")

    def _signal(self, logits: ArrayLike, labels: ArrayLike) -> FloatArray:
        s = (logit_margin if self.signal == "margin" else log_likelihood)(logits, labels)
        if s.ndim != 1:
            raise DataError(f"ThresholdAttack expects one logit per record (shape (n,)); got "
                            f"shape {s.shape}.")
        check_finite(s, "logits")
        return s


class LiRA:
    """The likelihood ratio attack of Carlini et al. (2022), on logit margins.

    Parameters
    ----------
    online : bool
        True: score = ``log N(m; mu_in, s_in) - log N(m; mu_out, s_out)``,
        which needs reference models trained with and without each record.
        False (offline): score = ``(m - mu_out) / s_out``, which ranks records
        as the paper's one-sided p-value does, from models trained without
        them only.
    variance : {"global", "per_record"}
        One standard deviation for all records (IN and OUT each), the paper's
        advice below about 64 reference models; or one per record, which
        needs at least two observations of each record on each side used.
    min_std : float
        Floor on a standard deviation (> 0), so a record whose margin every
        reference model agrees on does not give infinite scores.
    fpr : float
        False positive rate in (0, 1) that `fit` calibrates `predict`'s
        threshold to, on the reference models' own non-member observations.

    Attributes
    ----------
    labels_ : ndarray of bool, shape (n,)
    mean_in_, mean_out_ : ndarray of float64, shape (n,)
        Each record's mean margin under reference models trained with / without
        it (``mean_in_`` is NaN offline).
    std_in_, std_out_ : ndarray of float64, shape (n,)
        Their standard deviations (constant with ``variance = "global"``).
    threshold_ : float
        Scores above it are predicted members.
    """

    def __init__(self, *, online: bool = True, variance: str = "global", min_std: float = 1e-3,
                 fpr: float = 0.01) -> None:
        self.online = online
        self.variance = variance
        self.min_std = min_std
        self.fpr = fpr

    def fit(self, reference_logits: ArrayLike, reference_in: ArrayLike,
            labels: ArrayLike) -> LiRA:
        """Fit each record's IN and OUT margin distributions from reference models.

        Parameters
        ----------
        reference_logits : array-like of shape (n_reference, n)
            Each reference model's logit on each of the `n` records.
        reference_in : array-like of bool, shape (n_reference, n)
            Whether the record was in that reference model's training data.
        labels : array-like of shape (n,)
            The records' outcomes, 0 or 1.
        """
        self._check_settings()
        z = float64_array(reference_logits)
        if z.ndim != 2:
            raise DataError(f"LiRA.fit: reference_logits must have shape (n_reference, n); got "
                            f"shape {z.shape}.")
        inside = bool_flags(reference_in, z.shape, "LiRA.fit: reference_in",
                            "the shape of reference_logits")
        check_finite(z, "LiRA.fit: reference_logits")
        margins = logit_margin(z, labels)
        self.labels_ = _labels(labels, z.shape[1])
        need = 2 if self.variance == "per_record" else 1
        sides = [("OUT", ~inside)] + ([("IN", inside)] if self.online else [])
        stats = {}
        for side, mask in sides:
            counts = mask.sum(axis=0)
            short = np.flatnonzero(counts < need)
            if short.size:
                raise DataError(
                    f"LiRA.fit ({'online' if self.online else 'offline'}, {self.variance} "
                    f"variance) needs at least {need} reference model(s) {side} of every record; "
                    f"record {int(short[0])} has {int(counts[short[0]])} ({short.size} record(s) "
                    f"short). Train more reference models.")
            stats[side] = self._gaussian(margins, mask, counts)
        self.mean_out_, self.std_out_ = stats["OUT"]
        nan = np.full(z.shape[1], np.nan)
        self.mean_in_, self.std_in_ = stats.get("IN", (nan, nan))
        # Calibrate on the references' own non-member observations (each is also in the
        # fit, so the threshold is slightly optimistic, as in Carlini et al.'s code).
        out_scores = self._score(margins)[~inside]
        self.threshold_ = float(np.quantile(out_scores, 1.0 - self.fpr))
        return self

    def score_samples(self, logits: ArrayLike) -> FloatArray:
        """Membership score of each record under the target model (higher = member).

        Parameters
        ----------
        logits : array-like of shape (n,)
            The target model's logit on the records given to `fit`, in that order.
        """
        _check_fitted(self, "threshold_")
        z = float64_array(logits)
        if z.shape != self.labels_.shape:
            raise DataError(f"LiRA.score_samples: expected the target's logits on the "
                            f"{len(self.labels_)} records given to fit, shape "
                            f"{self.labels_.shape}; got shape {z.shape}.")
        check_finite(z, "LiRA.score_samples: logits")
        return self._score(np.where(self.labels_, z, -z))

    def predict(self, logits: ArrayLike) -> BoolArray:
        """Whether each record is guessed to be a member of the target's training data."""
        return np.asarray(self.score_samples(logits) > self.threshold_)

    def score(self, logits: ArrayLike, is_member: ArrayLike) -> float:
        """ROC AUC of the attack against a target whose members are known."""
        return roc_auc(self.score_samples(logits), is_member)

    def _score(self, margins: FloatArray) -> FloatArray:
        out = (margins - self.mean_out_) / self.std_out_
        if not self.online:
            return out
        inside = (margins - self.mean_in_) / self.std_in_
        # log N(m; mu_in, s_in) - log N(m; mu_out, s_out), the 2 pi terms cancelling
        return np.asarray(0.5 * (out**2 - inside**2) + np.log(self.std_out_ / self.std_in_))

    def _gaussian(self, margins: FloatArray, mask: BoolArray,
                  counts: NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
        total = np.where(mask, margins, 0.0).sum(axis=0)
        mean = total / counts
        squares = np.where(mask, (margins - mean) ** 2, 0.0)
        if self.variance == "global":
            dof = int(counts.sum()) - len(counts)
            pooled = math.sqrt(float(squares.sum()) / dof) if dof > 0 else 0.0
            std = np.full(len(counts), pooled)
        else:
            std = np.sqrt(squares.sum(axis=0) / (counts - 1))
        return mean, np.maximum(std, self.min_std)

    def _check_settings(self) -> None:
        if self.variance not in VARIANCES:
            raise ConfigError(f"The 'variance' parameter of LiRA must be one of "
                              f"{list(VARIANCES)}. Got {self.variance!r} instead.")
        if not (self.min_std > 0 and math.isfinite(self.min_std)):
            raise ConfigError(f"The 'min_std' parameter of LiRA must be a float in (0, inf). "
                              f"Got {self.min_std!r} instead.")
        _check_fpr(self.fpr, "The 'fpr' parameter of LiRA")


# --------------------------------------------------------------------------- the experiment
@dataclass(frozen=True)
class ReleasedModel:
    """A model trained by `LocalRuntime` and what its run's accountant says about it."""

    model: FlatModel
    params: torch.Tensor
    privacy: dict[str, Any] | None
    """The run's guarantee (``summary["privacy"]`` of a run directory); None without DP."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The released model's logit on each row of `x` (float32)."""
        self.model.load(self.params)
        return self.model.predict_logits(x)


def train_release(config: RunConfig, data: FederatedData) -> ReleasedModel:
    """Train one federation on `data` with fedcare's local runtime, as `fedcare run` does."""
    torch.set_num_threads(config.threads)
    runtime = LocalRuntime(data, config)
    params = runtime.run()
    privacy = None
    if runtime.privacy is not None and runtime.ledger is not None:
        privacy = runtime.privacy.guarantee(runtime.ledger)
    return ReleasedModel(runtime.model, params, privacy)


def with_training_rows(data: FederatedData, rows: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       held_out: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> FederatedData:
    """`data` with each site's training rows (and test rows) replaced, in site order."""
    sites = [SiteData(s.name, x, y, xt, yt)
             for s, (x, y), (xt, yt) in zip(data.sites, rows, held_out, strict=True)]
    return FederatedData(data.schema, data.feature_names, sites, data.description,
                         data.standardization)


def accountant_epsilon(privacy: Mapping[str, Any] | None, site: str | None = None) -> float:
    """The epsilon a run's accountant claims: ``inf`` without DP.

    Record level: the given `site`'s epsilon (or the largest over sites);
    site level: the federation's epsilon, which covers any one record too.
    """
    if privacy is None:
        return math.inf
    if privacy.get("level") == "record" and site is not None:
        return float(privacy["epsilon_per_site"][site])
    return float(privacy["epsilon"])


def membership_masks(site_sizes: Sequence[int], n_models: int,
                     rng: np.random.Generator) -> BoolArray:
    """Which records each model trains on: shape (n_models, total records).

    Each model takes a uniformly random half (``n // 2`` rows) of each site's
    pool, independently of the other models. Every model therefore has the
    same number of rows at each site, so DP noise calibrated for one fits
    all (and is computed once); each record is in a model with probability
    ``(n // 2) / n`` (1/2 for even ``n``), and the target's members are
    independent of its references' training sets, as an attacker's own
    reference models would be.
    """
    if n_models < 2:
        raise ConfigError(f"Membership inference needs at least 2 models (a target and a "
                          f"reference); got {n_models}.")
    blocks = []
    for n in site_sizes:
        if n < 2:
            raise DataError(f"Membership inference splits each site's rows in halves; a site "
                            f"has {n} row(s).")
        ranks = np.argsort(rng.random((n_models, n)), axis=1)
        blocks.append(ranks < n // 2)
    return np.concatenate(blocks, axis=1)


@dataclass(frozen=True)
class MembershipAuditResult:
    """What `audit_membership` measured (``to_dict`` is what ``audit.json`` holds).

    Attributes
    ----------
    dataset, description : str
        The configuration's data.
    model : str
        Model name and layer widths, e.g. ``mlp 30-256-256-1``.
    privacy_level : str
        ``none``, ``record`` or ``site``.
    accountant_epsilon : float
        The largest epsilon the target runs' accountant reported (``inf``
        without DP); record level: the largest over sites.
    delta : float
        The configuration's delta.
    attacks : dict of str to MembershipMetrics
        ``loss``, ``margin`` (Yeom et al.), ``lira_online`` and ``lira_offline``
        (Carlini et al.), over every target's members and non-members pooled.
    n_records : int
        Size of the data pool.
    n_reference, n_targets : int
        Reference models per target; target models evaluated.
    n_unscored : int
        (target, record) pairs left out because the record was in all or in
        none of that target's references (online LiRA cannot score it).
    accuracy : dict of str to float
        The targets' accuracy on their members (training rows) and their
        non-members (held-out rows of the pool): the generalisation gap the
        attacks exploit.
    privacy : dict or None
        The first target run's guarantee, as its accountant states it.
    seed : int
        Seed of the membership split.
    seconds : float
        Wall time of the audit.
    """

    dataset: str
    description: str
    model: str
    privacy_level: str
    accountant_epsilon: float
    delta: float
    attacks: dict[str, MembershipMetrics]
    n_records: int
    n_reference: int
    n_targets: int
    n_unscored: int
    accuracy: dict[str, float]
    privacy: dict[str, Any] | None = None
    seed: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"audit": "membership inference against the released model",
                "dataset": self.dataset, "description": self.description, "model": self.model,
                "privacy_level": self.privacy_level,
                "accountant_epsilon": json_number(self.accountant_epsilon), "delta": self.delta,
                "attacks": {name: m.to_dict() for name, m in self.attacks.items()},
                "n_records": self.n_records, "n_reference": self.n_reference,
                "n_targets": self.n_targets, "n_unscored": self.n_unscored,
                "accuracy": self.accuracy,
                "privacy": self.privacy, "seed": self.seed, "seconds": self.seconds,
                "config": self.config}


def model_description(config: RunConfig, n_features: int) -> str:
    """The model's name and layer widths, e.g. ``mlp 30-256-256-1``."""
    if config.model.name == "mlp":
        widths = [n_features, *config.model.hidden, 1]
        return "mlp " + "-".join(str(w) for w in widths)
    return f"{config.model.name} {n_features}-1"


def audit_membership(config: RunConfig, *, n_reference: int = 16, n_targets: int | None = None,
                     seed: int = 0, fprs: Sequence[float] = FPRS,
                     on_model: Callable[[int, int], None] | None = None
                     ) -> MembershipAuditResult:
    """Membership inference against models trained with `config`: loss, margin and LiRA.

    Parameters
    ----------
    config : RunConfig
        The run to audit; every model is trained with it (privacy included).
    n_reference : int
        Reference models per target (>= 3). A record that is in all or in
        none of a target's references cannot be scored by online LiRA and is
        left out for that target (probability ``2^(1 - n_reference)``).
        Carlini et al. use 64-256 reference models; with a global variance 16
        gives most of the attack's power.
    n_targets : int, optional
        How many of the ``n_reference + 1`` models serve in turn as the target
        (the others being its references); default all of them. Training
        cost does not change; more targets give more scored records, hence
        finer TPR at low FPR.
    seed : int
        Seed of the membership split (reproducible; it is an experiment, not a
        privacy mechanism).
    fprs : sequence of float
        False positive rates at which to report the TPR.
    on_model : callable, optional
        Called with (models trained, models to train) after each model.

    Returns
    -------
    MembershipAuditResult
    """
    started = time.perf_counter()
    if n_reference < 3:
        raise ConfigError(f"n_reference must be >= 3 (online LiRA needs records both in and "
                          f"out of some reference model); got {n_reference}.")
    n_models = n_reference + 1
    targets = n_models if n_targets is None else n_targets
    if not 1 <= targets <= n_models:
        raise ConfigError(f"n_targets must be in [1, n_reference + 1 = {n_models}]; got "
                          f"{n_targets}.")
    rates = [_check_fpr(f) for f in fprs]
    data = build_federation(config.data, private=config.privacy.level != "none")
    pools = [(torch.cat([s.x_train, s.x_test]), torch.cat([s.y_train, s.y_test]))
             for s in data.sites]
    x = torch.cat([p[0] for p in pools])
    y = torch.cat([p[1] for p in pools])
    sizes = [len(p[1]) for p in pools]
    bounds = np.cumsum([0, *sizes])
    masks = membership_masks(sizes, n_models, np.random.default_rng([seed, _SPLIT_STREAM]))

    logits = np.empty((n_models, len(y)))
    privacy: list[dict[str, Any] | None] = []
    for j, mask in enumerate(masks):
        rows, held_out = [], []
        for (xs, ys), begin, end in zip(pools, bounds[:-1], bounds[1:], strict=True):
            keep = torch.from_numpy(mask[begin:end])
            rows.append((xs[keep], ys[keep]))
            held_out.append((xs[~keep], ys[~keep]))
        model_config = copy.deepcopy(config)
        model_config.seed = config.seed + j
        release = train_release(model_config, with_training_rows(data, rows, held_out))
        logits[j] = release.logits(x).double().numpy()
        privacy.append(release.privacy)
        if on_model is not None:
            on_model(j + 1, n_models)

    labels = y.numpy()
    scores: dict[str, list[FloatArray]] = {name: [] for name in ATTACKS}
    members: list[BoolArray] = []
    unscored = 0
    for t in range(targets):
        refs = np.delete(np.arange(n_models), t)
        # Online LiRA needs each record IN and OUT of some reference; with independent
        # halves a record misses one side with probability 2^(1 - n_reference). Leaving
        # those out is unbiased: the target's members are independent of the references.
        n_in = masks[refs].sum(axis=0)
        usable = (n_in > 0) & (n_in < len(refs))
        unscored += int((~usable).sum())
        ref_logits, ref_in, y_t = logits[refs][:, usable], masks[refs][:, usable], labels[usable]
        for name, attack in (("loss", ThresholdAttack("loss")),
                             ("margin", ThresholdAttack("margin"))):
            attack.fit(ref_logits[~ref_in], np.broadcast_to(y_t, ref_in.shape)[~ref_in])
            scores[name].append(attack.score_samples(logits[t, usable], y_t))
        for name, online in (("lira_online", True), ("lira_offline", False)):
            lira = LiRA(online=online).fit(ref_logits, ref_in, y_t)
            scores[name].append(lira.score_samples(logits[t, usable]))
        members.append(masks[t, usable])
    member = np.concatenate(members)
    attacks = {name: membership_metrics(np.concatenate(s), member, rates)
               for name, s in scores.items()}
    correct = logit_margin(logits[:targets], labels) > 0
    accuracy = {"members": float(correct[masks[:targets]].mean()),
                "non_members": float(correct[~masks[:targets]].mean())}
    claimed = max(accountant_epsilon(p) for p in privacy[:targets])
    return MembershipAuditResult(
        dataset=config.data.dataset_name, description=data.description,
        model=model_description(config, data.n_features), privacy_level=config.privacy.level,
        accountant_epsilon=claimed, delta=config.privacy.delta, attacks=attacks,
        n_records=len(labels), n_reference=n_reference, n_targets=targets,
        n_unscored=unscored, accuracy=accuracy, privacy=privacy[0], seed=seed,
        seconds=time.perf_counter() - started, config=config.to_dict())


# --------------------------------------------------------------------------- checks
def float64_array(values: ArrayLike) -> FloatArray:
    """`values` (array-like or tensor) as a float64 array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _labels(labels: ArrayLike, n: int) -> BoolArray:
    y = float64_array(labels)
    if y.shape != (n,):
        raise DataError(f"Expected one label per record, shape ({n},); got shape {y.shape}.")
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise DataError(f"Labels must be 0 or 1; label {int(bad[0])} is {y[bad[0]]!r} "
                        f"({bad.size} such).")
    return np.asarray(y == 1)


def bool_flags(values: ArrayLike, shape: tuple[int, ...], what: str,
               expected: str) -> BoolArray:
    """`values` (array-like or tensor) as booleans of `shape`; `DataError` naming `what` else."""
    flags = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor)
                       else values)
    if flags.shape != shape:
        raise DataError(f"{what} has shape {flags.shape}; expected {expected}, {shape}.")
    if flags.dtype != np.bool_:
        if flags.size and not np.isin(flags, (0, 1)).all():
            raise DataError(f"{what} must be boolean (or 0/1).")
        flags = flags.astype(bool)
    return flags


def check_finite(values: FloatArray, what: str) -> None:
    """Raise `DataError` naming `what` and the first index holding a NaN or an infinity."""
    bad = np.flatnonzero(~np.isfinite(values.ravel()))
    if bad.size:
        where = np.unravel_index(int(bad[0]), values.shape)
        raise DataError(f"{what} must be finite; the value at index "
                        f"{tuple(int(i) for i in where) if values.ndim > 1 else int(where[0])} is "
                        f"{values[where]} ({bad.size} non-finite).")


def _check_scores(scores: ArrayLike, is_member: ArrayLike) -> tuple[FloatArray, BoolArray]:
    s = float64_array(scores)
    if s.ndim != 1:
        raise DataError(f"Membership scores must be one score per record (shape (n,)); got "
                        f"shape {s.shape}.")
    member = bool_flags(is_member, s.shape, "is_member", "one flag per score")
    check_finite(s, "Membership scores")
    n_pos = int(member.sum())
    if n_pos == 0 or n_pos == len(member):
        which = "member" if n_pos == 0 else "non-member"
        raise DataError(f"Membership metrics need members and non-members; is_member marks no "
                        f"{which} among the {len(member)} records.")
    return s, member


def _check_fpr(fpr: float, what: str = "A false positive rate") -> float:
    if not 0 < fpr < 1:
        raise ConfigError(f"{what} must be in (0, 1). Got {fpr!r} instead.")
    return float(fpr)


def _check_fitted(estimator: object, attribute: str) -> None:
    if not hasattr(estimator, attribute):
        raise NotFittedError(f"This {type(estimator).__name__} is not fitted yet; call fit "
                             "first.")


def json_number(value: float) -> float | str:
    """`value` for JSON, which has no infinity: ``"inf"`` (an epsilon without DP)."""
    return value if math.isfinite(value) else "inf"


