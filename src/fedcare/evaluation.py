"""Metrics of a binary risk model: accuracy, ROC AUC, balanced accuracy, Brier score, log loss."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import rankdata

METRICS = ("accuracy", "roc_auc", "balanced_accuracy", "brier", "log_loss")


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
