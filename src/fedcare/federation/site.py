"""A site (hospital): trains on its own records and sends back only a protected update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedcare.data.site_data import SiteData
from fedcare.errors import ProtocolError
from fedcare.federation.training import LocalTrainer, TrainingPlan
from fedcare.models.params import all_finite
from fedcare.privacy.dpsgd import RecordPrivacy
from fedcare.privacy.ledger import LedgerEntry
from fedcare.privacy.noise import NoiseSource
from fedcare.privacy.plan import record_entry
from fedcare.privacy.site_level import SitePrivacy
from fedcare.protection.base import Scheme, SiteSession
from fedcare.seeding import LOCAL_TRAINING, torch_generator

NoiseFor = Callable[[int, int], NoiseSource]
"""(round, party index) -> the noise source for that party's draws in that round."""


@dataclass(frozen=True)
class FitInstructions:
    """What the aggregator asks of a site in one round."""

    round: int
    plan: TrainingPlan
    cohort: int = 0
    """Sites selected this round (distributed DP noise is split among them)."""
    clip_norm: float = 0.0
    """Client-level DP: this round's bound on the update norm (it moves under adaptive
    clipping)."""


@dataclass(frozen=True)
class FitResult:
    """What leaves a site after local training.

    Attributes
    ----------
    site : str
    payload : object
        The protection scheme's form (a tensor under ``plain``, a ciphertext or
        a masked vector otherwise) of ``[n * delta, n]``: the site's update weighted by
        its number of training rows, with that weight appended so the
        aggregate carries its own denominator. Under client-level DP it is
        ``[clip(delta) (+ noise share), count]``: every site weighs the same, as
        the sensitivity bound needs, and the last slot carries adaptive
        clipping's within-the-bound indicator (`SitePrivacy.privatize`).
    n_examples : int
        Training rows (metadata; also inside the payload). 0 under client-level
        DP, where a site's size is part of what the guarantee protects.
    train_loss : float
        Mean local training loss (metadata, for monitoring).
    """

    site: str
    payload: object
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
    protection : Scheme
        How the update is protected before it leaves (site side: holds this
        site's secrets).
    record_privacy : RecordPrivacy, optional
        DP-SGD for every local step (record-level DP).
    site_privacy : SitePrivacy, optional
        Clip the update (and add a noise share) before it leaves (client-level DP).
    noise_for : callable, optional
        Source of DP noise and of DP-SGD's Poisson sampling; required with either privacy.
    """

    def __init__(self, data: SiteData, trainer: LocalTrainer, *, index: int, seed: int,
                 protection: Scheme, record_privacy: RecordPrivacy | None = None,
                 site_privacy: SitePrivacy | None = None,
                 noise_for: NoiseFor | None = None) -> None:
        if (record_privacy or site_privacy) and noise_for is None:
            raise ValueError("a private site needs a noise source")
        self.data = data
        self.trainer = trainer
        self.index = index
        self.seed = seed
        self.protection = protection
        self.record_privacy = record_privacy
        self.site_privacy = site_privacy
        self.noise_for = noise_for
        self._weight = torch.tensor([float(data.n_train)])  # appended to plain payloads
        self._session: tuple[int, SiteSession] | None = None

    @property
    def name(self) -> str:
        return self.data.name

    def planned_spend(self, round_number: int, plan: TrainingPlan) -> list[LedgerEntry]:
        """The record-level budget this site would spend in a round (none without DP-SGD)."""
        if self.record_privacy is None:
            return []
        return [record_entry(round_number, self.name, self.record_privacy, plan.epochs)]

    def exchange(self, round_number: int, message: object) -> object:
        """Answer a message of the protection protocol (before training or after it)."""
        return self.session(round_number).handle(message)

    def session(self, round_number: int) -> SiteSession:
        """This round's protection session (a new one, with fresh secrets, each round)."""
        if self._session is None or self._session[0] != round_number:
            self._session = (round_number,
                             self.protection.site_session(round_number, self.index))
        return self._session[1]

    def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        generator = torch_generator(self.seed, LOCAL_TRAINING, instructions.round, self.index)
        noise = None if self.noise_for is None else self.noise_for(instructions.round,
                                                                   self.index)
        local, loss = self.trainer.train(self.data.x_train, self.data.y_train, global_params,
                                         instructions.plan, generator,
                                         privacy=self.record_privacy, noise=noise)
        delta = local.sub_(global_params)
        if not all_finite(delta):
            raise ProtocolError(f"site {self.name!r}, round {instructions.round}: local training "
                                "diverged (non-finite parameters); nothing was sent. Lower "
                                "federation.lr or check this site's data.")
        n = self.data.n_train
        session = self.session(instructions.round)
        if self.site_privacy is not None:
            assert noise is not None
            if self.site_privacy.noise == "distributed":
                # The noise share assumes the announced cohort: the scheme checks what it can
                # of it and reveals nothing that carries less than the whole noise.
                session.require_contributors(self.site_privacy.needed(instructions.cohort),
                                             cohort=instructions.cohort)
            payload = self.site_privacy.privatize(
                delta, clip_norm=instructions.clip_norm or self.site_privacy.clip_norm,
                cohort=instructions.cohort, noise=noise)
            n = 0
        else:
            payload = torch.cat([delta.mul_(n), self._weight])
        if self.record_privacy is not None or self.site_privacy is not None:
            # The exact training loss is not covered by the DP guarantee (with one
            # batch it reveals a patient's label): a private site does not send it.
            loss = math.nan
        return FitResult(self.name, session.protect(payload), n, loss)
