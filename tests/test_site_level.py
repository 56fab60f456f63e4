"""Client-level DP: clipping, noise placement, the fixed denominator, adaptive clipping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fedcare.errors import ConfigError, ProtocolError
from fedcare.privacy.noise import SeededNoise
from fedcare.privacy.site_level import SitePrivacy


def noise(seed: int = 0) -> SeededNoise:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SeededNoise(seed)


def privacy(**kw: object) -> SitePrivacy:
    settings: dict[str, object] = {"clip_norm": 1.0, "noise_multiplier": 1.0,
                                   "sample_rate": 1.0, "n_sites": 10}
    settings.update(kw)
    return SitePrivacy(**settings)  # type: ignore[arg-type]


def test_central_payload_is_the_clipped_update_and_nothing_else() -> None:
    delta = torch.full((100,), 1.0)  # norm 10
    payload = privacy().privatize(delta, clip_norm=1.0, cohort=10, noise=noise())
    assert payload.shape == (101,)
    assert float(payload[:-1].norm()) <= 1.0
    assert torch.allclose(payload[:-1], delta / 10, atol=1e-6)


def test_distributed_shares_add_up_to_the_full_noise() -> None:
    p = privacy(noise="distributed", noise_multiplier=2.0, dropout_tolerance=2)
    cohort, d = 10, 20_000
    shares = torch.stack([p.privatize(torch.zeros(d), clip_norm=0.5, cohort=cohort,
                                      noise=noise(i))[:-1] for i in range(cohort - 2)])
    total = shares.sum(0)
    # 8 survivors of 10 with tolerance 2: exactly sigma^2 C^2 in the sum
    expected_std = 2.0 * 0.5
    # variance of a sample of 20,000 normals: relative sd sqrt(2/20000) = 1%; 5 sd margin
    assert float(total.std()) == pytest.approx(expected_std, rel=0.05)


def test_finish_divides_by_the_expected_number_of_sites() -> None:
    p = privacy(sample_rate=0.5, n_sites=8, noise="distributed")
    total = torch.cat([torch.full((5,), 8.0), torch.tensor([3.0])])
    update, clip = p.finish(total, clip_norm=1.0, cohort=4, arrived=4, round_number=1,
                            noise=noise())
    assert torch.equal(update, torch.full((5,), 2.0))  # 8 / (0.5 * 8)
    assert clip == 1.0  # fixed clipping


def test_finish_refuses_a_sum_without_enough_noise_shares() -> None:
    p = privacy(noise="distributed", dropout_tolerance=1)
    with pytest.raises(ProtocolError, match=r"8 of 10 .* at least 9"):
        p.finish(torch.zeros(6), clip_norm=1.0, cohort=10, arrived=8, round_number=4,
                 noise=noise())


def test_central_noise_has_sigma_c_on_the_sum() -> None:
    p = privacy(noise_multiplier=3.0, n_sites=1)
    update, _ = p.finish(torch.zeros(50_001), clip_norm=0.5, cohort=1, arrived=1,
                         round_number=1, noise=noise())
    assert float(update.std()) == pytest.approx(1.5, rel=0.05)


def test_adaptive_clipping_splits_the_noise_budget_as_andrew_et_al() -> None:
    p = privacy(target_quantile=0.5, count_noise=2.0, noise_multiplier=1.0)
    z = p.update_noise_multiplier
    # the two Gaussian queries compose to one of multiplier sigma
    assert (z ** -2 + (2 * 2.0) ** -2) ** -0.5 == pytest.approx(1.0)
    assert z > 1.0
    with pytest.raises(ConfigError, match="count noise"):
        privacy(target_quantile=0.5, count_noise=0.4, noise_multiplier=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("quantile", [0.2, 0.8])
def test_adaptive_clip_norm_converges_to_the_target_quantile(quantile: float) -> None:
    n_sites = 200
    p = privacy(target_quantile=quantile, n_sites=n_sites, noise_multiplier=0.5, clip_lr=0.2)
    norms = torch.linspace(0.1, 10.0, n_sites)  # the sites' update norms, uniform
    clip = 1.0
    for r in range(150):
        payloads = [p.privatize(torch.tensor([float(v)]), clip_norm=clip, cohort=n_sites,
                                noise=noise(r)) for v in norms]
        total = torch.stack(payloads).sum(0)
        _, clip = p.finish(total, clip_norm=clip, cohort=n_sites, arrived=n_sites,
                           round_number=r, noise=noise(10_000 + r))
    target = float(torch.quantile(norms, quantile))
    assert clip == pytest.approx(target, rel=0.1)
    assert math.isfinite(clip)
