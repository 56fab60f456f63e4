"""Metrics of a binary risk model: accuracy, ROC AUC, balanced accuracy, Brier score, log loss.

Also what a clinician needs next to them (`threshold_metrics`: the confusion
matrix, sensitivity, specificity, PPV and NPV at the stated threshold;
`bootstrap_intervals`: percentile 95% intervals over the test patients;
`chance_reason`: whether the model does better than chance at all) and, for
logistic regression, its odds ratios (`odds_ratios`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from fedcare.data.site_data import FederatedData
from fedcare.seeding import BOOTSTRAP, derive_seed

METRICS = ("accuracy", "roc_auc", "balanced_accuracy", "brier", "log_loss")
Metrics = dict[str, float]


THRESHOLD = 0.5
"""Predicted probability at or above which a patient is called positive (accuracy, the
confusion matrix, sensitivity, specificity, PPV, NPV)."""
CHANCE_MARGIN = 0.05
"""A balanced accuracy at most 0.5 + this is no better than chance."""
RESAMPLES = 1000
"""Bootstrap resamples of the test set for the intervals (measured on a loaded 2-core
machine: 0.07 s at 250 test patients, 3.4 s at 20,000)."""
INTERVAL_METRICS = ("accuracy", "roc_auc", "balanced_accuracy", "brier", "sensitivity",
                    "specificity", "ppv", "npv")


@dataclass
class Evaluation:
    """Metrics of one model on the pooled test set and on each site's test set.

    `details` (final evaluations only, `pooled_details`): the pooled test set's
    confusion matrix at `THRESHOLD`, bootstrap intervals and chance verdict.
    """

    pooled: Metrics
    sites: dict[str, Metrics] = field(default_factory=dict)
    details: dict[str, Any] | None = None

    @property
    def chance(self) -> str:
        """"" or why this model is no better than chance on the pooled test set."""
        if self.details is not None:
            return str(self.details.get("chance") or "")
        return chance_reason(self.pooled)

    def to_dict(self) -> dict[str, Any]:
        return {"pooled": self.pooled, "sites": self.sites, **(self.details or {})}


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of predicted logits against 0/1 labels, computed in float64.

    Returns NaN for a metric that is undefined on these labels (ROC AUC and
    balanced accuracy need both classes; every metric needs at least one row).
    The decision threshold for accuracy is probability 0.5.
    """
    z = logits.detach().to(torch.float64).numpy()
    y = labels.detach().to(torch.float64).numpy()
    n = len(y)
    if n == 0:
        return {name: math.nan for name in METRICS} | {"n": 0}
    p = 1.0 / (1.0 + np.exp(-z))
    predicted = p >= 0.5
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos and n_neg:
        # Mann-Whitney U with average ranks for ties.
        ranks = rankdata(z)
        auc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        balanced = 0.5 * (predicted[positive].mean() + (~predicted[~positive]).mean())
    else:
        auc = balanced = math.nan
    # log(1 + e^-z) for positives, log(1 + e^z) for negatives, without overflow.
    log_loss = np.mean(np.logaddexp(0.0, np.where(positive, -z, z)))
    return {
        "accuracy": float((predicted == positive).mean()),
        "roc_auc": float(auc),
        "balanced_accuracy": float(balanced),
        "brier": float(np.mean((p - y) ** 2)),
        "log_loss": float(log_loss),
        "n": n,
    }


def roc_curve(logits: torch.Tensor, labels: torch.Tensor,
              max_points: int = 101) -> dict[str, list[float]]:
    """ROC curve points (``fpr``, ``tpr``), thinned to at most `max_points`; empty if one class."""
    z = logits.detach().to(torch.float64).numpy()
    y = labels.detach().numpy() == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not (n_pos and n_neg):
        return {"fpr": [], "tpr": []}
    order = np.argsort(-z, kind="stable")
    z, y = z[order], y[order]
    # one point per distinct score (ties move together), from (0, 0) to (1, 1)
    last = np.r_[np.flatnonzero(np.diff(z)), len(z) - 1]
    tpr = np.r_[0.0, np.cumsum(y)[last] / n_pos]
    fpr = np.r_[0.0, np.cumsum(~y)[last] / n_neg]
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def calibration_curve(logits: torch.Tensor, labels: torch.Tensor,
                      bins: int = 10) -> dict[str, list[float] | list[int]]:
    """Mean predicted risk vs observed rate in equal-width risk bins (empty bins left out)."""
    p = 1.0 / (1.0 + np.exp(-logits.detach().to(torch.float64).numpy()))
    y = labels.detach().to(torch.float64).numpy()
    which = np.minimum((p * bins).astype(int), bins - 1)
    predicted, observed, count = [], [], []
    for b in range(bins):
        members = which == b
        if members.any():
            predicted.append(round(float(p[members].mean()), 5))
            observed.append(round(float(y[members].mean()), 5))
            count.append(int(members.sum()))
    return {"predicted": predicted, "observed": observed, "n": count}


def threshold_metrics(logits: torch.Tensor, labels: torch.Tensor,
                      threshold: float = THRESHOLD) -> dict[str, float]:
    """The confusion matrix at `threshold` and the rates read off it.

    Returns ``threshold``, ``true_positives``, ``false_positives``,
    ``true_negatives``, ``false_negatives`` (counts), ``sensitivity`` (TP / (TP + FN)),
    ``specificity`` (TN / (TN + FP)), ``ppv`` (TP / (TP + FP)) and ``npv``
    (TN / (TN + FN)); a rate whose denominator is 0 is NaN.
    """
    p = 1.0 / (1.0 + np.exp(-logits.detach().to(torch.float64).numpy()))
    predicted = p >= threshold
    positive = labels.detach().numpy() == 1
    tp, fp = int((predicted & positive).sum()), int((predicted & ~positive).sum())
    tn, fn = int((~predicted & ~positive).sum()), int((~predicted & positive).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {"threshold": threshold, "true_positives": tp, "false_positives": fp,
            "true_negatives": tn, "false_negatives": fn, "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn)}


def bootstrap_intervals(logits: torch.Tensor, labels: torch.Tensor, *, seed: int,
                        resamples: int = RESAMPLES, level: float = 0.95,
                        threshold: float = THRESHOLD) -> dict[str, Any]:
    """Percentile bootstrap intervals of `INTERVAL_METRICS` over the test patients.

    Each resample draws n patients with replacement (Efron and Tibshirani 1993,
    ch. 13); a metric undefined on a resample (AUC with one class drawn) leaves
    that resample out of its interval. Seeded and reproducible (stream
    `BOOTSTRAP` of `seed`): no privacy rests on it.

    Parameters
    ----------
    resamples : int
        B >= 1; 1000 take 0.07 s at 250 test patients, 3.4 s at 20,000 (`RESAMPLES`).
    level : float
        Coverage in (0, 1).

    Returns
    -------
    dict
        Metric -> [low, high] (None where no resample defines it), and
        ``resamples``, ``level`` and ``method``.
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs resamples >= 1 and level in (0, 1); got "
                         f"{resamples} and {level}.")
    z = logits.detach().to(torch.float64).numpy()
    positive = labels.detach().numpy() == 1
    n = len(z)
    out: dict[str, Any] = {"resamples": resamples, "level": level,
                           "method": "percentile bootstrap over the test patients"}
    if n == 0:
        return out | {m: None for m in INTERVAL_METRICS}
    p = 1.0 / (1.0 + np.exp(-z))
    predicted = p >= threshold
    # Ties move together in the AUC: one group per distinct logit, in increasing order.
    order = np.argsort(z, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(z[order])) + 1]
    per_row = {"correct": (predicted == positive).astype(np.float64),
               "tp": (predicted & positive).astype(np.float64),
               "fp": (predicted & ~positive).astype(np.float64),
               "tn": (~predicted & ~positive).astype(np.float64),
               "pos": positive.astype(np.float64),
               "brier": (p - positive) ** 2}
    rng = np.random.default_rng(derive_seed(seed, BOOTSTRAP))
    values: dict[str, list[np.ndarray]] = {m: [] for m in INTERVAL_METRICS}
    chunk = max(1, 2_000_000 // n)  # bounds the B x n count matrix to 16 MB
    for first in range(0, resamples, chunk):
        rows = min(chunk, resamples - first)
        draws = rng.integers(0, n, size=(rows, n))
        # How often each patient was drawn, per resample: every metric is a weighted sum.
        w = np.bincount((draws + n * np.arange(rows)[:, None]).ravel(),
                        minlength=rows * n).reshape(rows, n).astype(np.float64)
        s = {k: w @ v for k, v in per_row.items()}
        pos, neg = s["pos"], n - s["pos"]
        tp, fp, tn = s["tp"], s["fp"], s["tn"]
        fn = pos - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            sensitivity, specificity = tp / pos, tn / neg
            ws = w[:, order]
            pw = np.add.reduceat(ws * positive[order], starts, axis=1)
            nw = np.add.reduceat(ws * ~positive[order], starts, axis=1)
            below = np.cumsum(nw, axis=1) - nw
            values["roc_auc"].append((pw * (below + 0.5 * nw)).sum(axis=1) / (pos * neg))
            values["accuracy"].append(s["correct"] / n)
            values["balanced_accuracy"].append(0.5 * (sensitivity + specificity))
            values["brier"].append(s["brier"] / n)
            values["sensitivity"].append(sensitivity)
            values["specificity"].append(specificity)
            values["ppv"].append(tp / (tp + fp))
            values["npv"].append(tn / (tn + fn))
    tail = 100 * (1 - level) / 2
    for metric in INTERVAL_METRICS:
        finite = np.concatenate(values[metric])
        finite = finite[np.isfinite(finite)]
        out[metric] = None if not len(finite) else [
            float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]
    return out


def chance_reason(pooled: Mapping[str, Any], threshold: Mapping[str, Any] | None = None,
                  intervals: Mapping[str, Any] | None = None) -> str:
    """"" or why a model is no better than chance on its test set, in words.

    No better than chance: every prediction in one class, a balanced accuracy
    at most 0.5 + `CHANCE_MARGIN`, or a ROC AUC whose interval includes 0.5.
    Undefined metrics (one class in the test set) flag nothing.
    """
    reasons = []
    if threshold is not None and (threshold["true_positives"] + threshold["false_positives"]
                                  + threshold["true_negatives"]
                                  + threshold["false_negatives"]):
        called_positive = threshold["true_positives"] + threshold["false_positives"]
        called_negative = threshold["true_negatives"] + threshold["false_negatives"]
        if not called_positive or not called_negative:
            reasons.append("every patient is predicted "
                           + ("negative" if not called_positive else "positive"))
    balanced = pooled.get("balanced_accuracy")
    if balanced is not None and math.isfinite(balanced) and balanced <= 0.5 + CHANCE_MARGIN:
        reasons.append(f"balanced accuracy {balanced:.3f} (0.5 is chance)")
    auc = (intervals or {}).get("roc_auc")
    if auc is not None and auc[0] <= 0.5 <= auc[1]:
        reasons.append(f"the ROC AUC's 95% interval {auc[0]:.3f}-{auc[1]:.3f} includes 0.5")
    return "; ".join(reasons)


def pooled_details(logits: torch.Tensor, labels: torch.Tensor, *, seed: int,
                   resamples: int = RESAMPLES) -> dict[str, Any]:
    """`Evaluation.details` of a final model: ``threshold``, ``intervals`` and ``chance``.

    With `resamples` 0, no intervals (``intervals`` null): the chance verdict then rests
    on the predictions and the balanced accuracy alone.
    """
    pooled = binary_metrics(logits, labels)
    threshold = threshold_metrics(logits, labels)
    intervals = bootstrap_intervals(logits, labels, seed=seed, resamples=resamples) \
        if resamples else None
    return {"threshold": threshold, "intervals": intervals,
            "chance": chance_reason(pooled, threshold, intervals) or None}


STANDARDIZED_UNIT = {"federated": "1 SD of the pooled training data",
                     "bounds": "half the public range",
                     "site": "1 SD of each site's own training data",
                     "none": "1 unit"}
"""What one unit of a numeric model input is, per ``data.standardize`` (resolved)."""
NO_ODDS_RATIO_INTERVALS = (
    "No confidence intervals: a Wald interval needs the likelihood's curvature (the Fisher "
    "information, a sum over every site's training patients), which only a run without "
    "differential privacy in one process computes (in a private run it would be an exact "
    "function of each training patient, outside the guarantee; a deployment does not sum "
    "it); a bootstrap would need the pooled training rows, which no one holds.")
WALD_NOTE = (
    "95% Wald intervals from the Fisher information at the fitted coefficients (X'WX summed "
    "over the sites' training patients; computed only in a run without differential "
    "privacy). They assume the fit reached the maximum likelihood, which federated SGD "
    "only approaches in its rounds: read them as approximate.")


def logistic_covariance(params: torch.Tensor, inputs: Sequence[torch.Tensor]) -> np.ndarray:
    """Inverse Fisher information of a logistic regression at `params` (weights, then bias).

    The information is X'WX (X with a column of ones, W = p(1 - p)) summed over the
    sites' training inputs `inputs`, each site's term on its own: what a federation
    would sum. A pseudo-inverse, so that one-hot columns without a reference
    category (collinear with the intercept) still give the variance of every
    difference between categories (an estimable contrast).
    """
    w = params.detach().to(torch.float64)
    information = torch.zeros(len(w), len(w), dtype=torch.float64)
    for x in inputs:
        design = torch.cat([x.to(torch.float64), torch.ones(len(x), 1, dtype=torch.float64)],
                           dim=1)
        p = torch.sigmoid(design @ w)
        information += design.T @ (design * (p * (1 - p))[:, None])
    return np.linalg.pinv(information.numpy(), hermitian=True)


def odds_ratios(params: torch.Tensor, feature_names: Sequence[str], schema: Mapping[str, Any],
                standardization: Mapping[str, Mapping[str, Sequence[float]]],
                standardize: str, covariance: Sequence[Sequence[float]] | None = None
                ) -> list[dict[str, Any]]:
    """Odds ratios of a logistic regression: exp(coefficient) for each input.

    Parameters
    ----------
    params : tensor
        The flat parameters of ``model.name = "logreg"`` (weights, then bias).
    feature_names, schema, standardization
        As ``model.pt`` holds them.
    standardize : str
        The run's resolved ``data.standardize`` (`STANDARDIZED_UNIT`).
    covariance : matrix, optional
        `logistic_covariance` (weights and bias): adds 95% Wald intervals
        ``low``, ``high``.

    Returns
    -------
    list of dict
        ``feature``, ``odds_ratio`` and ``per`` (what the ratio compares): a
        numeric column per one unit of its standardised input; a 0/1-coded
        column with labels also as code 1 vs code 0 (when every site scaled it
        alike); a category against its column's first category (the reference).
    """
    weights = params.detach().to(torch.float64)[:len(feature_names)].tolist()
    coefficient = dict(zip(feature_names, weights, strict=True))
    labels: Mapping[str, Mapping[str, str]] = schema.get("labels") or {}
    numeric = list((schema.get("numeric") or {}).get("columns", []))
    scales = [tuple(v["std"]) for v in standardization.values()]
    shared = scales[0] if scales and all(s == scales[0] for s in scales) else None
    unit = STANDARDIZED_UNIT.get(standardize, "1 unit of the standardised input")
    index = {name: i for i, name in enumerate(feature_names)}
    rows: list[dict[str, Any]] = []

    def row(feature: str, per: str, terms: Mapping[str, float], factor: float = 1.0) -> None:
        """exp(factor * sum of coefficient * weight), with its Wald interval if known."""
        estimate = factor * sum(coefficient[k] * c for k, c in terms.items())
        entry = {"feature": feature, "odds_ratio": math.exp(estimate), "per": per}
        if covariance is not None:
            variance = factor ** 2 * sum(c * d * covariance[index[k]][index[m]]
                                         for k, c in terms.items() for m, d in terms.items())
            half = 1.959964 * math.sqrt(max(variance, 0.0))
            entry.update(low=math.exp(estimate - half), high=math.exp(estimate + half))
        rows.append(entry)

    for j, column in enumerate(numeric):
        scale = shared[j] if shared is not None else None
        row(column, unit + (f" ({scale:.3g})" if scale is not None and unit != "1 unit"
                            else ""), {column: 1.0})
        codes = labels.get(column, {})
        if scale is not None and set(codes) == {"0", "1"}:
            row(column, f"1 ({codes['1']}) vs 0 ({codes['0']})", {column: 1.0}, 1.0 / scale)
    for column, vocabulary in (schema.get("categorical") or {}).items():
        codes = labels.get(column, {})

        def named(code: str, codes: Mapping[str, str] = codes) -> str:
            return f"{code} ({codes[code]})" if code in codes else code

        reference = f"{column}={vocabulary[0]}"
        # Without drop_first every level has a weight and only differences are identified.
        for code in vocabulary[1:]:
            terms = {f"{column}={code}": 1.0}
            if reference in coefficient:
                terms[reference] = -1.0
            row(f"{column} = {named(code)}", f"vs {column} = {named(vocabulary[0])}", terms)
    return rows


AGE_BANDS = ((0.0, 50.0, "age < 50"), (50.0, 65.0, "age 50-64"), (65.0, math.inf, "age >= 65"))


def subgroups(data: FederatedData) -> dict[str, torch.Tensor]:
    """Masks over the pooled test set for the subgroups a model card reports.

    By sex (each value of a numeric or categorical column named ``sex``) and
    by age band (a numeric column named ``age``), where those columns exist.
    Numeric values are decoded from the encoded inputs with each site's
    standardisation (for private runs: the public bounds, so ages outside them
    fall in the edge band).
    """
    names = data.feature_names
    masks: dict[str, torch.Tensor] = {}
    numeric = list(data.schema.numeric)

    def decoded(column: str) -> torch.Tensor:
        j = numeric.index(column)
        return torch.cat([s.x_test[:, names.index(column)].double()
                          * data.standardization[s.name]["std"][j]
                          + data.standardization[s.name]["mean"][j] for s in data.sites])

    if "sex" in numeric:
        sex = decoded("sex").round() + 0.0  # no "-0"
        for value in sorted(set(sex.tolist())):
            masks[f"sex = {value:g}"] = sex == value
    elif "sex" in data.schema.categorical:
        x = torch.cat([s.x_test for s in data.sites])
        columns = [i for i, n in enumerate(names) if n.startswith("sex=")]
        vocabulary = data.schema.categorical["sex"]
        first = x[:, columns].sum(dim=1) == 0 if data.schema.drop_first else None
        if first is not None:
            masks[f"sex = {vocabulary[0]}"] = first
        for i in columns:
            masks[names[i].replace("=", " = ")] = x[:, i] == 1
    if "age" in numeric:
        age = decoded("age")
        for low, high, label in AGE_BANDS:
            masks[label] = (age >= low) & (age < high)
    return {label: mask for label, mask in masks.items() if bool(mask.any())}


# --------------------------------------------------------------------------- from sums
EVALUATION_SUMS = ("n", "correct", "brier", "log_loss", "positives", "true_positives",
                   "true_negatives", "roc_auc", "auc_sites", "sites")
"""What a deployed site sends of its test rows, through the protection scheme, so that
only the sum over sites is revealed: row counts and sums of per-row losses (pooled metrics
follow exactly), and its own ROC AUC with a 1 in ``auc_sites`` when the AUC is defined
(AUC is no sum over rows: the federation gets the mean of the sites' AUCs)."""
COUNTS = ("n", "correct", "positives", "true_positives", "true_negatives", "auc_sites",
          "sites")
"""Slots of `EVALUATION_SUMS` that hold integers (rounded after a ckks decryption, which
adds flooding noise of about 1e-6)."""
SITE_MEAN_AUC = ("ROC AUC is the mean of the sites' own AUCs (each on its own test "
                 "patients), not the AUC of the pooled test set, which no site can compute.")


def metric_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One site's `EVALUATION_SUMS` (float64) for a model's logits on its test rows."""
    metrics = binary_metrics(logits, labels)
    n = int(metrics["n"])
    if n == 0:
        return torch.zeros(len(EVALUATION_SUMS), dtype=torch.float64).index_fill_(
            0, torch.tensor([EVALUATION_SUMS.index("sites")]), 1.0)
    z = logits.detach().to(torch.float64).numpy()
    predicted = 1.0 / (1.0 + np.exp(-z)) >= 0.5  # as `binary_metrics` decides
    positive = labels.detach().numpy() == 1
    auc = metrics["roc_auc"]
    values = {
        "n": n,
        "correct": int((predicted == positive).sum()),
        # The means times n: the same float64 arithmetic as `binary_metrics`.
        "brier": metrics["brier"] * n,
        "log_loss": metrics["log_loss"] * n,
        "positives": int(positive.sum()),
        "true_positives": int((predicted & positive).sum()),
        "true_negatives": int((~predicted & ~positive).sum()),
        "roc_auc": 0.0 if math.isnan(auc) else auc,
        "auc_sites": 0 if math.isnan(auc) else 1,
        "sites": 1,
    }
    return torch.tensor([float(values[k]) for k in EVALUATION_SUMS], dtype=torch.float64)


def metrics_from_sums(total: torch.Tensor) -> Metrics:
    """Pooled metrics from the sum of the sites' `metric_sums` (`binary_metrics`' names).

    Accuracy, balanced accuracy, Brier score and log loss are those of the pooled test
    set, exactly. ``roc_auc`` is the mean of the sites' AUCs (`SITE_MEAN_AUC`), over
    ``roc_auc_sites`` sites (those with both classes among their test rows);
    ``sites`` is the number of sites whose rows are counted.
    """
    if total.shape != (len(EVALUATION_SUMS),):
        raise ValueError(f"expected {len(EVALUATION_SUMS)} sums {EVALUATION_SUMS}; got shape "
                         f"{tuple(total.shape)}.")
    s = {k: float(v) for k, v in zip(EVALUATION_SUMS, total.tolist(), strict=True)}
    for key in COUNTS:
        s[key] = float(round(s[key]))
    n, positives = s["n"], s["positives"]
    negatives = n - positives

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    balanced = 0.5 * (ratio(s["true_positives"], positives)
                      + ratio(s["true_negatives"], negatives)) if positives and negatives \
        else math.nan
    return {"accuracy": ratio(s["correct"], n), "roc_auc": ratio(s["roc_auc"], s["auc_sites"]),
            "balanced_accuracy": balanced, "brier": ratio(s["brier"], n),
            "log_loss": ratio(s["log_loss"], n), "n": int(n),
            "roc_auc_sites": int(s["auc_sites"]), "sites": int(s["sites"])}
