"""`secagg`: masked secure aggregation with dropout recovery (Bonawitz et al. 2017).

The cryptographic core of "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (Bonawitz, Ivanov, Kreuter, Marcedone,
McMahan, Patel, Ramage, Segal, Seth; CCS 2017), Figure 4, honest-but-curious
variant. The aggregator learns the sum of the sites' vectors and which sites
contributed, nothing else. Sites and aggregator exchange frozen dataclasses of
bytes and ints, so a round can be driven in process (`simulate_round`) or over
any transport (Flower messages) by the same `SecAggSite` / `SecAggAggregator`
objects; one pair of objects per round (keys are fresh every round).

Protocol (one round; ``t`` = threshold, ids are the Shamir x coordinates)
-------------------------------------------------------------------------
0. Advertise keys. Site ``u`` draws two X25519 key pairs, ``c_u`` (to
   encrypt shares) and ``s_u`` (to agree pairwise masks), and a 32-byte
   self-mask seed ``b_u``; it sends both public keys and a SHA-256
   commitment to ``b_u``. The aggregator relays the set U1 (>= t sites).
1. Share keys. ``u`` Shamir-shares ``s_u``'s private key and ``b_u``
   (threshold ``t``, over GF(2^521 - 1), `fedcare.protection.shamir`) among
   U1 and sends ``v``'s two shares AES-256-GCM-encrypted under
   ``HKDF-SHA256(X25519(c_u, c_v))``, with the round context and both ids as
   associated data. The aggregator relays ciphertexts it cannot read; U2 is
   the set of sites whose shares arrived (>= t).
2. Masked input. ``u`` encodes its vector in Z_{2^64}
   (`fedcare.protection.fixedpoint`, range-checked) and sends
   ``y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} D_uv PRG(s_uv)`` with
   ``s_uv = HKDF-SHA256(X25519(s_u, s_v))``, ``D_uv = +1`` if ``u < v`` else
   ``-1`` (so pairwise masks cancel in the sum), PRG = AES-256-CTR keystream
   read as little-endian uint64. U3 = sites whose ``y_u`` arrived (>= t).
3. Unmask. Each surviving site checks U3 is a subset of U2 of size >= t that
   contains itself, then reveals, for every ``v`` in U3, its share of ``b_v``,
   and for every ``v`` in U2 \\ U3 (dropped after sharing), its share of
   ``s_v``'s key -- never both for the same ``v``, across any number of
   requests. With ``t`` responses the aggregator rebuilds each ``b_v``
   (checked against its commitment) and each dropped ``s_v`` (checked against
   its public key), removes ``PRG(b_v)`` and the dropped sites' pairwise
   masks, and decodes the exact fixed-point sum of U3's vectors.

Threat model
------------
* Honest-but-curious aggregator, alone or together with up to ``t - 1``
  colluding sites: learns the sum of the honest contributors' vectors and the
  sets U1..U3, nothing else (Bonawitz §6, honest-but-curious setting). Each masked vector is one
  uniform ring element per coordinate; shares are AES-GCM encrypted between
  sites; the aggregator object never holds a site's ``c`` key nor a surviving
  site's ``s`` key or ``b`` seed (it rebuilds only the ``s`` keys of sites
  that dropped, whose inputs are not in the sum, and only inside
  `SecAggAggregator.collect_unmask_responses`).
* Double masking: a site that is declared dropped has its pairwise masks
  revealed, but ``PRG(b_u)`` still hides a late-arriving ``y_u``, because no
  honest site reveals ``b_u``'s share once ``u`` is declared dropped.
* Threshold: ``t > n/2`` is required (`RoundSetup`). Each honest site reveals
  only one kind of share per site, so an aggregator that *lies* about
  dropouts -- telling half the sites ``v`` survived and the other half it
  dropped -- would need two disjoint groups of ``t`` honest sites, impossible
  when ``2t > n``. With colluding malicious sites the paper needs
  ``t > 2n/3`` plus its consistency check.
* Not implemented (active adversaries): the consistency check of round 3
  (signatures on U3) and the signed-key PKI of the malicious-model protocol.
  A malicious aggregator can therefore simulate fake sites (Sybils) to reach
  the threshold with its own shares and unmask one honest site; it can also
  declare honest sites dropped so that the sum covers as few as ``t`` sites. A malicious
  site can send a wrong masked input (poisoning the sum) or corrupt shares
  (detected by the commitments: the round fails with `ProtocolError`, it is
  not silently wrong). Deploy with authenticated site identities (TLS client
  certificates / Flower node authentication) and a fixed roster.
* Dropouts: any site may drop at any phase; the round succeeds if at least
  ``t`` sites remain to the end. A site that drops after sharing costs each
  survivor nothing extra but costs the aggregator one key reconstruction and
  ``|U3|`` extra PRG expansions. Fewer than ``t`` survivors: `QuorumError`
  and nothing is unmasked (fewer than ``t`` shares carry no information).
* The sum itself is released: with few contributors, or with ``n - 1``
  colluding sites, it reveals the remaining site's vector. Combine with
  client-level DP for that.

SecAgg+ (Bell et al. 2020, sparse k-regular masking graphs) is not
implemented: every site masks with every other, O(n) key agreements and PRG
expansions per site.

Cost, measured
--------------
``python -m fedcare.protection.secagg`` (2026-11-28) on a 2-vCPU AMD EPYC VM,
Python 3.11, cryptography 46, numpy 2.4, shared with other jobs (load
average ~4.8, so wall time is about twice CPU time). One process plays every
site and the aggregator in turn: ``wall_s``/``cpu_s`` are a whole round, all
parties; ``site_s`` is the median CPU of one site over its four phases;
``unmask_s`` is the aggregator's unmasking. ``drop`` sites drop after sharing
keys (their masks are rebuilt). Bytes are what one site *sends* per phase
(byte strings plus 4 bytes per int; transport framing excluded). A site
*receives* the roster (100 B per site), about ``share_B`` of ciphertexts and
the survivor list (4 B per site). Threshold ``n // 2 + 1``, 32 fractional bits.

=====  =======  ====  ======  =====  ======  ========  =====  =======  ========  ========
sites  values   drop  wall_s  cpu_s  site_s  unmask_s  adv_B  share_B  masked_B  unmask_B
=====  =======  ====  ======  =====  ======  ========  =====  =======  ========  ========
   10    6,209     0    0.07   0.04   0.003     0.001    100    1,588    49,676       704
   10    6,209     1    0.07   0.03   0.003     0.003    100    1,588    49,676       704
   10  100,000     0    0.21   0.10   0.009     0.008    100    1,588   800,004       704
   10  100,000     1    0.22   0.11   0.010     0.012    100    1,588   800,004       704
  100    6,209     0    5.73   2.84   0.027     0.017    100   17,428    49,676     7,004
  100    6,209    10    5.44   2.68   0.026     0.173    100   17,428    49,676     7,004
  100  100,000     0   11.62   5.78   0.057     0.046    100   17,428   800,004     7,004
  100  100,000    10    8.83   5.26   0.049     0.377    100   17,428   800,004     7,004
=====  =======  ====  ======  =====  ======  ========  =====  =======  ========  ========

Reading: the masked vector (8 bytes per value, vs 4 for float32) dominates
traffic; key sharing is O(n) per site (176 B per peer), unmasking 70 B per
site. Per-site compute is O(n) X25519 agreements plus O(n * m) PRG output
(AES-CTR, ~0.4 ms per 100,000 values); the aggregator pays
O(|dropped| * |U3| * m) to remove the masks of sites that dropped.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from typing import TypeVar

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import ArrayLike, NDArray

from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.protection import shamir
from fedcare.protection.base import Exchange, wire_size
from fedcare.protection.fixedpoint import FixedPoint

_DOMAIN = b"fedcare secagg v1"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_ID = struct.Struct(">I")
_SHARE_PLAINTEXT = 2 * _ID.size + 2 * shamir.SHARE_BYTES
_Message = TypeVar("_Message")


class Phase(IntEnum):
    """The four phases of a round, in order (a dropout is named by the first phase it misses)."""

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3


@dataclass(frozen=True)
class RoundSetup:
    """Public parameters of one round, known to every site and the aggregator.

    Parameters
    ----------
    round_number : int
        Bound into every derived key and ciphertext, so nothing replays across rounds.
    site_ids : tuple of int
        Ids of the sites selected for the round: distinct, in [1, 2^32).
    threshold : int
        Shares needed to rebuild a secret; must satisfy ``n/2 < threshold <= n``
        (see the module's threat model). The round needs ``threshold`` sites to the end.
    vector_length : int
        Number of values each site sums (>= 1).
    frac_bits : int
        Fixed-point resolution ``2**-frac_bits``; see `FixedPoint` for the range.
    """

    round_number: int
    site_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    frac_bits: int = 32
    context: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(self.site_ids)
        n = len(ids)
        if n < 2 or len(set(ids)) != n or not all(0 < i < 2**32 for i in ids):
            raise ConfigError(f"secagg site_ids must be at least 2 distinct ids in [1, 2^32); "
                              f"got {ids}.")
        if not n // 2 < self.threshold <= n:
            raise ConfigError(f"secagg threshold must be in ({n / 2:g}, {n}] for {n} sites "
                              f"(a majority, so that no two disjoint groups of sites can both "
                              f"unmask a site); got {self.threshold}.")
        if self.vector_length < 1:
            raise ConfigError(f"secagg vector_length must be >= 1; got {self.vector_length}.")
        if not 0 <= self.round_number < 2**63:
            raise ConfigError(f"secagg round_number must be in [0, 2^63); got "
                              f"{self.round_number}.")
        FixedPoint(frac_bits=self.frac_bits, max_sites=n)  # validates frac_bits
        object.__setattr__(self, "site_ids", tuple(sorted(ids)))
        digest = hashlib.sha256(_DOMAIN)
        digest.update(struct.pack(">QIQI", self.round_number, self.threshold,
                                  self.vector_length, self.frac_bits))
        for i in self.site_ids:
            digest.update(_ID.pack(i))
        object.__setattr__(self, "context", digest.digest())

    @property
    def encoding(self) -> FixedPoint:
        """The fixed-point code of this round (bound set by the number of sites)."""
        return FixedPoint(frac_bits=self.frac_bits, max_sites=len(self.site_ids))


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyAdvertisement:
    """Site -> aggregator, phase 0: public keys (32 bytes each) and a commitment to ``b_u``."""

    site: int
    encryption_public_key: bytes
    mask_public_key: bytes
    self_mask_commitment: bytes


@dataclass(frozen=True)
class KeyRoster:
    """Aggregator -> every site in U1: the advertisements of U1, sorted by site id."""

    keys: tuple[KeyAdvertisement, ...]


@dataclass(frozen=True)
class EncryptedShare:
    """One site's two Shamir shares for another, AES-GCM encrypted between them."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class ShareBundle:
    """Site -> aggregator, phase 1: one `EncryptedShare` for every other site of U1."""

    site: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class SharesForSite:
    """Aggregator -> a site of U2: the shares every other site of U2 sent it."""

    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Site -> aggregator, phase 2: the masked vector, ``8 * vector_length`` bytes (uint64 LE)."""

    site: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Aggregator -> every site of U3: U3, the sites whose masked inputs arrived."""

    survivors: tuple[int, ...]


@dataclass(frozen=True)
class RevealedShare:
    """A Shamir share (`shamir.SHARE_BYTES` bytes) of a secret belonging to `owner`."""

    owner: int
    value: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Site -> aggregator, phase 3: shares of ``b_v`` for U3 and of ``s_v`` for U2 \\ U3."""

    site: int
    self_mask_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]


@dataclass(frozen=True)
class Aggregate:
    """What a round releases: the sum of the contributors' vectors.

    Attributes
    ----------
    values : ndarray of float64
        ``fixed_point * 2**-frac_bits`` (exact while ``|fixed_point| < 2**53``).
    fixed_point : ndarray of int64
        The exact sum of the contributors' fixed-point encodings.
    contributors : tuple of int
        U3: the sites whose vectors are in the sum.
    """

    values: NDArray[np.float64]
    fixed_point: NDArray[np.int64]
    contributors: tuple[int, ...]


# --- primitives ---------------------------------------------------------------------------


def expand_mask(seed: bytes, length: int) -> NDArray[np.uint64]:
    """`length` uniform elements of Z_{2^64}: the AES-256-CTR keystream of `seed`, as uint64 LE.

    Every seed is a fresh HKDF output used for one stream only, so a zero IV is safe.
    """
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def _derive(secret: bytes, context: bytes, label: bytes, *ids: int) -> bytes:
    info = context + label + b"".join(_ID.pack(i) for i in ids)
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(secret)


def _agree(private: X25519PrivateKey, public: bytes, *, owner: int) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # wrong length, or a low-order point giving an all-zero secret
        raise ProtocolError(f"secagg: the public key of site {owner} is invalid ({exc}).") from exc


def _pair_mask_seed(shared: bytes, context: bytes, u: int, v: int) -> bytes:
    return _derive(shared, context, b"pairwise mask", min(u, v), max(u, v))


def _self_mask_seed(b: bytes, context: bytes, u: int) -> bytes:
    return _derive(b, context, b"self mask", u)


def _commit(b: bytes, context: bytes, u: int) -> bytes:
    return hashlib.sha256(context + b"commit self mask" + _ID.pack(u) + b).digest()


def _share_ad(context: bytes, sender: int, recipient: int) -> bytes:
    return context + _ID.pack(sender) + _ID.pack(recipient)


# --- parties ------------------------------------------------------------------------------


class SecAggSite:
    """One site's side of one round. Holds its private keys; never sends them.

    Call, in order, `advertise_keys`, `share_keys`, `mask_input`, `unmask`
    (the last one may be called again, e.g. on a retransmitted request).

    Parameters
    ----------
    site_id : int
        This site's id in ``setup.site_ids``.
    setup : RoundSetup
    name : str, optional
        Named in error messages (default ``"site <id>"``).
    """

    def __init__(self, site_id: int, setup: RoundSetup, *, name: str | None = None) -> None:
        if site_id not in setup.site_ids:
            raise ConfigError(f"secagg site id {site_id} is not in the round's site_ids "
                              f"{setup.site_ids}.")
        self.site_id = site_id
        self.setup = setup
        self.name = name or f"site {site_id}"
        self._phase = Phase.ADVERTISE_KEYS
        self._encryption_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_mask = secrets.token_bytes(_KEY_BYTES)
        self._roster: dict[int, KeyAdvertisement] = {}
        self._held: dict[int, tuple[int, int]] = {}
        """Shares this site holds, by owner: (share of s_owner's key, share of b_owner)."""
        self._u2: frozenset[int] = frozenset()
        self._share_keys: dict[int, bytes] = {}
        self._revealed_self_mask: set[int] = set()
        self._revealed_key: set[int] = set()

    def advertise_keys(self) -> KeyAdvertisement:
        """Phase 0: the public keys and the commitment to the self-mask seed."""
        self._expect(Phase.ADVERTISE_KEYS)
        self._phase = Phase.SHARE_KEYS
        return self._advertisement()

    def share_keys(self, roster: KeyRoster) -> ShareBundle:
        """Phase 1: Shamir-share the mask key and self-mask seed among U1, encrypted per site."""
        self._expect(Phase.SHARE_KEYS)
        setup = self.setup
        roster_ids = [k.site for k in roster.keys]
        if len(set(roster_ids)) != len(roster_ids):
            raise ProtocolError(f"{self.name}: the key roster names a site twice: {roster_ids}.")
        unknown = sorted(set(roster_ids) - set(setup.site_ids))
        if unknown:
            raise ProtocolError(f"{self.name}: the key roster names sites {unknown}, which are "
                                f"not selected for round {setup.round_number}.")
        self._roster = {k.site: k for k in roster.keys}
        if self._roster.get(self.site_id) != self._advertisement():
            raise ProtocolError(f"{self.name}: the key roster does not carry this site's own "
                                "keys unchanged; refusing to share keys.")
        public_keys = [p for k in roster.keys
                       for p in (k.encryption_public_key, k.mask_public_key)]
        if len(set(public_keys)) != len(public_keys):
            raise ProtocolError(f"{self.name}: the key roster repeats a public key.")
        if len(roster_ids) < setup.threshold:
            raise QuorumError(f"{self.name}: {len(roster_ids)} sites advertised keys in round "
                              f"{setup.round_number}; the threshold is {setup.threshold}.")
        holders = sorted(roster_ids)
        key_shares = shamir.split(int.from_bytes(self._mask_key.private_bytes_raw(), "big"),
                                  threshold=setup.threshold, holders=holders)
        seed_shares = shamir.split(int.from_bytes(self._self_mask, "big"),
                                   threshold=setup.threshold, holders=holders)
        out = []
        for v in holders:
            if v == self.site_id:
                self._held[v] = (key_shares[v], seed_shares[v])
                continue
            aead = AESGCM(self._share_key(v))
            plaintext = (_ID.pack(self.site_id) + _ID.pack(v) + shamir.share_to_bytes(
                key_shares[v]) + shamir.share_to_bytes(seed_shares[v]))
            nonce = secrets.token_bytes(_NONCE_BYTES)
            ciphertext = aead.encrypt(nonce, plaintext, _share_ad(setup.context, self.site_id, v))
            out.append(EncryptedShare(self.site_id, v, nonce, ciphertext))
        self._phase = Phase.MASKED_INPUT
        return ShareBundle(self.site_id, tuple(out))

    def mask_input(self, shares: SharesForSite, update: ArrayLike) -> MaskedInput:
        """Phase 2: store the shares received (U2) and send the masked, encoded `update`.

        Raises
        ------
        ProtocolError
            If a share does not decrypt, or `update` has the wrong length, a
            non-finite value or a value beyond the fixed-point bound.
        """
        self._expect(Phase.MASKED_INPUT)
        setup = self.setup
        if shares.recipient != self.site_id:
            raise ProtocolError(f"{self.name}: received the shares addressed to site "
                                f"{shares.recipient}.")
        received: dict[int, tuple[int, int]] = {}
        for share in shares.shares:
            u = share.sender
            if u == self.site_id or u not in self._roster or u in received:
                raise ProtocolError(f"{self.name}: unexpected share from site {u} (not in U1, "
                                    "a duplicate, or from itself).")
            received[u] = self._open_share(share)
        u2 = frozenset(received) | {self.site_id}
        if len(u2) < setup.threshold:
            raise QuorumError(f"{self.name}: {len(u2)} sites shared keys in round "
                              f"{setup.round_number}; the threshold is {setup.threshold}.")
        x = np.asarray(update)
        if x.shape != (setup.vector_length,):
            raise ProtocolError(f"{self.name}: update of shape {x.shape}; this round sums "
                                f"vectors of {setup.vector_length} values.")
        masked = setup.encoding.encode(x, site=self.name)
        masked += expand_mask(_self_mask_seed(self._self_mask, setup.context, self.site_id),
                              setup.vector_length)
        for v in sorted(u2 - {self.site_id}):
            mask = expand_mask(self._pair_seed(v), setup.vector_length)
            # D_uv = +1 for u < v, -1 for u > v (Bonawitz Fig. 4, round 2): cancels in the sum.
            if self.site_id < v:
                masked += mask
            else:
                masked -= mask
        self._held.update(received)
        self._u2 = u2
        self._phase = Phase.UNMASK
        return MaskedInput(self.site_id, masked.astype("<u8", copy=False).tobytes())

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 3: reveal shares of ``b_v`` for survivors and of ``s_v`` for dropped sites.

        Raises
        ------
        ProtocolError
            If the survivors are not a subset of U2 containing this site, or if
            answering would reveal both kinds of share for one site (which
            would unmask its input), counting every earlier request.
        QuorumError
            If fewer than ``threshold`` survivors are named.
        """
        self._expect(Phase.UNMASK)
        setup = self.setup
        survivors = frozenset(request.survivors)
        if len(survivors) != len(request.survivors) or not survivors <= self._u2:
            raise ProtocolError(f"{self.name}: survivors {sorted(request.survivors)} are not "
                                f"distinct sites of U2 = {sorted(self._u2)}.")
        if self.site_id not in survivors:
            raise ProtocolError(f"{self.name}: asked to unmask a round in which it is declared "
                                "dropped although it sent its masked input.")
        if len(survivors) < setup.threshold:
            raise QuorumError(f"{self.name}: {len(survivors)} sites sent masked inputs in round "
                              f"{setup.round_number}; the threshold is {setup.threshold}. "
                              "Nothing is revealed.")
        dropped = self._u2 - survivors
        conflict = sorted((survivors & self._revealed_key) | (dropped & self._revealed_self_mask))
        if conflict:
            raise ProtocolError(f"{self.name}: refusing to unmask: site(s) {conflict} were "
                                "declared dropped in one request and survivors in another; "
                                "revealing both shares would expose their inputs.")
        self._revealed_self_mask |= survivors
        self._revealed_key |= dropped
        return UnmaskResponse(
            self.site_id,
            tuple(RevealedShare(v, shamir.share_to_bytes(self._held[v][1]))
                  for v in sorted(survivors)),
            tuple(RevealedShare(v, shamir.share_to_bytes(self._held[v][0]))
                  for v in sorted(dropped)))

    def _advertisement(self) -> KeyAdvertisement:
        return KeyAdvertisement(
            self.site_id, self._encryption_key.public_key().public_bytes_raw(),
            self._mask_key.public_key().public_bytes_raw(),
            _commit(self._self_mask, self.setup.context, self.site_id))

    def _share_key(self, v: int) -> bytes:
        if v not in self._share_keys:  # used to encrypt to v, then to decrypt from v
            shared = _agree(self._encryption_key, self._roster[v].encryption_public_key, owner=v)
            self._share_keys[v] = _derive(shared, self.setup.context, b"share encryption",
                                          min(self.site_id, v), max(self.site_id, v))
        return self._share_keys[v]

    def _pair_seed(self, v: int) -> bytes:
        shared = _agree(self._mask_key, self._roster[v].mask_public_key, owner=v)
        return _pair_mask_seed(shared, self.setup.context, self.site_id, v)

    def _open_share(self, share: EncryptedShare) -> tuple[int, int]:
        u = share.sender
        try:
            plaintext = AESGCM(self._share_key(u)).decrypt(
                share.nonce, share.ciphertext, _share_ad(self.setup.context, u, self.site_id))
        except (InvalidTag, ValueError) as exc:
            raise ProtocolError(f"{self.name}: the shares from site {u} fail authentication "
                                "(tampered, misaddressed or from another round).") from exc
        if len(plaintext) != _SHARE_PLAINTEXT or plaintext[:8] != _ID.pack(u) + _ID.pack(
                self.site_id):
            raise ProtocolError(f"{self.name}: the shares from site {u} are malformed.")
        body = plaintext[8:]
        return (shamir.share_from_bytes(body[:shamir.SHARE_BYTES]),
                shamir.share_from_bytes(body[shamir.SHARE_BYTES:]))

    def _expect(self, phase: Phase) -> None:
        if self._phase != phase:
            raise ProtocolError(f"{self.name}: asked for phase {phase.name} while in phase "
                                f"{self._phase.name}; each phase runs once, in order.")


class SecAggAggregator:
    """The aggregator's side of one round: relays, sums masked inputs, unmasks the sum.

    It holds public keys, ciphertexts it cannot open, and the running masked
    sum (one vector, whatever the number of sites). Each ``collect_*`` takes
    the messages that arrived in a phase (late ones are dropouts) and returns
    what to send next.

    Parameters
    ----------
    setup : RoundSetup
    """

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self._phase: Phase | None = Phase.ADVERTISE_KEYS
        self._roster: dict[int, KeyAdvertisement] = {}
        self._u2: tuple[int, ...] = ()
        self._u3: tuple[int, ...] = ()
        self._masked_sum = np.zeros(0, dtype=np.uint64)

    def collect_keys(self, advertisements: Iterable[KeyAdvertisement]) -> KeyRoster:
        """Phase 0 -> 1: the roster U1 to broadcast to every site in it."""
        self._expect(Phase.ADVERTISE_KEYS)
        adverts = list(advertisements)
        self._check_senders([a.site for a in adverts], self.setup.site_ids, "key advertisement")
        self._quorum(len(adverts), "advertised keys")
        self._roster = {a.site: a for a in adverts}
        self._phase = Phase.SHARE_KEYS
        return KeyRoster(tuple(self._roster[i] for i in sorted(self._roster)))

    def collect_shares(self, bundles: Iterable[ShareBundle]) -> dict[int, SharesForSite]:
        """Phase 1 -> 2: U2, and for each site of U2 the ciphertexts addressed to it."""
        self._expect(Phase.SHARE_KEYS)
        bundles = list(bundles)
        self._check_senders([b.site for b in bundles], tuple(self._roster), "share bundle")
        u1 = set(self._roster)
        for bundle in bundles:
            recipients = [s.recipient for s in bundle.shares]
            if sorted(recipients) != sorted(u1 - {bundle.site}) or any(
                    s.sender != bundle.site for s in bundle.shares):
                raise ProtocolError(f"secagg round {self.setup.round_number}: site "
                                    f"{bundle.site} sent shares for {sorted(recipients)}; "
                                    f"expected one for each other site of U1 "
                                    f"{sorted(u1 - {bundle.site})}.")
        self._quorum(len(bundles), "shared keys")
        self._u2 = tuple(sorted(b.site for b in bundles))
        inbox: dict[int, list[EncryptedShare]] = {v: [] for v in self._u2}
        for bundle in bundles:
            for share in bundle.shares:
                if share.recipient in inbox:
                    inbox[share.recipient].append(share)
        self._phase = Phase.MASKED_INPUT
        return {v: SharesForSite(v, tuple(sorted(inbox[v], key=lambda s: s.sender)))
                for v in self._u2}

    def collect_masked_inputs(self, inputs: Iterable[MaskedInput]) -> UnmaskRequest:
        """Phase 2 -> 3: add the masked inputs into the running sum; U3 to broadcast."""
        self._expect(Phase.MASKED_INPUT)
        expected_bytes = 8 * self.setup.vector_length
        senders: list[int] = []
        total = np.zeros(self.setup.vector_length, dtype=np.uint64)
        for message in inputs:  # streamed: one vector in memory, whatever the site count
            self._check_senders([*senders, message.site], self._u2, "masked input")
            if len(message.masked) != expected_bytes:
                raise ProtocolError(f"secagg: masked input of site {message.site} has "
                                    f"{len(message.masked)} bytes; expected {expected_bytes}.")
            total += np.frombuffer(message.masked, dtype="<u8")
            senders.append(message.site)
        self._quorum(len(senders), "sent masked inputs")
        self._masked_sum = total
        self._u3 = tuple(sorted(senders))
        self._phase = Phase.UNMASK
        return UnmaskRequest(self._u3)

    def collect_unmask_responses(self, responses: Iterable[UnmaskResponse]) -> Aggregate:
        """Phase 3 -> done: rebuild the self-masks and dropped sites' keys, return the sum.

        Raises
        ------
        QuorumError
            If fewer than ``threshold`` survivors answered: the sum stays masked.
        ProtocolError
            If a response is malformed or a rebuilt secret fails its check.
        """
        self._expect(Phase.UNMASK)
        setup = self.setup
        responses = list(responses)
        self._check_senders([r.site for r in responses], self._u3, "unmask response")
        survivors = self._u3
        dropped = tuple(sorted(set(self._u2) - set(survivors)))
        for r in responses:
            if (tuple(s.owner for s in r.self_mask_shares) != survivors
                    or tuple(s.owner for s in r.key_shares) != dropped):
                raise ProtocolError(f"secagg: site {r.site} revealed shares for the wrong sites; "
                                    f"expected self-mask shares for {list(survivors)} and key "
                                    f"shares for {list(dropped)}.")
        self._quorum(len(responses), "answered the unmask request")
        # Any t responders determine every secret; the lowest ids, for reproducibility.
        responders = sorted(responses, key=lambda r: r.site)[:setup.threshold]
        holders = [r.site for r in responders]
        weights = shamir.lagrange_at_zero(holders)
        total = self._masked_sum.copy()
        length = setup.vector_length
        for k, v in enumerate(survivors):
            b = self._rebuild(holders, weights, [r.self_mask_shares[k].value for r in responders],
                              v)
            if _commit(b, setup.context, v) != self._roster[v].self_mask_commitment:
                raise ProtocolError(f"secagg: the rebuilt self-mask seed of site {v} does not "
                                    "match its commitment; a revealed share is corrupt.")
            total -= expand_mask(_self_mask_seed(b, setup.context, v), length)
        for k, d in enumerate(dropped):
            raw = self._rebuild(holders, weights, [r.key_shares[k].value for r in responders], d)
            key = X25519PrivateKey.from_private_bytes(raw)
            if key.public_key().public_bytes_raw() != self._roster[d].mask_public_key:
                raise ProtocolError(f"secagg: the rebuilt mask key of dropped site {d} does not "
                                    "match its public key; a revealed share is corrupt.")
            for u in survivors:
                shared = _agree(key, self._roster[u].mask_public_key, owner=u)
                mask = expand_mask(_pair_mask_seed(shared, setup.context, u, d), length)
                # Survivor u added D_ud * PRG(s_ud) for the dropped d; take it back out.
                if u < d:
                    total -= mask
                else:
                    total += mask
        self._phase = None  # one round per object: a second unmasking is refused
        encoding = setup.encoding
        return Aggregate(encoding.decode(total), encoding.decode_integers(total).copy(),
                         survivors)

    def _rebuild(self, holders: list[int], weights: list[int], values: list[bytes],
                 owner: int) -> bytes:
        shares = {x: shamir.share_from_bytes(y) for x, y in zip(holders, values, strict=True)}
        secret = shamir.reconstruct(shares, threshold=self.setup.threshold, weights=weights)
        if secret >= 2 ** (8 * _KEY_BYTES):
            raise ProtocolError(f"secagg: a rebuilt secret of site {owner} is out of range; a "
                                "revealed share is corrupt.")
        return secret.to_bytes(_KEY_BYTES, "big")

    def _check_senders(self, senders: list[int], allowed: Iterable[int], what: str) -> None:
        allowed_set = set(allowed)
        if len(set(senders)) != len(senders):
            raise ProtocolError(f"secagg round {self.setup.round_number}: a site sent two "
                                f"{what}s: {sorted(senders)}.")
        stray = sorted(set(senders) - allowed_set)
        if stray:
            raise ProtocolError(f"secagg round {self.setup.round_number}: {what} from site(s) "
                                f"{stray}, which may not send one now (allowed: "
                                f"{sorted(allowed_set)}).")

    def _quorum(self, count: int, what: str) -> None:
        if count < self.setup.threshold:
            raise QuorumError(f"secagg round {self.setup.round_number}: {count} site(s) {what}; "
                              f"the threshold is {self.setup.threshold}. The round is aborted "
                              "and nothing is unmasked.")

    def _expect(self, phase: Phase) -> None:
        if self._phase != phase:
            raise ProtocolError(f"secagg aggregator: {phase.name} messages arrived out of "
                                "order (each phase runs once, in order, once per round).")


# --- the scheme, as the runtime drives it (`fedcare.protection.base`) ---------------------


class SecAggScheme:
    """`secagg` behind the `Scheme` interface: one `SecAggSite` / `SecAggAggregator` per round.

    Site index ``i`` of the federation is secagg id ``i + 1`` (Shamir x
    coordinates must be non-zero). Messages, in order: the aggregator sends
    each selected site the `RoundSetup` (reply: `KeyAdvertisement`), the
    `KeyRoster` (reply: `ShareBundle`) and its `SharesForSite`; the site
    trains and sends a `MaskedInput`; survivors get the `UnmaskRequest`
    (reply: `UnmaskResponse`).

    Parameters
    ----------
    threshold : float
        Share of each round's selected sites needed to finish it; the
        threshold is ``max(n // 2 + 1, ceil(threshold * n))`` (always a majority).
    frac_bits : int
        Fixed-point resolution.
    """

    name = "secagg"

    def __init__(self, threshold: float = 0.5, frac_bits: int = 32) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"protection.threshold must be in (0, 1]; got {threshold}.")
        self.threshold = threshold
        self.frac_bits = frac_bits

    def round_threshold(self, n_sites: int) -> int:
        return max(n_sites // 2 + 1, math.ceil(round(self.threshold * n_sites, 9)))

    def site_session(self, round_number: int, site: int) -> SecAggSiteSession:
        return SecAggSiteSession(round_number, site + 1)

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> SecAggAggregatorSession:
        if len(cohort) < 2:
            raise QuorumError(f"Round {round_number}: secure aggregation needs at least 2 "
                              f"selected sites (one site's sum is its update); "
                              f"{len(cohort)} selected. Raise federation.fraction or "
                              "federation.min_sites.")
        setup = RoundSetup(round_number, tuple(i + 1 for i in cohort),
                           self.round_threshold(len(cohort)), length, self.frac_bits)
        return SecAggAggregatorSession(setup)


class SecAggSiteSession:
    """A site's side of one secagg round."""

    def __init__(self, round_number: int, site_id: int) -> None:
        self.round_number = round_number
        self.site_id = site_id
        self._site: SecAggSite | None = None
        self._shares: SharesForSite | None = None

    def handle(self, message: object) -> object:
        if isinstance(message, RoundSetup):
            if message.round_number != self.round_number:
                raise ProtocolError(f"secagg site {self.site_id}: setup of round "
                                    f"{message.round_number} received in round "
                                    f"{self.round_number}.")
            self._site = SecAggSite(self.site_id, message)
            return self._site.advertise_keys()
        if isinstance(message, SharesForSite):
            self._shares = message
            return None
        site = self._require()
        if isinstance(message, KeyRoster):
            return site.share_keys(message)
        if isinstance(message, UnmaskRequest):
            return site.unmask(message)
        raise ProtocolError(f"secagg site {self.site_id}: unexpected message "
                            f"{type(message).__name__}.")

    def protect(self, payload: torch.Tensor) -> MaskedInput:
        if self._shares is None:
            raise ProtocolError(f"secagg site {self.site_id}: asked for its masked input "
                                "before the key shares arrived.")
        return self._require().mask_input(self._shares, payload.double().numpy())

    def _require(self) -> SecAggSite:
        if self._site is None:
            raise ProtocolError(f"secagg site {self.site_id}: a protocol message arrived "
                                "before the round setup.")
        return self._site


class SecAggAggregatorSession:
    """The aggregator's side of one secagg round: relays, sums masked vectors, unmasks."""

    def __init__(self, setup: RoundSetup) -> None:
        self.setup_message = setup
        self.aggregator = SecAggAggregator(setup)
        self.inputs: list[MaskedInput] = []

    def setup(self, exchange: Exchange) -> list[int]:
        aggregator = self.aggregator
        sites = [i - 1 for i in self.setup_message.site_ids]
        advertised = exchange(dict.fromkeys(sites, self.setup_message))
        roster = aggregator.collect_keys(_only(advertised, KeyAdvertisement))
        bundles = exchange({k.site - 1: roster for k in roster.keys})
        inboxes = aggregator.collect_shares(_only(bundles, ShareBundle))
        delivered = exchange({v - 1: inbox for v, inbox in inboxes.items()})
        return sorted(delivered)

    def add(self, site: int, payload: object) -> None:
        length = 8 * self.setup_message.vector_length
        if not isinstance(payload, MaskedInput) or payload.site != site + 1:
            raise ProtocolError(f"secagg: site {site + 1} sent {type(payload).__name__} "
                                "instead of its own masked input.")
        if len(payload.masked) != length:
            raise ProtocolError(f"secagg: masked input of site {site + 1} has "
                                f"{len(payload.masked)} bytes; expected {length}.")
        self.inputs.append(payload)

    def reveal(self, exchange: Exchange) -> torch.Tensor:
        request = self.aggregator.collect_masked_inputs(self.inputs)
        responses = exchange({v - 1: request for v in request.survivors})
        aggregate = self.aggregator.collect_unmask_responses(_only(responses, UnmaskResponse))
        return torch.from_numpy(aggregate.values)


def _only(replies: Mapping[int, object], kind: type[_Message]) -> list[_Message]:
    """The replies of the expected type: a site that answers anything else has dropped out."""
    return [r for r in replies.values() if isinstance(r, kind)]


# --- in-process driver and measurement ----------------------------------------------------


def simulate_round(setup: RoundSetup, updates: Mapping[int, ArrayLike], *,
                   dropouts: Mapping[int, Phase] | None = None) -> Aggregate:
    """Run one round with every site and the aggregator in this process.

    Parameters
    ----------
    setup : RoundSetup
    updates : mapping
        ``{site_id: vector}`` for every site of ``setup.site_ids``.
    dropouts : mapping, optional
        ``{site_id: phase}``: the site sends nothing from that phase on.

    Returns
    -------
    Aggregate
        The sum of the vectors of the sites that sent a masked input.
    """
    dropouts = dropouts or {}
    sites = {i: SecAggSite(i, setup) for i in setup.site_ids}
    aggregator = SecAggAggregator(setup)

    def sends(site_id: int, phase: Phase) -> bool:
        return dropouts.get(site_id, Phase.UNMASK + 1) > phase

    roster = aggregator.collect_keys(s.advertise_keys() for i, s in sites.items()
                                     if sends(i, Phase.ADVERTISE_KEYS))
    inboxes = aggregator.collect_shares(sites[k.site].share_keys(roster) for k in roster.keys
                                        if sends(k.site, Phase.SHARE_KEYS))
    request = aggregator.collect_masked_inputs(sites[v].mask_input(inbox, updates[v])
                                               for v, inbox in inboxes.items()
                                               if sends(v, Phase.MASKED_INPUT))
    return aggregator.collect_unmask_responses(sites[v].unmask(request)
                                               for v in request.survivors
                                               if sends(v, Phase.UNMASK))


def _measure(n_sites: int, vector_length: int, drop_fraction: float) -> str:
    """Time one round; a line of the table in the module docstring."""
    setup = RoundSetup(round_number=1, site_ids=tuple(range(1, n_sites + 1)),
                       threshold=n_sites // 2 + 1, vector_length=vector_length)
    rng = np.random.default_rng(0)
    updates = {i: rng.normal(size=vector_length).astype(np.float32) for i in setup.site_ids}
    # The lowest ids drop after sharing keys: the aggregator must rebuild their mask keys.
    dropped = set(range(1, int(drop_fraction * n_sites) + 1))
    sites = {i: SecAggSite(i, setup) for i in setup.site_ids}
    aggregator = SecAggAggregator(setup)
    site_seconds = dict.fromkeys(setup.site_ids, 0.0)
    sent = dict.fromkeys(Phase, 0)

    def timed(i: int, phase: Phase, call: Callable[[], _Message]) -> _Message:
        start = time.process_time()
        message = call()
        site_seconds[i] += time.process_time() - start
        if i == setup.site_ids[-1]:  # a site that never drops
            sent[phase] = wire_size(message)
        return message

    wall, cpu = time.perf_counter(), time.process_time()
    roster = aggregator.collect_keys(
        [timed(i, Phase.ADVERTISE_KEYS, s.advertise_keys) for i, s in sites.items()])
    inboxes = aggregator.collect_shares(
        [timed(i, Phase.SHARE_KEYS, partial(s.share_keys, roster)) for i, s in sites.items()])
    request = aggregator.collect_masked_inputs(
        [timed(v, Phase.MASKED_INPUT, partial(sites[v].mask_input, m, updates[v]))
         for v, m in inboxes.items() if v not in dropped])
    responses = [timed(v, Phase.UNMASK, partial(sites[v].unmask, request))
                 for v in request.survivors]
    unmask_cpu = time.process_time()
    result = aggregator.collect_unmask_responses(responses)
    end_cpu, end_wall = time.process_time(), time.perf_counter()
    expected = np.zeros(vector_length, dtype=np.uint64)
    for i in request.survivors:
        expected += setup.encoding.encode(updates[i], site=str(i))
    if not np.array_equal(result.fixed_point, setup.encoding.decode_integers(expected)):
        raise AssertionError("secagg benchmark: unmasked sum differs from the plaintext sum")
    return (f"{n_sites:>5} {vector_length:>7} {len(dropped):>4} {end_wall - wall:>7.2f} "
            f"{end_cpu - cpu:>7.2f} {float(np.median(list(site_seconds.values()))):>7.3f} "
            f"{end_cpu - unmask_cpu:>7.3f} " + " ".join(f"{sent[p]:>8}" for p in Phase))


if __name__ == "__main__":
    print("sites  values drop  wall_s   cpu_s  site_s unmask_s   adv_B  share_B masked_B unmask_B")
    for n, m in [(10, 6_209), (10, 100_000), (100, 6_209), (100, 100_000)]:
        for fraction in (0.0, 0.1):
            print(_measure(n, m, fraction), flush=True)
    sys.exit(0)
