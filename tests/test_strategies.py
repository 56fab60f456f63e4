"""Strategies: a contract suite over every registered strategy, plus the server maths."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fedcare.config import FederationConfig
from fedcare.errors import ConfigError
from fedcare.federation.strategy import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
    build_strategy,
)

ADAPTIVE = ["fedadagrad", "fedadam", "fedyogi"]
SIZE = 7


def vectors(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SIZE, generator=generator) for _ in range(count)]


def checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A real save/load of the state, so nothing is shared with the live strategy."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, torch.Tensor] = torch.load(buffer)
    return loaded


# ----------------------------------------------------------------- contract, every strategy
@pytest.fixture(params=sorted(STRATEGIES))
def name(request: pytest.FixtureRequest) -> str:
    key: str = request.param
    return key


def test_registry_builds_the_named_strategy(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name))

    assert isinstance(strategy, Strategy)
    assert strategy.name == name


def test_zero_update_from_fresh_state_leaves_params_unchanged(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name))
    params = vectors(1)[0]

    assert torch.equal(strategy.apply(params, torch.zeros(SIZE)), params)


def test_apply_returns_a_new_vector_and_leaves_its_inputs(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name))
    params, update = vectors(2)
    params_copy, update_copy = params.clone(), update.clone()

    new = strategy.apply(params, update)

    assert new.shape == params.shape
    assert new.dtype == params.dtype
    assert torch.equal(params, params_copy)
    assert torch.equal(update, update_copy)
    assert not torch.equal(new, params)
    # a positive update moves every coordinate in its direction (server step along the mean)
    assert torch.equal(torch.sign(new - params), torch.sign(update))


def test_state_dict_round_trip_gives_identical_continuation(name: str) -> None:
    config = FederationConfig(strategy=name)
    live = build_strategy(config)
    params = vectors(1, seed=1)[0]
    history, future = vectors(3, seed=2), vectors(3, seed=3)
    for update in history:
        params = live.apply(params, update)

    restored = build_strategy(config)
    restored.load_state_dict(checkpoint(live.state_dict()))

    a, b = params, params.clone()
    for update in future:
        a, b = live.apply(a, update), restored.apply(b, update)
        assert torch.equal(a, b)


def test_a_taken_state_dict_does_not_change_with_later_steps(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name))
    params = strategy.apply(torch.zeros(SIZE), vectors(1)[0])
    state = strategy.state_dict()
    frozen = {k: v.clone() for k, v in state.items()}

    strategy.apply(params, vectors(1, seed=9)[0])

    assert state.keys() == frozen.keys()
    for key, value in state.items():
        assert torch.equal(value, frozen[key])


def test_adaptive_state_holds_both_moments(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name))
    assert strategy.state_dict() == {}

    strategy.apply(torch.zeros(SIZE), vectors(1)[0])

    expected = {"m", "v"} if name in ADAPTIVE else set()
    assert set(strategy.state_dict()) == expected


# ----------------------------------------------------------------- FedAvg / FedProx
@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_stateless_strategies_ignore_history_for_a_zero_update(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name))
    params = torch.zeros(SIZE)
    for update in vectors(3):
        params = strategy.apply(params, update)

    assert torch.equal(strategy.apply(params, torch.zeros(SIZE)), params)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_with_server_lr_1_is_params_plus_update(name: str) -> None:
    strategy = build_strategy(FederationConfig(strategy=name))
    params, update = vectors(2)

    assert torch.equal(strategy.apply(params, update), params + update)


def test_fedavg_server_lr_scales_the_update() -> None:
    strategy = build_strategy(FederationConfig(strategy="fedavg", server_lr=0.5))
    params, update = vectors(2)

    torch.testing.assert_close(strategy.apply(params, update), params + 0.5 * update)


def test_only_fedprox_asks_sites_for_a_proximal_term() -> None:
    mus = {name: build_strategy(FederationConfig(strategy=name, mu=0.3)).proximal_mu
           for name in STRATEGIES}

    assert mus == {"fedavg": 0.0, "fedprox": 0.3, "fedadagrad": 0.0, "fedadam": 0.0,
                   "fedyogi": 0.0}


@pytest.mark.parametrize(("name", "default"), [
    ("fedavg", 1.0), ("fedprox", 1.0), ("fedadagrad", 0.1), ("fedadam", 0.03), ("fedyogi", 0.03),
])
def test_server_lr_zero_means_the_strategy_default(name: str, default: float) -> None:
    strategy = build_strategy(FederationConfig(strategy=name, server_lr=0.0))

    assert strategy.server_lr == default  # type: ignore[attr-defined]


# ----------------------------------------------------------------- Reddi et al. 2021, Alg. 2
def reddi_reference(name: str, params: np.ndarray, updates: list[np.ndarray], *, eta: float,
                    beta1: float, beta2: float, tau: float) -> list[np.ndarray]:
    """Algorithm 2 of Reddi et al. 2021 in float64; m_{-1} = 0, v_{-1} = tau^2."""
    x = params.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    out = []
    for delta in updates:
        d = delta.astype(np.float64)
        m = beta1 * m + (1 - beta1) * d
        if name == "fedadagrad":
            v = v + d**2
        elif name == "fedadam":
            v = beta2 * v + (1 - beta2) * d**2
        else:  # fedyogi
            v = v - (1 - beta2) * d**2 * np.sign(v - d**2)
        x = x + eta * m / (np.sqrt(v) + tau)
        out.append(x.copy())
    return out


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_strategies_follow_reddi_algorithm_2(name: str) -> None:
    config = FederationConfig(strategy=name, server_lr=0.3, beta1=0.8, beta2=0.95, tau=0.05)
    strategy = build_strategy(config)
    params = torch.tensor([0.5, -1.0, 0.0, 2.0])
    # Mixed scales so that for Yogi d^2 is sometimes above v and sometimes below.
    updates = [torch.tensor([1.0, -0.02, 0.3, 0.0]),
               torch.tensor([-0.5, 0.01, 0.3, 0.04]),
               torch.tensor([2.0, -0.03, -0.3, 0.0])]

    expected = reddi_reference(name, params.numpy(), [u.numpy() for u in updates],
                               eta=0.3, beta1=0.8, beta2=0.95, tau=0.05)

    current = params
    for update, want in zip(updates, expected, strict=True):
        current = strategy.apply(current, update)
        np.testing.assert_allclose(current.numpy(), want, rtol=1e-5, atol=1e-6)


def test_fedadam_first_step_in_closed_form() -> None:
    strategy = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)

    new = strategy.apply(torch.zeros(1), torch.tensor([2.0]))

    m = 0.1 * 2.0
    v = 0.99 * 1e-6 + 0.01 * 4.0
    assert float(new) == pytest.approx(0.1 * m / (v**0.5 + 1e-3), rel=1e-6)


def test_fedyogi_second_moment_moves_towards_the_squared_update() -> None:
    strategy = FedYogi(server_lr=0.1, beta1=0.9, beta2=0.9, tau=1.0)
    # v starts at tau^2 = 1; d^2 = 4 > v raises v, d^2 = 0.25 < v lowers it.
    strategy.apply(torch.zeros(2), torch.tensor([2.0, 0.5]))

    assert strategy.v is not None
    torch.testing.assert_close(strategy.v, torch.tensor([1.0 + 0.1 * 4.0, 1.0 - 0.1 * 0.25]))


def test_fedadagrad_second_moment_accumulates() -> None:
    strategy = FedAdagrad(server_lr=0.1, tau=0.5)
    for update in (torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([3.0])):
        strategy.apply(torch.zeros(1), update)

    assert strategy.v is not None
    torch.testing.assert_close(strategy.v, torch.tensor([0.25 + 1.0 + 4.0 + 9.0]))


# ----------------------------------------------------------------- configuration errors
def test_unknown_strategy_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_strategy(FederationConfig(strategy="fedsgd"))

    message = str(excinfo.value)
    assert "federation.strategy" in message
    assert "'fedsgd'" in message
    for name in STRATEGIES:
        assert name in message


@pytest.mark.parametrize(("config", "key"), [
    (FederationConfig(strategy="fedavg", server_lr=-1.0), "federation.server_lr"),
    (FederationConfig(strategy="fedadam", server_lr=-0.1), "federation.server_lr"),
    (FederationConfig(strategy="fedadam", tau=0.0), "federation.tau"),
    (FederationConfig(strategy="fedyogi", beta1=1.0), "federation.beta1"),
    (FederationConfig(strategy="fedadagrad", beta2=-0.1), "federation.beta2"),
    (FederationConfig(strategy="fedprox", mu=-0.5), "federation.mu"),
])
def test_bad_hyperparameters_name_their_key(config: FederationConfig, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_strategy(config)


def test_stateless_strategy_refuses_foreign_state() -> None:
    strategy = FedProx(mu=0.1)

    with pytest.raises(ConfigError, match=r"'fedprox' keeps no state.*\['m', 'v'\]"):
        strategy.load_state_dict({"m": torch.zeros(1), "v": torch.zeros(1)})

    FedAvg().load_state_dict({})  # an empty checkpoint is fine
