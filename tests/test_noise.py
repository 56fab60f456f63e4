"""Tests of the DP noise sources.

The distribution tests are hypothesis tests at a fixed false-alarm rate: each
uses ``ALPHA = 1e-6``, so a correct implementation fails a given check once in
a million runs, and this whole file (32 such checks) about once in 30,000
runs. Each statistic is exact or uses n = 200,000 draws.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import fedcare.privacy.noise as noise_module
from fedcare.errors import ConfigError
from fedcare.privacy.noise import (
    InsecureNoiseWarning,
    NoiseSource,
    SecureNoise,
    SeededNoise,
    noise_source,
)

ALPHA = 1e-6
"""False-alarm rate of every statistical test below."""

N = 200_000


def seeded(seed: int) -> SeededNoise:
    with pytest.warns(InsecureNoiseWarning):
        return SeededNoise(seed)


def sources() -> list[NoiseSource]:
    return [SecureNoise(), seeded(20240601)]


def two_sided(p_value: float) -> None:
    assert p_value > ALPHA, f"p = {p_value:.3g} <= alpha = {ALPHA}"


@pytest.fixture(params=["secure", "seeded"])
def source(request: pytest.FixtureRequest) -> NoiseSource:
    return SecureNoise() if request.param == "secure" else seeded(7)


# --- Gaussian -------------------------------------------------------------------------------


@pytest.mark.parametrize("std", [0.37, 250.0])
def test_gaussian_variance_chi_square(source: NoiseSource, std: float) -> None:
    x = source.gaussian(N, std).double().numpy()
    # Known mean 0: sum((x / std)**2) ~ chi2(N) exactly under H0.
    statistic = float(np.sum((x / std) ** 2))
    lower, upper = stats.chi2.ppf(ALPHA / 2, N), stats.chi2.isf(ALPHA / 2, N)
    assert lower < statistic < upper, (statistic, lower, upper)


def test_gaussian_mean_z_test(source: NoiseSource) -> None:
    std = 3.0
    x = source.gaussian(N, std).double().numpy()
    z = float(x.mean()) / (std / math.sqrt(N))
    assert abs(z) < stats.norm.isf(ALPHA / 2), z


def test_gaussian_is_normal_kolmogorov_smirnov(source: NoiseSource) -> None:
    std = 2.5
    x = source.gaussian(N + 1, std).double().numpy()  # odd: the last pair is cut
    two_sided(stats.kstest(x / std, "norm").pvalue)


def test_gaussian_halves_are_uncorrelated() -> None:
    # Catches Box-Muller outputs that share more than they should: the squares of
    # two independent N(0, 1) are uncorrelated, and sqrt(N) * r is ~N(0, 1).
    x = SecureNoise().gaussian(2 * N, 1.0).double().numpy()
    for a, b in [(x[:N], x[N:]), (x[:N] ** 2, x[N:] ** 2), (x[:-1] ** 2, x[1:] ** 2)]:
        r = float(np.corrcoef(a, b)[0, 1])
        assert abs(r) * math.sqrt(len(a)) < stats.norm.isf(ALPHA / 2), r


def test_gaussian_shape_dtype_and_zero_std(source: NoiseSource) -> None:
    for n in (0, 1, 2, 3, 1001):
        out = source.gaussian(n, 1.0)
        assert out.shape == (n,)
        assert out.dtype == torch.float32
        assert bool(torch.isfinite(out).all())
    zeros = source.gaussian(5, 0.0)
    assert zeros.dtype == torch.float32
    assert torch.equal(zeros, torch.zeros(5))


# --- Laplace --------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.05, 40.0])
def test_laplace_scale_exact_gamma_test(source: NoiseSource, scale: float) -> None:
    # |X| / b ~ Exp(1), so sum |X| / b ~ Gamma(N, 1) exactly: the test of b, and
    # so of the variance 2 b**2.
    x = source.laplace(N, scale).double().numpy()
    statistic = float(np.abs(x).sum() / scale)
    lower, upper = stats.gamma.ppf(ALPHA / 2, N), stats.gamma.isf(ALPHA / 2, N)
    assert lower < statistic < upper, (statistic, lower, upper)


def test_laplace_variance_and_mean(source: NoiseSource) -> None:
    scale = 1.5
    x = source.laplace(N, scale).double().numpy()
    critical = stats.norm.isf(ALPHA / 2)
    # CLT: Var X = 2 b^2 and Var X^2 = E X^4 - (2 b^2)^2 = 24 b^4 - 4 b^4 = 20 b^4.
    z_var = (float(np.mean(x**2)) - 2 * scale**2) / math.sqrt(20 * scale**4 / N)
    z_mean = float(x.mean()) / math.sqrt(2 * scale**2 / N)
    assert abs(z_var) < critical, z_var
    assert abs(z_mean) < critical, z_mean


def test_laplace_is_laplace_kolmogorov_smirnov(source: NoiseSource) -> None:
    scale = 0.7
    x = source.laplace(N, scale).double().numpy()
    two_sided(stats.kstest(x, "laplace", args=(0.0, scale)).pvalue)
    two_sided(stats.binomtest(int((x > 0).sum()), N, 0.5).pvalue)


def test_laplace_shape_dtype_and_zero_scale(source: NoiseSource) -> None:
    out = source.laplace(7, 2.0)
    assert out.shape == (7,)
    assert out.dtype == torch.float32
    assert torch.equal(source.laplace(4, 0.0), torch.zeros(4))
    assert source.laplace(0, 1.0).shape == (0,)


# --- uniform and Bernoulli ------------------------------------------------------------------


def test_uniform_is_on_the_53_bit_grid_in_half_open_interval(source: NoiseSource) -> None:
    u = source.uniform(N)
    assert u.dtype == np.float64
    assert u.shape == (N,)
    assert u.min() > 0.0
    assert u.max() <= 1.0
    scaled = u * 2.0**53
    assert np.array_equal(scaled, np.round(scaled))
    two_sided(stats.kstest(u, "uniform").pvalue)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.999])
def test_bernoulli_rate_binomial_test(source: NoiseSource, p: float) -> None:
    mask = source.bernoulli(N, p)
    assert mask.dtype == torch.bool
    assert mask.shape == (N,)
    two_sided(stats.binomtest(int(mask.sum()), N, p).pvalue)


def test_bernoulli_extremes_are_exact(source: NoiseSource) -> None:
    assert not bool(source.bernoulli(10_000, 0.0).any())
    assert bool(source.bernoulli(10_000, 1.0).all())
    assert source.bernoulli(0, 0.5).shape == (0,)


# --- where the bits come from ---------------------------------------------------------------


def test_secure_instances_draw_different_streams() -> None:
    a, b = SecureNoise(), SecureNoise()
    assert a.secure and b.secure
    first = a.gaussian(64, 1.0)
    assert not torch.equal(first, b.gaussian(64, 1.0))
    assert not torch.equal(first, a.gaussian(64, 1.0))  # the stream moves on


def test_secure_noise_takes_no_seed() -> None:
    with pytest.raises(TypeError):
        SecureNoise(0)  # type: ignore[call-arg]


def test_secure_noise_rekeys_and_stays_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    keys: list[object] = []
    real = noise_module._chacha20

    def counting() -> object:
        keys.append(object())
        return real()

    monkeypatch.setattr(noise_module, "_REKEY_BYTES", 8 * 1000)
    monkeypatch.setattr(noise_module, "_chacha20", counting)
    source = SecureNoise()
    u = source.uniform(N)  # 1.6 MB of keystream: 200 keys
    assert len(keys) == N * 8 // 8000
    assert u.shape == (N,)
    two_sided(stats.kstest(u, "uniform").pvalue)
    assert len(np.unique(u)) == N  # no repeated block of keystream


def test_seeded_noise_is_reproducible_and_warns_every_time() -> None:
    for _ in range(2):
        with pytest.warns(InsecureNoiseWarning, match="NOT differentially private"):
            SeededNoise(3)
    a, b, c = seeded(3), seeded(3), seeded(4)
    assert a.secure is False
    draws_a = (a.gaussian(50, 1.0), a.laplace(50, 1.0), a.uniform(50), a.bernoulli(50, 0.5))
    draws_b = (b.gaussian(50, 1.0), b.laplace(50, 1.0), b.uniform(50), b.bernoulli(50, 0.5))
    for x, y in zip(draws_a, draws_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert not torch.equal(draws_a[0], c.gaussian(50, 1.0))


def test_insecure_warning_is_a_user_warning() -> None:
    assert issubclass(InsecureNoiseWarning, UserWarning)


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_seeded_noise_rejects_bad_seeds(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        SeededNoise(seed)  # type: ignore[arg-type]


# --- noise_source ---------------------------------------------------------------------------


def test_noise_source_secure() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a secure source must not warn
        source = noise_source(secure=True)
    assert isinstance(source, SecureNoise)
    assert source.secure is True


def test_noise_source_seeded() -> None:
    with pytest.warns(InsecureNoiseWarning):
        source = noise_source(secure=False, seed=11)
    assert isinstance(source, SeededNoise)
    assert source.secure is False


def test_noise_source_validates_its_arguments() -> None:
    with pytest.raises(ConfigError, match=r"seed must be None when secure=True.*got 5\."):
        noise_source(secure=True, seed=5)
    with pytest.raises(ConfigError, match="seed is required when secure=False"):
        noise_source(secure=False)
    with pytest.raises(TypeError):
        noise_source(True)  # type: ignore[call-arg]


# --- parameter validation -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "name", "value", "shown"), [
    ("gaussian", "std", -1.0, "-1.0"),
    ("gaussian", "std", math.nan, "nan"),
    ("gaussian", "std", math.inf, "inf"),
    ("laplace", "scale", -0.5, "-0.5"),
    ("laplace", "scale", math.nan, "nan"),
])
def test_bad_spread_raises(source: NoiseSource, method: str, name: str, value: float,
                           shown: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be finite and >= 0; got {shown}\.$"):
        getattr(source, method)(10, value)


@pytest.mark.parametrize("p", [-0.1, 1.5, math.nan])
def test_bad_probability_raises(source: NoiseSource, p: float) -> None:
    with pytest.raises(ConfigError, match=r"^p must be in \[0, 1\]; got "):
        source.bernoulli(10, p)


@pytest.mark.parametrize("call", [
    lambda s: s.gaussian(-1, 1.0),
    lambda s: s.laplace(-1, 1.0),
    lambda s: s.uniform(-1),
    lambda s: s.bernoulli(-1, 0.5),
])
def test_negative_count_raises(source: NoiseSource, call: object) -> None:
    with pytest.raises(ConfigError, match=r"^n must be >= 0; got -1\.$"):
        call(source)  # type: ignore[operator]


def test_float64_gaussian_noise_is_not_on_float32s_grid() -> None:
    """CKKS flooding draws in float64: float32 would put noise of std 2**-20 on a 2**-44 grid."""
    draws = SecureNoise().gaussian(10_000, 2.0**-20, dtype=torch.float64)
    assert draws.dtype == torch.float64
    assert not torch.equal(draws, draws.float().double())
    assert abs(float(draws.std()) / 2.0**-20 - 1) < 0.05
    with pytest.raises(ValueError, match="float32 or float64"):
        SecureNoise().gaussian(3, 1.0, dtype=torch.int64)
