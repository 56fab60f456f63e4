"""Noise for differential privacy, from a cryptographically secure source.

Why ChaCha20
------------
DP noise must be unpredictable to whoever sees the noised value: if an
adversary can reproduce the generator's state (a Mersenne Twister after 624
outputs, or any seeded generator whose seed leaks or is guessed), they subtract
the noise and the guarantee is gone. Opacus's ``secure_mode`` answers this
with torchcsprng, which cannot be installed here, so `SecureNoise` builds the
same thing from the ``cryptography`` package: the ChaCha20 keystream (RFC 8439)
under a fresh 256-bit key from ``os.urandom`` is indistinguishable from
uniform bits for anyone without the key, OpenSSL produces it at about 2 GB/s
on this machine, and a streaming encryptor hands out the keystream in any amount
without re-keying. The key never leaves the object, and there is no seed.

The IETF variant has a 32-bit block counter: one (key, nonce) pair yields
2**32 blocks (256 GiB) before the keystream would repeat. The counter starts at
0 and the source re-keys from ``os.urandom`` every 64 GiB, so a long run never
comes near the wrap.

From bits to noise
------------------
Every sample starts from 64-bit words (little-endian, 8 keystream bytes each),
converted in bulk: numpy for the bits, torch's vectorised float64 functions
for the logarithms and trigonometry:

- **Uniform** in (0, 1]: the top 53 bits of a word, ``m``, give
  ``(m + 1) * 2**-53``; every value is exact in float64 and never 0, so the
  logarithms below are always finite.
- **Gaussian**: Box--Muller. Two uniforms ``u1``, ``u2`` give
  ``r = sqrt(-2 ln u1)`` and the pair ``r cos(2 pi u2)``, ``r sin(2 pi u2)``,
  two independent N(0, 1) draws; both are used, so one Gaussian costs one word.
- **Laplace**: inverse CDF. The Laplace(0, b) quantile function is
  ``-b sgn(p - 1/2) ln(1 - 2|p - 1/2|)``; it is evaluated as a sign and an
  exponential, ``sgn * (-b ln u)``, with the sign taken from the word's lowest
  bit (which the 53-bit uniform does not use) and ``u`` in (0, 1], so ``p = 1``
  cannot produce ``ln 0``.
- **Bernoulli(p)**: ``u <= p``; the probability is ``p`` rounded down to a
  multiple of 2**-53 (exact for ``p`` in {0, 1}).

Everything is computed in float64 and cast to float32 at the end.

Known caveat: floating-point noise is not the ideal distribution
----------------------------------------------------------------
The theorems assume real-valued noise. Mironov (2012), "On significance of the
least significant bits for differential privacy" (CCS '12), shows that
textbook floating-point Laplace samplers leave gaps and non-uniform spacing in
the low bits of ``value + noise``: some outputs can only come from one of two
neighbouring inputs, which breaks the guarantee outright for those outputs. The same reasoning
applies to Box--Muller Gaussians, and the float32 cast adds its own rounding.
The 53-bit uniforms also truncate the tails: no Gaussian exceeds about 8.6
standard deviations (``sqrt(2 * 53 ln 2)``) and no Laplace draw about 36.7
scales. **We do not implement the snapping mechanism or a discrete Gaussian**,
so the guarantee these samplers give is that of the real-valued mechanism up
to these floating-point effects, which are not accounted for.

Throughput
----------
Measured on the development machine (2 cores, AMD EPYC, torch on one thread),
``SecureNoise().gaussian(1_000_000, 1.0)``: about 19 ms at best, i.e. about
50 million Gaussians per second, with the machine otherwise lightly loaded;
38-45 ms (22-26 million per second) while other jobs kept both cores busy.
``SeededNoise`` is only slightly faster: the keystream costs about 4 ms per million
draws, the logarithm, square root and sine/cosine the rest.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from fedcare.errors import ConfigError

_UNIT = 2.0**-53
"""Spacing of the 53-bit uniforms: one float64 mantissa."""

_REKEY_BYTES = 2**36
"""Keystream bytes per ChaCha20 key: 2**30 blocks, a quarter of the 32-bit counter's range."""


class InsecureNoiseWarning(UserWarning):
    """Noise comes from a seeded, predictable generator: not differentially private."""


class NoiseSource(Protocol):
    """Where DP noise comes from: the interface every mechanism codes against.

    Attributes
    ----------
    secure : bool
        True only for a cryptographically secure source (`SecureNoise`).
    """

    secure: bool

    def gaussian(self, n: int, std: float, *, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
        """``n`` independent N(0, std**2) draws, shape ``(n,)``; ``std >= 0``; float32 unless
        `dtype` is ``torch.float64`` (CKKS flooding: see `fedcare.protection.ckks.decrypt`)."""
        ...

    def laplace(self, n: int, scale: float) -> torch.Tensor:
        """``n`` independent Laplace(0, scale) draws (variance ``2 scale**2``), float32."""
        ...

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` independent uniforms in (0, 1], float64, on a grid of 2**-53."""
        ...

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent booleans, each True with probability ``p`` in [0, 1]."""
        ...


class _WordNoise:
    """Turns a stream of uniform 64-bit words into noise; subclasses supply the words."""

    secure: bool

    def _words(self, n: int) -> npt.NDArray[np.uint64]:
        raise NotImplementedError

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` independent uniforms in (0, 1], float64, on a grid of 2**-53.

        Parameters
        ----------
        n : int
            Number of draws, >= 0.

        Returns
        -------
        ndarray of float64, shape (n,)
            Values ``k * 2**-53`` for ``k`` in 1..2**53, each equally likely.
        """
        _check_count(n)
        return _to_uniform(self._words(n))

    def gaussian(self, n: int, std: float, *, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
        """``n`` independent N(0, std**2) draws by Box--Muller, computed in float64.

        Parameters
        ----------
        n : int
            Number of draws, >= 0.
        std : float
            Standard deviation, finite and >= 0 (in the units of the values the
            noise is added to); 0 gives zeros and uses no random bits.

        dtype : torch.dtype
            ``torch.float32`` (model updates) or ``torch.float64``.

        Returns
        -------
        Tensor of `dtype`, shape (n,)
        """
        _check_count(n)
        _check_spread("std", std)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"gaussian noise is float32 or float64; got {dtype}.")
        if std == 0 or n == 0:
            return torch.zeros(n, dtype=dtype)
        pairs = (n + 1) // 2
        # numpy turns bits into uniforms; torch's vectorised float64 log, cos and
        # sin (SLEEF, 1 ulp) are about 4x faster than numpy's on this CPU.
        u = torch.from_numpy(_to_uniform(self._words(2 * pairs)))
        radius = u[:pairs].log_().mul_(-2.0).sqrt_().mul_(std)
        angle = u[pairs:].mul_(2.0 * math.pi)
        out = torch.cat([torch.cos(angle).mul_(radius), angle.sin_().mul_(radius)])
        return out[:n].to(dtype)

    def laplace(self, n: int, scale: float) -> torch.Tensor:
        """``n`` independent Laplace(0, scale) draws by the inverse CDF.

        Parameters
        ----------
        n : int
            Number of draws, >= 0.
        scale : float
            Scale ``b``, finite and >= 0 (variance ``2 b**2``); 0 gives zeros.

        Returns
        -------
        Tensor of float32, shape (n,)
        """
        _check_count(n)
        _check_spread("scale", scale)
        if scale == 0 or n == 0:
            return torch.zeros(n, dtype=torch.float32)
        words = self._words(n)
        magnitude = torch.from_numpy(_to_uniform(words)).log_().mul_(-scale)
        # Bit 0 is not among the 53 bits of the uniform: an independent fair sign.
        sign = torch.from_numpy((words & np.uint64(1)).astype(np.float64)).mul_(-2.0).add_(1.0)
        return magnitude.mul_(sign).float()

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent booleans, each True with probability ``p``.

        Parameters
        ----------
        n : int
            Number of draws, >= 0.
        p : float
            Probability in [0, 1], e.g. a Poisson sampling rate. It is used
            rounded down to a multiple of 2**-53; 0 and 1 are exact.

        Returns
        -------
        Tensor of bool, shape (n,)
        """
        _check_count(n)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"p must be in [0, 1]; got {p!r}.")
        return torch.from_numpy(_to_uniform(self._words(n)) <= p)


class SecureNoise(_WordNoise):
    """Noise from the ChaCha20 keystream under a key from ``os.urandom``.

    The only source fit for a DP release: there is no seed, every instance
    draws a fresh 256-bit key, and two instances never share a stream. One
    instance keeps one streaming encryptor; it is not meant to be shared
    between threads.
    """

    def __init__(self) -> None:
        self.secure = True
        self._encryptor = _chacha20()
        self._left = _REKEY_BYTES

    def _keystream(self, n_bytes: int) -> bytes:
        chunks = []
        while n_bytes > 0:
            if self._left == 0:
                self._encryptor, self._left = _chacha20(), _REKEY_BYTES
            take = min(n_bytes, self._left)
            # Encrypting zeros yields the keystream itself.
            chunks.append(self._encryptor.update(bytes(take)))
            self._left -= take
            n_bytes -= take
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _words(self, n: int) -> npt.NDArray[np.uint64]:
        return np.frombuffer(self._keystream(8 * n), dtype="<u8").astype(np.uint64, copy=False)


class SeededNoise(_WordNoise):
    """Reproducible noise from a seeded Philox generator: for tests only.

    Anyone who knows or guesses the seed can recompute the noise and subtract
    it, so results are **not** differentially private; constructing one
    always emits `InsecureNoiseWarning`.

    Parameters
    ----------
    seed : int
        Seed of ``numpy.random.Philox``, >= 0.
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0; got {seed!r}.")
        warnings.warn(
            "SeededNoise is NOT differentially private: noise is predictable from the seed, "
            "so anyone who knows or guesses it can subtract the noise. Use it only for tests "
            "and reproducible experiments, never for data that must stay private "
            "(set privacy.secure = true).",
            InsecureNoiseWarning, stacklevel=2)
        self.secure = False
        self._bits = np.random.Philox(int(seed))

    def _words(self, n: int) -> npt.NDArray[np.uint64]:
        words: npt.NDArray[np.uint64] = self._bits.random_raw(n)
        return words


def noise_source(*, secure: bool, seed: int | None = None) -> NoiseSource:
    """The noise source a run asked for.

    Parameters
    ----------
    secure : bool
        True for `SecureNoise` (the only choice for a DP release); False for
        `SeededNoise`, which warns that it is not private.
    seed : int or None
        Required when ``secure`` is False; must be None when it is True, since
        a secure source has no seed.

    Raises
    ------
    ConfigError
        If ``seed`` is given with ``secure=True`` or missing with ``secure=False``.
    """
    if secure:
        if seed is not None:
            raise ConfigError("seed must be None when secure=True (secure noise cannot be "
                              f"seeded); got {seed!r}.")
        return SecureNoise()
    if seed is None:
        raise ConfigError("seed is required when secure=False; got None.")
    return SeededNoise(seed)


def _chacha20() -> CipherContext:
    # 16-byte nonce as the cryptography package takes it: a 4-byte little-endian
    # block counter starting at 0, then the 12-byte RFC 8439 nonce. The key is
    # fresh, so the nonce need not be unique; random costs nothing.
    nonce = bytes(4) + os.urandom(12)
    return Cipher(algorithms.ChaCha20(os.urandom(32), nonce), mode=None).encryptor()


def _to_uniform(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    top = (words >> np.uint64(11)).astype(np.float64)  # exact: < 2**53
    top += 1.0
    top *= _UNIT
    return top


def _check_count(n: int) -> None:
    if n < 0:
        raise ConfigError(f"n must be >= 0; got {n!r}.")


def _check_spread(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be finite and >= 0; got {value!r}.")
