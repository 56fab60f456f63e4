"""Client-level DP: each hospital's whole contribution is protected (DP-FedAvg).

Geyer et al. 2017 and McMahan et al. 2018 ("Learning differentially private
recurrent language models", Algorithm 1): each selected site clips its model
update to L2 norm C; the sum of clipped updates gets Gaussian noise of
standard deviation ``sigma C``; the noised sum is divided by the *expected*
number of participants ``q K`` (their fixed-denominator estimator), so adding
or removing one site moves the result by at most ``C / (q K)``. Sites are
sampled independently with probability q each round (Poisson), from the
secure noise source, which is what the accountant's subsampled Gaussian
assumes.

Where the noise is added:

``central``
    the aggregator adds ``N(0, sigma^2 C^2)`` to the revealed sum. It sees
    every site's clipped update unless a protection scheme hides them, and it
    must be trusted to add the noise.
``distributed``
    each of the n selected sites adds ``N(0, sigma^2 C^2 / (n - t))`` to its
    own clipped update before protecting it, so the sum of the m >= n - t
    survivors carries at least the full noise ``sigma^2 C^2`` (t =
    ``dropout_tolerance``: sites may drop, the rest over-noise by
    ``n / (n - t)``). With secure aggregation the aggregator only ever sees
    noised sums. If fewer than n - t updates arrive, the sum does not carry
    enough noise, so the aggregator refuses to reveal it: it never asks for the
    unmasking (secagg) or the decryption (ckks) of a sum of fewer shares.

Rounds without enough sites. An empty Poisson cohort, a cohort or an arrival
below ``federation.min_sites`` (or below what the protection scheme can sum,
or below the ``n - t`` shares distributed noise needs) would stop a run, and
whether a run stops depends on which sites are in the federation, which is
outside the epsilon. So the round is released anyway, from a zero sum with
the noise it would have had (`SitePrivacy.release_empty`): the mechanism run
on an empty cohort, charged to the ledger as every round is.

What the aggregator sees (`SitePrivacy.aggregator_view`). It knows the
cohort, so no sampling amplification holds against it. Under plain
protection it reads each payload: the clipped update with noise
``sigma_u C / sqrt(n - t)`` and the count slot with ``count_std / sqrt(n - t)``;
under secagg or ckks only the sum, with ``sigma_u C`` and ``count_std``. The
two queries compose (Andrew et al. 2021, Theorem 1) to one Gaussian of
multiplier ``sigma / sqrt(n - t)`` (plain) or ``sigma`` (secagg, ckks): the
count slot is a second query on each site's data and is counted.

The ledger is charged the planned ``sigma``; over-noise from the dropout
tolerance is not credited (it only makes the guarantee stronger).

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with
adaptive clipping"), when ``target_quantile`` > 0: each site also reports
``b = 1[||delta|| <= C] - 1/2`` in the payload's last slot (where plain
FedAvg carries its weight, which client-level DP does not use); the noised
sum gives the share of sites within C, and the aggregator moves
``C <- C exp(-eta (share - target_quantile))`` (their geometric update), so
C tracks the chosen quantile of the update norms. The count query has
sensitivity 1/2 and noise ``count_noise``; the two Gaussian queries together
are one Gaussian mechanism of multiplier sigma when the update's own
multiplier is ``(sigma^-2 - (2 count_noise)^-2)^-1/2`` (their Theorem 1), so
the ledger still charges sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedcare.errors import ConfigError, ProtocolError, check_positive
from fedcare.privacy.clipping import clip_l2
from fedcare.privacy.noise import NoiseSource

NOISE_PLACEMENTS = ("central", "distributed")


@dataclass(frozen=True)
class SitePrivacy:
    """Client-level DP settings, shared by the aggregator and every site.

    Attributes
    ----------
    clip_norm : float
        C, the bound on each site's update norm (> 0).
    noise_multiplier : float
        sigma (> 0): the sum carries noise of standard deviation ``sigma C``.
    sample_rate : float
        q, each site's probability of taking part in a round, in (0, 1].
    n_sites : int
        K, the number of sites in the federation.
    noise : str
        ``central`` or ``distributed``.
    dropout_tolerance : int
        Distributed noise only: selected sites that may fail while the noise suffices.
    """

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    n_sites: int
    noise: str = "central"
    dropout_tolerance: int = 0
    target_quantile: float = 0.0
    """Adaptive clipping: the share of sites whose update should fall within C (0: fixed C)."""
    clip_lr: float = 0.2
    """Adaptive clipping: eta of the geometric update of C."""
    count_noise: float = 0.0
    """Adaptive clipping: noise std of the clipped-count sum (0: expected cohort / 20)."""

    def __post_init__(self) -> None:
        check_positive("privacy.clip_norm", self.clip_norm)
        check_positive("privacy.noise_multiplier", self.noise_multiplier)
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"federation.fraction must be in (0, 1]; got {self.sample_rate}.")
        if self.noise not in NOISE_PLACEMENTS:
            raise ConfigError(f"privacy.noise must be one of {list(NOISE_PLACEMENTS)}; got "
                              f"{self.noise!r}.")
        if self.dropout_tolerance < 0:
            raise ConfigError(f"privacy.dropout_tolerance must be >= 0; got "
                              f"{self.dropout_tolerance}.")
        if not 0 <= self.target_quantile < 1:
            raise ConfigError(f"privacy.target_quantile must be in [0, 1) (0: fixed clipping); "
                              f"got {self.target_quantile}.")
        if self.adaptive:
            if not self.clip_lr > 0:
                raise ConfigError(f"privacy.clip_lr must be > 0; got {self.clip_lr}.")
            if not 2 * self.count_std > self.noise_multiplier:
                raise ConfigError(
                    f"Adaptive clipping: the count noise ({self.count_std:g}) must exceed half "
                    f"the noise multiplier ({self.noise_multiplier:g}) or no noise budget is "
                    "left for the update; raise privacy.count_noise or epsilon.")

    @property
    def adaptive(self) -> bool:
        return self.target_quantile > 0

    @property
    def count_std(self) -> float:
        """Noise std of the clipped-count sum (adaptive clipping)."""
        return self.count_noise or self.denominator / 20

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier the update's own noise uses (sigma unless clipping adapts)."""
        if not self.adaptive:
            return self.noise_multiplier
        return float((self.noise_multiplier ** -2 - (2 * self.count_std) ** -2) ** -0.5)

    @property
    def denominator(self) -> float:
        """The expected number of participants, ``q K``."""
        return self.sample_rate * self.n_sites

    def select(self, noise: NoiseSource) -> list[int]:
        """This round's sites: each independently with probability q (all when q = 1)."""
        if self.sample_rate >= 1:
            return list(range(self.n_sites))
        mask = noise.bernoulli(self.n_sites, self.sample_rate)
        return [int(i) for i in mask.nonzero().squeeze(1)]

    def needed(self, cohort: int) -> int:
        """Updates that must arrive for the distributed noise to suffice."""
        return max(1, cohort - self.dropout_tolerance)

    def aggregator_view(self, cohort: int, *, protection: str) -> float | None:
        """Noise multiplier of what the aggregator reads of one site in a round of `cohort`.

        Parameters
        ----------
        cohort : int
            Sites selected in the round (n >= 1).
        protection : str
            ``plain`` (it reads each payload), ``secagg`` or ``ckks`` (it reads the sum).

        Returns
        -------
        float or None
            The multiplier of the one Gaussian mechanism the update and the
            count slot compose to (Andrew et al. 2021, Theorem 1), with no
            sampling (the aggregator knows the cohort); None under central
            noise, where the aggregator sees clipped updates without noise.
            Over-noise from dropped sites is not credited.
        """
        if self.noise == "central":
            return None
        if protection == "plain":
            return self.noise_multiplier / math.sqrt(self.needed(cohort))
        return self.noise_multiplier

    def release_empty(self, length: int, *, clip_norm: float,
                      noise: NoiseSource) -> tuple[torch.Tensor, float]:
        """A round released without any site's payload: noise on a zero sum.

        The mechanism applied to an empty cohort: the aggregator adds the full
        noise the sum would have carried (``sigma_u C`` on the update,
        ``count_std`` on the count slot), whatever the noise placement, so the
        result does not depend on how many sites took part. Returns the update
        (``length`` values, divided by ``q K``) and the next round's C.
        """
        return self._release(torch.zeros(length + 1), clip_norm=clip_norm, add_noise=True,
                             noise=noise)

    def privatize(self, delta: torch.Tensor, *, clip_norm: float, cohort: int,
                  noise: NoiseSource) -> torch.Tensor:
        """A site's payload: its clipped (and, distributed, noised) update, then the count slot.

        Parameters
        ----------
        delta : Tensor
            The site's model update (local minus global parameters).
        clip_norm : float
            This round's C, as announced by the aggregator.
        cohort : int
            Sites selected this round (n), as announced by the aggregator.
        """
        clipped, norm = clip_l2(delta, clip_norm)
        count = torch.tensor([(0.5 if norm <= clip_norm else -0.5) if self.adaptive else 1.0])
        if self.noise == "distributed":
            share = math.sqrt(self.needed(cohort))
            clipped.add_(noise.gaussian(clipped.numel(),
                                        self.update_noise_multiplier * clip_norm / share))
            if self.adaptive:
                count.add_(noise.gaussian(1, self.count_std / share))
        return torch.cat([clipped, count])

    def finish(self, total: torch.Tensor, *, clip_norm: float, cohort: int, arrived: int,
               round_number: int, noise: NoiseSource) -> tuple[torch.Tensor, float]:
        """The aggregator's side: the private mean update and the next round's C.

        `total` is the revealed sum of payloads (updates and count slot).
        Central noise is added here; distributed noise is checked to be
        complete. Raises `ProtocolError` (the sum is not used) if too few
        distributed shares arrived: the aggregator checks that before it asks
        for the sum (`Aggregator.run_round`); this is the last line.
        """
        if self.noise == "distributed" and arrived < self.needed(cohort):
            raise ProtocolError(
                f"Round {round_number}: {arrived} of {cohort} selected sites sent an "
                f"update, but distributed noise needs at least {self.needed(cohort)} "
                f"(privacy.dropout_tolerance = {self.dropout_tolerance}); the sum would "
                "carry too little noise, so it is not used.")
        return self._release(total, clip_norm=clip_norm, add_noise=self.noise == "central",
                             noise=noise)

    def _release(self, total: torch.Tensor, *, clip_norm: float, add_noise: bool,
                 noise: NoiseSource) -> tuple[torch.Tensor, float]:
        update, count = total[:-1], float(total[-1])
        if add_noise:
            update = update + noise.gaussian(update.numel(),
                                             self.update_noise_multiplier * clip_norm)
            if self.adaptive:
                count += float(noise.gaussian(1, self.count_std)[0])
        if self.adaptive:
            within = count / self.denominator + 0.5
            clip_norm *= math.exp(-self.clip_lr * (within - self.target_quantile))
        return update / self.denominator, clip_norm
