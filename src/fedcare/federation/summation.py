"""Sums of site vectors that are not model updates, through the run's protection scheme.

Federated standardisation needs the sites' column moments summed
(`fedcare.data.preprocess.federated_mean_std`). They go through the same
scheme as model updates (`fedcare.protection.base`): setup messages, each
site's ``protect``, the aggregator's ``add``, the ``reveal``. So under
``secagg`` the aggregator learns only the total (unless a majority of sites
collude with it), under ``ckks`` only the noise-flooded decryption of the
total, under ``plain`` every site's vector.

`protected_sum` drives one such sum over any `Contributor`: sites in this
process (`VectorSite`, the local runtime) or across Flower
(`fedcare.runtime.flower_server`). Unlike a training round, every contributor
must take part: a sum over fewer sites would be silently another statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from fedcare.errors import FedcareError, QuorumError
from fedcare.federation.aggregator import relay
from fedcare.protection.base import Scheme, SiteSession, min_contributors


class Contributor(Protocol):
    """A site that adds a vector of its own to a protected sum."""

    @property
    def name(self) -> str: ...

    @property
    def index(self) -> int:
        """The site's position in the federation (its index in the scheme's sessions)."""
        ...

    def exchange(self, round_number: int, message: object) -> object:
        """Answer a message of the scheme's protocol (`SiteSession.handle`)."""
        ...

    def contribute(self, round_number: int, request: object) -> object:
        """This site's vector for `request`, protected by its session of `round_number`."""
        ...


def protected_sum(scheme: Scheme, contributors: Sequence[Contributor], request: object, *,
                  length: int, round_number: int = 0, what: str = "the sites' vectors"
                  ) -> torch.Tensor:
    """The sum of every contributor's vector for `request`, as the scheme reveals it.

    Parameters
    ----------
    scheme : Scheme
        Aggregator side of the run's protection scheme.
    contributors : sequence of Contributor
        The sites of the sum, each at its own `Contributor.index`.
    request : object
        What each contributor is asked for (it computes its vector from it).
    length : int
        Values in each vector.
    round_number : int
        The scheme's round (its sessions are fresh each call).
    what : str
        What is summed, for error messages.

    Raises
    ------
    QuorumError
        If any contributor fails (naming it and why), or the scheme cannot sum
        so few sites (a secagg or ckks sum of one vector is that vector).
    """
    failures: dict[str, str] = {}
    by_index = {c.index: c for c in contributors}
    cohort = sorted(by_index)
    least = min_contributors(scheme)
    if len(contributors) < least:
        raise QuorumError(f"a {scheme.name} sum needs at least {least} sites; the federation "
                          f"has {len(contributors)}.")

    exchange = relay(by_index, round_number, failures)

    def refuse(step: str) -> QuorumError:
        detail = "; ".join(f"{site}: {why}" for site, why in failures.items())
        return QuorumError(f"the {scheme.name} sum of {what} failed at the {step}: {detail}")

    session = scheme.aggregator_session(round_number, cohort, length)
    ready = set(session.setup(exchange))
    for i in cohort:
        if i not in ready:
            failures.setdefault(by_index[i].name, f"did not complete the {scheme.name} setup")
    if failures:
        raise refuse("setup")
    for i, contributor in sorted(by_index.items()):
        try:
            session.add(i, contributor.contribute(round_number, request))
        except FedcareError as exc:
            failures[contributor.name] = str(exc)
    if failures:
        raise refuse("contributions")
    total = session.reveal(exchange)
    if failures:
        raise refuse("reveal")
    return total


class VectorSite:
    """A `Contributor` in this process whose vector for each request is computed here."""

    def __init__(self, name: str, index: int, scheme: Scheme,
                 vector: Callable[[object], np.ndarray]) -> None:
        self._name = name
        self._index = index
        self.scheme = scheme
        self.vector = vector
        self._session: tuple[int, SiteSession] | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def index(self) -> int:
        return self._index

    def session(self, round_number: int) -> SiteSession:
        if self._session is None or self._session[0] != round_number:
            self._session = (round_number, self.scheme.site_session(round_number, self._index))
        return self._session[1]

    def exchange(self, round_number: int, message: object) -> object:
        return self.session(round_number).handle(message)

    def contribute(self, round_number: int, request: object) -> object:
        return self.session(round_number).protect(
            torch.from_numpy(np.asarray(self.vector(request), dtype=np.float64)))
