"""Model-ready data of one site and of a whole (simulated) federation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedcare.data.loaders import RowAccount
from fedcare.data.schema import Schema


@dataclass(frozen=True)
class SiteData:
    """One site's encoded, standardised records, split into train and test.

    Attributes
    ----------
    name : str
        Site name.
    x_train, x_test : Tensor of float32, shape (n, n_features)
        Encoded inputs.
    y_train, y_test : Tensor of float32, shape (n,)
        Binary labels (0.0 / 1.0).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])


@dataclass(frozen=True)
class FederatedData:
    """Every site's data plus what they share: schema and input layout."""

    schema: Schema
    feature_names: list[str]
    sites: list[SiteData]
    description: str
    standardization: dict[str, dict[str, list[float]]]
    """Per site: ``mean`` and ``std`` of the numeric columns as applied before encoding."""
    row_accounts: list[RowAccount] = field(default_factory=list)
    """Per source table (a natural site, or a partitioned cohort): rows read, dropped and
    why, used. What the data holder sees; published only where `fedcare.report.data_loss`
    allows."""

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every site's training rows together: only for the pooled baseline of a simulation."""
        return (torch.cat([s.x_train for s in self.sites]),
                torch.cat([s.y_train for s in self.sites]))

    def pooled_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every site's test rows together (the FLamby "pooled test set")."""
        return (torch.cat([s.x_test for s in self.sites]),
                torch.cat([s.y_test for s in self.sites]))
