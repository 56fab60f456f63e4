"""`plain`: updates travel as they are; the aggregator sums them.

Threat model: none. An honest-but-curious aggregator reads every site's
update (and can run gradient inversion on it). Use it for baselines and for
measuring what the other schemes cost.
"""

from __future__ import annotations

import torch


class PlainSum:
    """Identity protection and streaming summation."""

    name = "plain"

    def protect(self, vector: torch.Tensor) -> torch.Tensor:
        return vector

    def combine(self, total: torch.Tensor | None, payload: torch.Tensor) -> torch.Tensor:
        """Add one payload to the running total (memory stays one vector for any site count)."""
        return payload.clone() if total is None else total.add_(payload)

    def reveal(self, total: torch.Tensor) -> torch.Tensor:
        return total
