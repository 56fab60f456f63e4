"""DP-SGD (Abadi et al. 2016): Poisson sampling, per-record clipping, Gaussian noise.

One DP-SGD step on a site's rows ``x`` draws a Poisson sample (each row with
probability q), computes each sampled record's gradient ``g_i``, clips it to
L2 norm C, sums, adds ``N(0, sigma^2 C^2 I)`` and divides by the expected
batch size ``q n``, exactly as Opacus' ``DPOptimizer`` does with
``loss_reduction="mean"`` (a test checks the two agree for the same batch and
noise). Changing one patient's record changes the clipped sum by at most C
(add/remove neighbouring), which is what the accountant's subsampled Gaussian
mechanism assumes.

Two ways to get the clipped sum, chosen by `PerRecordClipper`:

``linear`` (fast path, models made only of ``nn.Linear`` layers and
parameter-free activations, on 2-D inputs): a linear layer's per-record weight
gradient is the outer product ``g_i a_i^T`` of the gradient at its output and
its input, so ``||grad_i W||^2 = ||g_i||^2 ||a_i||^2`` and the bias adds
``||g_i||^2`` (Goodfellow 2015; the "ghost norm" of Li et al. 2022). One
forward pass and one backward pass to the layer outputs give every record's
norm without materialising per-record gradients, and the clipped sum is
``(c * g)^T a`` per layer: one matrix product, the cost of a plain backward.

``vmap`` (any model): per-record gradients with ``torch.func.vmap(grad(...))``,
a ``batch x parameters`` matrix, clipped and summed in one product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedcare.errors import ConfigError, check_positive
from fedcare.models.params import FlatModel
from fedcare.privacy.clipping import clip_factors
from fedcare.privacy.noise import NoiseSource

CLIPPING_METHODS = ("auto", "linear", "vmap")


@dataclass(frozen=True)
class RecordPrivacy:
    """One site's DP-SGD settings.

    Attributes
    ----------
    clip_norm : float
        C, the bound on each record's gradient norm (> 0).
    noise_multiplier : float
        sigma: the noise standard deviation is ``sigma * C`` on the clipped sum (> 0).
    sample_rate : float
        q, each record's probability of being in a step's Poisson sample, in (0, 1].
    steps_per_epoch : int
        DP-SGD steps per local epoch (``ceil(1 / q)``).
    """

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int

    def __post_init__(self) -> None:
        check_positive("privacy.clip_norm", self.clip_norm)
        check_positive("privacy.noise_multiplier", self.noise_multiplier)
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"The sample rate must be in (0, 1]; got {self.sample_rate}.")
        if self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1; got {self.steps_per_epoch}.")

    @staticmethod
    def sampling(n_records: int, batch_size: int) -> tuple[float, int]:
        """Sample rate ``q = batch_size / n`` (at most 1) and ``ceil(1 / q)`` steps per epoch."""
        if n_records < 1:
            raise ConfigError("DP-SGD needs at least one training record at every site.")
        q = min(1.0, batch_size / n_records)
        return q, math.ceil(1 / q - 1e-9)


# Layers that act on each record alone and hold no parameters. Anything else
# (BatchNorm, Dropout, attention) could mix records within a batch, and the
# gradient at a layer output would no longer be each record's own.
_ROWWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Identity,
            nn.Sequential)


def _linear_layers(module: nn.Module) -> list[nn.Linear] | None:
    """The module's Linear layers if they hold all its parameters, else None.

    Only a Sequential of Linear layers and row-wise activations qualifies, so
    that the outputs the hooks see are the ones the loss depends on.
    """
    if not isinstance(module, nn.Sequential):
        return None
    parts = list(module.modules())
    if not all(isinstance(m, (nn.Linear, *_ROWWISE)) for m in parts):
        return None
    linears = [m for m in parts if isinstance(m, nn.Linear)]
    return linears or None


class PerRecordClipper:
    """Clipped sums of per-record gradients for one `FlatModel`.

    Parameters
    ----------
    model : FlatModel
    clip_norm : float
    method : str
        ``auto`` (``linear`` when the model allows it, else ``vmap``), ``linear`` or ``vmap``.
    """

    def __init__(self, model: FlatModel, clip_norm: float, method: str = "auto") -> None:
        check_positive("privacy.clip_norm", clip_norm)
        if method not in CLIPPING_METHODS:
            raise ConfigError(f"privacy.clipping must be one of {list(CLIPPING_METHODS)}; "
                              f"got {method!r}.")
        self.model = model
        self.clip_norm = clip_norm
        self._linears = _linear_layers(model.module)
        if method == "linear" and self._linears is None:
            raise ConfigError("privacy.clipping = 'linear' needs a Sequential of nn.Linear "
                              "layers and row-wise activations; use 'vmap' or 'auto'.")
        self.method = ("linear" if self._linears is not None else "vmap") if method == "auto" \
            else method
        self._per_record_grads: Callable[..., dict[str, torch.Tensor]] | None = None
        # Views into the flat gradient, by parameter (not `.grad`, which zero_grad() may unset).
        spec = model.spec
        self._grad_views = {
            id(param): model.grads[offset:offset + size].view(shape)
            for param, offset, size, shape in zip(model.module.parameters(), spec.offsets,
                                                  spec.sizes, spec.shapes, strict=True)}

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``sum_i clip(grad loss_i)`` into ``model.grads``; return losses and norms.

        Parameters
        ----------
        x, y : Tensor
            The sampled records, ``(B, features)`` and ``(B,)``, B >= 1.

        Returns
        -------
        losses, norms : Tensor
            Each record's loss and its gradient's L2 norm before clipping, ``(B,)``.
        """
        if self.method == "linear":
            return self._linear(x, y)
        return self._vmap(x, y)

    def _linear(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._linears is not None
        if x.dim() != 2:
            raise ConfigError(f"privacy.clipping = 'linear' needs (records, features) inputs; "
                              f"got shape {tuple(x.shape)}.")
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []

        def keep(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            inputs.append(args[0].detach())
            outputs.append(out)

        hooks = [layer.register_forward_hook(keep) for layer in self._linears]
        try:
            logits = self.model.module(x).squeeze(-1)
        finally:
            for hook in hooks:
                hook.remove()
        losses = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        # The sum's gradient at a layer output is, row by row, each record's own gradient.
        out_grads = torch.autograd.grad(losses.sum(), outputs)
        # Norms in float64 (B values, no cost): a float32 norm can round below C
        # for a record just above it, and the bound would be exceeded by a hair.
        squared = torch.zeros(x.shape[0], dtype=torch.float64)
        for layer, a, g in zip(self._linears, inputs, out_grads, strict=True):
            g2 = g.square().sum(1, dtype=torch.float64)
            squared += g2 * a.square().sum(1, dtype=torch.float64)
            if layer.bias is not None:
                squared += g2
        norms = squared.sqrt()
        factors = clip_factors(norms, self.clip_norm).to(torch.float32)
        for layer, a, g in zip(self._linears, inputs, out_grads, strict=True):
            scaled = g * factors[:, None]
            torch.mm(scaled.T, a, out=self._grad_views[id(layer.weight)])
            if layer.bias is not None:
                torch.sum(scaled, 0, out=self._grad_views[id(layer.bias)])
        return losses.detach(), norms

    def _vmap(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.model.module
        if self._per_record_grads is None:
            def loss_of(params: dict[str, torch.Tensor], xi: torch.Tensor,
                        yi: torch.Tensor) -> torch.Tensor:
                logit = functional_call(module, params, (xi.unsqueeze(0),)).reshape(())
                return F.binary_cross_entropy_with_logits(logit, yi)

            self._per_record_grads = vmap(grad(loss_of), in_dims=(None, 0, 0))
        params = {name: p.detach() for name, p in module.named_parameters()}
        per_record = self._per_record_grads(params, x, y)
        matrix = torch.cat([per_record[name].reshape(x.shape[0], -1)
                            for name in self.model.spec.names], dim=1)
        norms = matrix.norm(dim=1, dtype=torch.float64)
        factors = clip_factors(norms, self.clip_norm).to(torch.float32)
        torch.mv(matrix.T, factors, out=self.model.grads)
        with torch.no_grad():
            losses = F.binary_cross_entropy_with_logits(module(x).squeeze(-1), y,
                                                        reduction="none")
        return losses, norms


def noisy_gradient(clipper: PerRecordClipper, x: torch.Tensor, y: torch.Tensor, *,
                   privacy: RecordPrivacy, n_records: int, noise: NoiseSource) -> float:
    """One DP-SGD gradient into ``model.grads``: clipped sum plus noise over ``q n``.

    `x`, `y` are the step's Poisson sample (possibly empty: the gradient is then
    noise alone). Returns the sample's summed loss (monitoring only).
    """
    grads = clipper.model.grads
    if x.shape[0]:
        losses, _ = clipper.clipped_sum(x, y)
        loss_sum = float(losses.sum())
    else:
        grads.zero_()
        loss_sum = 0.0
    grads.add_(noise.gaussian(grads.numel(), privacy.noise_multiplier * privacy.clip_norm))
    grads.div_(privacy.sample_rate * n_records)
    return loss_sum
