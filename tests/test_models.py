"""Flat parameter layout (`ParamSpec`) and the flat-buffer model (`FlatModel`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedcare.config import ModelConfig
from fedcare.errors import ConfigError
from fedcare.models import MODELS, FlatModel, ParamSpec, build_model

N_FEATURES = 13  # the heart-disease input width (FLamby encoding)
FLOAT32_BYTES = 4


def flat(name: str, hidden: list[int] | None = None, n_features: int = N_FEATURES) -> FlatModel:
    config = ModelConfig(name) if hidden is None else ModelConfig(name, hidden)
    return FlatModel(build_model(config, n_features))


def reference_module(config: ModelConfig, vector: torch.Tensor) -> nn.Module:
    """A plain module (no FlatModel) holding `vector`, sliced by hand in parameter order."""
    module = build_model(config, N_FEATURES)
    offset = 0
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(vector[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
    assert offset == vector.numel()
    return module


# ----------------------------------------------------------------- ParamSpec
def test_spec_of_logistic_regression() -> None:
    spec = flat("logreg").spec

    assert spec.names == ("0.weight", "0.bias")
    assert spec.shapes == ((1, 13), (1,))
    assert spec.sizes == (13, 1)
    assert spec.offsets == (0, 13)
    assert spec.size == 14


def test_spec_of_mlp_13_64_64_1_has_5121_values() -> None:
    spec = flat("mlp", [64, 64]).spec

    assert spec.names == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    assert spec.shapes == ((64, 13), (64,), (64, 64), (64,), (1, 64), (1,))
    assert spec.sizes == (832, 64, 4096, 64, 64, 1)
    assert spec.offsets == (0, 832, 896, 4992, 5056, 5120)
    assert spec.size == 5121


def test_spec_follows_named_parameters_order() -> None:
    module = build_model(ModelConfig("mlp", [7, 5]), 3)

    spec = ParamSpec.of(module)

    named = list(module.named_parameters())
    assert spec.names == tuple(n for n, _ in named)
    assert spec.shapes == tuple(tuple(p.shape) for _, p in named)
    assert spec.size == sum(p.numel() for _, p in named)


@pytest.mark.parametrize(("index", "where"), [
    (0, "0.weight[0]"), (831, "0.weight[831]"), (832, "0.bias[0]"), (896, "2.weight[0]"),
    (5056, "4.weight[0]"), (5120, "4.bias[0]"),
])
def test_locate_names_the_tensor_and_position(index: int, where: str) -> None:
    assert flat("mlp", [64, 64]).spec.locate(index) == where


@pytest.mark.parametrize("index", [-1, 5121])
def test_locate_out_of_range_raises(index: int) -> None:
    with pytest.raises(IndexError):
        flat("mlp", [64, 64]).spec.locate(index)


def test_spec_to_dict_round_trips() -> None:
    spec = flat("mlp", [64, 64]).spec

    raw = spec.to_dict()

    assert raw["names"] == list(spec.names)
    rebuilt = ParamSpec(tuple(raw["names"]), tuple(tuple(s) for s in raw["shapes"]))
    assert rebuilt == spec


# ----------------------------------------------------------------- FlatModel views
@pytest.mark.parametrize(("name", "hidden"), [("logreg", None), ("mlp", [64, 64])])
def test_parameters_and_grads_are_views_of_the_flat_buffers(name: str,
                                                            hidden: list[int] | None) -> None:
    model = flat(name, hidden)
    params = list(model.module.parameters())

    assert len(params) == len(model.spec.names)
    for param, offset in zip(params, model.spec.offsets, strict=True):
        assert param.data_ptr() == model.params.data_ptr() + offset * FLOAT32_BYTES
        assert param.grad is not None
        assert param.grad.data_ptr() == model.grads.data_ptr() + offset * FLOAT32_BYTES


def test_constructor_keeps_the_module_initial_values() -> None:
    module = build_model(ModelConfig("mlp", [64, 64]), N_FEATURES)
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])

    model = FlatModel(module)

    assert torch.equal(model.params, before)
    assert torch.count_nonzero(model.grads) == 0


def test_writing_the_flat_vector_changes_the_module_output() -> None:
    model = flat("logreg")
    x = torch.randn(6, N_FEATURES, generator=torch.Generator().manual_seed(0))
    vector = torch.arange(14, dtype=torch.float32) / 10

    model.load(vector)

    expected = x @ vector[:13] + vector[13]
    torch.testing.assert_close(model.module(x).squeeze(-1), expected)
    torch.testing.assert_close(model.predict_logits(x), expected)


def test_in_place_edit_of_params_reaches_the_mlp() -> None:
    model = flat("mlp", [64, 64])
    x = torch.randn(5, N_FEATURES, generator=torch.Generator().manual_seed(1))
    vector = model.init_params(torch.Generator().manual_seed(2))
    model.load(vector)
    before = model.predict_logits(x).clone()

    model.params[5120] += 3.0  # the output bias

    torch.testing.assert_close(model.predict_logits(x), before + 3.0)
    reference = reference_module(ModelConfig("mlp", [64, 64]), model.params)
    torch.testing.assert_close(model.predict_logits(x), reference(x).squeeze(-1).detach())


def test_backward_writes_into_the_flat_gradient() -> None:
    model = flat("mlp", [64, 64])
    generator = torch.Generator().manual_seed(3)
    vector = model.init_params(generator)
    model.load(vector)
    x = torch.randn(9, N_FEATURES, generator=generator)
    y = (torch.rand(9, generator=generator) < 0.5).float()

    loss = nn.functional.binary_cross_entropy_with_logits(model.module(x).squeeze(-1), y)
    loss.backward()

    reference = reference_module(ModelConfig("mlp", [64, 64]), vector)
    ref_loss = nn.functional.binary_cross_entropy_with_logits(reference(x).squeeze(-1), y)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss,
                                                                     list(reference.parameters()))])
    assert torch.count_nonzero(model.grads) > 0
    torch.testing.assert_close(model.grads, expected)


def test_predict_logits_is_one_logit_per_row_without_graph() -> None:
    model = flat("mlp", [64, 64])

    logits = model.predict_logits(torch.zeros(4, N_FEATURES))

    assert logits.shape == (4,)
    assert not logits.requires_grad


# ----------------------------------------------------------------- init_params
def test_init_params_is_reproducible_under_one_seed() -> None:
    model = flat("mlp", [64, 64])

    first = model.init_params(torch.Generator().manual_seed(11))
    second = model.init_params(torch.Generator().manual_seed(11))
    other = model.init_params(torch.Generator().manual_seed(12))

    assert first.shape == (5121,)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_init_params_leaves_the_global_rng_and_the_model_alone() -> None:
    model = flat("mlp", [64, 64])
    params_before = model.params.clone()
    state = torch.get_rng_state()

    model.init_params(torch.Generator().manual_seed(0))

    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model.params, params_before)


def test_init_params_uses_pytorch_default_bounds() -> None:
    model = flat("mlp", [64, 64])

    vector = model.init_params(torch.Generator().manual_seed(4))

    fan_ins = {"0": N_FEATURES, "2": 64, "4": 64}
    for name, offset, size in zip(model.spec.names, model.spec.offsets, model.spec.sizes,
                                  strict=True):
        bound = 1 / math.sqrt(fan_ins[name.split(".")[0]])
        chunk = vector[offset:offset + size]
        assert chunk.abs().max() <= bound
        if size >= 64:  # wide enough that the draws spread over the interval
            assert chunk.abs().max() > 0.8 * bound


# ----------------------------------------------------------------- registry
def test_build_model_registry() -> None:
    assert set(MODELS) == {"logreg", "mlp"}
    with pytest.raises(ConfigError, match=r"model\.name.*'resnet'"):
        build_model(ModelConfig("resnet"), N_FEATURES)


@pytest.mark.parametrize("hidden", [[], [8, 0]])
def test_mlp_refuses_bad_widths(hidden: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden"):
        build_model(ModelConfig("mlp", hidden), N_FEATURES)
