"""`plain`: updates travel as they are; the aggregator sums them.

Threat model: none. An honest-but-curious aggregator reads every site's
update (and can run gradient inversion on it). Use it for baselines and for
measuring what the other schemes cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcare.errors import ProtocolError
from fedcare.protection.base import Exchange


class PlainSum:
    """No protection; streaming summation (memory is one vector for any site count)."""

    name = "plain"

    def site_session(self, round_number: int, site: int) -> PlainSite:
        return PlainSite()

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> PlainAggregator:
        return PlainAggregator(cohort)


class PlainSite:
    def handle(self, message: object) -> object:
        raise ProtocolError(f"plain protection exchanges no messages; received "
                            f"{type(message).__name__}.")

    def require_contributors(self, needed: int, *, cohort: int) -> None:
        """Nothing to check: the aggregator reads each payload with its own share of noise."""

    def protect(self, payload: torch.Tensor) -> torch.Tensor:
        return payload


class PlainAggregator:
    def __init__(self, cohort: Sequence[int]) -> None:
        self.cohort = list(cohort)
        self.total: torch.Tensor | None = None

    def setup(self, exchange: Exchange) -> list[int]:
        return self.cohort

    def add(self, site: int, payload: object) -> None:
        if not isinstance(payload, torch.Tensor):
            raise ProtocolError(f"plain protection expects a tensor payload; site {site} sent "
                                f"{type(payload).__name__}.")
        self.total = payload.clone() if self.total is None else self.total.add_(payload)

    def reveal(self, exchange: Exchange) -> torch.Tensor:
        if self.total is None:
            raise ProtocolError("plain protection: no payload was added this round.")
        return self.total
