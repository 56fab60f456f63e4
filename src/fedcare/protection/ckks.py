"""`ckks`: summing site updates under CKKS homomorphic encryption (TenSEAL / Microsoft SEAL).

Each site encrypts its update under one CKKS key set; the aggregator adds the
ciphertexts with a context that can neither encrypt nor decrypt; the sites
decrypt the sum and release it only noise-flooded. CKKS (Cheon, Kim, Kim, Song;
ASIACRYPT 2017) packs ``N/2`` real values into one ciphertext and adds
ciphertexts slot by slot. This module only ever *adds*, so the modulus chain
needs no room for multiplications and no relinearisation or Galois (rotation)
keys are saved or shipped. Key sets are symmetric (secret-key encryption):
only the sites, which share the secret key, can encrypt; the aggregator holds
the parameters and no key at all. Secret-key encryption is also about three
times faster than public-key encryption (1.8 against 5.5 ms a ciphertext
here) and leaves a smaller decryption error.

Flow
----
1. Once, on a trusted machine: ``fedcare keys init DIR`` (`generate_keys`)
   writes ``site.ckks`` (the context with the secret key), ``aggregator.ckks``
   (the parameters only: no key) and ``keys.json`` (parameters and
   fingerprint, no secrets). Both key files start with `KEY_FILE_MAGIC` and
   a random key-set id, then hold TenSEAL's context, so two key sets with
   the same parameters have different fingerprints. Both are created with
   mode 0600. Distribution is out of band: ``site.ckks`` is
   copied to every site and only there, ``aggregator.ckks`` to the
   aggregator. The fingerprint is the SHA-256 of ``aggregator.ckks`` (what
   ``sha256sum aggregator.ckks`` prints, and what ``fedcare keys fingerprint``
   prints for either file), so each party can check it has the right key set.
2. Each site: ``payload = encrypt(site_context, update, site=name)``.
3. The aggregator: ``total = add(aggregator_context, total, payload, site=name)``
   for each payload (``total`` starts as None), with a context that can
   neither encrypt nor decrypt.
4. The sites: ``decrypt(site_context, total, noise=SecureNoise())``.

A vector of ``m`` values travels as ``ceil(m / (N/2))`` ciphertexts
("chunks"); the last one is padded with zeros, so every chunk holds ``N/2``
slots and `decrypt` checks all of them.

Parameters and precision
------------------------
Defaults (`CkksParameters`): ``N = 8192`` (4,096 values per ciphertext),
coefficient moduli of (60, 60, 60) bits and scale ``Delta = 2**70``. The last
60-bit prime is SEAL's special prime; the two others (120 bits) hold the
data. The total, 180 bits, is within the 218 bits the HomomorphicEncryption.org
standard (Albrecht et al. 2018, ternary secrets) allows for 128-bit security
at ``N = 8192``; `CkksParameters` refuses anything above that table. Since
nothing is ever rescaled the scale may exceed each prime: it only has to leave
``120 - 70 = 50`` bits of headroom, and the sum of at most `MAX_SUMMANDS`
payloads of values at most `MAX_ABS_VALUE` (``2**14 * 2**32 = 2**46``) fits
with 3 bits to spare. A large scale is what makes the key-dependent
decryption error tiny, which is what the flooding below has to hide.

Measured with the defaults (TenSEAL 0.3.18, SEAL 3.6), the exact CKKS sum
differs from the float64 sum by

* the encryption noise, independent of the values: standard deviation
  ``1.8e-19 * sqrt(K)`` for a sum of ``K`` fresh ciphertexts (about
  ``2**7.7 / Delta`` each; public-key encryption would give ``2**10.4``), and
* float64 rounding in SEAL's encoder and decoder, about ``3e-16`` times the
  largest magnitude in the vector (so ``3e-13`` for values of ``1e3``).

For ``K <= 1000`` payloads of values of magnitude up to ``1e3`` the exact
sum is within ``1e-9`` of numpy's: measured at most ``1.0e-10`` over 4,096
sums of 1,000 payloads (``3.0e-11`` against an exactly rounded ``math.fsum``:
the rest is numpy's own rounding), i.e. ``1e-13`` relative to the values,
far inside the ``1e-6`` required. The tests check the ``1e-9`` bound with 3
payloads, with random small ones (hypothesis) and, marked slow, with 1,000.
What a site gets from `decrypt` is dominated instead by the flooding noise
(standard deviation ``flooding_std``, default ``2**-20``) and the rounding to
the grid (at most half of ``grid``, default ``2**-24``).

Threat model
------------
* **Aggregator, honest but curious.** It holds only ``aggregator.ckks``,
  the parameters without any key: `load_aggregator_context` refuses a file
  that holds a secret or public key, and `add` takes nothing else. It sees
  every site's ciphertexts and the ciphertext of their sum, which under the
  RLWE assumption (128-bit parameters, above) reveal nothing about the
  values but their number. It learns the
  aggregate only if a site sends the (flooded) decryption back.
* **One shared secret key.** TenSEAL has no threshold or multi-key CKKS, so
  every site holds the same secret key and can decrypt any ciphertext made
  under it. An aggregator colluding with *one* site, or one site that
  intercepts another's traffic, reads every site's update. This is much
  weaker than `fedcare.protection.secagg`, which tolerates ``t - 1``
  colluders. Sites must never see each other's ciphertexts: send each
  payload site-to-aggregator over an authenticated, encrypted channel (TLS).
* **Li--Micciancio key recovery (EUROCRYPT 2021).** CKKS is IND-CPA but not
  IND-CPA^D: whoever holds a ciphertext ``(c0, c1)`` and its exact
  decryption, re-encoded, knows every term of ``c0 + c1 * s = Delta * m + e``
  but ``s``, and linear algebra yields the secret key. So no exact
  decryption leaves a site: `decrypt` keeps only the real parts (SEAL's
  decoder drops the imaginary parts, which hold pure error), adds fresh
  Gaussian noise of standard deviation ``flooding_std`` to every value from a
  `~fedcare.privacy.noise.NoiseSource` (`~fedcare.privacy.noise.SecureNoise`
  in production), then rounds to a power-of-two ``grid``.
  With the defaults the flooding noise (``2**-20``, about ``9.5e-7``) is
  ``2**42.3 / sqrt(K)`` times the key-dependent error of a ``K``-site sum
  (``2**37.3`` for 1,000 sites). Li, Micciancio, Schultz and Sorrell
  (CRYPTO 2022) prove ``s`` bits of statistical security for ``q`` released
  decryptions when the flooding standard deviation is at least
  ``sqrt(24 N q) * 2**(s/2)`` times the error bound; taking the bound as 6
  standard deviations, the defaults give ``s = 30`` for about 3.9 million
  released chunk decryptions per key set at 1,000 sites (240 million at 16
  sites; ``s = 40`` for 3,800 and 235,000). A release is one chunk decryption
  that reaches the aggregator or anyone who saw the ciphertexts; every
  `decrypt` draws fresh noise, so ``k`` sites each releasing their
  decryption of the same aggregate count ``k`` times. Count releases and
  re-key (``fedcare keys init --overwrite``) before the allowance. `decrypt`
  refuses a ``flooding_std`` below ``2**17`` times an upper estimate of one
  fresh ciphertext's error (`FRESH_ERROR_UNITS`: ``2**-42`` with the
  defaults): it never returns an exact decryption. Caveats, as in
  `fedcare.privacy.noise`: the proof is for real-valued noise; and it
  covers the key-dependent error, not SEAL's float64 rounding of the
  decoded values (``3e-16`` relative), which is a deterministic function of
  the exact decryption and stays below the flooding noise only while
  aggregate values stay below about ``3e9``.
* **Tampering and mistakes: what is detected.** `add` (and `decrypt`) refuse,
  with `ProtocolError` naming the site: a payload from another key set
  (fingerprint mismatch: a misconfigured site, not an attacker, who can copy
  the fingerprint); a wrong number of chunks for the stated length, or a
  length different from the running total's; a chunk that TenSEAL cannot
  parse (truncated, extended, garbage, another scheme) or that SEAL rejects
  (a coefficient not reduced modulo its prime, another parameter set); and
  a chunk with the wrong slot count, scale, polynomial count or modulus
  level, or a transparent one (zero mask: values in the clear). SEAL's
  serialization carries no checksum, so a flipped bit inside a coefficient
  that stays below its prime parses as a valid, different ciphertext: the
  aggregator cannot tell. Such a chunk decrypts to noise of magnitude about
  ``2**55`` in every slot, and `decrypt` checks every slot, padding
  included, against the ``2**46`` an honest sum can reach, refusing
  (without releasing anything) unless all 4,096 pass, which a random
  corruption does with probability below ``2**-30000``. Measured on 3,000
  single-bit flips of one chunk: 598 refused by `add`, 2,382 by `decrypt`,
  20 changed nothing (the sum decrypted correctly), none gave a wrong sum.
  The same check catches a ciphertext made under another key set with a
  copied fingerprint, and a sum of too many payloads.
* **Not detected, and not detectable here.** Nothing authenticates a
  ciphertext: a site can encrypt any values within the bounds (poisoning).
  Only key holders can encrypt (there is no public key), but the aggregator
  can still combine the ciphertexts it received (drop, repeat, negate, add
  them) and pass the result off as the sum. A per-chunk MAC would not change
  that: its key would be shared by all sites, and the aggregator could not
  tag the sum it computes. Integrity in transit is TLS's job; the checks above catch
  mistakes and random corruption, not a forger.
* **Actively malicious aggregator: not covered.** CKKS has no security
  against chosen ciphertexts. An aggregator that gets a site to decrypt a
  ciphertext of its choosing, e.g. ``(0, Delta)``, reads ``s`` off the slots
  (they hold ``s`` evaluated at the roots, of magnitude about ``sqrt(N)``,
  far above any useful flooding), and from then on every update. It can also
  pass one site's ciphertext off as the sum. Sites must only decrypt
  aggregates from an aggregator they trust to follow the protocol.

Cost, measured
--------------
``python -m fedcare.protection.ckks`` (2026-11-29) on a 2-vCPU AMD EPYC VM,
Python 3.11, TenSEAL 0.3.18, load average 0.3; default parameters, 10 sites.
Times are per site (``encrypt_ms``, ``add_ms``: one payload into the running
total) or per aggregate (``decrypt_ms``, flooding included); ``bytes`` is one
payload; ``decrypt_ms`` excludes drawing the flooding noise, which
``flood_ms`` times alone (`~fedcare.privacy.noise.SecureNoise`);
``max_abs_error`` is the exact (unflooded) sum's largest error against numpy
for updates drawn from N(0, 1e3**2). Key generation takes about 9 ms;
``site.ckks`` is 196,866 bytes and ``aggregator.ckks`` 147.

=======  ======  ==========  ======  ==========  ========  =========  =============
values   chunks  encrypt_ms  add_ms  decrypt_ms  flood_ms      bytes  max_abs_error
=======  ======  ==========  ======  ==========  ========  =========  =============
 10,000       3         9.1     2.9         4.7       0.3    786,876        3.6e-12
100,000      25        58.8    16.8        25.3       1.0  6,557,300        5.5e-12
=======  ======  ==========  ======  ==========  ========  =========  =============

Reading: a payload is 64 bytes per value (16 times float32), whatever the
values, since each chunk is two polynomials of 8,192 coefficients modulo two
60-bit primes, stored as 64-bit words (SEAL's zstd compression finds no
whole zero bytes to drop). Fewer bytes are out of reach with TenSEAL: a
chunk costs at least (data modulus bits) / 2 bytes per value, and the scale
the flooding needs (about 2**70) plus the sums' range take about 118 bits;
SEAL's half-size seeded symmetric ciphertexts are not exposed; and packing
two values into one slot would need more than the 53 bits a float64 carries
through SEAL's encoder and decoder. Encryption (about 2.3 ms per chunk,
public-key encryption took 5-7) still dominates a site's cost; the
aggregator's ``add`` mostly parses and re-serializes the running total
(about 0.7 ms per chunk; `CkksAggregatorSession` keeps the sum parsed
instead). The flooding draw costs about 30 ms when torch's two intra-op
threads compete with other load, about 1 ms with
``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import numpy as np
import tenseal as ts
import torch
from numpy.typing import ArrayLike, NDArray

from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.noise import NoiseSource, SecureNoise
from fedcare.protection.base import MIN_CONTRIBUTORS, Exchange

HE_STANDARD_MAX_LOG_Q: Mapping[int, int] = MappingProxyType(
    {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881})
"""Largest total coefficient modulus (bits) for 128-bit security, per ring dimension N.

HomomorphicEncryption.org security standard (Albrecht et al. 2018), Table 1,
uniform ternary secrets (SEAL's), classical attacks.
"""

MAX_ABS_VALUE = 2.0**32
"""Largest magnitude `encrypt` accepts in an update (about 4.3e9)."""

MAX_SUMMANDS = 2**14
"""Most payloads one aggregate may sum (16,384) and still decrypt correctly."""

SUM_BOUND = MAX_ABS_VALUE * MAX_SUMMANDS
"""Largest magnitude an honest aggregate can have (2**46); `decrypt` refuses more."""

HEADROOM_BITS = 48
"""Bits the data modulus must keep above the scale: log2(SUM_BOUND) + 1 sign bit + 1 spare."""

MIN_SCALE_BITS = 40
"""Smallest log2 scale `CkksParameters` accepts: below it the decryption error exceeds 1e-9."""

DEFAULT_FLOODING_STD = 2.0**-20
"""Default standard deviation of the flooding noise added to every decrypted value (~9.5e-7)."""

DEFAULT_GRID = 2.0**-24
"""Default grid the flooded values are rounded to (~6.0e-8, a sixteenth of the flooding std)."""

FRESH_ERROR_UNITS = 2.0**11
"""Upper estimate of one fresh ciphertext's decryption error std at N = 8192, in units of 1/scale.

Taken as growing linearly with N. Measured for public-key encryption 2**10.4,
2**11.4 and 2**12.4 at N = 8192, 16384 and 32768 (60-bit special prime); the
secret-key encryption used here gives 2**7.7 and 2**8.2 at N = 8192 and 16384,
so the floor `decrypt` enforces keeps 3 bits to spare.
"""

KEY_FILE_MAGIC = b"fedcare-ckks-keyset-1\n"
"""First bytes of ``site.ckks`` and ``aggregator.ckks``; the key-set id and TenSEAL's follow."""

KEY_SET_ID_BYTES = 32
"""Length of the random key-set id (`secrets`) that makes each key set's fingerprint unique."""

FLOODING_FLOOR_RATIO = 2.0**17
"""`decrypt` refuses flooding below this multiple of a fresh ciphertext's error.

OpenFHE's rule ``sqrt(12 q) * 2**(s/2)`` for s = 30 bits and q = 1 release is 2**16.8.
"""

RELEASE_SECURITY_BITS = 30
"""Bits of statistical security against key recovery a site keeps (`release_allowance`)."""

RELEASES_SUFFIX = ".released"
"""Beside ``site.ckks``: how many chunk decryptions this site has released under it."""

SITE_FILE = "site.ckks"
AGGREGATOR_FILE = "aggregator.ckks"
MANIFEST_FILE = "keys.json"
_MANIFEST_FORMAT = "fedcare-ckks-keys/1"


def _security_problem(n: int, total_bits: int) -> str | None:
    bound = HE_STANDARD_MAX_LOG_Q.get(n)
    if bound is None:
        return f"poly_modulus_degree {n} is not one of {sorted(HE_STANDARD_MAX_LOG_Q)}."
    if total_bits > bound:
        return (f"the coefficient modulus has {total_bits} bits, above the {bound} bits that "
                f"128-bit security allows at poly_modulus_degree={n} (HomomorphicEncryption.org "
                "standard).")
    return None


def _scale_problem(data_bits: int, scale_bits: int) -> str | None:
    if scale_bits < MIN_SCALE_BITS:
        return (f"must be >= {MIN_SCALE_BITS} bits, or the decryption error exceeds 1e-9 "
                "(and the flooding floor exceeds its default).")
    if data_bits - scale_bits < HEADROOM_BITS:
        return (f"must be <= {data_bits - HEADROOM_BITS} bits: the data primes hold {data_bits} "
                f"bits and a sum of {MAX_SUMMANDS} values of {MAX_ABS_VALUE:.3g} needs "
                f"{HEADROOM_BITS} bits above the scale.")
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters of one key set, checked for 128-bit security and summation headroom.

    Parameters
    ----------
    poly_modulus_degree : int
        Ring dimension ``N``, a power of two in 1024..32768; each ciphertext
        holds ``N/2`` values.
    coeff_mod_bit_sizes : tuple of int
        Bit sizes of the coefficient-modulus primes, each in [20, 60], at
        least two (a list is converted); the last is SEAL's special prime,
        the others hold data. Their sum must not exceed
        `HE_STANDARD_MAX_LOG_Q` for ``N``.
    global_scale_bits : int
        log2 of the CKKS scale ``Delta``, at least `MIN_SCALE_BITS`, and at most
        the data primes' bits minus `HEADROOM_BITS` (so a sum of
        `MAX_SUMMANDS` values of `MAX_ABS_VALUE` cannot wrap).

    Raises
    ------
    ConfigError
        Naming the parameter, the value and the bound it breaks.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60, 60)
    global_scale_bits: int = 70

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if not _is_int(n) or n not in HE_STANDARD_MAX_LOG_Q:
            raise ConfigError(f"CkksParameters.poly_modulus_degree must be one of "
                              f"{sorted(HE_STANDARD_MAX_LOG_Q)}; got {n!r}.")
        sizes: object = self.coeff_mod_bit_sizes
        if isinstance(sizes, list):  # as TOML and JSON give it
            sizes = tuple(sizes)
            object.__setattr__(self, "coeff_mod_bit_sizes", sizes)
        if (not isinstance(sizes, tuple) or len(sizes) < 2
                or not all(_is_int(b) and 20 <= b <= 60 for b in sizes)):
            raise ConfigError("CkksParameters.coeff_mod_bit_sizes must be a tuple of at least two "
                              f"integers in [20, 60] (data primes, then the special prime); "
                              f"got {sizes!r}.")
        problem = _security_problem(n, sum(sizes))
        if problem:
            raise ConfigError(f"CkksParameters.coeff_mod_bit_sizes = {sizes!r}: {problem}")
        if not _is_int(self.global_scale_bits):
            raise ConfigError("CkksParameters.global_scale_bits must be an integer; "
                              f"got {self.global_scale_bits!r}.")
        problem = _scale_problem(sum(sizes[:-1]), self.global_scale_bits)
        if problem:
            raise ConfigError(f"CkksParameters.global_scale_bits = {self.global_scale_bits}: "
                              f"{problem}")

    @property
    def slots(self) -> int:
        """Values per ciphertext, ``N/2``."""
        return self.poly_modulus_degree // 2


DEFAULT_PARAMETERS = CkksParameters()


@dataclass(frozen=True)
class _Layout:
    """What a loaded context fixes: ring dimension, data modulus, scale, top-level parms_id."""

    poly_modulus_degree: int
    data_bits: int
    scale_bits: int
    parms_id: tuple[int, ...]

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return 2.0**self.scale_bits


class _KeyContext:
    """A checked TenSEAL CKKS context, its key-set id and the key set's fingerprint."""

    def __init__(self, context: ts.Context, *, key_set: bytes, where: str) -> None:
        if not (isinstance(key_set, bytes) and len(key_set) == KEY_SET_ID_BYTES):
            raise ConfigError(f"{where}: the key-set id must be {KEY_SET_ID_BYTES} bytes.")
        self._layout = _inspect(context, where)
        self.context = context
        self.key_set = key_set
        self.fingerprint = hashlib.sha256(_aggregator_file(key_set, context)).hexdigest()

    @property
    def poly_modulus_degree(self) -> int:
        """Ring dimension ``N``."""
        return self._layout.poly_modulus_degree

    @property
    def slots(self) -> int:
        """Values per ciphertext chunk, ``N/2``."""
        return self._layout.slots

    @property
    def scale_bits(self) -> int:
        """log2 of the CKKS scale."""
        return self._layout.scale_bits

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(N={self.poly_modulus_degree}, "
                f"scale=2**{self.scale_bits}, fingerprint={self.fingerprint[:16]}...)")


class SiteContext(_KeyContext):
    """A site's key material: encrypts updates and decrypts aggregates.

    Holds the secret key, so it must never reach the aggregator; `public`
    gives what the aggregator may hold. Made by `create_site_context` or
    `load_site_context`.

    Parameters
    ----------
    context : tenseal.Context
        A symmetric CKKS context with a secret key and a global scale.
    key_set : bytes
        The key set's random id (`KEY_SET_ID_BYTES`).
    where : str
        Where it came from, for error messages (a path).

    Attributes
    ----------
    context : tenseal.Context
    key_set : bytes
    fingerprint : str
        SHA-256 hex of the key set's ``aggregator.ckks``.
    """

    def __init__(self, context: ts.Context, *, key_set: bytes,
                 where: str = "the context") -> None:
        super().__init__(context, key_set=key_set, where=where)
        self.releases = ReleaseCounter(None)
        """Chunk decryptions released under this key set (`load_site_context`: a file)."""
        if not context.is_private():
            raise ConfigError(f"{where} holds no secret key; a site needs {SITE_FILE} "
                              f"(got the parameters only, as in {AGGREGATOR_FILE}).")
        if _holds_public_key(context):
            raise ConfigError(f"{where} is a public-key CKKS context; fedcare's key sets are "
                              "symmetric (only the sites can encrypt): make one with "
                              "`fedcare keys init`.")

    @property
    def flooding_floor(self) -> float:
        """Smallest ``flooding_std`` `decrypt` accepts with this key set."""
        error = FRESH_ERROR_UNITS * self.poly_modulus_degree / 8192 / self._layout.scale
        return FLOODING_FLOOR_RATIO * error

    def public(self) -> AggregatorContext:
        """The aggregator's context for this key set: the same parameters, no key."""
        return AggregatorContext(ts.context_from(_parameters_only(self.context)),
                                 key_set=self.key_set, where="the parameters of the site context")


def release_allowance(context: SiteContext, *, summands: int,
                      flooding_std: float = DEFAULT_FLOODING_STD,
                      security_bits: int = RELEASE_SECURITY_BITS) -> int:
    """Chunk decryptions of `summands`-payload sums a key set may release and keep its key.

    Li, Micciancio, Schultz and Sorrell (CRYPTO 2022) give ``s`` bits of statistical
    security for ``q`` released decryptions when ``flooding_std >= sqrt(24 N q) 2**(s/2)
    B``; B is taken as 6 standard deviations of the sum's key-dependent error, with
    `FRESH_ERROR_UNITS` (an upper estimate, about 2**3.3 above the measured error of the
    symmetric encryption used here) per payload, growing as ``sqrt(summands)``. So the
    allowance is about a hundred times below what the measured error would allow (the
    module docstring's 3.9 million at 1,000 sites is 38,000 here).
    """
    if summands < 1:
        raise ConfigError(f"a sum has at least one payload; got {summands}.")
    n = context.poly_modulus_degree
    bound = 6 * FRESH_ERROR_UNITS * n / 8192 / context._layout.scale * math.sqrt(summands)
    return int((flooding_std / bound) ** 2 / (24 * n) / 2.0**security_bits)


class ReleaseCounter:
    """How many chunk decryptions a site released under one key set; refuses past an allowance.

    Kept in a file beside ``site.ckks`` (``site.ckks.released``, read and rewritten under
    an exclusive lock, flushed before the decryption is released) or, for a key set made
    in memory, in memory: there every simulated site shares one counter, the key set's
    true total.

    Parameters
    ----------
    path : Path or None
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._count = 0

    def released(self) -> int:
        if self.path is None:
            return self._count
        if not self.path.exists():
            return 0
        return self._parse(self.path.read_text(encoding="ascii"))

    def charge(self, chunks: int, allowance: int, *, site: str) -> None:
        """Count `chunks` more releases, or `ProtocolError` (nothing counted) past `allowance`."""
        if self.path is None:
            self._count = self._checked(self._count, chunks, allowance, site)
            return
        self.path.touch(mode=0o600, exist_ok=True)
        with self.path.open("r+", encoding="ascii") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                count = self._checked(self._parse(f.read()), chunks, allowance, site)
                f.seek(0)
                f.truncate()
                f.write(f"{count}\n")
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _parse(self, text: str) -> int:
        try:
            return int(text.strip() or 0)
        except ValueError:
            raise ConfigError(f"{self.path} is not a count of released decryptions; this site "
                              "refuses to decrypt until it is repaired (or the key set is "
                              "renewed).") from None

    @staticmethod
    def _checked(count: int, chunks: int, allowance: int, site: str) -> int:
        if count + chunks > allowance:
            raise ProtocolError(
                f"ckks site {site}: this key set has released {count} chunk decryptions here; "
                f"{chunks} more would pass the {allowance} it may release and keep "
                f"{RELEASE_SECURITY_BITS} bits of security against key recovery (Li-"
                "Micciancio). Refused: renew the key set (`fedcare keys init --overwrite`).")
        return count + chunks


class AggregatorContext(_KeyContext):
    """The aggregator's: parameters and key-set id, no key; adds, cannot encrypt or decrypt.

    Parameters
    ----------
    context : tenseal.Context
        A CKKS context with a global scale and no secret or public key.
    key_set : bytes
        The key set's random id (`KEY_SET_ID_BYTES`).
    where : str
        Where it came from, for error messages (a path).

    Raises
    ------
    ConfigError
        If `context` holds a secret key or a public key.
    """

    def __init__(self, context: ts.Context, *, key_set: bytes,
                 where: str = "the context") -> None:
        super().__init__(context, key_set=key_set, where=where)
        if context.is_private():
            raise ConfigError(f"{where} holds the secret key: refusing to give the aggregator "
                              f"a secret key (it must get {AGGREGATOR_FILE}, never {SITE_FILE}).")
        if _holds_public_key(context):
            raise ConfigError(f"{where} holds a public key, with which the aggregator could "
                              f"encrypt values of its choosing; {AGGREGATOR_FILE} from "
                              "`fedcare keys init` holds none.")


@dataclass(frozen=True)
class KeyFiles:
    """What `generate_keys` wrote.

    Attributes
    ----------
    site : Path
        ``site.ckks``: secret context, mode 0600, for every site.
    aggregator : Path
        ``aggregator.ckks``: parameters and key-set id, mode 0600, for the aggregator.
    manifest : Path
        ``keys.json``: parameters and fingerprint, no secrets.
    fingerprint : str
        SHA-256 hex of ``aggregator.ckks``.
    params : CkksParameters
    """

    site: Path
    aggregator: Path
    manifest: Path
    fingerprint: str
    params: CkksParameters


@dataclass(frozen=True)
class CkksPayload:
    """An encrypted vector, or an encrypted sum of vectors, as it travels.

    Attributes
    ----------
    fingerprint : str
        Fingerprint of the key set it was encrypted under.
    length : int
        Number of real values (>= 1).
    chunks : tuple of bytes
        Serialized TenSEAL CKKS vectors, ``ceil(length / (N/2))`` of them, each
        of ``N/2`` slots (the last zero-padded).
    """

    fingerprint: str
    length: int
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        """Total size of the serialized ciphertexts."""
        return sum(len(chunk) for chunk in self.chunks)


def create_site_context(params: CkksParameters = DEFAULT_PARAMETERS) -> SiteContext:
    """A fresh symmetric key set in memory: the site's context (``.public()``: the aggregator's).

    No Galois keys are generated (they only serve rotations); TenSEAL makes
    relinearisation keys regardless, which are never saved. The key-set id
    comes from `secrets`.
    """
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = 2.0**params.global_scale_bits
    return SiteContext(context, key_set=secrets.token_bytes(KEY_SET_ID_BYTES),
                       where="the new context")


def generate_keys(directory: str | os.PathLike[str],
                  params: CkksParameters = DEFAULT_PARAMETERS, *,
                  overwrite: bool = False) -> KeyFiles:
    """Make a key set and write ``site.ckks``, ``aggregator.ckks`` and ``keys.json`` to `directory`.

    Run it on a trusted machine, then copy ``site.ckks`` to every site and
    ``aggregator.ckks`` to the aggregator out of band. Both key files are
    created with mode 0600 (never wider; the umask may narrow it); the
    directory is created with mode 0700 if missing. Each file is written
    under a temporary name and renamed, so a crash leaves no half-written
    key. Before anything is written, both files' bytes are reloaded and
    checked: the aggregator's holds no key, and both give the same fingerprint.

    Parameters
    ----------
    directory : path
    params : CkksParameters
    overwrite : bool
        Replace existing key files (every site then needs the new ``site.ckks``).

    Returns
    -------
    KeyFiles

    Raises
    ------
    ConfigError
        If one of the three files exists and `overwrite` is False.
    """
    folder = Path(directory)
    site_path, aggregator_path, manifest_path = (folder / SITE_FILE, folder / AGGREGATOR_FILE,
                                                 folder / MANIFEST_FILE)
    if not overwrite:
        existing = [str(p) for p in (site_path, aggregator_path, manifest_path)
                    if p.exists() or p.is_symlink()]
        if existing:
            raise ConfigError(f"refusing to overwrite existing key files: {', '.join(existing)}. "
                              "Pass overwrite=True (fedcare keys init --overwrite) to replace "
                              f"them; every site then needs the new {SITE_FILE}.")
    site = create_site_context(params)
    secret_bytes = KEY_FILE_MAGIC + site.key_set + bytes(site.context.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False,
        save_relin_keys=False))
    public_bytes = _aggregator_file(site.key_set, site.context)
    aggregator = _parse_key_file(public_bytes, str(aggregator_path))
    reloaded = _parse_key_file(secret_bytes, str(site_path))
    fingerprint = hashlib.sha256(public_bytes).hexdigest()
    if not (isinstance(aggregator, AggregatorContext) and isinstance(reloaded, SiteContext)
            and fingerprint == site.fingerprint == aggregator.fingerprint
            == reloaded.fingerprint):
        raise RuntimeError("TenSEAL serialized the context differently after a reload; the "
                           "fingerprint would not match across files. Nothing was written.")
    manifest = {
        "format": _MANIFEST_FORMAT,
        "scheme": "CKKS",
        "library": f"tenseal {ts.__version__}",
        **asdict(params),
        "slots_per_ciphertext": params.slots,
        "max_abs_value": MAX_ABS_VALUE,
        "max_summands": MAX_SUMMANDS,
        "fingerprint": fingerprint,
        "fingerprint_of": f"SHA-256 of {AGGREGATOR_FILE} (parameters and key-set id)",
        "encryption": "symmetric (secret key); the aggregator holds no key",
        "site_file": SITE_FILE,
        "aggregator_file": AGGREGATOR_FILE,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_file(aggregator_path, public_bytes, mode=0o600)
        _write_file(site_path, secret_bytes, mode=0o600)
        _write_file(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write the key files to {folder}: {exc}.") from exc
    return KeyFiles(site=site_path, aggregator=aggregator_path, manifest=manifest_path,
                    fingerprint=fingerprint, params=params)


def load_context(path: str | os.PathLike[str]) -> SiteContext | AggregatorContext:
    """Load a key file: `SiteContext` if it holds a secret key, else `AggregatorContext`.

    Raises
    ------
    ConfigError
        Naming `path`, if it cannot be read, is not a CKKS context, or breaks
        the checks of `CkksParameters` (128-bit security, scale headroom).
    """
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read CKKS key file {where}: {exc.strerror or exc}.") from exc
    return _parse_key_file(data, where)


def _parse_key_file(data: bytes, where: str) -> SiteContext | AggregatorContext:
    head = len(KEY_FILE_MAGIC) + KEY_SET_ID_BYTES
    if not data.startswith(KEY_FILE_MAGIC) or len(data) <= head:
        raise ConfigError(f"{where} is not a fedcare CKKS key file (it does not start with "
                          f"{KEY_FILE_MAGIC!r}); expected {SITE_FILE} or {AGGREGATOR_FILE} from "
                          "`fedcare keys init` (key files of fedcare before symmetric key sets "
                          "must be made again with `fedcare keys init --overwrite`).")
    key_set = data[len(KEY_FILE_MAGIC):head]
    try:
        context = ts.context_from(data[head:])
    except Exception as exc:  # C++ exceptions reach Python as ValueError, RuntimeError, ...
        raise ConfigError(f"{where} does not hold a TenSEAL context after its header ({exc}); "
                          f"expected {SITE_FILE} or {AGGREGATOR_FILE} from `fedcare keys "
                          "init`.") from exc
    if context.is_private():
        return SiteContext(context, key_set=key_set, where=where)
    return AggregatorContext(context, key_set=key_set, where=where)


def load_site_context(path: str | os.PathLike[str]) -> SiteContext:
    """Load ``site.ckks``; `ConfigError` naming `path` if it is bad or holds no secret key."""
    context = load_context(path)
    if not isinstance(context, SiteContext):
        raise ConfigError(f"{path} holds no secret key; a site needs {SITE_FILE} "
                          f"(this looks like {AGGREGATOR_FILE}).")
    context.releases = ReleaseCounter(Path(str(path) + RELEASES_SUFFIX))
    return context


def load_aggregator_context(path: str | os.PathLike[str]) -> AggregatorContext:
    """Load ``aggregator.ckks``; `ConfigError` if it is bad or holds a secret key."""
    context = load_context(path)
    if not isinstance(context, AggregatorContext):
        raise ConfigError(f"{path} holds the secret key: refusing to give the aggregator a "
                          f"secret key (it must get {AGGREGATOR_FILE}, never {SITE_FILE}).")
    return context


def encrypt(context: SiteContext, vector: ArrayLike, *, site: str) -> CkksPayload:
    """Encrypt one site's update.

    Parameters
    ----------
    context : SiteContext
    vector : array_like, 1-D
        The update, converted to float64; every value finite with magnitude
        at most `MAX_ABS_VALUE`.
    site : str
        The site's name, for error messages.

    Returns
    -------
    CkksPayload
        ``ceil(len(vector) / (N/2))`` chunks; the last is zero-padded.

    Raises
    ------
    ProtocolError
        Naming the site and the first offending index, if the vector is not
        1-D and non-empty, or holds a NaN, an infinity or a value beyond
        `MAX_ABS_VALUE`. Nothing is encrypted then.
    """
    _require(context, SiteContext, "encrypt", SITE_FILE)
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ProtocolError(f"site {site!r}: the update must be a non-empty 1-D vector; "
                            f"got shape {values.shape}.")
    finite = np.isfinite(values)
    if not finite.all():
        index = int(np.argmin(finite))
        raise ProtocolError(f"site {site!r}: update value at index {index} is {values[index]}; "
                            "CKKS encrypts finite numbers only.")
    large = np.abs(values) > MAX_ABS_VALUE
    if large.any():
        index = int(np.argmax(large))
        raise ProtocolError(f"site {site!r}: update value at index {index} is {values[index]:.6g}; "
                            f"CKKS aggregation takes magnitudes up to {MAX_ABS_VALUE:.6g} "
                            f"(2**{int(math.log2(MAX_ABS_VALUE))}), so that a sum of "
                            f"{MAX_SUMMANDS} updates still decrypts.")
    slots = context.slots
    padded = np.zeros(-(-values.size // slots) * slots)
    padded[:values.size] = values
    chunks = tuple(bytes(ts.ckks_vector(context.context, padded[start:start + slots]).serialize())
                   for start in range(0, padded.size, slots))
    return CkksPayload(fingerprint=context.fingerprint, length=int(values.size), chunks=chunks)


def add(context: AggregatorContext, total: CkksPayload | None, payload: CkksPayload, *,
        site: str) -> CkksPayload:
    """Add one site's payload to the running total, with the aggregator's context only.

    Parameters
    ----------
    context : AggregatorContext
    total : CkksPayload or None
        The sum so far (None before the first payload).
    payload : CkksPayload
        What `site` sent.
    site : str
        The sender, for error messages.

    Returns
    -------
    CkksPayload
        The new total (`payload` itself, once checked, when `total` is None).

    Raises
    ------
    ProtocolError
        Naming the site and what is wrong: another key set's fingerprint, a
        length or chunk count that does not match, or a chunk that is
        truncated, unparsable or of the wrong size, scale or parameters (see
        the module docstring for what cannot be detected here). The total is
        unchanged (a new payload is returned, nothing is modified in place).
    """
    _require(context, AggregatorContext, "add", AGGREGATOR_FILE)
    incoming = _open(context, payload, sender=f"site {site!r}")
    if total is None:
        return payload
    if payload.length != total.length:
        raise ProtocolError(f"site {site!r} sent {payload.length} values; the running total "
                            f"holds {total.length}.")
    running = _open(context, total, sender=f"the running total (before site {site!r})")
    for partial, addend in zip(running, incoming, strict=True):
        partial.add_(addend)  # in place on a vector just parsed from bytes: nothing is shared
    return CkksPayload(fingerprint=context.fingerprint, length=total.length,
                       chunks=tuple(bytes(partial.serialize()) for partial in running))


def decrypt(context: SiteContext, aggregate: CkksPayload, *, noise: NoiseSource,
            flooding_std: float = DEFAULT_FLOODING_STD,
            grid: float = DEFAULT_GRID) -> NDArray[np.float64]:
    """Decrypt an aggregate, flood it with Gaussian noise and round it: safe to release.

    Parameters
    ----------
    context : SiteContext
    aggregate : CkksPayload
        The sum from the aggregator.
    noise : NoiseSource
        Source of the flooding noise: `~fedcare.privacy.noise.SecureNoise` in
        production (a predictable source lets anyone subtract the noise and
        run the Li--Micciancio attack).
    flooding_std : float
        Standard deviation of the noise added to every value, in the values'
        units; at least `SiteContext.flooding_floor` (``2**-42`` with the
        default parameters). Default ``2**-20`` (see the threat model).
    grid : float
        A power of two; the result is rounded to its multiples. Default
        ``2**-24``.

    Returns
    -------
    ndarray of float64, shape (aggregate.length,)
        ``grid * rint((sum + N(0, flooding_std**2)) / grid)``, every value a
        multiple of `grid`.

    Raises
    ------
    ConfigError
        If `flooding_std` is below the floor or `grid` is not a power of two.
    ProtocolError
        If the aggregate is malformed (as in `add`), or any slot of any chunk
        decrypts beyond `SUM_BOUND`: it was corrupted, made under another key
        set or summed too many payloads. Nothing is returned then.
    """
    _require(context, SiteContext, "decrypt", SITE_FILE)
    floor = context.flooding_floor
    if not (math.isfinite(flooding_std) and flooding_std >= floor):
        raise ConfigError(f"flooding_std must be finite and >= {floor:.3g} (2**17 times the "
                          f"decryption error of one ciphertext at scale 2**{context.scale_bits}), "
                          f"so that no exact decryption is released; got {flooding_std!r}.")
    if not (math.isfinite(grid) and grid > 0 and math.frexp(grid)[0] == 0.5):
        raise ConfigError(f"grid must be a power of two (every multiple then is exact in "
                          f"float64), e.g. 2**-24; got {grid!r}.")
    vectors = _open(context, aggregate, sender="the aggregate")
    # TenSEAL returns the real parts; SEAL drops the imaginary ones (pure error) in its decoder.
    slots = np.concatenate([np.asarray(vector.decrypt(), dtype=np.float64) for vector in vectors])
    implausible = ~(np.abs(slots) <= SUM_BOUND)
    if implausible.any():
        index = int(np.argmax(implausible))
        # The value itself stays out of the message: it is an exact decryption.
        raise ProtocolError(
            f"the aggregate decrypts beyond {SUM_BOUND:.3g} (the most a sum of {MAX_SUMMANDS} "
            f"updates of magnitude <= {MAX_ABS_VALUE:.3g} can reach) in chunk "
            f"{index // context.slots + 1} of {len(vectors)}, slot {index % context.slots}: it "
            "was corrupted, made under another key set or sums too many updates. Nothing was "
            "released.")
    # A copy, not a view: the padding slots of `slots` are exact decryptions of zero, i.e.
    # the bare key-dependent error, and must not stay reachable through `.base`.
    values = slots[:aggregate.length].copy()
    del slots
    # Drawn in float64: float32 noise would sit on a grid of about 2**-44 here, coarse next
    # to the key-dependent error it has to hide (2**-62 a ciphertext).
    values += noise.gaussian(values.size, flooding_std, dtype=torch.float64).numpy()
    values /= grid  # exact: grid is a power of two
    np.rint(values, out=values)
    values *= grid
    return values



# --- the `Scheme` behind protection.scheme = "ckks" -----------------------------------------


@dataclass(frozen=True)
class KeyCheck:
    """Setup message: the aggregator's key-set fingerprint; a site answers with its own."""

    round_number: int
    fingerprint: str


@dataclass(frozen=True)
class DecryptRequest:
    """Reveal message: the summed ciphertext, sent to one site that contributed to it.

    ``contributors`` are the indices of the sites whose payloads the aggregator added.
    """

    round_number: int
    aggregate: CkksPayload
    contributors: tuple[int, ...] = ()


MIN_DECRYPT_CONTRIBUTORS = MIN_CONTRIBUTORS["ckks"]
"""Fewest distinct sites a sum must hold for a site to decrypt it: one site's payload
decrypted is that site's update."""


class CkksScheme:
    """`ckks` behind the `~fedcare.protection.base.Scheme` interface.

    Messages of a round: the aggregator sends each selected site a `KeyCheck`
    (a site holding another key set refuses, and is left out of the round);
    each site sends its encrypted payload; the aggregator adds them and sends
    the sum, in a `DecryptRequest`, to the first contributor, which answers
    with the flooded, rounded decryption (`decrypt`); if it fails, the next
    one is asked. So one site releases one decryption per round. A site
    decrypts at most once per round and never an aggregate equal to its own
    payload (an aggregator passing one ciphertext off as the sum).

    Parameters
    ----------
    site : SiteContext or None
        The sites' key material; None on a machine that only aggregates.
    aggregator : AggregatorContext or None
        The aggregator's; None on a site machine.

    Raises
    ------
    ConfigError
        If neither is given, or their fingerprints differ.
    """

    name = "ckks"

    def __init__(self, site: SiteContext | None, aggregator: AggregatorContext | None) -> None:
        if site is None and aggregator is None:
            raise ConfigError("ckks protection needs a site or an aggregator context.")
        if site is not None and aggregator is not None \
                and site.fingerprint != aggregator.fingerprint:
            raise ConfigError(f"{SITE_FILE} (key set {site.fingerprint[:16]}...) and "
                              f"{AGGREGATOR_FILE} ({aggregator.fingerprint[:16]}...) come from "
                              "different `fedcare keys init` runs.")
        self.site_context = site
        self.aggregator_context = aggregator

    @classmethod
    def from_keys(cls, directory: str | os.PathLike[str] = "") -> CkksScheme:
        """The key files found in `directory` (``fedcare keys init``), or a fresh in-memory set.

        An empty `directory` makes a new key set for a one-process simulation.
        Otherwise whichever of ``site.ckks`` and ``aggregator.ckks`` it holds
        is loaded (a site machine has only the first, the aggregator's only
        the second); `ConfigError` if it holds neither.
        """
        if not directory:
            site = create_site_context()
            return cls(site, site.public())
        folder = Path(directory)
        site_file, aggregator_file = folder / SITE_FILE, folder / AGGREGATOR_FILE
        if not site_file.exists() and not aggregator_file.exists():
            raise ConfigError(f"protection.keys = {str(directory)!r} holds neither {SITE_FILE} "
                              f"nor {AGGREGATOR_FILE}; make them with `fedcare keys init "
                              f"{directory}`.")
        return cls(load_site_context(site_file) if site_file.exists() else None,
                   load_aggregator_context(aggregator_file) if aggregator_file.exists() else None)

    def site_session(self, round_number: int, site: int) -> CkksSiteSession:
        if self.site_context is None:
            raise ConfigError(f"ckks: this machine holds no {SITE_FILE}, so it cannot act as a "
                              "site.")
        return CkksSiteSession(self.site_context, round_number, site)

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> CkksAggregatorSession:
        if self.aggregator_context is None:
            raise ConfigError(f"ckks: this machine holds no {AGGREGATOR_FILE}, so it cannot "
                              "aggregate.")
        return CkksAggregatorSession(self.aggregator_context, round_number, cohort, length)


class CkksSiteSession:
    """A site's side of one ckks round: encrypts its payload, decrypts the sum once."""

    def __init__(self, context: SiteContext, round_number: int, site: int) -> None:
        self.context = context
        self.round_number = round_number
        self.site = str(site + 1)  # as secagg numbers sites
        self._checked = False
        self._sent: tuple[bytes, ...] | None = None
        self._decrypted = False
        self._needed = MIN_DECRYPT_CONTRIBUTORS

    def handle(self, message: object) -> object:
        if isinstance(message, KeyCheck | DecryptRequest) \
                and message.round_number != self.round_number:
            raise ProtocolError(f"ckks site {self.site}: a {type(message).__name__} of round "
                                f"{message.round_number} arrived in round {self.round_number}.")
        if isinstance(message, KeyCheck):
            if message.fingerprint != self.context.fingerprint:
                raise ProtocolError(
                    f"ckks site {self.site} holds key set {self.context.fingerprint[:16]}..., "
                    f"the aggregator {message.fingerprint[:16]}...: they come from different "
                    "`fedcare keys init` runs; the site sits this round out.")
            self._checked = True
            return KeyCheck(self.round_number, self.context.fingerprint)
        if isinstance(message, DecryptRequest):
            return torch.from_numpy(self._decrypt(message))
        raise ProtocolError(f"ckks site {self.site}: unexpected message "
                            f"{type(message).__name__}.")

    def require_contributors(self, needed: int, *, cohort: int) -> None:
        """Decrypt only a sum the aggregator says holds `needed` sites (it has no roster of
        the cohort to check against)."""
        self._needed = max(MIN_DECRYPT_CONTRIBUTORS, needed)

    def protect(self, payload: torch.Tensor) -> CkksPayload:
        if not self._checked:
            raise ProtocolError(f"ckks site {self.site}: asked to encrypt before the key check.")
        encrypted = encrypt(self.context, payload.double().numpy(), site=self.site)
        self._sent = encrypted.chunks
        return encrypted

    def _decrypt(self, request: DecryptRequest) -> NDArray[np.float64]:
        """The flooded decryption of a sum, after every check this site can make.

        It checks: it contributed this round; it has not decrypted this round; the
        ciphertext is not its own payload; the aggregator says the sum holds at least
        `MIN_DECRYPT_CONTRIBUTORS` distinct sites, itself among them; the key set's
        release allowance for a sum of that many payloads (`release_allowance`) is not
        passed by the releases this site has counted. It cannot check that the
        ciphertext really is the sum of those sites' payloads (CKKS has no integrity: an
        aggregator that deviates from the protocol can send another site's payload), nor
        count the decryptions other sites released under the same key set.
        """
        aggregate = request.aggregate
        contributors = request.contributors
        if self._sent is None:
            raise ProtocolError(f"ckks site {self.site}: asked to decrypt a sum it did not "
                                "contribute to.")
        if self._decrypted:
            raise ProtocolError(f"ckks site {self.site}: asked to decrypt a second time in round "
                                f"{self.round_number}; every decryption released counts "
                                "towards the key set's allowance, so it is refused.")
        if isinstance(aggregate, CkksPayload) and aggregate.chunks == self._sent:
            raise ProtocolError(f"ckks site {self.site}: the aggregate is this site's own "
                                "ciphertext, not a sum; refused.")
        me = int(self.site) - 1
        if not (isinstance(contributors, tuple) and all(_is_int(c) for c in contributors)
                and len(set(contributors)) == len(contributors)
                and len(contributors) >= self._needed and me in contributors):
            raise ProtocolError(
                f"ckks site {self.site}: asked to decrypt a sum of sites {contributors!r}; it "
                f"decrypts only a sum of at least {self._needed} distinct sites' payloads that "
                "includes its own (2, or the sites distributed DP noise needs). Refused.")
        if not isinstance(aggregate, CkksPayload):
            raise ProtocolError(f"ckks site {self.site}: asked to decrypt a "
                                f"{type(aggregate).__name__}; expected a CkksPayload.")
        allowance = release_allowance(self.context, summands=len(contributors))
        self.context.releases.charge(len(aggregate.chunks), allowance, site=self.site)
        self._decrypted = True
        return decrypt(self.context, aggregate, noise=SecureNoise())


class CkksAggregatorSession:
    """The aggregator's side of one ckks round: checks keys, adds ciphertexts, asks for the sum.

    The running sum stays parsed in memory (each payload is parsed and checked
    once, then added in place) and is serialised once, for the decrypting site.
    """

    def __init__(self, context: AggregatorContext, round_number: int, cohort: Sequence[int],
                 length: int) -> None:
        self.context = context
        self.round_number = round_number
        self.cohort = list(cohort)
        self.length = length
        self._sum: list[Any] | None = None
        self.contributors: list[int] = []

    @property
    def total(self) -> CkksPayload | None:
        """The encrypted sum so far, as it travels (None before the first payload)."""
        if self._sum is None:
            return None
        return CkksPayload(fingerprint=self.context.fingerprint, length=self.length,
                           chunks=tuple(bytes(vector.serialize()) for vector in self._sum))

    def setup(self, exchange: Exchange) -> list[int]:
        check = KeyCheck(self.round_number, self.context.fingerprint)
        replies = exchange(dict.fromkeys(self.cohort, check))
        return [i for i, reply in replies.items() if reply == check]

    def add(self, site: int, payload: object) -> None:
        if isinstance(payload, CkksPayload) and payload.length != self.length:
            raise ProtocolError(f"ckks: site {site + 1} encrypted {payload.length} values; the "
                                f"model's payload has {self.length}.")
        incoming = _open(self.context, cast(CkksPayload, payload), sender=f"site {site + 1!r}")
        if self._sum is None:
            self._sum = incoming
        else:
            for partial, addend in zip(self._sum, incoming, strict=True):
                partial.add_(addend)
        self.contributors.append(site)

    def reveal(self, exchange: Exchange) -> torch.Tensor:
        total = self.total
        if total is None:
            raise ProtocolError(f"ckks: round {self.round_number} has no payload to reveal.")
        request = DecryptRequest(self.round_number, total, tuple(self.contributors))
        for site in self.contributors:
            reply = exchange({site: request}).get(site)
            if isinstance(reply, torch.Tensor) and reply.shape == (self.length,):
                return reply
        raise ProtocolError(f"ckks: no site of round {self.round_number} returned the decrypted "
                            "sum; the round is lost.")


def _open(keys: _KeyContext, payload: CkksPayload, *, sender: str) -> list[Any]:
    """Parse and check every chunk of `payload`; `ProtocolError` naming `sender` otherwise."""
    if not isinstance(payload, CkksPayload):
        raise ProtocolError(f"{sender} sent a {type(payload).__name__}; expected a CkksPayload.")
    if payload.fingerprint != keys.fingerprint:
        raise ProtocolError(
            f"{sender}: encrypted under key set {str(payload.fingerprint)[:16]}..., expected "
            f"{keys.fingerprint[:16]}... (SHA-256 of {AGGREGATOR_FILE}); was it given the "
            f"{SITE_FILE} of another `fedcare keys init`?")
    length = payload.length
    if not _is_int(length) or length < 1:
        raise ProtocolError(f"{sender}: length must be an integer >= 1; got {length!r}.")
    chunks = payload.chunks
    expected = -(-length // keys.slots)
    if not isinstance(chunks, tuple) or len(chunks) != expected:
        found = len(chunks) if isinstance(chunks, tuple) else type(chunks).__name__
        raise ProtocolError(f"{sender}: {found} ciphertext chunks for {length} values; expected "
                            f"{expected} ({keys.slots} values per chunk).")
    vectors = []
    for index, chunk in enumerate(chunks):
        where = f"{sender}: ciphertext chunk {index + 1} of {len(chunks)}"
        if not isinstance(chunk, bytes):
            raise ProtocolError(f"{where} is a {type(chunk).__name__}; expected bytes.")
        try:
            vector = ts.ckks_vector_from(keys.context, chunk)
            problem = _ciphertext_problem(vector, keys._layout)
        except Exception as exc:  # C++ exceptions reach Python as ValueError, RuntimeError, ...
            raise ProtocolError(f"{where} cannot be read ({exc}): truncated, corrupted, or not a "
                                "CKKS vector of these parameters.") from exc
        if problem:
            raise ProtocolError(f"{where} {problem}.")
        vectors.append(vector)
    return vectors


def _ciphertext_problem(vector: ts.CKKSVector, layout: _Layout) -> str | None:
    if vector.size() != layout.slots:
        return f"holds {vector.size()} values; expected {layout.slots}"
    parts = vector.ciphertext()
    if len(parts) != 1:
        return f"holds {len(parts)} ciphertexts; expected 1"
    ciphertext = parts[0]
    if ciphertext.size() != 2:
        return f"has {ciphertext.size()} polynomials; expected 2 (sums of fresh ciphertexts)"
    if tuple(ciphertext.parms_id()) != layout.parms_id:
        return "is not at the top modulus level of these parameters"
    if ciphertext.scale != layout.scale:
        return f"has scale {ciphertext.scale!r}; expected 2**{layout.scale_bits}"
    if not ciphertext.is_ntt_form():
        return "is not in NTT form, as CKKS ciphertexts are"
    if ciphertext.is_transparent():
        return "is transparent (its mask is zero, so its values are in the clear)"
    return None


def _inspect(context: ts.Context, where: str) -> _Layout:
    """Check a loaded context as `CkksParameters` checks new ones; `ConfigError` naming `where`."""
    try:
        seal = context.seal_context().data
        top = seal.first_context_data()
        scheme = top.parms().scheme()
        n = int(top.parms().poly_modulus_degree())
        data_bits = int(top.total_coeff_modulus_bit_count())
        key_bits = int(seal.key_context_data().total_coeff_modulus_bit_count())
        parms_id = tuple(int(word) for word in seal.first_parms_id())
    except Exception as exc:  # C++ exceptions reach Python as ValueError, RuntimeError, ...
        raise ConfigError(f"{where} is not a usable TenSEAL context ({exc}).") from exc
    if scheme != ts.SCHEME_TYPE.CKKS.value:
        raise ConfigError(f"{where} holds a {scheme.name} context; expected CKKS.")
    problem = _security_problem(n, key_bits)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    try:
        scale = float(context.global_scale)
    except Exception as exc:  # TenSEAL raises ValueError("no global scale")
        raise ConfigError(f"{where} has no global scale ({exc}).") from exc
    scale_bits = math.log2(scale) if scale > 0 else math.nan
    if not scale_bits.is_integer():
        raise ConfigError(f"{where} has scale {scale!r}; expected a power of two.")
    problem = _scale_problem(data_bits, int(scale_bits))
    if problem:
        raise ConfigError(f"{where}: scale 2**{int(scale_bits)}: {problem}")
    return _Layout(poly_modulus_degree=n, data_bits=data_bits, scale_bits=int(scale_bits),
                   parms_id=parms_id)


def _parameters_only(context: ts.Context) -> bytes:
    """TenSEAL's serialization of `context` without any key: parameters and scale."""
    return bytes(context.serialize(save_public_key=False, save_secret_key=False,
                                   save_galois_keys=False, save_relin_keys=False))


def _aggregator_file(key_set: bytes, context: ts.Context) -> bytes:
    """``aggregator.ckks`` of a key set: the header, the id, the parameters; its SHA-256 is the
    fingerprint."""
    return KEY_FILE_MAGIC + key_set + _parameters_only(context)


def _holds_public_key(context: ts.Context) -> bool:
    try:
        return bool(context.has_public_key())
    except ValueError:  # TenSEAL: "has_public_key is not supported for symmetric encryption"
        return False


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    # Created with its final mode (never chmod-ed after the bytes are in), under a fresh
    # name, then renamed over `path`: no window where a key is readable by others or
    # half-written under its real name.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _require(context: object, kind: type[_KeyContext], action: str, file: str) -> None:
    if not isinstance(context, kind):
        raise ConfigError(f"{action} needs the {kind.__name__} (from {file}); "
                          f"got {type(context).__name__}.")


def _benchmark(sizes: tuple[int, ...] = (10_000, 100_000), sites: int = 10) -> None:
    """Print the cost table of the module docstring (``python -m fedcare.protection.ckks``)."""

    class ZeroNoise:
        """Times `decrypt` without the noise draw, which `flood_ms` times on its own."""

        secure = False

        def gaussian(self, n: int, std: float, *, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype)

    def median_ms(seconds: list[float]) -> float:
        return 1e3 * float(np.median(seconds))

    keygen = []
    for _ in range(5):
        start = time.perf_counter()
        keys = create_site_context()
        keygen.append(time.perf_counter() - start)
    public, noise = keys.public(), SecureNoise()
    print(f"{DEFAULT_PARAMETERS}: keygen {median_ms(keygen):.0f} ms")
    print("values  chunks  encrypt_ms  add_ms  decrypt_ms  flood_ms  bytes  max_abs_error")
    rng = np.random.default_rng(0)
    for size in sizes:
        updates = [rng.normal(0.0, 1e3, size) for _ in range(sites)]
        encrypt_s, add_s, decrypt_s, flood_s = [], [], [], []
        total: CkksPayload | None = None
        for index, update in enumerate(updates):
            start = time.perf_counter()
            payload = encrypt(keys, update, site=str(index))
            encrypt_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            total = add(public, total, payload, site=str(index))
            add_s.append(time.perf_counter() - start)
        assert total is not None
        for _ in range(5):
            start = time.perf_counter()
            decrypt(keys, total, noise=cast(NoiseSource, ZeroNoise()))
            decrypt_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            noise.gaussian(size, DEFAULT_FLOODING_STD)
            flood_s.append(time.perf_counter() - start)
        exact = np.concatenate([ts.ckks_vector_from(keys.context, chunk).decrypt()
                                for chunk in total.chunks])[:size]
        error = float(np.max(np.abs(exact - np.sum(updates, axis=0))))
        # The first add only checks the payload; the others parse, add and re-serialize.
        print(f"{size:,}  {len(total.chunks)}  {median_ms(encrypt_s):.1f}  "
              f"{median_ms(add_s[1:]):.1f}  {median_ms(decrypt_s):.1f}  "
              f"{median_ms(flood_s):.1f}  {payload.nbytes:,}  {error:.1e}")


if __name__ == "__main__":
    _benchmark()
