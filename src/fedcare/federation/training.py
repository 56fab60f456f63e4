"""Local training on one site's tensors: mini-batch SGD on a `FlatModel`.

Batches are slices of the site's tensors by a shuffled index (no DataLoader,
no per-sample Python); the SGD step is one fused update of the flat vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcare.errors import ConfigError
from fedcare.models.params import FlatModel
from fedcare.privacy.dpsgd import PerRecordClipper, RecordPrivacy, noisy_gradient
from fedcare.privacy.noise import NoiseSource


@dataclass(frozen=True)
class TrainingPlan:
    """What one local training run does.

    Attributes
    ----------
    epochs : int
        Passes over the site's training rows (>= 1).
    batch_size : int
        Rows per step (>= 1); the last batch of an epoch may be smaller.
    lr : float
        SGD learning rate (> 0).
    momentum : float
        Heavy-ball momentum in [0, 1), restarted at each run.
    proximal_mu : float
        FedProx weight of ``mu/2 * ||w - w_start||^2`` (Li et al. 2020, eq. 2); 0 disables it.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"federation.local_epochs must be >= 1; got {self.epochs}.")
        if self.batch_size < 1:
            raise ConfigError(f"federation.batch_size must be >= 1; got {self.batch_size}.")
        if not self.lr > 0:
            raise ConfigError(f"federation.lr must be > 0; got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"federation.momentum must be in [0, 1); got {self.momentum}.")
        if not self.proximal_mu >= 0:
            raise ConfigError(f"federation.mu must be >= 0; got {self.proximal_mu}.")


class LocalTrainer:
    """Runs a `TrainingPlan` on one shared `FlatModel` (one model instance per process)."""

    def __init__(self, model: FlatModel, clipping: str = "auto") -> None:
        self.model = model
        self.clipping = clipping
        self._clipper: PerRecordClipper | None = None

    def train(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, plan: TrainingPlan,
              generator: torch.Generator, *, privacy: RecordPrivacy | None = None,
              noise: NoiseSource | None = None) -> tuple[torch.Tensor, float]:
        """Train from `start` on (`x`, `y`); return the new flat parameters and the mean loss.

        With `privacy`, every step is a DP-SGD step (`fedcare.privacy.dpsgd`)
        whose Poisson sample and noise come from `noise`; `generator` is then
        unused, since the sampling is part of the privacy mechanism. The
        returned vector is a fresh tensor; `start` is not modified.
        """
        model = self.model
        model.load(start)
        params, grads, module = model.params, model.grads, model.module
        velocity = torch.zeros_like(params) if plan.momentum else None
        n = int(y.shape[0])
        loss_sum, seen = 0.0, 0

        def descend() -> None:
            if plan.proximal_mu:
                # gradient of mu/2 ||w - w_start||^2
                grads.add_(params, alpha=plan.proximal_mu).add_(start, alpha=-plan.proximal_mu)
            step = grads
            if velocity is not None:
                step = velocity.mul_(plan.momentum).add_(grads)
            params.add_(step, alpha=-plan.lr)

        if privacy is not None:
            if noise is None:
                raise ConfigError("DP-SGD needs a noise source.")
            clipper = self._clipper_for(privacy.clip_norm)
            for _ in range(plan.epochs * privacy.steps_per_epoch):
                index = noise.bernoulli(n, privacy.sample_rate).nonzero().squeeze(1)
                loss_sum += noisy_gradient(clipper, x[index], y[index], privacy=privacy,
                                           n_records=n, noise=noise)
                seen += int(index.numel())
                descend()
            return params.clone(), loss_sum / max(seen, 1)

        for _ in range(plan.epochs):
            order = torch.randperm(n, generator=generator)
            for begin in range(0, n, plan.batch_size):
                index = order[begin:begin + plan.batch_size]
                grads.zero_()
                loss = F.binary_cross_entropy_with_logits(module(x[index]).squeeze(-1), y[index])
                loss.backward()  # type: ignore[no-untyped-call]
                descend()
                loss_sum += loss.item() * int(index.numel())
                seen += int(index.numel())
        return params.clone(), loss_sum / max(seen, 1)

    def _clipper_for(self, clip_norm: float) -> PerRecordClipper:
        if self._clipper is None or self._clipper.clip_norm != clip_norm:
            self._clipper = PerRecordClipper(self.model, clip_norm, self.clipping)
        return self._clipper
