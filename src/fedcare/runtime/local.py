"""The local runtime: every site in one process, one model instance swapped per site.

No process, thread or actor per site: the sites share one `LocalTrainer`
whose flat parameter vector is overwritten with the global weights at the
start of each site's fit. That keeps memory at one model plus one aggregate
vector whatever the number of sites, and makes runs deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.data.preprocess import SumVectors
from fedcare.data.site_data import FederatedData
from fedcare.errors import ConfigError
from fedcare.federation.aggregator import Aggregator, RoundReport, SiteClient
from fedcare.federation.site import NoiseFor, Site
from fedcare.federation.strategy import build_strategy
from fedcare.federation.summation import VectorSite, protected_sum
from fedcare.federation.training import LocalTrainer, TrainingPlan
from fedcare.models import FlatModel, build_model
from fedcare.models.params import ParamSpec
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.privacy.plan import (
    AGGREGATOR,
    FEDERATION,
    PrivacyPlan,
    aggregator_cap,
    aggregator_entry,
    build_privacy_plan,
    noise_factory,
    site_entry,
)
from fedcare.protection import build_scheme
from fedcare.protection.base import Scheme
from fedcare.seeding import INIT, torch_generator

AggregatorT = TypeVar("AggregatorT", bound=Aggregator)


STANDARDIZATION_ROUND = 0
"""The protection scheme's round of federated standardisation's sums: before round 1."""
MOMENTS = ("federated standardisation's column moments (a column whose sums pass the "
           "scheme's range must be rescaled in the files, or standardised with \"bounds\" or "
           "\"site\")")
"""What federated standardisation sums, for `protected_sum`'s errors."""


def load_federation(config: RunConfig) -> FederatedData:
    """The run's data, with federated standardisation summed under its protection scheme.

    Each of the two sums of `fedcare.data.preprocess.federated_mean_std` is one
    protocol run of ``protection.scheme`` between the sites of this process
    (`scheme_sum`), as a deployment runs it across Flower: the statistics, and
    so the model, are those a deployment on the same files gets.
    """
    private = config.privacy.level != "none"
    return build_federation(config.data, scheme_sum(build_scheme(config.protection)),
                            private=private)


def scheme_sum(scheme: Scheme) -> SumVectors:
    """`SumVectors` that sums site vectors with `scheme` (`protected_sum`), site ``i`` at ``i``."""

    def total(vectors: Sequence[np.ndarray]) -> np.ndarray:
        sites = [VectorSite(f"site {i}", i, scheme, _constant(v)) for i, v in enumerate(vectors)]
        length = len(vectors[0]) if vectors else 0
        return protected_sum(scheme, sites, None, length=length,
                             round_number=STANDARDIZATION_ROUND, what=MOMENTS).double().numpy()

    return total


def _constant(vector: np.ndarray) -> Callable[[object], np.ndarray]:
    return lambda _: vector


def training_plan(config: RunConfig) -> TrainingPlan:
    f = config.federation
    return TrainingPlan(epochs=f.local_epochs, batch_size=f.batch_size, lr=f.lr,
                        momentum=f.momentum)


def build_aggregator(config: RunConfig, spec: ParamSpec, sites: Sequence[SiteClient], *,
                     protection: Scheme, privacy: PrivacyPlan | None,
                     noise_for: NoiseFor | None, kind: type[AggregatorT]) -> AggregatorT:
    """The aggregator of `config`, as every runtime builds it, with its privacy ledger.

    Parameters
    ----------
    config : RunConfig
    spec : ParamSpec
        Layout of the global parameters.
    sites : sequence of SiteClient
        The federation's sites, in index order (their planned spends are shown to the ledger).
    protection : Scheme
    privacy : PrivacyPlan or None
        The calibrated mechanisms and caps (None: no DP, no ledger).
    noise_for : callable or None
        Noise source of the run (`noise_factory`); required with `privacy`.
    kind : type
        `Aggregator`, or a subclass taking the same arguments.
    """
    f = config.federation
    ledger = None
    site_privacy = None if privacy is None else privacy.site
    if privacy is not None:
        caps = dict(privacy.caps)
        cap = aggregator_cap(privacy)
        stand_in = None
        if cap is not None and site_privacy is not None:
            caps[AGGREGATOR] = cap
            worst = site_privacy.aggregator_view(site_privacy.n_sites,
                                                 protection=privacy.protection)
            assert worst is not None
            # A run resumed from a ledger written before the aggregator's view had its own
            # entries: each old round counts as the worst view it could have been.
            stand_in = (FEDERATION, AGGREGATOR, worst)
        ledger = PrivacyLedger(None, delta=privacy.delta, accountant=privacy.accountant,
                               caps=caps, released_only=[FEDERATION], stand_in=stand_in)
        # Calibration made the whole plan fit; showing it once per party here lets
        # every per-round check hit the ledger's cache instead of the accountant.
        plan = training_plan(config)
        for site in sites:
            ledger.fits(site.name, [e for r in range(1, f.rounds + 1)
                                    for e in site.planned_spend(r, plan)])
        if site_privacy is not None:
            ledger.fits(FEDERATION, [site_entry(r, site_privacy)
                                     for r in range(1, f.rounds + 1)])
            if cap is not None:  # the cap's own worst case: every later check is cached
                ledger.fits(AGGREGATOR, [e for r in range(1, f.rounds + 1)
                                         for e in aggregator_entry(
                                             r, site_privacy, cohort=site_privacy.n_sites,
                                             protection=privacy.protection)])
    return kind(build_strategy(f), spec, training_plan(config), fraction=f.fraction,
                min_sites=f.min_sites, seed=config.seed, protection=protection,
                site_privacy=site_privacy, ledger=ledger, noise_for=noise_for)


class LocalRuntime:
    """A whole simulated federation in this process.

    Parameters
    ----------
    data : FederatedData
    config : RunConfig
    """

    def __init__(self, data: FederatedData, config: RunConfig) -> None:
        self.data = data
        self.config = config
        self.model = FlatModel(build_model(config.model, data.n_features))
        self.trainer = LocalTrainer(self.model, config.privacy.clipping)
        self.privacy = build_privacy_plan(config, data)
        noise_for = None
        record, site_privacy = {}, None
        if self.privacy is not None:
            noise_for = noise_factory(config)
            record, site_privacy = self.privacy.record, self.privacy.site
        protection = build_scheme(config.protection)
        self.sites = [Site(d, self.trainer, index=i, seed=config.seed, protection=protection,
                           record_privacy=record.get(d.name), site_privacy=site_privacy,
                           noise_for=noise_for)
                      for i, d in enumerate(data.sites)]
        f = config.federation
        if f.rounds < 1:
            raise ConfigError(f"federation.rounds must be >= 1; got {f.rounds}.")
        if f.min_sites > len(self.sites):
            raise ConfigError(f"federation.min_sites is {f.min_sites} but the federation has "
                              f"{len(self.sites)} site(s).")
        self.aggregator = build_aggregator(config, self.model.spec, self.sites,
                                           protection=protection, privacy=self.privacy,
                                           noise_for=noise_for, kind=Aggregator)
        self.ledger: PrivacyLedger | None = self.aggregator.ledger

    def initial_params(self) -> torch.Tensor:
        return self.model.init_params(torch_generator(self.config.seed, INIT))

    def run(self, on_round: Callable[[torch.Tensor, RoundReport], None] | None = None,
            params: torch.Tensor | None = None, first_round: int = 1) -> torch.Tensor:
        """Train rounds `first_round`..``federation.rounds``; return the final parameters.

        `params` is the model to start from (default: a fresh initialisation).
        """
        start = self.initial_params() if params is None else params
        return self.aggregator.fit(self.sites, start, self.config.federation.rounds, on_round,
                                   first_round)
