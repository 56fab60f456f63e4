"""Gradient inversion against one site's update: what a curious aggregator can read back.

Threat model
------------
An honest-but-curious aggregator: it runs the protocol as written and knows
everything public (the configuration, the model architecture, the global
parameters it sent, the schema with its vocabularies and bounds, the
standardisation every site applies), and tries to reconstruct a patient's
record from what reaches it. What reaches it depends on the configuration:

- ``protection.scheme = "plain"``: each site's payload ``[n * delta, n]``
  (`fedcare.federation.site.FitResult`), one site at a time;
- client-level DP (``privacy.level = "site"``): the clipped update; with
  ``privacy.noise = "distributed"`` each site has added its share of the noise
  before sending, with ``"central"`` the aggregator adds the noise itself
  *after* reading the clipped update, so it sees clipping alone;
- record-level DP (``privacy.level = "record"``): DP-SGD ran at the site, so
  the update carries per-record clipping and noise;
- ``secagg`` and ``ckks``: only the sum over the round's sites (for ckks
  with the decrypting site's flooding noise).

The leakage setup
-----------------
The standard one of the gradient inversion literature, the attacker's best
case: every site holds one record and takes one local step (batch size 1,
one epoch, FedSGD-style), so a site's update is ``-lr`` times the gradient
of the loss of that one record, or its clipped, noised or summed form. Each
target record gets its own round from the initial global model (as round 1
of ``fedcare run``): fedcare's own `Site.fit` and `Aggregator.run_round`
produce it, and a wrapper around the protection scheme keeps what the
aggregator's session was given (`add`) and revealed (`reveal`), which is
exactly what the aggregator can read. The other sites of the federation take
part in the same round with one record of their own each; the privacy
mechanisms are calibrated for this setup over ``federation.rounds`` rounds
(``federation.rounds = 1`` puts the whole budget into the one round
observed: the least noise a given epsilon allows). A round in which the
target site is not selected reveals nothing about it; the experiment
conditions on its selection (the next round number is tried).

Attacks (`ATTACKS`, by name)
----------------------------
``analytic``
    Phong et al. 2018 ("Privacy-preserving deep learning via additively
    homomorphic encryption"), Geiping et al. 2020 ("Inverting gradients"):
    at batch size 1 a fully connected layer ``h = W x + b`` has
    ``dL/dW_i = (dL/db_i) x`` for every row ``i``, so ``x = dL/dW_i / dL/db_i``
    for any row with ``dL/db_i != 0``. Here the least-squares combination of
    all rows, ``x = sum_i g_i G_i / sum_i g_i^2`` (``g = dL/db``, ``G = dL/dW``),
    which is exact without noise and averages noise over the rows with it.
    Works for logistic regression (the only layer) and an MLP's first layer.
``neurons``
    After Pan et al. 2022 ("exclusively activated neurons"): in a *sum* of several
    records' gradients, a ReLU unit of the first layer that only one record
    activated still carries that record exactly in its row; the attacker
    finds those rows without knowing the records (`ExclusiveNeurons`). Against
    one site's payload it equals ``analytic``; against a ``secagg``/``ckks``
    sum it separates the summed records.
``idlg``
    Zhao et al. 2020: the label from the output bias gradient (for one logit
    ``z`` and binary cross-entropy, ``dL/db = sigmoid(z) - y``, negative iff
    ``y = 1``), then DLG's optimisation for the input.
``dlg``
    Zhu et al. 2019: dummy input and dummy (soft) label optimised together to
    minimise ``||grad L(x', y') - g||^2``, from a seeded random start.
``tableak``
    Vero et al. 2023: for mixed-type records each categorical column is a
    softmax over its categories (the encoder's one-hot block, its first
    category implicit with ``drop_first``), the cosine gradient-matching loss
    of Geiping et al., and pooling over seeded restarts: median of each
    numeric feature, mode of each categorical one. The label is iDLG's.

Optimisation uses Adam with a cosine learning-rate decay, all records and
restarts at once (each row's loss depends on its own variables only, and
Adam's step is per coordinate, so batching changes nothing). The attacker's
gradient of a dummy record is computed by `DenseGradients` in closed form
for fedcare's models (linear layers with ReLU between, one logit), which a
test checks against what `Site.fit` sends.

Metrics
-------
A reconstruction is mapped back to the schema's features: a numeric value by
the site's standardisation (``value = mean + std * encoded``, clipped to the
schema's public bounds, which the attacker knows), a categorical one by the
argmax of its block. A numeric feature counts as recovered within
``tolerance`` (default 0.05) of its public range, the schema's bounds (for a
column without bounds, of 4 standard deviations); a categorical one if it is
the right category. A record is recovered when every feature is. The truth
is the record as the model sees it (after imputation and clipping to the
bounds): no update can reveal more.

Against a sum the aggregator does not know which site a record came from:
each attack's reconstruction is scored against the target record, and
separately every record it claims (at most one per site in the sum) against
every record in the sum (``round_records_recovered``: what it learns about
*some* patient).

The **prior baseline** guesses every record the same from public data (here
the other sites' training rows, which the attack never sees): each
categorical feature's mode, each numeric feature's value that falls within
the tolerance of the most public records (for this metric at least as good
as the mean, and the mode for a 0/1 column), and the majority label. An
attack that does no better has learnt nothing from the update that the
population did not already say.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.data.schema import Schema
from fedcare.data.site_data import FederatedData, SiteData
from fedcare.errors import ConfigError, DataError, ProtocolError
from fedcare.federation.aggregator import Aggregator
from fedcare.federation.site import Site
from fedcare.federation.strategy import build_strategy
from fedcare.federation.training import LocalTrainer
from fedcare.models import FlatModel, ParamSpec, build_model
from fedcare.privacy.plan import build_privacy_plan, noise_factory
from fedcare.protection import build_scheme
from fedcare.protection.base import AggregatorSession, Exchange, Scheme, SiteSession
from fedcare.runtime.local import training_plan
from fedcare.seeding import INIT, torch_generator

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

TOLERANCE = 0.05
"""Default numeric tolerance: a share of the feature's public range."""
SUMMED_SCHEMES = ("secagg", "ckks")
"""Schemes under which the aggregator reads only the sum of the round's payloads."""
_TARGET_STREAM = 0x47524144  # "GRAD": keys the choice of target and companion records
_MAX_TRIES = 1000
"""Rounds tried per record before concluding the target site is never selected."""


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CategoricalBlock:
    """Where one categorical column's one-hot block sits in the encoded input.

    Attributes
    ----------
    name : str
    start, stop : int
        Column range of the block in the encoded input.
    n_categories : int
        Size of the vocabulary; the block has one column fewer with `drop_first`
        (the first category is then the all-zero block).
    drop_first : bool
    """

    name: str
    start: int
    stop: int
    n_categories: int
    drop_first: bool


@dataclass(frozen=True)
class FeatureLayout:
    """The encoded input as the schema lays it out: numeric columns first, then blocks."""

    numeric: tuple[str, ...]
    blocks: tuple[CategoricalBlock, ...]

    @classmethod
    def of(cls, schema: Schema) -> FeatureLayout:
        blocks, start = [], len(schema.numeric)
        for name, vocabulary in schema.categorical.items():
            width = len(vocabulary) - 1 if schema.drop_first else len(vocabulary)
            blocks.append(CategoricalBlock(name, start, start + width, len(vocabulary),
                                           schema.drop_first))
            start += width
        return cls(tuple(schema.numeric), tuple(blocks))

    @property
    def n_numeric(self) -> int:
        return len(self.numeric)

    @property
    def n_features(self) -> int:
        """Width of the encoded input."""
        return self.blocks[-1].stop if self.blocks else self.n_numeric

    @property
    def features(self) -> tuple[str, ...]:
        """Schema features (not encoded columns), numeric then categorical."""
        return (*self.numeric, *(b.name for b in self.blocks))


@dataclass(frozen=True)
class Records:
    """Records in the schema's terms: numeric values and category codes.

    Attributes
    ----------
    numeric : ndarray of float64, shape (n, n_numeric)
        In the data's units.
    categorical : ndarray of int64, shape (n, n_categorical)
        Index into each column's vocabulary.
    """

    numeric: FloatArray
    categorical: IntArray

    def __len__(self) -> int:
        return int(self.numeric.shape[0])


@dataclass(frozen=True)
class RecordDecoder:
    """From an encoded input back to the schema's features, as an attacker can.

    Parameters
    ----------
    layout : FeatureLayout
    mean, std : ndarray of shape (n_numeric,)
        The site's standardisation (``encoded = (value - mean) / std``); public
        to the aggregator (``bounds``: from the schema; ``federated``: it
        computed them).
    bounds : ndarray of shape (n_numeric, 2)
        Public ranges (low, high); decoded values are clipped to them. A row of
        NaN: the column has no bounds.
    """

    layout: FeatureLayout
    mean: FloatArray
    std: FloatArray
    bounds: FloatArray

    @classmethod
    def for_site(cls, data: FederatedData, site: str) -> RecordDecoder:
        stats = data.standardization[site]
        bounds = np.array([data.schema.bounds.get(c, (math.nan, math.nan))
                           for c in data.schema.numeric], dtype=np.float64).reshape(-1, 2)
        return cls(FeatureLayout.of(data.schema), np.asarray(stats["mean"], dtype=np.float64),
                   np.asarray(stats["std"], dtype=np.float64), bounds)

    def decode(self, encoded: torch.Tensor | FloatArray) -> Records:
        """Numeric values (clipped to public bounds) and each block's argmax category."""
        x = _as_float64(encoded)
        if x.ndim != 2 or x.shape[1] != self.layout.n_features:
            raise DataError(f"Encoded records must have shape (n, {self.layout.n_features}); "
                            f"got {x.shape}.")
        p = self.layout.n_numeric
        numeric = self.mean + self.std * x[:, :p]
        low, high = self.bounds[:, 0], self.bounds[:, 1]
        numeric = np.where(np.isnan(low), numeric, np.clip(numeric, low, high))
        codes = np.empty((len(x), len(self.layout.blocks)), dtype=np.int64)
        for j, block in enumerate(self.layout.blocks):
            scores = x[:, block.start:block.stop]
            if block.drop_first:  # the first category's share is what the block leaves
                scores = np.concatenate([1.0 - scores.sum(axis=1, keepdims=True), scores], 1)
            codes[:, j] = scores.argmax(axis=1)
        return Records(numeric, codes)

    def tolerance(self, fraction: float = TOLERANCE) -> FloatArray:
        """Per numeric feature, the absolute error (data units) that still counts as right."""
        _check_tolerance(fraction)
        width = np.where(np.isnan(self.bounds[:, 0]), 4.0 * self.std,
                         self.bounds[:, 1] - self.bounds[:, 0])
        return np.asarray(fraction * width, dtype=np.float64)


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class ReconstructionMetrics:
    """How much of the target records a reconstruction got right.

    Attributes
    ----------
    n_records : int
    records_recovered : float
        Share of records with every feature right.
    feature_accuracy : dict of str to float
        Per schema feature, the share of records where it is right (numeric:
        within the tolerance; categorical: the right category).
    label_accuracy : float
        Share of records whose outcome was recovered.
    """

    n_records: int
    records_recovered: float
    feature_accuracy: dict[str, float]
    label_accuracy: float

    @property
    def mean_feature_accuracy(self) -> float:
        return float(np.mean(list(self.feature_accuracy.values())))

    def to_dict(self) -> dict[str, Any]:
        return {"n_records": self.n_records, "records_recovered": self.records_recovered,
                "mean_feature_accuracy": self.mean_feature_accuracy,
                "feature_accuracy": self.feature_accuracy,
                "label_accuracy": self.label_accuracy}


def reconstruction_metrics(truth: Records, guess: Records, true_labels: torch.Tensor | ArrayLike,
                           guessed_labels: torch.Tensor | ArrayLike, *, layout: FeatureLayout,
                           tolerance: FloatArray) -> ReconstructionMetrics:
    """Score a reconstruction against the true records.

    Parameters
    ----------
    truth, guess : Records
        The same number of records, in the same order.
    true_labels, guessed_labels : array-like of shape (n,)
        Outcomes, 0 or 1.
    layout : FeatureLayout
        Names the features.
    tolerance : ndarray of shape (n_numeric,)
        Largest absolute error (data units) at which a numeric feature counts as
        right (`RecordDecoder.tolerance`).
    """
    n = len(truth)
    if len(guess) != n or n == 0:
        raise DataError(f"A reconstruction must score at least one record and as many as the "
                        f"truth holds ({n}); got {len(guess)}.")
    right = np.concatenate([np.abs(guess.numeric - truth.numeric) <= tolerance,
                            guess.categorical == truth.categorical], axis=1)
    y, y_hat = _as_float64(true_labels), _as_float64(guessed_labels)
    if y.shape != (n,) or y_hat.shape != (n,):
        raise DataError(f"Expected one true and one guessed label per record ({n}); got shapes "
                        f"{y.shape} and {y_hat.shape}.")
    return ReconstructionMetrics(
        n_records=n, records_recovered=float(right.all(axis=1).mean()),
        feature_accuracy={name: float(right[:, j].mean())
                          for j, name in enumerate(layout.features)},
        label_accuracy=float(((y_hat > 0.5) == (y > 0.5)).mean()))


def records_found(truth: Records, candidates: Records, *, tolerance: FloatArray) -> int:
    """How many of the `truth` records some candidate gets entirely right."""
    if len(truth) == 0 or len(candidates) == 0:
        return 0
    numeric = (np.abs(candidates.numeric[None, :, :] - truth.numeric[:, None, :])
               <= tolerance).all(axis=2)
    categorical = (candidates.categorical[None, :, :]
                   == truth.categorical[:, None, :]).all(axis=2)
    return int((numeric & categorical).any(axis=1).sum())


def prior_guess(public: Records, public_labels: torch.Tensor | ArrayLike, *,
                tolerance: FloatArray) -> tuple[Records, float]:
    """The best data-independent guess of a record from public data: one record and a label.

    Each categorical feature's most frequent category (lowest code on ties);
    each numeric feature's value whose tolerance window ``[v - t, v + t]``
    holds the most public values (the mode at the metric's resolution; for a
    0/1 column, the more frequent value); the majority label.
    """
    if len(public) == 0:
        raise DataError("The prior baseline needs at least one public record; got none.")
    numeric = np.empty(public.numeric.shape[1])
    for j in range(public.numeric.shape[1]):
        values = np.sort(public.numeric[:, j])
        # A window of width 2t that holds the most values can start at a value:
        # centre it t above each value and count what falls inside.
        inside = (np.searchsorted(values, values + 2 * tolerance[j], side="right")
                  - np.arange(len(values)))
        numeric[j] = values[int(inside.argmax())] + tolerance[j]
    categorical = np.array([np.bincount(col).argmax() for col in public.categorical.T],
                           dtype=np.int64)
    label = float(_as_float64(public_labels).mean() >= 0.5)
    return Records(numeric[None, :], categorical[None, :]), label


# --------------------------------------------------------------------------- the attacker's model
class DenseGradients:
    """Per-record gradients of a fedcare model, in closed form, differentiable in the input.

    fedcare's models are linear layers with ReLU between and one logit
    (`fedcare.models.tabular`); the loss is binary cross-entropy. For a
    batch of dummy records this returns each record's gradient as a flat
    vector in `ParamSpec` order, built with ordinary tensor operations so
    that autograd differentiates the gradient-matching loss through it (the
    ReLU's derivative is a step; its own derivative is zero, as in autograd).

    Parameters
    ----------
    model : FlatModel
        The architecture (its parameters are not read or changed).
    params : Tensor
        The global parameters the gradients are taken at.

    Raises
    ------
    ConfigError
        If the model is not a sequence of linear layers with biases and ReLU
        between them ending in one output.
    """

    def __init__(self, model: FlatModel, params: torch.Tensor) -> None:
        spec = model.spec
        _check_params(params, spec)
        module = model.module
        children = list(module.children()) if isinstance(module, nn.Sequential) else []
        linear = [i for i, m in enumerate(children) if isinstance(m, nn.Linear)]
        expected = [f"{i}.{kind}" for i in linear for kind in ("weight", "bias")]
        shape_ok = (bool(children) and isinstance(children[-1], nn.Linear)
                    and children[-1].out_features == 1
                    and all(isinstance(m, nn.ReLU) for i, m in enumerate(children)
                            if i not in linear)
                    and all(b - a == 2 for a, b in itertools.pairwise(linear)))
        if not shape_ok or list(spec.names) != expected:
            raise ConfigError(f"Gradient inversion supports models made of linear layers with "
                              f"biases, ReLU between them and one output (model.name = logreg "
                              f"or mlp); got parameters {list(spec.names)}.")
        flat = params.detach().to(torch.float32)
        self.spec = spec
        self.layers = [(flat[spec.offsets[k]:spec.offsets[k] + spec.sizes[k]]
                        .view(spec.shapes[k]),
                        flat[spec.offsets[k + 1]:spec.offsets[k + 1] + spec.sizes[k + 1]])
                       for k in range(0, len(spec.names), 2)]

    @property
    def n_features(self) -> int:
        return int(self.layers[0][0].shape[1])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of ``BCE(model(x_k), y_k)`` for each row k: shape (n, spec.size).

        `y` may be soft (in [0, 1]): the gradient at the logit is ``sigmoid(z) - y``.
        """
        inputs, pre = [x], []
        for k, (weight, bias) in enumerate(self.layers):
            h = inputs[-1] @ weight.T + bias
            pre.append(h)
            if k < len(self.layers) - 1:
                inputs.append(torch.relu(h))
        delta = torch.sigmoid(pre[-1]) - y[:, None]  # dL/dz, shape (n, 1)
        n = x.shape[0]
        parts: list[torch.Tensor] = []
        for k in reversed(range(len(self.layers))):
            parts = [(delta[:, :, None] * inputs[k][:, None, :]).reshape(n, -1), delta, *parts]
            if k:
                delta = (delta @ self.layers[k][0]) * (pre[k - 1] > 0)
        return torch.cat(parts, dim=1)


def first_layer(spec: ParamSpec) -> tuple[slice, slice, tuple[int, int]]:
    """Flat slices of the first layer's weight and bias, and the weight's shape."""
    if len(spec.names) < 2 or len(spec.shapes[0]) != 2 or len(spec.shapes[1]) != 1:
        raise ConfigError(f"The analytic attack needs a first fully connected layer (weight, "
                          f"bias); the model's parameters are {list(spec.names)}.")
    rows, cols = spec.shapes[0]
    weight = slice(spec.offsets[0], spec.offsets[0] + spec.sizes[0])
    bias = slice(spec.offsets[1], spec.offsets[1] + spec.sizes[1])
    return weight, bias, (rows, cols)


def idlg_labels(gradients: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
    """iDLG (Zhao et al. 2020) for one logit and BCE: label 1 where ``dL/db_out < 0``.

    ``dL/db_out = sigmoid(z) - y`` lies in (-1, 0) for ``y = 1`` and in (0, 1) for
    ``y = 0``: its sign is the label. `gradients` has shape (n, spec.size);
    the output bias is the last parameter.
    """
    if spec.shapes[-1] != (1,):
        raise ConfigError(f"iDLG needs one output logit with a bias (the last parameter); "
                          f"the model's last parameter is {spec.names[-1]} of shape "
                          f"{spec.shapes[-1]}.")
    return (gradients[:, -1] < 0).to(torch.float32)


# --------------------------------------------------------------------------- attacks
class GradientAttack(Protocol):
    """What every attack does: invert a batch of observed gradients into records."""

    inputs_: torch.Tensor
    """The reconstruction of each observation, encoded: shape (n, n_features)."""
    labels_: torch.Tensor
    """The recovered label of each observation, 0.0 or 1.0: shape (n,)."""
    candidates_: list[torch.Tensor]
    """Per observation, every record the attack claims to have recovered, shape
    (k, n_features) with 1 <= k <= payloads; its first row is ``inputs_``."""

    @property
    def name(self) -> str:
        """The attack's name in `ATTACKS`."""
        ...

    def fit(self, gradients: torch.Tensor, *, model: FlatModel, params: torch.Tensor,
            layout: FeatureLayout, payloads: int = 1) -> Self:
        """Reconstruct from observed gradients, shape (n, n_params), each from `payloads` sites."""
        ...


class AnalyticInversion:
    """Closed-form input of the first fully connected layer at batch size 1.

    ``x = sum_i g_i G_i / sum_i g_i^2`` over the first layer's rows, with
    ``g = dL/db`` and ``G = dL/dW`` (Phong et al. 2018; Geiping et al.
    2020); the label by iDLG. The scale of the observed gradient cancels,
    so clipping the update does not change the result.

    Attributes (after `fit`)
    ------------------------
    inputs_ : Tensor of float32, shape (n, n_features)
        The reconstructed encoded inputs (zeros where no row has ``g_i != 0``).
    labels_ : Tensor of float32, shape (n,)
    recoverable_ : Tensor of bool, shape (n,)
        Whether some row of the first layer had a non-zero bias gradient.
    """

    name = "analytic"

    def fit(self, gradients: torch.Tensor, *, model: FlatModel, params: torch.Tensor,
            layout: FeatureLayout, payloads: int = 1) -> AnalyticInversion:
        g = check_gradients(gradients, model.spec, attack=self.name).to(torch.float64)
        _check_params(params, model.spec)
        gw, gb = _first_layer_gradients(g, model.spec, layout)
        power = (gb * gb).sum(dim=1)
        self.recoverable_ = power > 0
        # where no row is active the quotient is 0/1: the input stays unknown (zero)
        x = torch.einsum("nr,nrc->nc", gb, gw) / torch.where(self.recoverable_, power, 1.0)[:, None]
        self.inputs_ = x.to(torch.float32)
        self.labels_ = idlg_labels(g, model.spec)
        self.candidates_ = _single(self.inputs_)
        return self


class ExclusiveNeurons:
    """Records behind first-layer units that only one record activated (Pan et al. 2022).

    With several records in one gradient (a sum over sites), row ``i`` of the
    first layer gives ``G_i / g_i = sum_k g_ik x_k / sum_k g_ik`` over the
    records ``k`` that activate unit ``i`` (ReLU); a unit activated by exactly
    one record gives that record exactly ("exclusively activated neurons",
    Pan et al. 2022, "Exploring the security boundary of data reconstruction
    via neuron exclusivity analysis", USENIX Security 2022, whose own
    reconstruction algorithm is more elaborate). Here the attacker tells
    those rows from mixtures without knowing the records by a simpler check
    of this module's own: a candidate ``c = G_i / g_i`` that
    is a record with label ``y`` must reproduce the unit's own bias gradient,
    ``dL(c, y)/db_i = g_i``, which a mixture does not (to within `rtol`,
    since the update arrives in float32). Candidates that agree (to within
    `rtol` of their scale) are one record, supported by as many units; the
    `payloads` best supported are claimed, the best first. Where no unit
    passes (noise, or every unit shared), the result is the analytic one.

    Parameters
    ----------
    rtol : float
        Relative tolerance of the bias-gradient check and of merging
        candidates, in (0, 1). Float32 updates at the initial model were
        consistent to 7e-4 in every case measured; mixtures differ by far more.

    Attributes (after `fit`)
    ------------------------
    inputs_, labels_, candidates_
        As `GradientAttack`; ``candidates_[j]`` holds at most `payloads` records.
    support_ : list of Tensor of int64
        Per observation, how many units support each candidate.
    """

    name = "neurons"

    def __init__(self, *, rtol: float = 5e-3) -> None:
        self.rtol = rtol

    def fit(self, gradients: torch.Tensor, *, model: FlatModel, params: torch.Tensor,
            layout: FeatureLayout, payloads: int = 1) -> ExclusiveNeurons:
        if not (isinstance(self.rtol, float) and 0 < self.rtol < 1):
            raise ConfigError(f"The 'rtol' parameter of ExclusiveNeurons must be a float in "
                              f"(0, 1). Got {self.rtol!r} instead.")
        _check_payloads(payloads)
        g = check_gradients(gradients, model.spec, attack=self.name).to(torch.float64)
        fallback = AnalyticInversion().fit(g, model=model, params=params, layout=layout)
        net = DenseGradients(model, params)
        # The observation is the mean over the payloads; a unit that one record
        # activated carries that record's gradient in the sum.
        gw, gb = _first_layer_gradients(g * payloads, model.spec, layout)
        _, bias, _ = first_layer(model.spec)
        n = gb.shape[0]
        active = gb.abs() > 1e-9 * gb.abs().amax(dim=1, keepdim=True)
        record, unit = active.nonzero(as_tuple=True)
        candidates = gw[record, unit] / gb[record, unit][:, None]
        observed = gb[record, unit]
        # each candidate's own bias gradient at its unit, as label 0 and as label 1
        own = torch.stack([net(candidates.to(torch.float32),
                               torch.full((len(unit),), float(y)))[:, bias][
                                   torch.arange(len(unit)), unit].to(torch.float64)
                           for y in (0, 1)], dim=1)
        error = (own - observed[:, None]).abs() / observed.abs()[:, None]
        passes = error.min(dim=1).values <= self.rtol
        label = error.argmin(dim=1).to(torch.float32)
        self.inputs_ = fallback.inputs_.clone()
        self.labels_ = fallback.labels_.clone()
        self.candidates_, self.support_ = [], []
        for j in range(n):
            mine = passes & (record == j)
            found, support, labels = _merge(candidates[mine], label[mine], self.rtol)
            if len(found):
                keep = slice(0, payloads)
                self.candidates_.append(found[keep].to(torch.float32))
                self.support_.append(support[keep])
                self.inputs_[j] = found[0].to(torch.float32)
                self.labels_[j] = labels[0]
            else:
                self.candidates_.append(fallback.inputs_[j:j + 1])
                self.support_.append(torch.zeros(1, dtype=torch.int64))
        return self


def _merge(candidates: torch.Tensor, labels: torch.Tensor,
           rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group candidates (and labels) within `rtol` of each other: records, support, labels.

    Best supported first; empty tensors when there are no candidates.
    """
    records: list[torch.Tensor] = []
    support: list[int] = []
    record_labels: list[float] = []
    for c, y in zip(candidates, labels.tolist(), strict=True):
        scale = rtol * (1.0 + float(c.abs().max()))
        for k, r in enumerate(records):
            if record_labels[k] == y and float((r - c).abs().max()) <= scale:
                support[k] += 1
                break
        else:
            records.append(c)
            support.append(1)
            record_labels.append(y)
    if not records:
        return candidates, torch.zeros(0, dtype=torch.int64), labels
    order = sorted(range(len(records)), key=lambda k: -support[k])
    return (torch.stack([records[k] for k in order]),
            torch.tensor([support[k] for k in order], dtype=torch.int64),
            torch.tensor([record_labels[k] for k in order]))


def _first_layer_gradients(g: torch.Tensor, spec: ParamSpec,
                           layout: FeatureLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dW, dL/db) of the first layer: shapes (n, rows, inputs) and (n, rows)."""
    weight, bias, (rows, cols) = first_layer(spec)
    if cols != layout.n_features:
        raise ConfigError(f"The model's first layer takes {cols} inputs; the schema's "
                          f"encoding has {layout.n_features}.")
    return g[:, weight].view(-1, rows, cols), g[:, bias]


def _single(inputs: torch.Tensor) -> list[torch.Tensor]:
    return [inputs[j:j + 1] for j in range(inputs.shape[0])]


def _check_payloads(payloads: int) -> None:
    if isinstance(payloads, bool) or not isinstance(payloads, int) or payloads < 1:
        raise ConfigError(f"payloads (site updates summed in each observation) must be an int "
                          f">= 1; got {payloads!r}.")


@dataclass(frozen=True)
class _Optimisation:
    steps: int
    lr: float
    restarts: int
    seed: int


class DLG:
    """Deep leakage from gradients (Zhu et al. 2019), or iDLG (Zhao et al. 2020).

    Dummy inputs (and, for DLG, dummy soft labels ``sigmoid(l)``) are optimised
    with Adam to minimise ``||grad L(x', y') - g||^2``; with several restarts
    the one with the lowest final loss is kept.

    Parameters
    ----------
    label : {"optimize", "idlg"}
        ``optimize``: the label is a variable (DLG); ``idlg``: it is read off
        the output bias gradient first (`idlg_labels`), and only the input is
        optimised.
    steps : int
        Adam steps (>= 1).
    lr : float
        Initial Adam learning rate (> 0), decayed to 0 along a cosine.
    restarts : int
        Independent seeded starts per record (>= 1).
    seed : int
        Seed of the starting points (standard normal inputs and label logits).

    Attributes (after `fit`)
    ------------------------
    inputs_ : Tensor of float32, shape (n, n_features)
    labels_ : Tensor of float32, shape (n,)
    loss_ : Tensor of float32, shape (n,)
        Final gradient-matching loss of the kept restart.
    """

    def __init__(self, *, label: str = "optimize", steps: int = 1000, lr: float = 0.1,
                 restarts: int = 1, seed: int = 0) -> None:
        self.label = label
        self.steps = steps
        self.lr = lr
        self.restarts = restarts
        self.seed = seed

    @property
    def name(self) -> str:
        return "idlg" if self.label == "idlg" else "dlg"

    def fit(self, gradients: torch.Tensor, *, model: FlatModel, params: torch.Tensor,
            layout: FeatureLayout, payloads: int = 1) -> DLG:
        if self.label not in ("optimize", "idlg"):
            raise ConfigError(f"The 'label' parameter of DLG must be 'optimize' or 'idlg'. Got "
                              f"{self.label!r} instead.")
        plan = _check_optimisation(self.name, self.steps, self.lr, self.restarts, self.seed)
        g = check_gradients(gradients, model.spec, attack=self.name).to(torch.float32)
        net = DenseGradients(model, params)
        n, r = g.shape[0], plan.restarts
        generator = torch.Generator().manual_seed(plan.seed)
        x = torch.randn(n * r, net.n_features, generator=generator).requires_grad_()
        variables = [x]
        if self.label == "idlg":
            known = idlg_labels(g, model.spec).repeat_interleave(r)

            def labels() -> torch.Tensor:
                return known
        else:
            logits = torch.randn(n * r, generator=generator).requires_grad_()
            variables.append(logits)

            def labels() -> torch.Tensor:
                return torch.sigmoid(logits)

        loss = _match(net, g.repeat_interleave(r, dim=0), variables, lambda: (x, labels()),
                      distance=_squared_distance, plan=plan)
        best = loss.view(n, r).argmin(dim=1) + torch.arange(n) * r
        self.inputs_ = x.detach()[best]
        self.labels_ = (labels().detach()[best] > 0.5).to(torch.float32)
        self.loss_ = loss[best]
        self.candidates_ = _single(self.inputs_)
        return self


class TabLeak:
    """TabLeak (Vero et al. 2023): softmax-relaxed categories, cosine loss, pooled restarts.

    Each record is reconstructed from `restarts` seeded starts at once; a
    categorical column is a softmax over its categories (its logits are the
    variables), numeric columns are free. The restarts are pooled feature by
    feature: the median of each numeric value, the most frequent category of
    each categorical one (ties go to the restart with the lowest loss). The
    label is iDLG's; the loss is Geiping et al.'s cosine distance
    ``1 - <grad L(x'), g> / (||grad L(x')|| ||g||)``, blind to the scale that
    clipping changes.

    Parameters
    ----------
    steps, lr, restarts, seed
        As for `DLG`; `restarts` >= 1.

    Attributes (after `fit`)
    ------------------------
    inputs_ : Tensor of float32, shape (n, n_features)
        The pooled reconstruction, categories as (drop-first) one-hot blocks.
    labels_ : Tensor of float32, shape (n,)
    loss_ : Tensor of float32, shape (n, restarts)
        Final loss of every restart.
    """

    name = "tableak"

    def __init__(self, *, steps: int = 1000, lr: float = 0.1, restarts: int = 8,
                 seed: int = 0) -> None:
        self.steps = steps
        self.lr = lr
        self.restarts = restarts
        self.seed = seed

    def fit(self, gradients: torch.Tensor, *, model: FlatModel, params: torch.Tensor,
            layout: FeatureLayout, payloads: int = 1) -> TabLeak:
        plan = _check_optimisation(self.name, self.steps, self.lr, self.restarts, self.seed)
        g = check_gradients(gradients, model.spec, attack=self.name).to(torch.float32)
        net = DenseGradients(model, params)
        if net.n_features != layout.n_features:
            raise ConfigError(f"The model takes {net.n_features} inputs; the schema's encoding "
                              f"has {layout.n_features}.")
        n, r, p = g.shape[0], plan.restarts, layout.n_numeric
        generator = torch.Generator().manual_seed(plan.seed)
        numeric = torch.randn(n * r, p, generator=generator).requires_grad_()
        logits = [torch.randn(n * r, b.n_categories, generator=generator).requires_grad_()
                  for b in layout.blocks]
        labels = idlg_labels(g, model.spec).repeat_interleave(r)

        def encode() -> tuple[torch.Tensor, torch.Tensor]:
            parts = [numeric]
            for block, z in zip(layout.blocks, logits, strict=True):
                share = torch.softmax(z, dim=1)
                parts.append(share[:, 1:] if block.drop_first else share)
            return torch.cat(parts, dim=1), labels

        loss = _match(net, g.repeat_interleave(r, dim=0), [numeric, *logits], encode,
                      distance=_cosine_distance, plan=plan)
        self.loss_ = loss.view(n, r)
        best = self.loss_.argmin(dim=1)
        pooled = torch.zeros(n, layout.n_features)
        pooled[:, :p] = numeric.detach().view(n, r, p).median(dim=1).values
        rows = torch.arange(n)
        for block, z in zip(layout.blocks, logits, strict=True):
            votes = torch.zeros(n, block.n_categories)
            votes.scatter_add_(1, z.detach().argmax(dim=1).view(n, r),
                               torch.ones(n, r))
            votes[rows, z.detach().view(n, r, -1)[rows, best].argmax(dim=1)] += 0.5
            onehot = torch.nn.functional.one_hot(votes.argmax(dim=1), block.n_categories)
            pooled[:, block.start:block.stop] = (onehot[:, 1:] if block.drop_first
                                                 else onehot).to(torch.float32)
        self.inputs_ = pooled
        self.labels_ = idlg_labels(g, model.spec)
        self.candidates_ = _single(self.inputs_)
        return self


def _squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum(dim=1)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The small floor keeps a dummy with every unit dead (a zero gradient) finite.
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    cosine: torch.Tensor = (a * b).sum(dim=1) / norms.clamp(min=1e-12)
    return 1.0 - cosine


def _match(net: DenseGradients, target: torch.Tensor, variables: list[torch.Tensor],
           encode: Callable[[], tuple[torch.Tensor, torch.Tensor]], *,
           distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           plan: _Optimisation) -> torch.Tensor:
    """Minimise ``distance(net(encode()), target)`` row by row; the final loss per row."""
    optimiser = torch.optim.Adam(variables, lr=plan.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, plan.steps)
    for _ in range(plan.steps):
        optimiser.zero_grad(set_to_none=True)
        x, y = encode()
        # Rows are independent, so the sum's gradient is each row's own.
        distance(net(x, y), target).sum().backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        x, y = encode()
        return distance(net(x, y), target)


def _check_optimisation(name: str, steps: int, lr: float, restarts: int,
                        seed: int) -> _Optimisation:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"The 'steps' parameter of {name} must be an int >= 1. Got "
                          f"{steps!r} instead.")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"The 'lr' parameter of {name} must be a float in (0, inf). Got "
                          f"{lr!r} instead.")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ConfigError(f"The 'restarts' parameter of {name} must be an int >= 1. Got "
                          f"{restarts!r} instead.")
    return _Optimisation(steps, float(lr), restarts, int(seed))


AttackFactory = Callable[[int], GradientAttack]

ATTACKS: dict[str, AttackFactory] = {
    "analytic": lambda seed: AnalyticInversion(),
    "neurons": lambda seed: ExclusiveNeurons(),
    "idlg": lambda seed: DLG(label="idlg", seed=seed),
    "dlg": lambda seed: DLG(label="optimize", restarts=4, seed=seed),
    "tableak": lambda seed: TabLeak(seed=seed),
}
"""Attacks by name (the ``method`` of `audit_gradient_leakage`), each built from a seed."""


def build_attack(name: str, *, seed: int = 0) -> GradientAttack:
    """The attack `ATTACKS` names, seeded."""
    if name not in ATTACKS:
        raise ConfigError(f"Unknown gradient attack {name!r}; expected one of "
                          f"{sorted(ATTACKS)}.")
    return ATTACKS[name](seed)


def resolve_methods(method: str | Sequence[str], schema: Schema) -> list[str]:
    """Attack names for `method`: ``auto``, ``all``, a name of `ATTACKS`, or a list of names.

    ``auto``: the two closed-form attacks (``analytic``, and ``neurons`` for
    sums) and the optimisation attack suited to the data: TabLeak when the
    schema has categorical columns, iDLG otherwise.
    """
    if method == "all":
        return list(ATTACKS)
    if method == "auto":
        return ["analytic", "neurons", "tableak" if schema.categorical else "idlg"]
    names = [method] if isinstance(method, str) else list(method)
    unknown = [m for m in names if m not in ATTACKS]
    if unknown or not names:
        raise ConfigError(f"method must be 'auto', 'all', or one or more of {sorted(ATTACKS)}; "
                          f"got {method!r}.")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- input checks
def check_gradients(gradients: torch.Tensor, spec: ParamSpec, *, attack: str) -> torch.Tensor:
    """Refuse observed gradients of the wrong shape or with a non-finite value.

    Returns the gradients as a 2-D tensor, shape (n, spec.size) (a 1-D vector
    is one record).
    """
    if not isinstance(gradients, torch.Tensor):
        raise DataError(f"Gradient inversion ({attack}): the observed gradients must be a "
                        f"tensor; got {type(gradients).__name__}.")
    g = gradients.detach()
    if g.ndim == 1:
        g = g.unsqueeze(0)
    if g.ndim != 2 or g.shape[1] != spec.size or g.shape[0] < 1:
        raise DataError(f"Gradient inversion ({attack}): the observed update has shape "
                        f"{tuple(gradients.shape)}; expected (n_records, {spec.size}), one "
                        f"value per model parameter ({', '.join(spec.names)}).")
    bad = torch.nonzero(~torch.isfinite(g))
    if bad.numel():
        record, index = int(bad[0, 0]), int(bad[0, 1])
        raise DataError(f"Gradient inversion ({attack}): the observed update of record {record} "
                        f"has value {g[record, index].item()} at index {index} "
                        f"({spec.locate(index)}); expected finite numbers ({len(bad)} "
                        "non-finite).")
    return g


def update_to_gradient(payload: torch.Tensor, *, spec: ParamSpec, lr: float, payloads: int,
                       where: str) -> torch.Tensor:
    """The gradient an observed payload stands for: ``-update / (lr * payloads)``, float64.

    Parameters
    ----------
    payload : Tensor of shape (spec.size + 1,)
        What the aggregator read: ``[update, weight or count]`` of one site, or
        the sum over `payloads` sites.
    spec : ParamSpec
    lr : float
        The sites' local learning rate (public: the configuration).
    payloads : int
        Site payloads in `payload` (each site holds one record and its weight
        is 1, so the sum of `payloads` updates divided by it is their mean).
    where : str
        Names the payload in errors, e.g. ``"site 'cleveland', round 3"``.

    Raises
    ------
    DataError
        If the payload has the wrong length or holds a non-finite value.
    """
    if payload.ndim != 1 or payload.numel() != spec.size + 1:
        raise DataError(f"Gradient inversion: the payload of {where} has shape "
                        f"{tuple(payload.shape)}; expected {spec.size + 1} values (the "
                        f"model's {spec.size} parameters and the weight slot).")
    values = payload.detach().to(torch.float64)
    bad = torch.nonzero(~torch.isfinite(values))
    if bad.numel():
        index = int(bad[0, 0])
        part = "weight slot" if index == spec.size else spec.locate(index)
        raise DataError(f"Gradient inversion: the payload of {where} has value "
                        f"{values[index].item()} at index {index} ({part}); expected finite "
                        "numbers.")
    return -values[:-1] / (lr * payloads)


# --------------------------------------------------------------------------- the observation
class _RecordingSession:
    """An aggregator session that keeps what it was given and what it revealed."""

    def __init__(self, inner: AggregatorSession) -> None:
        self.inner = inner
        self.received: dict[int, object] = {}
        self.revealed: torch.Tensor | None = None

    def setup(self, exchange: Exchange) -> list[int]:
        return self.inner.setup(exchange)

    def add(self, site: int, payload: object) -> None:
        self.inner.add(site, payload)
        self.received[site] = payload

    def reveal(self, exchange: Exchange) -> torch.Tensor:
        self.revealed = self.inner.reveal(exchange)
        return self.revealed


class RecordingScheme:
    """A protection scheme as usual, but it keeps each round's aggregator session.

    The sessions' ``received`` (payloads as added: tensors under ``plain``,
    masked vectors or ciphertexts otherwise) and ``revealed`` (the plain sum)
    are exactly what the aggregator can read.
    """

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self.name = scheme.name
        self.sessions: dict[int, _RecordingSession] = {}

    def site_session(self, round_number: int, site: int) -> SiteSession:
        return self.scheme.site_session(round_number, site)

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> _RecordingSession:
        session = _RecordingSession(self.scheme.aggregator_session(round_number, cohort, length))
        self.sessions[round_number] = session
        return session


@dataclass(frozen=True)
class ObservedUpdates:
    """What the aggregator read in each attacked round, and the truth to score attacks by.

    Attributes
    ----------
    gradients : Tensor of float64, shape (n, n_params)
        Per target record, ``-update / (lr * payloads)``: the gradient the
        observed payload stands for (noised, clipped or summed as it arrived).
    params : Tensor of float32
        The global parameters every round started from.
    inputs : Tensor of float32, shape (n, n_features)
        The target records as encoded (the truth; never shown to an attack).
    labels : Tensor of float32, shape (n,)
    site : str
        The target site.
    payloads : int
        Site payloads in each observation (1: the target's own; more: a sum).
    view : str
        What the aggregator read, in words.
    update_norms : Tensor of float64, shape (n,)
        L2 norm of the update part of each observed payload.
    noise_multiplier, clip_norm : float
        The DP mechanism as calibrated for the leakage setup (site level: the
        update's; record level: the target site's DP-SGD); 0 without DP.
    round_sites : tuple of tuple of str
        Per observation, the sites whose records are in it (the target alone
        unless the aggregator reads a sum).
    round_inputs : tuple of Tensor
        Per observation, those sites' records, encoded, shape (m, n_features).
    """

    gradients: torch.Tensor
    params: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor
    site: str
    payloads: int
    view: str
    update_norms: torch.Tensor
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    round_sites: tuple[tuple[str, ...], ...] = ()
    round_inputs: tuple[torch.Tensor, ...] = ()


def leakage_config(config: RunConfig) -> RunConfig:
    """`config` with the leakage setup's local training: one step of batch size 1."""
    leak = copy.deepcopy(config)
    leak.federation.batch_size = 1
    leak.federation.local_epochs = 1
    return leak


def aggregator_view(config: RunConfig, site: str, payloads: int) -> str:
    """What the aggregator reads of `site`'s update under `config`, in one sentence."""
    scheme, p = config.protection.scheme, config.privacy
    if scheme in SUMMED_SCHEMES:
        what = f"the sum of {payloads} sites' payloads ({scheme})"
    else:
        what = f"the payload of site {site!r} alone (plain)"
    if p.level == "record":
        return f"{what}: DP-SGD updates (per-record clipping and noise at the site)"
    if p.level == "site" and p.noise == "central":
        return (f"{what}: clipped updates without noise (central noise is added by the "
                "aggregator after it has read them)")
    if p.level == "site":
        return f"{what}: clipped updates carrying the sites' noise shares (distributed)"
    return f"{what}: updates [n * delta, n]"


def observe_updates(config: RunConfig, data: FederatedData, *, site: str, rows: Sequence[int],
                    seed: int = 0) -> ObservedUpdates:
    """Run one leakage round per target record and keep what the aggregator reads.

    Parameters
    ----------
    config : RunConfig
        The run audited (privacy and protection as configured; local training
        becomes one step of batch size 1, `leakage_config`).
    data : FederatedData
        As `build_federation` makes it from the config.
    site : str
        The target site.
    rows : sequence of int
        The target records: indices of the site's training rows.
    seed : int
        Chooses each round's records at the other sites.

    Returns
    -------
    ObservedUpdates
    """
    names = [s.name for s in data.sites]
    if site not in names:
        raise ConfigError(f"Unknown target site {site!r}; the sites are {names}.")
    target = names.index(site)
    n_train = data.sites[target].n_train
    if not rows or any(not 0 <= r < n_train for r in rows):
        raise ConfigError(f"Target rows must be indices of site {site!r}'s {n_train} training "
                          f"rows; got {list(rows)[:10]}.")
    leak = leakage_config(config)
    rng = np.random.default_rng([seed, _TARGET_STREAM, 1])
    model = FlatModel(build_model(leak.model, data.n_features))
    trainer = LocalTrainer(model, leak.privacy.clipping)
    params = model.init_params(torch_generator(leak.seed, INIT))
    first = _one_record_each(data, [rows[0] if i == target else 0
                                    for i in range(len(data.sites))])
    plan = build_privacy_plan(leak, first)  # calibrated for one-record sites
    record = plan.record if plan is not None else {}
    site_privacy = plan.site if plan is not None else None
    noise_for = noise_factory(leak) if plan is not None else None
    scheme = RecordingScheme(build_scheme(leak.protection))
    f = leak.federation
    summed = leak.protection.scheme in SUMMED_SCHEMES

    gradients, norms, counts = [], [], set()
    round_sites: list[tuple[str, ...]] = []
    round_inputs: list[torch.Tensor] = []
    for j, row in enumerate(rows):
        for attempt in range(_MAX_TRIES):
            round_number = j + 1 + attempt * len(rows)
            picks = [row if i == target else int(rng.integers(s.n_train))
                     for i, s in enumerate(data.sites)]
            round_data = _one_record_each(data, picks)
            sites = [Site(d, trainer, index=i, seed=leak.seed, protection=scheme,
                          record_privacy=record.get(d.name), site_privacy=site_privacy,
                          noise_for=noise_for) for i, d in enumerate(round_data.sites)]
            # A fresh aggregator per record: every observation is its own round 1
            # (adaptive clipping and the strategy's state do not carry over).
            aggregator = Aggregator(build_strategy(f), model.spec, training_plan(leak),
                                    fraction=f.fraction, min_sites=f.min_sites, seed=leak.seed,
                                    protection=scheme, site_privacy=site_privacy,
                                    noise_for=noise_for)
            _, report = aggregator.run_round(round_number, sites, params)
            session = scheme.sessions.pop(round_number)
            if site in report.failures:
                raise ProtocolError(f"Gradient audit: target site {site!r} failed in round "
                                    f"{round_number}: {report.failures[site]}")
            if target in session.received:
                break
        else:
            raise DataError(f"Gradient audit: site {site!r} was not selected in "
                            f"{_MAX_TRIES} rounds (federation.fraction = {f.fraction}).")
        if summed:
            assert session.revealed is not None
            observed, inside = session.revealed, tuple(report.participants)
        else:
            received = session.received[target]
            assert isinstance(received, torch.Tensor)
            observed, inside = received, (site,)
        payloads = len(inside)
        counts.add(payloads)
        round_sites.append(inside)
        round_inputs.append(torch.cat([round_data.sites[names.index(name)].x_train
                                       for name in inside]))
        where = (f"the sum revealed in round {round_number}" if summed
                 else f"site {site!r} in round {round_number}")
        gradients.append(update_to_gradient(observed, spec=model.spec, lr=f.lr,
                                            payloads=payloads, where=where))
        norms.append(float(observed[:-1].to(torch.float64).norm()))
    sigma, clip = 0.0, 0.0
    if site_privacy is not None:
        sigma, clip = site_privacy.noise_multiplier, site_privacy.clip_norm
    elif site in record:
        sigma, clip = record[site].noise_multiplier, record[site].clip_norm
    x = data.sites[target].x_train[list(rows)]
    y = data.sites[target].y_train[list(rows)]
    return ObservedUpdates(torch.stack(gradients), params, x, y, site, max(counts),
                           aggregator_view(leak, site, max(counts)),
                           torch.tensor(norms, dtype=torch.float64), sigma, clip,
                           tuple(round_sites), tuple(round_inputs))


def _one_record_each(data: FederatedData, picks: Sequence[int]) -> FederatedData:
    sites = [SiteData(s.name, s.x_train[r:r + 1], s.y_train[r:r + 1], s.x_test, s.y_test)
             for s, r in zip(data.sites, picks, strict=True)]
    return FederatedData(data.schema, data.feature_names, sites, data.description,
                         data.standardization)


# --------------------------------------------------------------------------- the audit
@dataclass(frozen=True)
class AttackOutcome:
    """One attack's result in an audit.

    Attributes
    ----------
    metrics : ReconstructionMetrics
        Its reconstruction of each target record (one per observation).
    round_records_recovered : float
        Share of all records inside the observed payloads (the target's, and
        under ``secagg``/``ckks`` the other sites' in the sum) that one of the
        attack's claimed records (`GradientAttack.candidates_`, at most one
        per site in the sum) gets entirely right: what the aggregator learns
        about *some* patient, whichever site it came from. Equal to
        ``metrics.records_recovered`` when it reads one site's payload.
    seconds : float
        Wall time of the attack.
    """

    metrics: ReconstructionMetrics
    round_records_recovered: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics.to_dict(),
                "round_records_recovered": self.round_records_recovered,
                "seconds": self.seconds}


@dataclass(frozen=True)
class GradientAuditResult:
    """What `audit_gradient_leakage` measured (``to_dict`` is what ``audit.json`` holds).

    Attributes
    ----------
    dataset, description : str
        The configuration's data.
    model : str
        Model name and layer widths, e.g. ``mlp 30-32-1``.
    site : str
        The target site.
    view : str
        What the aggregator read, in words (`aggregator_view`).
    payloads : int
        Site payloads in each observation (1 unless the aggregator sees a sum).
    privacy_level, noise, protection : str
        ``privacy.level``, ``privacy.noise`` and ``protection.scheme``.
    epsilon, delta : float
        The configured target (``inf``/0 without DP).
    noise_multiplier, clip_norm : float
        As calibrated for the leakage setup (0 without DP).
    tolerance : float
        Share of a feature's public range within which a numeric value counts as right.
    median_update_norm : float
        Median L2 norm of the updates the aggregator read (clipped, noised or
        summed as they arrived), in parameter units: next to `clip_norm` it
        shows whether clipping bit.
    attacks : dict of str to AttackOutcome
        Per attack (`ATTACKS` names), its metrics and wall time.
    prior : AttackOutcome
        The prior baseline: `prior_guess` from the other sites' training rows,
        the same guess for every record.
    n_records : int
        Target records, one round each.
    seed : int
    seconds : float
        Wall time of the whole audit, rounds included.
    """

    dataset: str
    description: str
    model: str
    site: str
    view: str
    payloads: int
    privacy_level: str
    noise: str
    protection: str
    epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    tolerance: float
    median_update_norm: float
    attacks: dict[str, AttackOutcome]
    prior: AttackOutcome
    n_records: int
    seed: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> str:
        """The attack that recovered the most records (the first listed on ties)."""
        return max(self.attacks, key=lambda k: self.attacks[k].metrics.records_recovered)

    def to_dict(self) -> dict[str, Any]:
        return {"audit": "gradient inversion against one site's update",
                "dataset": self.dataset, "description": self.description, "model": self.model,
                "site": self.site, "view": self.view, "payloads": self.payloads,
                "privacy_level": self.privacy_level, "noise": self.noise,
                "protection": self.protection, "epsilon": _json_float(self.epsilon),
                "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "tolerance": self.tolerance,
                "median_update_norm": self.median_update_norm,
                "attacks": {k: v.to_dict() for k, v in self.attacks.items()},
                "best": self.best, "prior": self.prior.to_dict(),
                "n_records": self.n_records, "seed": self.seed, "seconds": self.seconds,
                "config": self.config}


def audit_gradient_leakage(config: RunConfig, *, n_records: int,
                           method: str | Sequence[str] = "auto",
                           seed: int = 0, site: str | None = None,
                           tolerance: float = TOLERANCE) -> GradientAuditResult:
    """Gradient inversion against what the aggregator reads of one site, scored against a prior.

    Parameters
    ----------
    config : RunConfig
        The run audited: data, model, privacy and protection as configured;
        local training becomes the leakage setup (one step of batch size 1).
    n_records : int
        Target records (>= 1, at most the target site's training rows), drawn
        at random from the site's training rows; each gets its own round.
    method : str or sequence of str
        ``auto`` (the closed-form attacks and TabLeak or iDLG,
        `resolve_methods`), ``all``, or names of `ATTACKS`.
    seed : int
        Seed of the choice of records and of the attacks' starting points.
    site : str, optional
        The target site; default the federation's first.
    tolerance : float
        In (0, 1]: a numeric value is right within this share of its public range.

    Returns
    -------
    GradientAuditResult
    """
    started = time.perf_counter()
    _check_tolerance(tolerance)
    torch.set_num_threads(config.threads)
    data = build_federation(config.data, private=config.privacy.level != "none")
    methods = resolve_methods(method, data.schema)
    names = [s.name for s in data.sites]
    target = names[0] if site is None else site
    if target not in names:
        raise ConfigError(f"Unknown target site {target!r}; the sites are {names}.")
    available = data.sites[names.index(target)].n_train
    if isinstance(n_records, bool) or not isinstance(n_records, int) \
            or not 1 <= n_records <= available:
        raise ConfigError(f"n_records must be an int in [1, {available}] (site {target!r}'s "
                          f"training rows); got {n_records!r}.")
    others = [s for s in data.sites if s.name != target]
    if not others:
        raise ConfigError("The prior baseline needs public data: a federation of at least two "
                          "sites (the others' training rows).")
    rng = np.random.default_rng([seed, _TARGET_STREAM])
    rows = sorted(int(r) for r in rng.choice(available, size=n_records, replace=False))
    observed = observe_updates(config, data, site=target, rows=rows, seed=seed)

    decoder = RecordDecoder.for_site(data, target)
    layout = decoder.layout
    tolerances = decoder.tolerance(tolerance)
    truth = decoder.decode(observed.inputs)
    decoders = {s.name: RecordDecoder.for_site(data, s.name) for s in data.sites}
    model = FlatModel(build_model(config.model, data.n_features))
    outcomes = {}
    for name in methods:
        began = time.perf_counter()
        attack = build_attack(name, seed=seed).fit(observed.gradients, model=model,
                                                   params=observed.params, layout=layout,
                                                   payloads=observed.payloads)
        seconds = time.perf_counter() - began
        metrics = reconstruction_metrics(truth, decoder.decode(attack.inputs_), observed.labels,
                                         attack.labels_, layout=layout, tolerance=tolerances)
        outcomes[name] = AttackOutcome(
            metrics, _round_recovery(observed, attack.candidates_, decoders, tolerance), seconds)

    began = time.perf_counter()
    public = [decoders[s.name].decode(s.x_train) for s in others]
    guess, label = prior_guess(
        Records(np.concatenate([r.numeric for r in public]),
                np.concatenate([r.categorical for r in public])),
        torch.cat([s.y_train for s in others]), tolerance=tolerances)
    found = sum(records_found(decoders[site].decode(record[None, :]), guess,
                              tolerance=decoders[site].tolerance(tolerance))
                for sites, inputs in zip(observed.round_sites, observed.round_inputs, strict=True)
                for site, record in zip(sites, inputs, strict=True))
    prior = AttackOutcome(
        reconstruction_metrics(truth, Records(np.repeat(guess.numeric, n_records, 0),
                                              np.repeat(guess.categorical, n_records, 0)),
                               observed.labels, np.full(n_records, label), layout=layout,
                               tolerance=tolerances),
        found / sum(len(sites) for sites in observed.round_sites), time.perf_counter() - began)

    private = config.privacy.level != "none"
    return GradientAuditResult(
        dataset=config.data.dataset_name, description=data.description,
        model=_model_description(config, data.n_features), site=target, view=observed.view,
        payloads=observed.payloads, privacy_level=config.privacy.level,
        noise=config.privacy.noise if config.privacy.level == "site" else "",
        protection=config.protection.scheme,
        epsilon=config.privacy.epsilon if private else math.inf,
        delta=config.privacy.delta if private else 0.0,
        noise_multiplier=observed.noise_multiplier, clip_norm=observed.clip_norm,
        tolerance=tolerance, median_update_norm=float(observed.update_norms.median()),
        attacks=outcomes, prior=prior, n_records=n_records, seed=seed,
        seconds=time.perf_counter() - started, config=config.to_dict())


# --------------------------------------------------------------------------- helpers
def _round_recovery(observed: ObservedUpdates, candidates: Sequence[torch.Tensor],
                    decoders: Mapping[str, RecordDecoder], tolerance: float) -> float:
    """Share of the records inside the observations that some candidate gets right.

    Each record is decoded by its own site's decoder, and so are the
    candidates compared with it (the attacker knows every site's
    standardisation, not which site a record came from).
    """
    found = total = 0
    for sites, inputs, claimed in zip(observed.round_sites, observed.round_inputs, candidates,
                                      strict=True):
        for site, record in zip(sites, inputs, strict=True):
            decoder = decoders[site]
            found += records_found(decoder.decode(record[None, :]), decoder.decode(claimed),
                                   tolerance=decoder.tolerance(tolerance))
            total += 1
    return found / max(total, 1)


def _model_description(config: RunConfig, n_features: int) -> str:
    if config.model.name == "mlp":
        return "mlp " + "-".join(str(w) for w in [n_features, *config.model.hidden, 1])
    return f"{config.model.name} {n_features}-1"


def _check_params(params: torch.Tensor, spec: ParamSpec) -> None:
    if not isinstance(params, torch.Tensor) or params.shape != (spec.size,):
        shape = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
        raise DataError(f"Gradient inversion: the global parameters have shape {shape}; "
                        f"expected ({spec.size},), the model's flat parameter vector.")


def _check_tolerance(tolerance: float) -> None:
    if not (isinstance(tolerance, int | float) and 0 < tolerance <= 1):
        raise ConfigError(f"tolerance must be a share of the feature's range in (0, 1]; got "
                          f"{tolerance!r}.")


def _as_float64(values: torch.Tensor | ArrayLike) -> FloatArray:
    if isinstance(values, torch.Tensor):
        return np.asarray(values.detach().cpu().to(torch.float64).numpy())
    return np.asarray(values, dtype=np.float64)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"

