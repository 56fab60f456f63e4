"""The interface every protection scheme implements, on both sides of the wire.

A round of protected aggregation is a short protocol between the aggregator
and the sites it selected. The runtime carries the messages (method calls in
the local runtime, Flower messages in a deployment); the scheme decides what
they are:

1. ``setup``: messages before training (secagg: key advertisement and the
   encrypted Shamir shares; plain and ckks: none).
2. each site trains and ``protect``s its payload ``[weighted update, weight]``;
   the aggregator ``add``s what arrives, without being able to read it.
3. ``reveal``: messages after the last payload (ckks: one site decrypts the
   summed ciphertext and floods it with noise; secagg: the survivors reveal
   the shares that remove the masks); the result is the plain sum, which goes
   to the strategy.

A site that fails at any step is dropped from the round (and named in the
round report); the scheme decides whether the round can still finish.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Protocol

import torch

Exchange = Callable[[Mapping[int, object]], dict[int, object]]
"""Send one message to each of some sites (by index); the replies of those that answered."""


class SiteSession(Protocol):
    """A site's side of one round; holds that round's secrets and never sends them."""

    def handle(self, message: object) -> object:
        """Answer a protocol message of `setup` or `reveal`."""
        ...

    def protect(self, payload: torch.Tensor) -> object:
        """The protected form of this site's payload, the only thing it sends of its update."""
        ...

    def require_contributors(self, needed: int, *, cohort: int) -> None:
        """Help reveal only a sum of at least `needed` payloads, of a round of `cohort` sites.

        Distributed DP noise (`fedcare.privacy.site_level`): each of the `cohort`
        selected sites adds ``1 / needed`` of the noise's variance, so a sum of fewer
        payloads carries too little. The session refuses (`ProtocolError`) a round
        whose cohort is not `cohort` as far as it can check, and its part in revealing a
        smaller sum. A scheme that reveals each payload on its own has nothing to check.
        """
        ...


class AggregatorSession(Protocol):
    """The aggregator's side of one round: it combines payloads it cannot read."""

    def setup(self, exchange: Exchange) -> list[int]:
        """Run the messages before training; return the sites that may send a payload."""
        ...

    def add(self, site: int, payload: object) -> None:
        """Combine one site's protected payload; `ProtocolError` (naming it) if malformed."""
        ...

    def reveal(self, exchange: Exchange) -> torch.Tensor:
        """The plain sum of the payloads that were added."""
        ...


class Scheme(Protocol):
    """A protection scheme: makes the two sides' sessions for each round.

    ``site_session`` holds site secrets, ``aggregator_session`` only public
    material; in a deployment each side builds only its own.
    """

    name: str

    def site_session(self, round_number: int, site: int) -> SiteSession: ...

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> AggregatorSession: ...


MIN_CONTRIBUTORS = {"plain": 1, "secagg": 2, "ckks": 2}
"""Fewest payloads whose sum each scheme reveals: a secagg sum of one masked input is that
site's update (`SecAggScheme.aggregator_session` refuses it), and a ckks site never decrypts
a sum equal to its own ciphertext."""


def min_contributors(scheme: Scheme) -> int:
    """Fewest payloads whose sum `scheme` reveals (1 for a scheme it does not know)."""
    return MIN_CONTRIBUTORS.get(scheme.name, 1)


def wire_size(message: object) -> int:
    """Bytes a message needs on the wire, without transport framing.

    Byte strings and tensors count their bytes, integers 4, floats 8, text its
    UTF-8 length; tuples, lists and dataclasses the sum of their parts.
    """
    if message is None:
        return 0
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, torch.Tensor):
        return message.element_size() * message.numel()
    if isinstance(message, int):
        return struct.calcsize(">I")
    if isinstance(message, float):
        return struct.calcsize(">d")
    if isinstance(message, str):
        return len(message.encode())
    if isinstance(message, tuple | list):
        return sum(wire_size(m) for m in message)
    if is_dataclass(message) and not isinstance(message, type):
        return sum(wire_size(getattr(message, f.name)) for f in fields(message))
    raise TypeError(f"no wire size for {type(message).__name__}")


def wire_digest(message: object) -> str:
    """SHA-256 (hex) of a message's content, for the audit log: what arrived, not who read it.

    Walks the message as `wire_size` does; every part is tagged with its kind
    and length, so two different messages never hash the same bytes.
    """
    digest = hashlib.sha256()

    def feed(part: object) -> None:
        if part is None:
            digest.update(b"N")
        elif isinstance(part, bytes):
            digest.update(b"B" + struct.pack(">Q", len(part)) + part)
        elif isinstance(part, torch.Tensor):
            data = part.detach().contiguous().cpu().numpy().tobytes()
            header = f"{part.dtype}{tuple(part.shape)}".encode()
            digest.update(b"T" + struct.pack(">Q", len(header)) + header + data)
        elif isinstance(part, bool | int):
            digest.update(b"I" + str(int(part)).encode() + b";")
        elif isinstance(part, float):
            digest.update(b"F" + struct.pack(">d", part))
        elif isinstance(part, str):
            feed(part.encode())
        elif isinstance(part, tuple | list):
            digest.update(b"L" + struct.pack(">Q", len(part)))
            for item in part:
                feed(item)
        elif is_dataclass(part) and not isinstance(part, type):
            feed(type(part).__name__)
            feed([getattr(part, f.name) for f in fields(part)])
        else:
            raise TypeError(f"no wire digest for {type(part).__name__}")

    feed(message)
    return digest.hexdigest()
