"""Models that fit clinical tabular data: logistic regression and an MLP.

Both output one logit per record (binary outcome); the loss is binary cross-entropy
on that logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from fedcare.config import ModelConfig
from fedcare.errors import ConfigError


def logistic_regression(n_features: int, hidden: Sequence[int] = ()) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, 1))


def mlp(n_features: int, hidden: Sequence[int] = (64, 64)) -> nn.Module:
    if not hidden or any(h < 1 for h in hidden):
        raise ConfigError(f"model.hidden must list positive layer widths; got {list(hidden)}.")
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[int, Sequence[int]], nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
}


def build_model(config: ModelConfig, n_features: int) -> nn.Module:
    if config.name not in MODELS:
        raise ConfigError(f"model.name must be one of {sorted(MODELS)}; got {config.name!r}.")
    return MODELS[config.name](n_features, config.hidden)
