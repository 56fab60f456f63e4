"""`secagg`: masked secure aggregation with dropout recovery (Bonawitz et al. 2017, SecAgg+).

The cryptographic core of "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (Bonawitz, Ivanov, Kreuter, Marcedone,
McMahan, Patel, Ramage, Segal, Seth; CCS 2017), Figure 4, honest-but-curious
variant. The aggregator learns the sum of the sites' vectors and which sites
contributed, nothing else (with SecAgg+, below: with high probability over a
random graph, and only if it follows the protocol). Sites and aggregator
exchange frozen dataclasses of bytes and ints, so a round can be driven in
process (`simulate_round`) or over any transport (Flower messages) by the same
`SecAggSite` / `SecAggAggregator` objects; one pair of objects per round (keys
are fresh every round).

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
* Signed keys (the PKI of the malicious-model protocol, §4): a site given a
  certified identity (`fedcare.protection.identity`, a deployment's ``fedcare
  certs``) signs its advertised keys and shares nothing unless every key of
  the roster is signed by a distinct site certificate of the federation's CA:
  an aggregator can no longer substitute a site's keys or add fake sites
  (Sybils) to reach the threshold. Without identities (simulation, insecure
  tests) the roster is taken as relayed.
* Not implemented (active adversaries): the consistency check of round 3
  (signatures on U3). A malicious aggregator can declare honest sites dropped
  so that the sum covers as few as ``t`` sites. A malicious
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

SecAgg+: sparse random neighbourhoods (``neighbours = k > 0``)
-------------------------------------------------------------
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (Bell,
Bonawitz, Gascón, Lepoint, Raykova; CCS 2020), semi-honest variant. The
complete graph above costs each site O(n) and the round O(n^2); with
``RoundSetup.neighbours = k`` (``protection.neighbours``) the same four
phases run on a k-regular graph, O(k) per site and O(n k) per round.

* Graph. The aggregator draws a 32-byte ``graph_seed`` with `secrets` and
  sends it in the `RoundSetup`. Every party sorts the site ids by
  ``SHA-256(domain, seed, id)`` (a uniformly random ordering) and joins each
  site to the ``k/2`` sites before and after it on that ring: the Harary
  graph ``H(k, n)`` on a random permutation, as Bell et al. and Flower's
  SecAgg+ use (`RoundSetup.neighbourhood`). ``k``, ``t_k`` and the seed are
  bound into the round context, so a site handed another graph cannot open
  its peers' shares and the round fails instead of mixing graphs. A site
  refuses a setup whose ``k`` is not its own ``protection.neighbours``.
* Threshold. ``u`` shares ``s_u`` and ``b_u`` among its neighbourhood
  ``N[u]`` -- itself and its ``k`` neighbours -- in U1, and any
  ``t_k = max(k/2 + 1, ceil(threshold * (k + 1)))`` of those ``k + 1``
  shares rebuild a secret: with the default ``protection.threshold = 0.5``
  that is Bell et al.'s ``k/2 + 1``, always a majority of the neighbourhood
  (`RoundSetup.neighbour_threshold`). ``u`` sends ``k`` encrypted shares,
  not ``n - 1``.
* Masking. ``y_u = x_u + PRG(b_u) + sum_{v in N(u) and U2} D_uv PRG(s_uv)``.
* Unmasking. Each survivor reveals shares for its neighbourhood only
  (``b_v`` for those in U3, ``s_v`` for those in U2 \\ U3, never both for
  one ``v``). The aggregator rebuilds every survivor's ``b_v`` and the
  ``s_d`` of every dropped site with a surviving neighbour from ``t_k``
  shares of that site's neighbourhood; the sum is exact as before.
* Quorum. Besides ``threshold`` sites to the end, every neighbourhood whose
  secret is needed must keep ``t_k`` of its members: the aggregator checks
  U2, then U3 before asking anyone to unmask, each site checks again before
  revealing, and the aggregator checks the answers before rebuilding
  anything. A shortfall is a `QuorumError` naming the site whose
  neighbourhood fell short; nothing is unmasked.

SecAgg+ threat model
~~~~~~~~~~~~~~~~~~~~
What holds for every graph (honest-but-curious aggregator, as above): it
learns more than the sum only if (a) ``t_k`` of some site's neighbours
collude with it -- their shares rebuild that site's ``s_u`` next to its
revealed ``b_u``, exposing its input: 8 sites at ``k = 14``, where the
complete graph needs ``t``, 51 of 100 -- or (b) the colluding and dropped
sites together cut the graph, which shows it the partial sum of each
remaining piece (masks cancel inside a piece). Fewer than ``t_k`` colluding
sites in all never do (a); fewer than ``k`` colluding and dropped sites never
do (b), ``H(k, n)`` being k-connected. Beyond that, the aggregator learns
only the sum *with high probability over the random ordering*, for colluding
and dropped sets fixed before the seed is drawn (Bell et al. 2020, security
of their semi-honest random-graph protocol; the same two bad events as in
Google's fcp parameter finder). `graph_bounds` gives union bounds on both, and on the round
aborting for lack of a neighbourhood quorum, per round (the graph is
drawn afresh each round, so over R rounds they add up to R times as much).
A selection of ``python -m fedcare.protection.secagg --bounds``, with
``t = k/2 + 1``; ``c`` columns: P[exposed] / P[split] with a fraction ``c``
of the sites colluding and 10% dropped; ``d`` columns: P[aborted] with a
fraction ``d`` dropped at random; 0: impossible whatever the graph.

=====  ===  ===  ==============  ==============  ==============  ============  =====  ====  ====
sites    k    t  c = 5%          c = 10%         c = 20%         c = 33%       d=10%  20%   30%
=====  ===  ===  ==============  ==============  ==============  ============  =====  ====  ====
  100   14    8  0 / 2^-39       2^-14 / 2^-28   2^-4 / 2^-16    1 / 2^-7      2^-13  2^-2  1
  100   40   21  0 / 0           0 / 0           0 / 0           2^-4 / 2^-68  0      0     2^-6
  100   60   31  0 / 0           0 / 0           0 / 0           2^-15 / 0     0      0     0
  300   18   10  2^-25 / 2^-39   2^-13 / 2^-30   2^-3 / 2^-18    1 / 2^-7      2^-12  2^-2  1
  300   40   21  0 / 2^-131      2^-38 / 2^-99   2^-13 / 2^-65   1 / 2^-39     2^-37  2^-12 0.54
  300   60   31  0 / 0           0 / 2^-197      2^-24 / 2^-118  2^-3 / 2^-72  0      2^-23 2^-5
 1000   20   11  2^-22 / 2^-37   2^-11 / 2^-29   2^-1 / 2^-16    1 / 2^-6      2^-10  0.85  1
 1000   60   31  2^-85 / 2^-163  2^-46 / 2^-132  2^-16 / 2^-92   1 / 2^-57     2^-45  2^-15 2^-2
=====  ===  ===  ==============  ==============  ==============  ============  =====  ====  ====

Reading: the floor ``k = 2 log2 n`` (14 at 100 sites, 18 at 300) keeps 5%
colluding sites out (impossible at 100 sites, 2^-25 at 300), 10% only to
about 2^-13 a round, and 20% or a third not at all. 40-bit security against
10% colluding needs ``k`` about 40 at 300 sites; against a third, more than
60. Keeping ``t_k`` a majority also caps dropouts per neighbourhood: at
``k = 14`` a round with 20% random dropouts aborts with probability up to
1/4 (the complete graph survives up to ``n - t``). Bell et al. and fcp
reach smaller ``k`` by tuning ``t`` to stated colluding and dropout rates;
this module keeps a majority and leaves ``k`` to ``protection.neighbours``.

* Aggregator that lies (not honest-but-curious): with the complete graph,
  one that tells different sites different survivor lists still cannot
  expose a single site, because rebuilding the mask keys of all ``n - 1``
  others needs ``(n - 1) t`` key shares and honest sites reveal at most
  ``n (n - t) < (n - 1) t`` of them when ``t > n/2``. SecAgg+ loses this: sites
  told that ``u`` survived reveal ``b_u``, and sites told that each of ``u``'s
  neighbours dropped reveal their mask keys -- different owners, so the
  "never both" rule never fires and each neighbourhood keeps its quorum.
  That exposes ``u`` with no colluding site at all (a test plays it). The
  defences of the malicious setting -- a consistency round in which sites
  sign the survivor list before anything is revealed, and a graph seed no
  single party chooses -- are not implemented; a malicious aggregator could
  also grind the seed until a target's neighbours are its colluders. **Use SecAgg+ only where the
  aggregator is trusted to follow the protocol** (as the rest of this module
  assumes), and prefer the complete graph when it is affordable.

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

Complete graph against SecAgg+: ``python -m fedcare.protection.secagg --plus``
(2026-11-29, the same VM, Python 3.11, cryptography 50, numpy 2.4, load
average ~4.5 from other jobs, so wall time is 2-2.5 times CPU time; the
CPU column is the one to compare). Same columns, ``k`` = neighbours (0:
complete graph), 6,209 values, threshold ``n // 2 + 1`` and ``t_k = k/2 + 1``:

=====  ===  ====  ======  =====  ======  ========  =======  ========  ========
sites    k  drop  wall_s  cpu_s  site_s  unmask_s  share_B  masked_B  unmask_B
=====  ===  ====  ======  =====  ======  ========  =======  ========  ========
  100    0     0    4.27   2.77   0.026     0.031   17,428    49,676     7,004
  100    0    10    5.23   2.90   0.029     0.111   17,428    49,676     7,004
  100   14     0    0.96   0.46   0.004     0.020    2,468    49,676     1,054
  100   14    10    1.05   0.52   0.005     0.044    2,468    49,676     1,054
  100   40     0    2.94   1.46   0.014     0.069    7,044    49,676     2,874
  100   40    10    2.71   1.34   0.013     0.076    7,044    49,676     2,874
  300    0     0   74.56  28.69   0.093     0.163   52,628    49,676    21,004
  300    0    30   69.59  32.32   0.106     1.175   52,628    49,676    21,004
  300   18     0    2.37   1.72   0.005     0.092    3,172    49,676     1,334
  300   18    30    3.02   2.04   0.006     0.165    3,172    49,676     1,334
  300   40     0    7.02   4.01   0.012     0.221    7,044    49,676     2,874
  300   40    30    4.85   3.41   0.010     0.291    7,044    49,676     2,874
=====  ===  ====  ======  =====  ======  ========  =======  ========  ========

Reading: per site, SecAgg+ costs what the complete graph costs for ``k + 1``
sites, whatever ``n``: at 100 sites ``k = 14`` takes a sixth of the CPU
(0.46 s against 2.77 s a round), at 300 sites ``k = 18`` a seventeenth
(1.72 s against 28.7 s), and key-share traffic shrinks likewise. The
masked vector, the same ``8 m`` bytes either way, is then all that grows
with the model. ``k = 40`` costs about ``40/14`` of ``k = 14``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import cached_property, partial
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
from fedcare.protection.identity import SiteIdentity, signed_message

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
        Must satisfy ``n/2 < threshold <= n`` (see the module's threat model).
        The round needs ``threshold`` sites to the end; with the complete graph
        it is also the number of shares needed to rebuild a secret.
    vector_length : int
        Number of values each site sums (>= 1).
    frac_bits : int
        Fixed-point resolution ``2**-frac_bits``; see `FixedPoint` for the range.
    neighbours : int
        0: complete graph (Bonawitz et al.). Otherwise SecAgg+ (Bell et al.):
        each site masks with, and shares its secrets among, ``neighbours``
        sites of a Harary graph drawn from `graph_seed`; an even number in
        ``[2, n - 1]``.
    neighbour_threshold : int
        SecAgg+: shares needed to rebuild a site's secret, out of the ``k + 1``
        held by the site and its ``k`` neighbours; a majority of them,
        ``k/2 < neighbour_threshold <= k + 1``. 0 takes ``k/2 + 1``.
    graph_seed : bytes
        SecAgg+: 32 public random bytes that fix the graph (`neighbourhood`).
        Empty: drawn here from the operating system's CSPRNG; the aggregator
        builds the setup and sends it to every site, so all derive the same graph.
    """

    round_number: int
    site_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    frac_bits: int = 32
    neighbours: int = 0
    neighbour_threshold: int = 0
    graph_seed: bytes = b""
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
        k = self.neighbours
        if k == 0:
            if self.neighbour_threshold or self.graph_seed:
                raise ConfigError("secagg neighbour_threshold and graph_seed apply only to a "
                                  "SecAgg+ round (neighbours > 0); got neighbours = 0 with "
                                  f"neighbour_threshold = {self.neighbour_threshold} and a "
                                  f"{len(self.graph_seed)}-byte graph_seed.")
        else:
            if not (2 <= k <= n - 1 and k % 2 == 0):
                raise ConfigError(f"secagg neighbours must be 0 (complete graph) or an even "
                                  f"number in [2, {n - 1}] for {n} sites (a Harary graph of "
                                  f"even degree below n); got {k}.")
            t = self.neighbour_threshold or k // 2 + 1
            if not k // 2 < t <= k + 1:
                raise ConfigError(f"secagg neighbour_threshold must be in ({k // 2}, {k + 1}] "
                                  f"for {k} neighbours (a majority of the {k + 1} holders of a "
                                  f"site's shares: the site and its neighbours); got {t}.")
            seed = self.graph_seed or secrets.token_bytes(_KEY_BYTES)
            if len(seed) != _KEY_BYTES:
                raise ConfigError(f"secagg graph_seed must be {_KEY_BYTES} bytes; got "
                                  f"{len(seed)}.")
            object.__setattr__(self, "neighbour_threshold", t)
            object.__setattr__(self, "graph_seed", seed)
        object.__setattr__(self, "site_ids", tuple(sorted(ids)))
        digest = hashlib.sha256(_DOMAIN)
        digest.update(struct.pack(">QIQI", self.round_number, self.threshold,
                                  self.vector_length, self.frac_bits))
        for i in self.site_ids:
            digest.update(_ID.pack(i))
        if k:  # the complete graph's context is unchanged from before SecAgg+
            digest.update(b"secagg+" + struct.pack(">II", k, self.neighbour_threshold)
                          + self.graph_seed)
        object.__setattr__(self, "context", digest.digest())

    @property
    def encoding(self) -> FixedPoint:
        """The fixed-point code of this round (bound set by the number of sites)."""
        return FixedPoint(frac_bits=self.frac_bits, max_sites=len(self.site_ids))

    @property
    def share_threshold(self) -> int:
        """Shares needed to rebuild one site's secret: `threshold`, or `neighbour_threshold`."""
        return self.neighbour_threshold if self.neighbours else self.threshold

    def neighbourhood(self, site: int) -> tuple[int, ...]:
        """The sites that hold shares of `site`'s secrets, sorted: `site` and its neighbours.

        Every site for the complete graph. For SecAgg+, the Harary graph
        ``H(k, n)`` on a random ordering of the sites: the sites are sorted by
        ``SHA-256(domain, graph_seed, id)`` and each is joined to the ``k/2``
        before and the ``k/2`` after it, cyclically. Anyone holding the setup
        computes the same graph; it is ``k``-connected whatever the ordering.
        """
        if not self.neighbours:
            return self.site_ids
        try:
            return self._graph[site]
        except KeyError:
            raise ConfigError(f"secagg site id {site} is not in the round's site_ids "
                              f"{self.site_ids}.") from None

    @cached_property
    def _graph(self) -> dict[int, tuple[int, ...]]:
        # cached_property writes the instance __dict__, not a dataclass field: messages and
        # equality keep only the public parameters, from which the graph follows.
        order = sorted(self.site_ids, key=lambda i: hashlib.sha256(
            _DOMAIN + b"graph" + self.graph_seed + _ID.pack(i)).digest())
        n, half = len(order), self.neighbours // 2
        return {u: tuple(sorted(order[(p + j) % n] for j in range(-half, half + 1)))
                for p, u in enumerate(order)}


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyAdvertisement:
    """Site -> aggregator, phase 0: public keys (32 bytes each) and a commitment to ``b_u``.

    A site with a certified identity (`fedcare.protection.identity`) adds its certificate
    (DER) and its signature of the rest, bound to the round (`signed_keys`).
    """

    site: int
    encryption_public_key: bytes
    mask_public_key: bytes
    self_mask_commitment: bytes
    certificate: bytes = b""
    signature: bytes = b""


def signed_keys(advertisement: KeyAdvertisement, context: bytes) -> bytes:
    """What a site signs of its advertisement: its id and keys, in this round's context."""
    return signed_message(b"fedcare secagg keys", (
        context, _ID.pack(advertisement.site), advertisement.encryption_public_key,
        advertisement.mask_public_key, advertisement.self_mask_commitment))


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
    identity : SiteIdentity, optional
        This site's certified identity: it signs its keys, and it shares nothing
        unless every site of the key roster signed its own keys with a distinct site
        certificate of the federation's CA (no substituted keys, no invented sites).
        Without it (simulation, insecure loopback tests) the roster is taken as relayed.
    """

    def __init__(self, site_id: int, setup: RoundSetup, *, name: str | None = None,
                 identity: SiteIdentity | None = None) -> None:
        if site_id not in setup.site_ids:
            raise ConfigError(f"secagg site id {site_id} is not in the round's site_ids "
                              f"{setup.site_ids}.")
        self.site_id = site_id
        self.setup = setup
        self.name = name or f"site {site_id}"
        self.identity = identity
        self.min_survivors = 0
        """Fewest masked inputs this site helps unmask (distributed DP noise: `needed`)."""
        self._advertised: KeyAdvertisement | None = None
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
        """Phase 1: Shamir-share the mask key and self-mask seed, encrypted per site.

        Among U1 with the complete graph; among this site's neighbours in U1 with SecAgg+.
        """
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
        if self.identity is not None:
            self._check_signatures(roster)
        if len(roster_ids) < setup.threshold:
            raise QuorumError(f"{self.name}: {len(roster_ids)} sites advertised keys in round "
                              f"{setup.round_number}; the threshold is {setup.threshold}.")
        neighbourhood = setup.neighbourhood(self.site_id)
        holders = sorted(set(roster_ids).intersection(neighbourhood))
        if len(holders) < setup.share_threshold:
            raise QuorumError(f"{self.name}: {len(holders)} sites of its neighbourhood "
                              f"{list(neighbourhood)} advertised keys in round "
                              f"{setup.round_number}; its neighbourhood threshold is "
                              f"{setup.share_threshold}. Nothing is shared.")
        key_shares = shamir.split(int.from_bytes(self._mask_key.private_bytes_raw(), "big"),
                                  threshold=setup.share_threshold, holders=holders)
        seed_shares = shamir.split(int.from_bytes(self._self_mask, "big"),
                                   threshold=setup.share_threshold, holders=holders)
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
        neighbourhood = setup.neighbourhood(self.site_id)
        for share in shares.shares:
            u = share.sender
            if (u == self.site_id or u not in self._roster or u in received
                    or u not in neighbourhood):
                raise ProtocolError(f"{self.name}: unexpected share from site {u} (not in U1, "
                                    "not a neighbour, a duplicate, or from itself).")
            received[u] = self._open_share(share)
        u2 = frozenset(received) | {self.site_id}
        if not setup.neighbours and len(u2) < setup.threshold:
            raise QuorumError(f"{self.name}: {len(u2)} sites shared keys in round "
                              f"{setup.round_number}; the threshold is {setup.threshold}.")
        if len(u2) < setup.share_threshold:  # SecAgg+: U2 as far as this site can see it
            raise QuorumError(f"{self.name}: {len(u2)} sites of its neighbourhood "
                              f"{list(neighbourhood)} shared keys in round "
                              f"{setup.round_number}; its neighbourhood threshold is "
                              f"{setup.share_threshold}. Nothing is sent.")
        x = np.asarray(update)
        if x.shape != (setup.vector_length,):
            raise ProtocolError(f"{self.name}: update of shape {x.shape}; this round sums "
                                f"vectors of {setup.vector_length} values.")
        masked = setup.encoding.encode(x, site=self.name)
        masked += expand_mask(_self_mask_seed(self._self_mask, setup.context, self.site_id),
                              setup.vector_length)
        for v in sorted(u2 - {self.site_id}):  # SecAgg+: only neighbours ever send shares
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

        Only for the sites whose shares this site holds: U2 with the complete
        graph, its neighbours in U2 with SecAgg+.

        Raises
        ------
        ProtocolError
            If the survivors are not a subset of U2 containing this site, or if
            answering would reveal both kinds of share for one site (which
            would unmask its input), counting every earlier request.
        QuorumError
            If fewer than ``threshold`` survivors are named or, with SecAgg+,
            if the survivors in the neighbourhood of a site whose share this
            one would reveal are fewer than ``neighbour_threshold`` (its secret
            could not be rebuilt, so nothing is revealed).
        """
        self._expect(Phase.UNMASK)
        setup = self.setup
        survivors = frozenset(request.survivors)
        neighbourhood = frozenset(setup.neighbourhood(self.site_id))
        if (len(survivors) != len(request.survivors)
                or not survivors & neighbourhood <= self._u2
                or not survivors.issubset(setup.site_ids)):
            where = (f"U2 = {sorted(self._u2)}" if not setup.neighbours else
                     f"the selected sites whose neighbours of this site are in its U2 = "
                     f"{sorted(self._u2)}")
            raise ProtocolError(f"{self.name}: survivors {sorted(request.survivors)} are not "
                                f"distinct sites of {where}.")
        if self.site_id not in survivors:
            raise ProtocolError(f"{self.name}: asked to unmask a round in which it is declared "
                                "dropped although it sent its masked input.")
        if len(survivors) < setup.threshold:
            raise QuorumError(f"{self.name}: {len(survivors)} sites sent masked inputs in round "
                              f"{setup.round_number}; the threshold is {setup.threshold}. "
                              "Nothing is revealed.")
        if len(survivors) < self.min_survivors:
            raise QuorumError(f"{self.name}: {len(survivors)} sites sent masked inputs in round "
                              f"{setup.round_number}, but their sum carries enough of the "
                              f"distributed DP noise only with {self.min_survivors}. Nothing "
                              "is revealed.")
        alive = survivors & self._u2  # the sites whose shares it holds: all of U2, or neighbours
        dropped = self._u2 - survivors
        if setup.neighbours:
            for v in sorted(self._u2):
                # Each of them needs its neighbourhood: b_v if it survived, s_v if it dropped
                # (this site survived and masked with it).
                present = survivors.intersection(setup.neighbourhood(v))
                if len(present) < setup.share_threshold:
                    raise QuorumError(f"{self.name}: the neighbourhood of site {v} has "
                                      f"{len(present)} survivor(s) {sorted(present)} in round "
                                      f"{setup.round_number}; its threshold is "
                                      f"{setup.share_threshold}. Nothing is revealed.")
        conflict = sorted((alive & self._revealed_key) | (dropped & self._revealed_self_mask))
        if conflict:
            raise ProtocolError(f"{self.name}: refusing to unmask: site(s) {conflict} were "
                                "declared dropped in one request and survivors in another; "
                                "revealing both shares would expose their inputs.")
        self._revealed_self_mask |= alive
        self._revealed_key |= dropped
        return UnmaskResponse(
            self.site_id,
            tuple(RevealedShare(v, shamir.share_to_bytes(self._held[v][1]))
                  for v in sorted(alive)),
            tuple(RevealedShare(v, shamir.share_to_bytes(self._held[v][0]))
                  for v in sorted(dropped)))

    def _advertisement(self) -> KeyAdvertisement:
        if self._advertised is None:  # made once: an ECDSA signature differs at every call
            keys = KeyAdvertisement(
                self.site_id, self._encryption_key.public_key().public_bytes_raw(),
                self._mask_key.public_key().public_bytes_raw(),
                _commit(self._self_mask, self.setup.context, self.site_id))
            if self.identity is not None:
                keys = replace(keys, certificate=self.identity.certificate,
                               signature=self.identity.sign(signed_keys(keys,
                                                                        self.setup.context)))
            self._advertised = keys
        return self._advertised

    def _check_signatures(self, roster: KeyRoster) -> None:
        """Every advertisement signed by a distinct certified site (Bonawitz et al. §4)."""
        assert self.identity is not None
        signers: dict[str, int] = {}
        for keys in roster.keys:
            where = f"{self.name}: the keys of site {keys.site} in round {self.setup.round_number}"
            if not keys.certificate or not keys.signature:
                raise ProtocolError(f"{where} are not signed; this site masks only with sites "
                                    "whose keys a federation certificate signed. Refusing to "
                                    "share keys.")
            signer = self.identity.verify(keys.certificate, keys.signature,
                                          signed_keys(keys, self.setup.context), where=where)
            if signer in signers:
                raise ProtocolError(f"{self.name}: site {signer!r} signed the keys of both "
                                    f"site {signers[signer]} and site {keys.site} in round "
                                    f"{self.setup.round_number}: one site counted twice. "
                                    "Refusing to share keys.")
            signers[signer] = keys.site

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
            expected = sorted(u1.intersection(self.setup.neighbourhood(bundle.site))
                              - {bundle.site})
            if sorted(recipients) != expected or any(
                    s.sender != bundle.site for s in bundle.shares):
                whom = "other site" if not self.setup.neighbours else "neighbour in"
                raise ProtocolError(f"secagg round {self.setup.round_number}: site "
                                    f"{bundle.site} sent shares for {sorted(recipients)}; "
                                    f"expected one for each {whom} U1 {expected}.")
        self._quorum(len(bundles), "shared keys")
        self._u2 = tuple(sorted(b.site for b in bundles))
        if self.setup.neighbours:
            self._neighbourhood_quorum(self._u2, set(self._u2), "shared keys")
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
        u3 = tuple(sorted(senders))
        if self.setup.neighbours:  # checked before the unmask request: nothing is revealed
            self._neighbourhood_quorum(self._needed_secrets(u3), set(u3), "sent masked inputs")
        self._masked_sum = total
        self._u3 = u3
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
        alive, u2 = set(survivors), set(self._u2)
        for r in responses:
            # A responder holds shares of its neighbourhood (everyone, for the complete graph).
            neighbourhood = setup.neighbourhood(r.site)
            expected_alive = [v for v in neighbourhood if v in alive]
            expected_dropped = [v for v in neighbourhood if v in u2 and v not in alive]
            if ([s.owner for s in r.self_mask_shares] != expected_alive
                    or [s.owner for s in r.key_shares] != expected_dropped):
                raise ProtocolError(f"secagg: site {r.site} revealed shares for the wrong sites; "
                                    f"expected self-mask shares for {expected_alive} and key "
                                    f"shares for {expected_dropped}.")
        self._quorum(len(responses), "answered the unmask request")
        needed = self._needed_secrets(survivors)
        answered = {r.site for r in responses}
        if setup.neighbours:  # every secret is checked before any is rebuilt
            self._neighbourhood_quorum(needed, answered, "answered the unmask request")
        self_mask_shares = {r.site: {s.owner: s.value for s in r.self_mask_shares}
                            for r in responses}
        key_shares = {r.site: {s.owner: s.value for s in r.key_shares} for r in responses}
        weights: dict[tuple[int, ...], list[int]] = {}

        def rebuild(owner: int, revealed: dict[int, dict[int, bytes]]) -> bytes:
            # Any t holders that answered determine the secret; the lowest ids, for
            # reproducibility. With the complete graph they are the same t for every secret.
            holders = tuple([u for u in setup.neighbourhood(owner)
                             if u in answered][:setup.share_threshold])
            if holders not in weights:
                weights[holders] = shamir.lagrange_at_zero(holders)
            return self._rebuild(list(holders), weights[holders],
                                 [revealed[u][owner] for u in holders], owner)

        total = self._masked_sum.copy()
        length = setup.vector_length
        for v in survivors:
            b = rebuild(v, self_mask_shares)
            if _commit(b, setup.context, v) != self._roster[v].self_mask_commitment:
                raise ProtocolError(f"secagg: the rebuilt self-mask seed of site {v} does not "
                                    "match its commitment; a revealed share is corrupt.")
            total -= expand_mask(_self_mask_seed(b, setup.context, v), length)
        for d in (v for v in needed if v not in alive):
            key = X25519PrivateKey.from_private_bytes(rebuild(d, key_shares))
            if key.public_key().public_bytes_raw() != self._roster[d].mask_public_key:
                raise ProtocolError(f"secagg: the rebuilt mask key of dropped site {d} does not "
                                    "match its public key; a revealed share is corrupt.")
            for u in setup.neighbourhood(d):
                if u not in alive:
                    continue
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
        secret = shamir.reconstruct(shares, threshold=self.setup.share_threshold,
                                    weights=weights)
        if secret >= 2 ** (8 * _KEY_BYTES):
            raise ProtocolError(f"secagg: a rebuilt secret of site {owner} is out of range; a "
                                "revealed share is corrupt.")
        return secret.to_bytes(_KEY_BYTES, "big")

    def _needed_secrets(self, survivors: Sequence[int]) -> tuple[int, ...]:
        """Sites whose secret the unmasking rebuilds, sorted.

        Every survivor (its self-mask seed) and every site of U2 \\ U3 that a
        survivor masked with (its mask key): all of U2 with the complete
        graph, the dropped sites with a surviving neighbour with SecAgg+.
        """
        alive = set(survivors)
        return tuple(v for v in self._u2 if v in alive or any(
            u in alive for u in self.setup.neighbourhood(v)))

    def _neighbourhood_quorum(self, owners: Iterable[int], present: set[int],
                              what: str) -> None:
        """SecAgg+: refuse unless each owner's neighbourhood has ``share_threshold`` present."""
        setup = self.setup
        for v in owners:
            members = [u for u in setup.neighbourhood(v) if u in present]
            if len(members) < setup.share_threshold:
                raise QuorumError(f"secagg round {setup.round_number}: in the neighbourhood of "
                                  f"site {v}, {list(setup.neighbourhood(v))}, {len(members)} "
                                  f"site(s) {what} ({members}); its threshold is "
                                  f"{setup.share_threshold}. The round is aborted and nothing "
                                  "is unmasked.")

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
        With SecAgg+ the same share of each neighbourhood (a site and its
        ``k`` neighbours) is needed to rebuild that site's secrets:
        ``max(k/2 + 1, ceil(threshold * (k + 1)))`` (`neighbour_threshold`).
    frac_bits : int
        Fixed-point resolution.
    neighbours : int
        0: every site masks with every other (Bonawitz et al.). Otherwise
        SecAgg+: ``k`` neighbours per site on a Harary graph the aggregator
        draws afresh each round (`RoundSetup.neighbourhood`); an even number,
        at least ``2 log2 n`` and below ``n`` for a cohort of ``n`` sites
        (checked each round). Sites refuse a setup with another ``k``.
    identity : SiteIdentity, optional
        A site's certified identity (a deployment with `fedcare certs`): it signs its
        keys and checks every other site's signature (`SecAggSite`).
    """

    name = "secagg"

    def __init__(self, threshold: float = 0.5, frac_bits: int = 32, neighbours: int = 0,
                 identity: SiteIdentity | None = None) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"protection.threshold must be in (0, 1]; got {threshold}.")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 0 \
                or neighbours % 2:
            raise ConfigError(f"protection.neighbours must be 0 (every site masks with every "
                              f"other) or an even number >= 2 (SecAgg+: masks with that many "
                              f"random neighbours, e.g. 14 for 100 sites); got {neighbours!r}.")
        self.threshold = threshold
        self.frac_bits = frac_bits
        self.neighbours = neighbours
        self.identity = identity

    def round_threshold(self, n_sites: int) -> int:
        return max(n_sites // 2 + 1, math.ceil(round(self.threshold * n_sites, 9)))

    def neighbour_threshold(self, neighbours: int) -> int:
        """SecAgg+: shares needed out of a neighbourhood of ``neighbours + 1`` (a majority)."""
        return max(neighbours // 2 + 1, math.ceil(round(self.threshold * (neighbours + 1), 9)))

    def check_neighbours(self, n_sites: int, round_number: int) -> None:
        """Refuse a `neighbours` that does not fit a cohort of `n_sites` (`ConfigError`).

        The floor ``2 log2 n`` (rounded up to even) is where a random Harary
        graph starts to keep a small colluding or dropped fraction of sites
        from splitting it or from holding a majority of one neighbourhood; it
        is a floor, not a guarantee (see the module's SecAgg+ threat model).
        """
        k = self.neighbours
        if not k:
            return
        low, high = min_neighbours(n_sites), n_sites - 1 - (n_sites - 1) % 2
        if not low <= k <= high:
            fits = (f"an even number in [{low}, {high}]" if low <= high else
                    "no SecAgg+ graph (too few sites for one)")
            raise ConfigError(f"protection.neighbours = {k} does not fit round {round_number}'s "
                              f"cohort of {n_sites} selected sites: SecAgg+ needs {fits} (at "
                              f"least 2 log2 n, fewer than the other sites). Use 0 (every site "
                              "masks with every other) or change protection.neighbours.")

    def site_session(self, round_number: int, site: int) -> SecAggSiteSession:
        return SecAggSiteSession(round_number, site + 1, neighbours=self.neighbours,
                                 identity=self.identity)

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> SecAggAggregatorSession:
        if len(cohort) < 2:
            raise QuorumError(f"Round {round_number}: secure aggregation needs at least 2 "
                              f"selected sites (one site's sum is its update); "
                              f"{len(cohort)} selected. Raise federation.fraction or "
                              "federation.min_sites.")
        self.check_neighbours(len(cohort), round_number)
        k = self.neighbours
        setup = RoundSetup(round_number, tuple(i + 1 for i in cohort),
                           self.round_threshold(len(cohort)), length, self.frac_bits,
                           neighbours=k,
                           neighbour_threshold=self.neighbour_threshold(k) if k else 0,
                           # Public randomness from the aggregator's CSPRNG; every site
                           # derives the graph from it (see the threat model).
                           graph_seed=secrets.token_bytes(_KEY_BYTES) if k else b"")
        return SecAggAggregatorSession(setup)


class SecAggSiteSession:
    """A site's side of one secagg round (`neighbours`: the site's own configuration)."""

    def __init__(self, round_number: int, site_id: int, *, neighbours: int = 0,
                 identity: SiteIdentity | None = None) -> None:
        self.round_number = round_number
        self.site_id = site_id
        self.neighbours = neighbours
        self.identity = identity
        self._site: SecAggSite | None = None
        self._shares: SharesForSite | None = None

    def handle(self, message: object) -> object:
        if isinstance(message, RoundSetup):
            if message.round_number != self.round_number:
                raise ProtocolError(f"secagg site {self.site_id}: setup of round "
                                    f"{message.round_number} received in round "
                                    f"{self.round_number}.")
            if message.neighbours != self.neighbours:
                # The aggregator picks the graph; the site holds it to its own configuration.
                raise ProtocolError(f"secagg site {self.site_id}: the setup of round "
                                    f"{message.round_number} asks for {message.neighbours} "
                                    f"neighbours per site; this site is configured with "
                                    f"protection.neighbours = {self.neighbours}. Refusing.")
            self._site = SecAggSite(self.site_id, message, identity=self.identity)
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

    def require_contributors(self, needed: int, *, cohort: int) -> None:
        """The round must be set up for `cohort` sites and unmask at least `needed` inputs."""
        site = self._require()
        if len(site.setup.site_ids) != cohort:
            raise ProtocolError(f"secagg site {self.site_id}: told that {cohort} sites were "
                                f"selected in round {self.round_number}, but the round is set "
                                f"up for {len(site.setup.site_ids)}; its noise share would be "
                                "wrong. Refusing.")
        site.min_survivors = needed

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


def min_neighbours(n_sites: int) -> int:
    """The smallest SecAgg+ degree accepted for `n_sites`: ``2 log2 n`` rounded up to even."""
    return 2 * math.ceil(math.log2(n_sites))


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


def graph_bounds(n_sites: int, neighbours: int, neighbour_threshold: int, *, colluding: int,
                 dropped: int) -> tuple[float, float, float]:
    """Union bounds, over SecAgg+'s random graph, on the three ways it can fall short.

    The colluding and the dropped sites are any fixed sets of the given
    sizes, chosen without knowing the graph (the graph seed is drawn after).

    Parameters
    ----------
    n_sites, neighbours, neighbour_threshold : int
        ``n``, ``k`` and ``t`` of the round.
    colluding : int
        Sites that pool their shares and keys with the aggregator.
    dropped : int
        Sites that do not reach the end of the round.

    Returns
    -------
    exposed : float
        P[some honest site has ``>= t`` colluding neighbours], who then hold
        enough shares to rebuild both its secrets and unmask its input.
    split : float
        P[the colluding and dropped sites together cut the graph], which
        would show the aggregator the partial sum of each remaining piece.
        0 when fewer than ``k`` sites are removed (the graph is ``k``-connected).
    aborted : float
        P[some neighbourhood needed for unmasking has fewer than ``t``
        survivors]: the round fails with `QuorumError`, revealing nothing.
    """
    n, k, t = n_sites, neighbours, neighbour_threshold

    def tail(population: int, marked: int, at_least: int) -> float:
        """P[X >= at_least], X hypergeometric: k draws from `population` with `marked`."""
        top = min(marked, k)
        if at_least > top:
            return 0.0
        favourable = sum(math.comb(marked, i) * math.comb(population - marked, k - i)
                         for i in range(max(at_least, 0), top + 1))
        return favourable / math.comb(population, k)

    exposed = (n - colluding) * tail(n - 1, colluding, t)
    bad = colluding + dropped
    # A cut of the ring-of-cliques needs k/2 consecutive removed sites in two places.
    split = 0.0 if bad < k else n * (n - k + 1) / 2 * math.comb(bad, k) / math.comb(n, k)
    # A survivor needs t - 1 surviving neighbours (it holds one share itself); a dropped
    # site that a survivor masked with needs t.
    aborted = ((n - dropped) * tail(n - 1, dropped, k - t + 2)
               + dropped * tail(n - 1, max(dropped - 1, 0), k - t + 1))
    return min(exposed, 1.0), min(split, 1.0), min(aborted, 1.0)


def _measure(n_sites: int, vector_length: int, drop_fraction: float,
             neighbours: int = 0) -> str:
    """Time one round; a line of the table in the module docstring."""
    setup = RoundSetup(round_number=1, site_ids=tuple(range(1, n_sites + 1)),
                       threshold=n_sites // 2 + 1, vector_length=vector_length,
                       neighbours=neighbours)
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
    return (f"{n_sites:>5} {neighbours:>4} {vector_length:>7} {len(dropped):>4} "
            f"{end_wall - wall:>7.2f} "
            f"{end_cpu - cpu:>7.2f} {float(np.median(list(site_seconds.values()))):>7.3f} "
            f"{end_cpu - unmask_cpu:>7.3f} " + " ".join(f"{sent[p]:>8}" for p in Phase))


def _log2(p: float) -> str:
    return "0" if p == 0 else f"2^{math.log2(p):.0f}" if p < 0.5 else f"{p:.2f}"


if __name__ == "__main__":
    if "--bounds" in sys.argv:  # the SecAgg+ parameter table of the module docstring
        print("sites    k    t  exposed/split, colluding 5% 10% 20% 33% (10% dropped)   "
              "aborted, dropped 10% 20% 30%")
        for n in (100, 300, 1000):
            for k in sorted({min_neighbours(n), 20, 40, 60}):
                t = k // 2 + 1
                cells = []
                for fraction in (0.05, 0.10, 0.20, 1 / 3):
                    exposed, split, _ = graph_bounds(n, k, t, colluding=int(fraction * n),
                                                     dropped=n // 10)
                    cells.append(f"{_log2(exposed)}/{_log2(split)}")
                aborted = [_log2(graph_bounds(n, k, t, colluding=0, dropped=int(d * n))[2])
                           for d in (0.1, 0.2, 0.3)]
                print(f"{n:>5} {k:>4} {t:>4}  " + " ".join(f"{c:>13}" for c in cells)
                      + "  " + " ".join(f"{a:>6}" for a in aborted))
        sys.exit(0)
    print("sites    k  values drop  wall_s   cpu_s  site_s unmask_s   adv_B  share_B masked_B "
          "unmask_B")
    if "--plus" in sys.argv:  # complete graph against SecAgg+
        runs = [(n, 6_209, k) for n in (100, 300) for k in (0, min_neighbours(n), 40)]
    else:
        runs = [(n, m, 0) for n, m in [(10, 6_209), (10, 100_000), (100, 6_209),
                                       (100, 100_000)]]
    for n, m, k in runs:
        for fraction in (0.0, 0.1):
            print(_measure(n, m, fraction, k), flush=True)
    sys.exit(0)
