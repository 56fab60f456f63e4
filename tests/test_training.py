"""Local training (`LocalTrainer`, `TrainingPlan`) against a plain hand-written torch loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedcare.config import ModelConfig
from fedcare.errors import ConfigError
from fedcare.federation.training import LocalTrainer, TrainingPlan
from fedcare.models import FlatModel, build_model

N_FEATURES = 13
ARCHITECTURES = [ModelConfig("logreg"), ModelConfig("mlp", [16, 8])]


def site_tensors(n: int = 53, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=generator)
    y = (torch.rand(n, generator=generator) < 0.4).float()
    return x, y


def torch_sgd_loop(config: ModelConfig, start: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   plan: TrainingPlan, seed: int) -> tuple[torch.Tensor, float]:
    """Reference: torch.optim.SGD on an ordinary module, FedProx as an explicit loss term."""
    module = build_model(config, N_FEATURES)
    offset = 0
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(start[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
    anchors = [p.detach().clone() for p in module.parameters()]
    optimiser = torch.optim.SGD(module.parameters(), lr=plan.lr, momentum=plan.momentum,
                                dampening=0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(plan.epochs):
        order = torch.randperm(len(y), generator=generator)
        for begin in range(0, len(y), plan.batch_size):
            index = order[begin:begin + plan.batch_size]
            optimiser.zero_grad()
            loss = F.binary_cross_entropy_with_logits(module(x[index]).squeeze(-1), y[index])
            objective = loss
            if plan.proximal_mu:
                objective = loss + plan.proximal_mu / 2 * sum(
                    ((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchors, strict=True))
            objective.backward()
            optimiser.step()
            losses.append(loss.item() * len(index))
    final = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    return final, sum(losses) / (len(y) * plan.epochs)  # mean loss per record seen


def start_and_model(config: ModelConfig) -> tuple[FlatModel, torch.Tensor]:
    model = FlatModel(build_model(config, N_FEATURES))
    return model, model.init_params(torch.Generator().manual_seed(1))


# ----------------------------------------------------------------- equivalence with torch
@pytest.mark.parametrize("config", ARCHITECTURES, ids=lambda c: c.name)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_trainer_equals_torch_sgd_exactly(config: ModelConfig, momentum: float) -> None:
    model, start = start_and_model(config)
    x, y = site_tensors()
    plan = TrainingPlan(epochs=3, batch_size=8, lr=0.1, momentum=momentum)  # 53 rows: last batch 5

    params, loss = LocalTrainer(model).train(x, y, start, plan, torch.Generator().manual_seed(7))

    expected, expected_loss = torch_sgd_loop(config, start, x, y, plan, seed=7)
    assert torch.equal(params, expected)
    assert loss == pytest.approx(expected_loss, rel=1e-6)


@pytest.mark.parametrize("config", ARCHITECTURES, ids=lambda c: c.name)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fedprox_term_equals_the_explicit_proximal_loss(config: ModelConfig,
                                                        momentum: float) -> None:
    model, start = start_and_model(config)
    x, y = site_tensors()
    plan = TrainingPlan(epochs=2, batch_size=8, lr=0.1, momentum=momentum, proximal_mu=0.5)

    params, loss = LocalTrainer(model).train(x, y, start, plan, torch.Generator().manual_seed(7))

    expected, expected_loss = torch_sgd_loop(config, start, x, y, plan, seed=7)
    torch.testing.assert_close(params, expected, rtol=0, atol=1e-6)
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def test_fedprox_pulls_towards_the_start() -> None:
    model, start = start_and_model(ARCHITECTURES[1])
    x, y = site_tensors()
    plain = TrainingPlan(epochs=3, batch_size=8, lr=0.2)
    prox = TrainingPlan(epochs=3, batch_size=8, lr=0.2, proximal_mu=1.0)
    trainer = LocalTrainer(model)

    free, _ = trainer.train(x, y, start, plain, torch.Generator().manual_seed(3))
    pulled, _ = trainer.train(x, y, start, prox, torch.Generator().manual_seed(3))

    assert (pulled - start).norm() < (free - start).norm()


# ----------------------------------------------------------------- contract of train()
def test_start_is_not_modified_and_the_result_is_fresh() -> None:
    model, start = start_and_model(ARCHITECTURES[1])
    original = start.clone()
    x, y = site_tensors()
    trainer = LocalTrainer(model)
    plan = TrainingPlan(epochs=1, batch_size=4, lr=0.5, momentum=0.5, proximal_mu=0.1)

    first, _ = trainer.train(x, y, start, plan, torch.Generator().manual_seed(0))
    kept = first.clone()
    trainer.train(x, y, start + 1, plan, torch.Generator().manual_seed(1))

    assert torch.equal(start, original)
    assert not torch.equal(first, start)
    assert first.data_ptr() != model.params.data_ptr()
    assert torch.equal(first, kept)  # a later run on the shared model does not overwrite it


def test_same_generator_seed_same_result_other_seed_other_order() -> None:
    model, start = start_and_model(ARCHITECTURES[0])
    x, y = site_tensors()
    trainer = LocalTrainer(model)
    plan = TrainingPlan(epochs=1, batch_size=4, lr=0.3)

    a, _ = trainer.train(x, y, start, plan, torch.Generator().manual_seed(5))
    b, _ = trainer.train(x, y, start, plan, torch.Generator().manual_seed(5))
    c, _ = trainer.train(x, y, start, plan, torch.Generator().manual_seed(6))

    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_full_batch_gradient_step_by_hand() -> None:
    model, _ = start_and_model(ModelConfig("logreg"))
    x, y = site_tensors(n=20)
    start = torch.zeros(N_FEATURES + 1)
    plan = TrainingPlan(epochs=1, batch_size=20, lr=0.5)

    params, loss = LocalTrainer(model).train(x, y, start, plan, torch.Generator().manual_seed(0))

    # At w = 0 every probability is 1/2: grad_w = X^T (1/2 - y) / n, grad_b = mean(1/2 - y).
    residual = 0.5 - y
    expected = -0.5 * torch.cat([x.T @ residual / 20, residual.mean().reshape(1)])
    torch.testing.assert_close(params, expected)
    assert loss == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)


# ----------------------------------------------------------------- TrainingPlan validation
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 0}, r"federation.local_epochs must be >= 1; got 0"),
    ({"batch_size": 0}, r"batch_size must be >= 1; got 0"),
    ({"lr": 0.0}, r"federation.lr must be > 0; got 0\.0"),
    ({"lr": -0.1}, r"federation.lr must be > 0; got -0\.1"),
    ({"lr": float("nan")}, r"federation.lr must be > 0; got nan"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\); got 1\.0"),
    ({"momentum": -0.1}, r"momentum must be in \[0, 1\); got -0\.1"),
    ({"proximal_mu": -1.0}, r"federation.mu must be >= 0; got -1\.0"),
])
def test_training_plan_refuses_bad_values(kwargs: dict[str, float], message: str) -> None:
    settings: dict[str, float] = {"epochs": 1, "batch_size": 8, "lr": 0.1} | kwargs
    with pytest.raises(ConfigError, match=message):
        TrainingPlan(**settings)  # type: ignore[arg-type]
