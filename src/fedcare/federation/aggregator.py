"""The aggregator: the round loop, site selection, quorum, and the strategy step."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fedcare.errors import ConfigError, FedcareError, ProtocolError, QuorumError
from fedcare.federation.site import FitInstructions, FitResult, NoiseFor
from fedcare.federation.strategy import Strategy
from fedcare.federation.training import TrainingPlan
from fedcare.models.params import ParamSpec, all_finite
from fedcare.privacy.ledger import LedgerEntry, PrivacyLedger
from fedcare.privacy.plan import aggregator_entry, site_entry
from fedcare.privacy.site_level import SitePrivacy
from fedcare.protection.base import Scheme, min_contributors, wire_digest, wire_size
from fedcare.protection.plain import PlainSum
from fedcare.seeding import SAMPLING, derive_seed


class SiteClient(Protocol):
    """Anything that can run a site's round: in process, or across the network."""

    @property
    def name(self) -> str: ...

    def fit(self, global_params: torch.Tensor, instructions: FitInstructions) -> FitResult: ...

    def exchange(self, round_number: int, message: object) -> object: ...

    def planned_spend(self, round_number: int, plan: TrainingPlan) -> list[LedgerEntry]: ...


AGGREGATOR_PARTY = 1 << 32
"""Party index of the aggregator's own noise draws (sites are 0..K-1)."""


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round, for metrics and the audit trail."""

    round: int
    selected: list[str]
    participants: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    train_loss: float = math.nan
    n_examples: int = 0
    clip_norm: float | None = None
    """Client-level DP: the bound the sites clipped to this round."""
    received: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Site -> (bytes, SHA-256) of the protected payload the aggregator combined."""
    empty: bool = False
    """Client-level DP: released from noise alone (too few sites for a sum; nobody's update)."""



class Exchanging(Protocol):
    """A site as a protection scheme's setup reaches it."""

    @property
    def name(self) -> str: ...

    def exchange(self, round_number: int, message: object) -> object: ...


def relay(sites: Sequence[Exchanging] | Mapping[int, Exchanging], round_number: int,
          failures: dict[str, str]) -> Callable[[Mapping[int, object]], dict[int, object]]:
    """The `exchange` callback of a scheme's setup: each message to its site (by index).

    A site that fails is left out of the replies and its first reason kept in `failures`.
    """

    def exchange(messages: Mapping[int, object]) -> dict[int, object]:
        replies = {}
        for i, message in messages.items():
            try:
                replies[i] = sites[i].exchange(round_number, message)
            except FedcareError as exc:
                failures.setdefault(sites[i].name, str(exc))
        return replies

    return exchange


class Aggregator:
    """Runs rounds: select sites, collect protected updates, combine, apply the strategy.

    Parameters
    ----------
    strategy : Strategy
    spec : ParamSpec
        Layout of the global parameters; payloads must be ``spec.size + 1`` long.
    plan : TrainingPlan
        Local training each selected site runs.
    fraction : float
        Share of sites selected per round, in (0, 1]; at least `min_sites` are selected.
    min_sites : int
        Quorum: a round whose usable updates are fewer is refused with `QuorumError`.
    seed : int
        Seed of site selection (reproducible).
    protection : Scheme
        How payloads are combined (aggregator side: public material only).
        Default: `PlainSum`.
    site_privacy : SitePrivacy, optional
        Client-level DP: Poisson site sampling, central noise or a check of the
        distributed noise, and the fixed ``q K`` denominator.
    ledger : PrivacyLedger, optional
        Checked before each round (`BudgetExceeded` stops the run before any
        training) and charged as each round's results are released.
    noise_for : callable, optional
        Secure randomness for site sampling and central noise (client-level DP).
    """

    def __init__(self, strategy: Strategy, spec: ParamSpec, plan: TrainingPlan, *,
                 fraction: float = 1.0, min_sites: int = 1, seed: int = 0,
                 protection: Scheme | None = None, site_privacy: SitePrivacy | None = None,
                 ledger: PrivacyLedger | None = None,
                 noise_for: NoiseFor | None = None) -> None:
        if site_privacy is not None and noise_for is None:
            raise ValueError("client-level DP needs a noise source")
        if not 0 < fraction <= 1:
            raise ConfigError(f"federation.fraction must be in (0, 1]; got {fraction}.")
        if min_sites < 1:
            raise ConfigError(f"federation.min_sites must be >= 1; got {min_sites}.")
        self.strategy = strategy
        self.spec = spec
        self.plan = TrainingPlan(plan.epochs, plan.batch_size, plan.lr, plan.momentum,
                                 strategy.proximal_mu)
        self.fraction = fraction
        self.min_sites = min_sites
        self.seed = seed
        self.protection: Scheme = protection or PlainSum()
        self.site_privacy = site_privacy
        self.ledger = ledger
        self.noise_for = noise_for
        self.clip_norm = 0.0 if site_privacy is None else site_privacy.clip_norm
        """Client-level DP: the current bound on update norms (checkpointed; adaptive)."""

    def select(self, n_sites: int, round_number: int) -> list[int]:
        """Indices of the sites taking part in `round_number` (sorted).

        Reproducible under the seed; under client-level DP each site is drawn
        independently with probability ``fraction`` from the secure source.
        """
        if n_sites < self.min_sites:
            raise QuorumError(f"The federation has {n_sites} site(s) but federation.min_sites is "
                              f"{self.min_sites}.")
        if self.site_privacy is not None and self.noise_for is not None:
            return self.site_privacy.select(self.noise_for(round_number, AGGREGATOR_PARTY))
        # Rounded first: 0.07 * 100 is 7.000000000000001 in floating point, not 7.
        k = min(n_sites, max(self.min_sites, math.ceil(round(self.fraction * n_sites, 9))))
        if k == n_sites:
            return list(range(n_sites))
        rng = np.random.default_rng(derive_seed(self.seed, SAMPLING, round_number))
        return sorted(int(i) for i in rng.choice(n_sites, size=k, replace=False))

    def run_round(self, round_number: int, clients: Sequence[SiteClient],
                  params: torch.Tensor) -> tuple[torch.Tensor, RoundReport]:
        """One round from the current global parameters; returns the next ones and a report.

        A site whose fit fails with a fedcare error, or whose payload has the
        wrong length or a non-finite value, is left out of this round and
        named in the report; the round goes on if the quorum still holds.

        Under client-level DP a round without enough sites (an empty Poisson
        cohort; fewer than ``min_sites``, than the protection scheme can sum,
        or than the distributed noise needs) is not an error: whether a run
        stops must not depend on which sites are in the federation, which the
        epsilon does not cover. The round is released from a zero sum with the
        noise it would have had (`SitePrivacy.release_empty`), charged as every
        round is, and reported with ``empty = True``. A sum with fewer
        distributed noise shares than needed is never revealed (no unmasking,
        no decryption is asked for).
        """
        chosen = self.select(len(clients), round_number)
        selected = [clients[i] for i in chosen]
        instructions = FitInstructions(round_number, self.plan, cohort=len(selected),
                                       clip_norm=self.clip_norm)
        dp = self.site_privacy
        record_spend: list[LedgerEntry] = []
        site_spend: list[LedgerEntry] = []
        view_spend: list[LedgerEntry] = []
        if self.ledger is not None:
            record_spend = [e for c in selected
                            for e in c.planned_spend(round_number, self.plan)]
            if dp is not None:
                site_spend = [site_entry(round_number, dp)]
                view_spend = aggregator_entry(round_number, dp, cohort=len(selected),
                                              protection=self.protection.name)
            self.ledger.check(record_spend + site_spend + view_spend)
        failures: dict[str, str] = {}
        if dp is not None and len(selected) < self.least_contributors(len(selected)):
            # Nobody is asked: the round could not be summed whatever the sites sent.
            return self.release_empty(round_number, params, selected, failures, site_spend,
                                      instructions)

        exchange = relay(clients, round_number, failures)
        try:
            session = self.protection.aggregator_session(round_number, chosen,
                                                         self.spec.size + 1)
            ready = set(session.setup(exchange))
        except QuorumError:
            if dp is None:
                raise
            return self.release_empty(round_number, params, selected, failures, site_spend,
                                      instructions)
        if self.ledger is not None and self.protection.name == "plain":
            # Under plain protection the aggregator reads each payload as it arrives:
            # charged before the first is read, as every spend is before its result is used.
            self.ledger.record(view_spend)
            view_spend = []
        participants: list[str] = []
        received: dict[str, tuple[int, str]] = {}
        loss_sum, n_sum = 0.0, 0
        for i, client in zip(chosen, selected, strict=True):
            if i not in ready:
                failures.setdefault(client.name, f"did not complete the {self.protection.name} "
                                                 "setup")
                continue
            try:
                result = client.fit(params, instructions)
                if isinstance(result.payload, torch.Tensor):  # readable: check it here
                    self.check_payload(result.site, result.payload)
                session.add(i, result.payload)
            except FedcareError as exc:
                failures[client.name] = str(exc)
                continue
            received[client.name] = (wire_size(result.payload), wire_digest(result.payload))
            participants.append(client.name)
            loss_sum += result.train_loss * result.n_examples
            n_sum += result.n_examples
        if self.ledger is not None:
            # Every selected site ran DP-SGD and may have sent its update (even one
            # that was then rejected): charge them all, never fewer.
            self.ledger.record(record_spend)
        least = self.least_contributors(len(selected))
        if len(participants) < least:
            if dp is not None:
                # Checked before the reveal: a sum of fewer distributed noise shares than
                # needed is never unmasked or decrypted, so nobody sees it under-noised.
                return self.release_empty(round_number, params, selected, failures,
                                          site_spend, instructions)
            detail = "; ".join(f"{k}: {v}" for k, v in failures.items()) or "none failed"
            raise QuorumError(f"Round {round_number}: {len(participants)} of {len(selected)} "
                              f"selected sites returned a usable update, fewer than "
                              f"federation.min_sites = {self.min_sites} ({detail}). The global "
                              f"model of round {round_number - 1} is kept.")
        if self.ledger is not None:
            # Charged before the sum is revealed: whoever reads it (the aggregator, and under
            # ckks the decrypting site) has seen the round, used or not.
            self.ledger.record(site_spend + view_spend)
        try:
            aggregate = session.reveal(exchange).to(params.dtype)
        except QuorumError:
            if dp is None:
                raise
            # Nothing was revealed (too few sites answered the unmasking); the round is
            # already charged.
            return self.release_empty(round_number, params, selected, failures, [],
                                      instructions)
        self.check_aggregate(aggregate, round_number)
        if dp is not None and self.noise_for is not None:
            update, self.clip_norm = dp.finish(
                aggregate, clip_norm=self.clip_norm, cohort=len(selected),
                arrived=len(participants), round_number=round_number,
                noise=self.noise_for(round_number, AGGREGATOR_PARTY))
        else:
            update = aggregate[:-1] / float(aggregate[-1])
        new_params = self.strategy.apply(params, update)
        report = RoundReport(round_number, [c.name for c in selected], participants, failures,
                             loss_sum / max(n_sum, 1), n_sum, instructions.clip_norm or None,
                             received)
        return new_params, report

    def least_contributors(self, cohort: int) -> int:
        """Usable payloads a round of `cohort` selected sites needs before its sum is revealed.

        ``min_sites``; what the protection scheme can sum (`min_contributors`:
        a secagg or ckks sum of one payload is that site's update); and with
        distributed client-level noise the ``n - t`` shares that carry the full noise.
        """
        least = self.min_sites
        if self.site_privacy is not None:
            least = max(least, min_contributors(self.protection))
            if self.site_privacy.noise == "distributed":
                least = max(least, self.site_privacy.needed(cohort))
        return least

    def release_empty(self, round_number: int, params: torch.Tensor,
                      selected: Sequence[SiteClient], failures: dict[str, str],
                      site_spend: Sequence[LedgerEntry], instructions: FitInstructions
                      ) -> tuple[torch.Tensor, RoundReport]:
        """Client-level DP: release the round from a zero sum and the noise it would have had.

        The ledger is charged `site_spend` (the round's usual entry) before the
        noise is drawn; the strategy applies the noised update as any other.
        The report names no participant (no site's update is in it) and says
        ``empty``.
        """
        assert self.site_privacy is not None and self.noise_for is not None
        if self.ledger is not None:
            self.ledger.record(site_spend)
        update, self.clip_norm = self.site_privacy.release_empty(
            self.spec.size, clip_norm=self.clip_norm,
            noise=self.noise_for(round_number, AGGREGATOR_PARTY))
        new_params = self.strategy.apply(params, update.to(params.dtype))
        report = RoundReport(round_number, [c.name for c in selected], [], failures,
                             clip_norm=instructions.clip_norm or None, empty=True)
        return new_params, report

    def check_payload(self, site: str, payload: torch.Tensor) -> None:
        """Refuse a readable (plain) payload of the wrong shape, non-finite, or unweighted."""
        if payload.ndim != 1 or payload.numel() != self.spec.size + 1:
            raise ProtocolError(f"site {site!r}: payload of shape {tuple(payload.shape)}; "
                                f"expected {self.spec.size + 1} values (update and weight).")
        if not all_finite(payload):
            bad = int(torch.nonzero(~torch.isfinite(payload))[0, 0])
            last = "weight" if self.site_privacy is None else "count slot"
            where = last if bad == self.spec.size else self.spec.locate(bad)
            raise ProtocolError(f"site {site!r}: payload value {bad} ({where}) is "
                                f"{payload[bad].item()}; expected a finite number. The update "
                                "was discarded.")
        if self.site_privacy is None and not float(payload[-1]) > 0:
            raise ProtocolError(f"site {site!r}: aggregation weight "
                                f"{float(payload[-1])}; expected a positive row count.")

    def check_aggregate(self, aggregate: torch.Tensor, round_number: int) -> None:
        """Refuse a revealed sum that cannot be a sum of valid payloads."""
        if not all_finite(aggregate) or (self.site_privacy is None
                                         and not float(aggregate[-1]) > 0):
            raise ProtocolError(f"Round {round_number}: the revealed aggregate holds non-finite "
                                f"values or a non-positive total weight; under "
                                f"{self.protection.name} a site's payload cannot be checked "
                                "alone, so the round is refused and the global model of round "
                                f"{round_number - 1} is kept.")

    def fit(self, clients: Sequence[SiteClient], params: torch.Tensor, rounds: int,
            on_round: Callable[[torch.Tensor, RoundReport], None] | None = None,
            first_round: int = 1) -> torch.Tensor:
        """Run rounds `first_round`..`rounds`; `on_round` sees each new model and its report."""
        if rounds < 1:
            raise ConfigError(f"federation.rounds must be >= 1; got {rounds}.")
        for round_number in range(first_round, rounds + 1):
            params, report = self.run_round(round_number, clients, params)
            if on_round is not None:
                on_round(params, report)
        return params
