"""A site (hospital): trains on its own records and sends back only a protected update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcare.data.site_data import SiteData
from fedcare.errors import ProtocolError
from fedcare.federation.training import LocalTrainer, TrainingPlan
from fedcare.models.params import all_finite
from fedcare.protection import PlainSum
from fedcare.seeding import LOCAL_TRAINING, torch_generator


@dataclass(frozen=True)
class FitInstructions:
    """What the aggregator asks of a site in one round."""

    round: int
    plan: TrainingPlan


@dataclass(frozen=True)
class FitResult:
    """What leaves a site after local training.

    Attributes
    ----------
    site : str
    payload : Tensor
        The protected vector ``[n * delta, n]``: the site's update weighted by
        its number of training rows, with that weight appended so the
        aggregate carries its own denominator.
    n_examples : int
        Training rows (metadata; also inside the payload).
    train_loss : float
        Mean local training loss (metadata, for monitoring).
    """

    site: str
    payload: torch.Tensor
    n_examples: int
    train_loss: float


class Site:
    """One site's local work, run by whichever runtime hosts it.

    Parameters
    ----------
    data : SiteData
        The site's records; they never leave this object.
    trainer : LocalTrainer
        Shared trainer (one model instance per process).
    index : int
        The site's position in the federation, which keys its random streams.
    seed : int
        Run seed for shuffling (reproducible, not privacy-relevant).
    protection : PlainSum
        How the update is protected before it leaves.
    """

    def __init__(self, data: SiteData, trainer: LocalTrainer, *, index: int, seed: int,
                 protection: PlainSum) -> None:
        self.data = data
        self.trainer = trainer
        self.index = index
        self.seed = seed
        self.protection = protection
        self._weight = torch.tensor([float(data.n_train)])  # appended to every payload

    @property
    def name(self) -> str:
        return self.data.name

    def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        generator = torch_generator(self.seed, LOCAL_TRAINING, instructions.round, self.index)
        local, loss = self.trainer.train(self.data.x_train, self.data.y_train, global_params,
                                         instructions.plan, generator)
        delta = local.sub_(global_params)
        if not all_finite(delta):
            raise ProtocolError(f"site {self.name!r}, round {instructions.round}: local training "
                                "diverged (non-finite parameters); nothing was sent. Lower "
                                "federation.lr or check this site's data.")
        n = self.data.n_train
        payload = torch.cat([delta.mul_(n), self._weight])
        return FitResult(self.name, self.protection.protect(payload), n, loss)
