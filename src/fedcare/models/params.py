"""Parameters as one flat float vector with a fixed, documented layout.

Every protection scheme (DP noise, CKKS, masking) works on the same thing: a
1-D float32 vector. `ParamSpec` is its layout: the module's parameters in
``named_parameters()`` order, each flattened row-major (C order), concatenated.
For an MLP 13-64-64-1 that is ``0.weight`` (64x13), ``0.bias`` (64),
``2.weight`` (64x64), ``2.bias``, ``4.weight`` (1x64), ``4.bias`` (1): 5,121
values; `ParamSpec.to_dict` writes it into every saved model.

`FlatModel` goes one step further: the module's parameters *are* views into
one flat tensor, and their gradients views into another. Loading global
weights is a single copy, a local SGD step a single fused update, and
``delta = params - global`` needs no gathering: the hot path never walks a
dict of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """Layout of a flat parameter vector: names, shapes and offsets."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return tuple(out)

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(self.sizes)

    @classmethod
    def of(cls, module: nn.Module) -> ParamSpec:
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    def locate(self, index: int) -> str:
        """Which parameter tensor a flat index falls in, e.g. ``layers.0.weight[3]``."""
        for name, offset, size in zip(self.names, self.offsets, self.sizes, strict=True):
            if offset <= index < offset + size:
                return f"{name}[{index - offset}]"
        raise IndexError(index)

    def to_dict(self) -> dict[str, list[object]]:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}


def all_finite(vector: torch.Tensor) -> bool:
    """Whether a float32 vector holds no NaN or inf, in one reduction.

    Summing in float64 cannot overflow for float32 inputs (at most 3.4e38 per
    value), and any NaN or inf makes the sum non-finite: exact, and about 4x
    cheaper than ``isfinite(x).all()`` on the per-site hot path.
    """
    return math.isfinite(float(vector.sum(dtype=torch.float64)))


class FlatModel:
    """A module whose parameters and gradients live in two flat tensors.

    Parameters
    ----------
    module : nn.Module
        Any module; its parameters are re-seated as views of `params`.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.spec = ParamSpec.of(module)
        self.params = torch.zeros(self.spec.size, dtype=torch.float32)
        self.grads = torch.zeros(self.spec.size, dtype=torch.float32)
        for (name, param), offset, size in zip(module.named_parameters(), self.spec.offsets,
                                               self.spec.sizes, strict=True):
            view = self.params[offset:offset + size].view(param.shape)
            view.copy_(param.detach())
            owner, leaf = _owner(module, name)
            flat_param = nn.Parameter(view)
            # Autograd accumulates into an existing .grad in place, so every
            # backward pass writes straight into the flat gradient buffer.
            flat_param.grad = self.grads[offset:offset + size].view(param.shape)
            setattr(owner, leaf, flat_param)

    def load(self, vector: torch.Tensor) -> None:
        """Set every parameter from a flat vector (one copy)."""
        self.params.copy_(vector)

    def init_params(self, generator: torch.Generator) -> torch.Tensor:
        """Fresh initial parameters, reproducible under `generator`.

        Linear layers get PyTorch's default distribution, U(-1/sqrt(fan_in),
        1/sqrt(fan_in)) for weight and bias, drawn from `generator` so the
        global random state is neither used nor changed.
        """
        out = torch.empty(self.spec.size)
        for name, shape, offset, size in zip(self.spec.names, self.spec.shapes, self.spec.offsets,
                                             self.spec.sizes, strict=True):
            owner, _ = _owner(self.module, name)
            fan_in = getattr(owner, "in_features", shape[-1] if len(shape) > 1 else 1)
            bound = 1.0 / math.sqrt(fan_in)
            out[offset:offset + size].uniform_(-bound, bound, generator=generator)
        return out

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.module(x)
        return logits.squeeze(-1)


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf
