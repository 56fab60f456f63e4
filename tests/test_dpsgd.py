"""DP-SGD: per-record clipping and the noisy gradient, checked against Opacus.

Opacus is the outside reference (its ``DPOptimizer`` with ``loss_reduction="mean"``
is what `fedcare.privacy.dpsgd` documents it reproduces); a naive loop with one
backward pass per record is the reference for the clipped sum and the norms.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedcare.errors import ConfigError
from fedcare.federation.training import LocalTrainer, TrainingPlan
from fedcare.models.params import FlatModel
from fedcare.models.tabular import logistic_regression, mlp
from fedcare.privacy.dpsgd import PerRecordClipper, RecordPrivacy, noisy_gradient
from fedcare.privacy.noise import SeededNoise

opacus = pytest.importorskip("opacus")
import opacus.optimizers.optimizer as opacus_optimizer  # noqa: E402
import opacus.optimizers.optimizer_fast_gradient_clipping as opacus_fgc  # noqa: E402

METHODS = ("linear", "vmap")

# (name, features, builder): logreg and the two MLP shapes the issue names.
MODELS: list[tuple[str, int, Callable[[int], nn.Module]]] = [
    ("logreg-13", 13, logistic_regression),
    ("mlp-13-16-8-1", 13, lambda d: mlp(d, (16, 8))),
    ("mlp-30-64-64-1", 30, lambda d: mlp(d, (64, 64))),
]


def make_model(build: Callable[[int], nn.Module], features: int,
               seed: int = 0) -> tuple[nn.Module, FlatModel]:
    """A plain copy of a freshly initialised module and a `FlatModel` with the same weights."""
    torch.manual_seed(seed)
    module = build(features)
    plain = copy.deepcopy(module)  # FlatModel re-seats `module`'s parameters in place
    return plain, FlatModel(module)


def make_batch(n: int, features: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Scaled up so that some records' gradients exceed C and some do not.
    x = 2.0 * torch.randn(n, features, generator=generator)
    y = (torch.rand(n, generator=generator) < 0.5).float()
    return x, y


class FixedNoise:
    """A `NoiseSource` whose Gaussian draw is a fixed unit vector ``z`` times the std.

    Only for comparing with Opacus: the same ``z`` is handed to Opacus (see
    `patched_opacus_noise`), so both implementations add identical noise.
    """

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z
        self.stds: list[float] = []

    def gaussian(self, n: int, std: float) -> torch.Tensor:
        assert n == self.z.numel()
        self.stds.append(std)
        return self.z * std

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bool)


def patched_opacus_noise(monkeypatch: pytest.MonkeyPatch, z: torch.Tensor,
                         expected_std: float) -> list[float]:
    """Make Opacus' noise the slices of ``z`` (times std), parameter by parameter.

    ``DPOptimizer.add_noise`` calls the module-level ``_generate_noise(std,
    reference)`` once per parameter, in the optimizer's parameter order, which
    is ``module.parameters()`` order, the same order as the flat layout of
    `FlatModel` (``named_parameters()``, row-major). Replacing it with a
    function that returns the next ``reference.numel()`` values of ``z``
    times ``std`` makes Opacus add exactly ``std * z``, the vector `FixedNoise`
    hands to `noisy_gradient`, at the same point (on the clipped sum, before
    the division by the expected batch size). The std Opacus asks for is
    recorded so the test also checks sigma * C agrees.
    """
    offset = 0
    stds: list[float] = []

    def fixed(std: float, reference: torch.Tensor, generator: object = None,
              secure_mode: bool = False) -> torch.Tensor:
        nonlocal offset
        stds.append(std)
        size = reference.numel()
        piece = z[offset:offset + size].view(reference.shape) * std
        offset = (offset + size) % z.numel()
        return piece.to(reference.dtype)

    # The fast-gradient-clipping optimizer imported the name into its own module.
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", fixed)
    monkeypatch.setattr(opacus_fgc, "_generate_noise", fixed)
    return stds


def opacus_noisy_gradient(plain: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                          mode: str, privacy: RecordPrivacy, n_records: int) -> torch.Tensor:
    """Opacus' noisy gradient for one batch, flattened in ``named_parameters()`` order.

    Built by hand (GradSampleModule + DPOptimizer) rather than with
    ``make_private``, so the batch is exactly ``x`` (fixed, no Poisson
    sampler): the equivalent of ``poisson_sampling=False``.
    """
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    plain = copy.deepcopy(plain)  # Opacus leaves its hooks on the module it wraps
    expected_batch_size = privacy.sample_rate * n_records
    settings = {"noise_multiplier": privacy.noise_multiplier, "max_grad_norm": privacy.clip_norm,
                "expected_batch_size": expected_batch_size, "loss_reduction": "mean"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode=False; noise is patched
        if mode == "hooks":
            module = GradSampleModule(plain, loss_reduction="mean")
            optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), **settings)
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(module(x).squeeze(-1), y)
            loss.backward()
        else:
            module = GradSampleModuleFastGradientClipping(
                plain, max_grad_norm=privacy.clip_norm, use_ghost_clipping=True,
                loss_reduction="mean")
            optimizer = DPOptimizerFastGradientClipping(
                torch.optim.SGD(module.parameters(), lr=1.0), **settings)
            criterion = DPLossFastGradientClipping(
                module, optimizer, nn.BCEWithLogitsLoss(reduction="mean"), loss_reduction="mean")
            optimizer.zero_grad()
            criterion(module(x).squeeze(-1), y).backward()
        assert optimizer.pre_step()  # clip, accumulate, add noise, scale; no parameter update
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def naive_clipped_sum(plain: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One backward per record: the clipped sum and every record's gradient norm."""
    total = torch.zeros(sum(p.numel() for p in plain.parameters()), dtype=torch.float64)
    norms = []
    for xi, yi in zip(x, y, strict=True):
        plain.zero_grad()
        F.binary_cross_entropy_with_logits(plain(xi[None]).reshape(()), yi).backward()
        g = torch.cat([p.grad.reshape(-1) for p in plain.parameters()]).double()
        norm = float(g.norm())
        norms.append(norm)
        total += g * (min(1.0, clip_norm / norm) if norm > 0 else 1.0)
    return total, torch.tensor(norms, dtype=torch.float64)


# ------------------------------------------------------------------ Opacus reference
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("name", "features", "build"), MODELS, ids=[m[0] for m in MODELS])
def test_noisy_gradient_equals_opacus(monkeypatch: pytest.MonkeyPatch, method: str, name: str,
                                      features: int,
                                      build: Callable[[int], nn.Module]) -> None:
    plain, model = make_model(build, features)
    n_records, batch = 256, 29  # q n = 32 exactly; the Poisson sample happened to have 29 rows
    x, y = make_batch(batch, features)
    # C at the median norm: both branches of the clip factor (scaled, not scaled) are exercised.
    _, norms = naive_clipped_sum(plain, x, y, 1.0)
    privacy = RecordPrivacy(clip_norm=float(norms.median()), noise_multiplier=1.3,
                            sample_rate=0.125, steps_per_epoch=8)
    z = torch.randn(model.spec.size, generator=torch.Generator().manual_seed(7))
    ours_noise = FixedNoise(z)
    opacus_stds = patched_opacus_noise(monkeypatch, z, privacy.noise_multiplier)

    clipper = PerRecordClipper(model, privacy.clip_norm, method)
    noisy_gradient(clipper, x, y, privacy=privacy, n_records=n_records, noise=ours_noise)
    reference = opacus_noisy_gradient(plain, x, y, mode="hooks", privacy=privacy,
                                      n_records=n_records)

    sigma_c = privacy.noise_multiplier * privacy.clip_norm
    assert ours_noise.stds == [pytest.approx(sigma_c)]
    assert opacus_stds == [pytest.approx(sigma_c)] * len(model.spec.names)
    # Opacus divides by (norm + 1e-6), a relative difference of ~1e-6 on clipped records;
    # measured: at most 2.4e-7 on entries up to 0.67 (fedcare also shrinks by 2**-20).
    assert (model.grads - reference).abs().max() < 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("name", "features", "build"), MODELS, ids=[m[0] for m in MODELS])
def test_noisy_gradient_equals_opacus_ghost_clipping(
        monkeypatch: pytest.MonkeyPatch, method: str, name: str, features: int,
        build: Callable[[int], nn.Module]) -> None:
    plain, model = make_model(build, features)
    n_records, batch = 256, 29
    x, y = make_batch(batch, features)
    _, norms = naive_clipped_sum(plain, x, y, 1.0)
    privacy = RecordPrivacy(clip_norm=float(norms.median()), noise_multiplier=1.3,
                            sample_rate=0.125, steps_per_epoch=8)
    z = torch.randn(model.spec.size, generator=torch.Generator().manual_seed(7))
    patched_opacus_noise(monkeypatch, z, privacy.noise_multiplier)
    try:
        reference = opacus_noisy_gradient(plain, x, y, mode="ghost", privacy=privacy,
                                          n_records=n_records)
    except (ImportError, NotImplementedError, TypeError, AttributeError) as error:
        pytest.skip(f"Opacus ghost clipping does not run here: {error!r}")
    clipper = PerRecordClipper(model, privacy.clip_norm, method)
    noisy_gradient(clipper, x, y, privacy=privacy, n_records=n_records, noise=FixedNoise(z))
    assert (model.grads - reference).abs().max() < 1e-6


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize(("name", "features", "build"), MODELS, ids=[m[0] for m in MODELS])
def test_linear_vmap_and_naive_loop_agree(name: str, features: int,
                                          build: Callable[[int], nn.Module]) -> None:
    plain, model = make_model(build, features)
    x, y = make_batch(40, features)
    clip_norm = 0.7
    expected_sum, expected_norms = naive_clipped_sum(plain, x, y, clip_norm)
    sums, all_norms = {}, {}
    for method in METHODS:
        losses, norms = PerRecordClipper(model, clip_norm, method).clipped_sum(x, y)
        sums[method], all_norms[method] = model.grads.clone(), norms
        expected_losses = F.binary_cross_entropy_with_logits(
            plain(x).squeeze(-1), y, reduction="none")
        torch.testing.assert_close(losses, expected_losses.detach())
        torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums[method].double(), expected_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(all_norms["linear"], all_norms["vmap"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums["linear"], sums["vmap"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_records_below_the_bound_are_not_scaled(method: str) -> None:
    plain, model = make_model(lambda d: mlp(d, (16, 8)), 13)
    x, y = make_batch(32, 13)
    _, norms = PerRecordClipper(model, 1e6, method).clipped_sum(x, y)
    assert norms.max() < 1e6
    plain.zero_grad()
    F.binary_cross_entropy_with_logits(plain(x).squeeze(-1), y, reduction="sum").backward()
    unclipped = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
    torch.testing.assert_close(model.grads, unclipped, rtol=1e-5, atol=1e-6)

    # With C at the median norm, the records below C keep their gradient exactly:
    # the clipped sum minus the clipped records' part is the plain sum of the others.
    clip_norm = float(norms.median())
    below = norms <= clip_norm
    clipper = PerRecordClipper(model, clip_norm, method)
    clipper.clipped_sum(x, y)
    full = model.grads.clone()
    clipper.clipped_sum(x[~below], y[~below])
    above_clipped = model.grads.clone()
    PerRecordClipper(model, 1e6, method).clipped_sum(x[below], y[below])
    torch.testing.assert_close(full - above_clipped, model.grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_clipped_norm_never_exceeds_the_bound(method: str) -> None:
    _, model = make_model(lambda d: mlp(d, (16, 8)), 13)
    x, y = make_batch(20, 13)
    clipper = PerRecordClipper(model, 0.05, method)
    for i in range(x.shape[0]):
        _, norms = clipper.clipped_sum(x[i:i + 1], y[i:i + 1])
        assert norms[0] > 0.05
        assert float(model.grads.norm()) <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_record_with_zero_gradient_gives_no_nan(method: str) -> None:
    plain, model = make_model(lambda d: mlp(d, (16, 8)), 13)
    with torch.no_grad():
        model.module[-1].bias.fill_(200.0)  # sigmoid(logit) == 1.0 exactly in float32
        plain[-1].bias.fill_(200.0)
    x, y = make_batch(8, 13)
    y[:] = 0.0
    y[3] = 1.0  # record 3: d loss / d logit = sigmoid(~200) - 1 == 0, so its gradient is 0
    losses, norms = PerRecordClipper(model, 0.5, method).clipped_sum(x, y)
    assert norms[3] == 0
    assert torch.isfinite(norms).all() and torch.isfinite(losses).all()
    assert torch.isfinite(model.grads).all()
    expected, _ = naive_clipped_sum(plain, x, y, 0.5)
    torch.testing.assert_close(model.grads.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_clipped_sum_leaves_the_parameters_unchanged(method: str) -> None:
    _, model = make_model(lambda d: mlp(d, (16, 8)), 13)
    before = model.params.clone()
    PerRecordClipper(model, 0.5, method).clipped_sum(*make_batch(16, 13))
    assert torch.equal(model.params, before)
    # Parameters are still views of the flat vector, gradients of the flat gradient buffer.
    for p in model.module.parameters():
        assert p.untyped_storage().data_ptr() == model.params.untyped_storage().data_ptr()
        assert p.grad is not None
        assert p.grad.untyped_storage().data_ptr() == model.grads.untyped_storage().data_ptr()


def layer_norm_model(features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))


def test_linear_refuses_a_model_with_other_parametrised_layers() -> None:
    _, model = make_model(layer_norm_model, 6)
    with pytest.raises(ConfigError, match="'linear'"):
        PerRecordClipper(model, 1.0, "linear")
    assert PerRecordClipper(model, 1.0, "auto").method == "vmap"
    with pytest.raises(ConfigError, match="must be one of"):
        PerRecordClipper(model, 1.0, "ghost")


def test_vmap_handles_any_model() -> None:
    plain, model = make_model(layer_norm_model, 6)
    x, y = make_batch(12, 6)
    _, norms = PerRecordClipper(model, 0.3, "vmap").clipped_sum(x, y)
    expected_sum, expected_norms = naive_clipped_sum(plain, x, y, 0.3)
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.grads.double(), expected_sum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "features", "build"), MODELS, ids=[m[0] for m in MODELS])
def test_auto_picks_linear_for_the_tabular_models(name: str, features: int,
                                                   build: Callable[[int], nn.Module]) -> None:
    _, model = make_model(build, features)
    assert PerRecordClipper(model, 1.0).method == "linear"


# ------------------------------------------------------------------ noisy gradient
@pytest.mark.parametrize("method", METHODS)
def test_noisy_gradient_is_clipped_sum_plus_noise_over_qn(method: str) -> None:
    _, model = make_model(lambda d: mlp(d, (16, 8)), 13)
    x, y = make_batch(10, 13)
    privacy = RecordPrivacy(clip_norm=0.5, noise_multiplier=2.0, sample_rate=0.1,
                            steps_per_epoch=10)
    clipper = PerRecordClipper(model, 0.5, method)
    clipper.clipped_sum(x, y)
    clipped = model.grads.clone()
    z = torch.randn(model.spec.size, generator=torch.Generator().manual_seed(3))
    loss = noisy_gradient(clipper, x, y, privacy=privacy, n_records=100, noise=FixedNoise(z))
    torch.testing.assert_close(model.grads, (clipped + 1.0 * z) / 10.0)
    assert loss == pytest.approx(float(F.binary_cross_entropy_with_logits(
        model.predict_logits(x), y, reduction="sum")), rel=1e-5)

    # An empty Poisson sample: the gradient is the noise alone, over q n.
    model.grads.fill_(123.0)
    loss = noisy_gradient(clipper, x[:0], y[:0], privacy=privacy, n_records=100,
                          noise=FixedNoise(z))
    assert loss == 0.0
    torch.testing.assert_close(model.grads, z / 10.0)


# ------------------------------------------------------------------ LocalTrainer
def seeded_noise(seed: int) -> SeededNoise:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-secure source warns on purpose
        return SeededNoise(seed)


def train_private(sigma: float, seed: int, sample_rate: float = 0.25,
                  steps_per_epoch: int = 4) -> tuple[torch.Tensor, torch.Tensor, float]:
    _, model = make_model(lambda d: mlp(d, (16, 8)), 13)
    x, y = make_batch(64, 13)
    start = model.params.clone()
    privacy = RecordPrivacy(clip_norm=1.0, noise_multiplier=sigma, sample_rate=sample_rate,
                            steps_per_epoch=steps_per_epoch)
    plan = TrainingPlan(epochs=1, batch_size=16, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, loss = LocalTrainer(model).train(x, y, start, plan, torch.Generator(),
                                                 privacy=privacy, noise=seeded_noise(seed))
    return start, params, loss


def test_private_training_with_seeded_noise_is_reproducible() -> None:
    start, first, loss_first = train_private(1.0, seed=5)
    _, again, loss_again = train_private(1.0, seed=5)
    _, other, _ = train_private(1.0, seed=6)
    assert torch.equal(first, again) and loss_first == loss_again
    assert not torch.equal(first, other)
    assert not torch.equal(first, start)


def test_huge_noise_dominates_the_update() -> None:
    # One step; the same seed gives the same Poisson sample and the same unit noise z,
    # so the update is lr (clipped + sigma C z) / (q n) and its norm ~ sigma.
    norms = {}
    for sigma in (1e3, 1e4):
        start, params, _ = train_private(sigma, seed=5, steps_per_epoch=1)
        norms[sigma] = float((params - start).norm())
    assert norms[1e4] / norms[1e3] == pytest.approx(10.0, rel=1e-2)
    d = start.numel()
    # ||z|| ~ sqrt(d) for a standard normal z in d dimensions.
    expected = 0.1 * 1e3 * 1.0 * math.sqrt(d) / (0.25 * 64)
    assert norms[1e3] == pytest.approx(expected, rel=0.1)


def test_an_empty_poisson_sample_works() -> None:
    start, params, loss = train_private(1.0, seed=5, sample_rate=1e-6, steps_per_epoch=3)
    assert loss == 0.0
    assert torch.isfinite(params).all()
    assert not torch.equal(params, start)  # noise alone moved it
