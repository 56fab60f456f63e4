"""How the aggregate update becomes the next global model.

A strategy sees only the *aggregate* (the weighted mean of the sites'
updates), never one site's update, so it composes with every protection
scheme: the aggregator may hold nothing but a sum.

- FedAvg (McMahan et al. 2017): ``w <- w + eta * mean_delta`` (eta = 1 is plain averaging).
- FedProx (Li et al. 2020): FedAvg on the server; sites add ``mu/2 ||w - w_t||^2``.
- FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2): the mean
  update is a pseudo-gradient for a server optimiser with first moment
  ``m = b1 m + (1-b1) d`` and second moment ``v`` (Adagrad ``v + d^2``, Adam
  ``b2 v + (1-b2) d^2``, Yogi ``v - (1-b2) d^2 sign(v - d^2)``), then
  ``w <- w + eta m / (sqrt(v) + tau)``; ``v`` starts at ``tau^2``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from fedcare.config import FederationConfig
from fedcare.errors import ConfigError, check_positive


class Strategy(ABC):
    """Turns the aggregate update into the next global parameters.

    Attributes
    ----------
    name : str
        Registry key.
    proximal_mu : float
        Weight of the proximal term sites add to their local objective (0: none).
    """

    name: str = ""
    proximal_mu: float = 0.0

    @abstractmethod
    def apply(self, params: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """Next global parameters from the current ones and the mean site update."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server optimiser state, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ConfigError(f"strategy {self.name!r} keeps no state; the checkpoint has "
                              f"{sorted(state)}.")


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        check_positive("federation.server_lr", server_lr)
        self.server_lr = server_lr

    def apply(self, params: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return params + self.server_lr * update


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, *, mu: float, server_lr: float = 1.0) -> None:
        super().__init__(server_lr=server_lr)
        if not mu >= 0:
            raise ConfigError(f"federation.mu must be >= 0 for fedprox; got {mu}.")
        self.proximal_mu = mu


class _AdaptiveServer(Strategy):
    default_server_lr = 0.03
    """Chosen on validation data for heart-disease (BENCHMARKS.md, Quality)."""

    def __init__(self, *, server_lr: float = 0.03, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        check_positive("federation.server_lr", server_lr)
        check_positive("federation.tau", tau)
        for key, beta in (("federation.beta1", beta1), ("federation.beta2", beta2)):
            if not 0 <= beta < 1:
                raise ConfigError(f"{key} must be in [0, 1); got {beta}.")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @abstractmethod
    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor: ...

    def apply(self, params: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(update)
            self.v = torch.full_like(update, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * update
        self.v = self.second_moment(self.v, update * update)
        return params + self.server_lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m, self.v = state.get("m"), state.get("v")


class FedAdagrad(_AdaptiveServer):
    name = "fedadagrad"
    default_server_lr = 0.1
    """Adagrad's steps shrink as v accumulates, so it needs a larger server rate."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


class FedAdam(_AdaptiveServer):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(_AdaptiveServer):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)



def _adaptive(kind: type[_AdaptiveServer]) -> Callable[[FederationConfig], Strategy]:
    return lambda c: kind(server_lr=c.server_lr or kind.default_server_lr, beta1=c.beta1,
                          beta2=c.beta2, tau=c.tau)


STRATEGIES: dict[str, Callable[[FederationConfig], Strategy]] = {
    "fedavg": lambda c: FedAvg(server_lr=c.server_lr or 1.0),
    "fedprox": lambda c: FedProx(mu=c.mu, server_lr=c.server_lr or 1.0),
    "fedadagrad": _adaptive(FedAdagrad),
    "fedadam": _adaptive(FedAdam),
    "fedyogi": _adaptive(FedYogi),
}


def build_strategy(config: FederationConfig) -> Strategy:
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"federation.strategy must be one of {sorted(STRATEGIES)}; "
                          f"got {config.strategy!r}.")
    return STRATEGIES[config.strategy](config)
