"""Gradient inversion against what the aggregator reads of one site (fedcare.audit.gradient)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from fedcare.audit.gradient import (
    ATTACKS,
    DLG,
    AnalyticInversion,
    DenseGradients,
    ExclusiveNeurons,
    FeatureLayout,
    GradientAuditResult,
    RecordDecoder,
    Records,
    TabLeak,
    audit_gradient_leakage,
    build_attack,
    check_gradients,
    idlg_labels,
    observe_updates,
    prior_guess,
    reconstruction_metrics,
    records_found,
    resolve_methods,
    update_to_gradient,
)
from fedcare.config import RunConfig
from fedcare.data.datasets import HEART_SCHEMA, build_federation
from fedcare.errors import ConfigError, DataError, FedcareError
from fedcare.models import FlatModel, build_model

MARGIN = 0.05
"""How far above the prior baseline a protected configuration may score (records
recovered and mean per-feature accuracy); the measured gaps are at most zero."""


@pytest.fixture(autouse=True)
def _quiet_single_thread() -> Iterator[None]:
    # privacy.secure = false warns that seeded noise is not private: that is the point here.
    # One torch thread, as `fedcare run` uses: two spin against any other load on tiny batches.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


def config(dataset: str = "heart-disease", model: str = "mlp", **values: Any) -> RunConfig:
    c = RunConfig()
    c.federation.rounds = 1  # the whole budget in the one round observed: least noise
    c.privacy.secure = False  # seeded noise: reproducible (and not private), for tests
    c.model.name = model
    c.model.hidden = [32]
    if dataset == "breast-cancer":
        c.data.dataset = dataset
        c.data.partition = "iid"
        c.data.sites = 4
    for key, value in values.items():
        c.set_value(key.replace("__", "."), value)
    return c


def assert_no_better_than_prior(result: GradientAuditResult) -> None:
    prior = result.prior
    for name, outcome in result.attacks.items():
        m = outcome.metrics
        assert m.records_recovered <= prior.metrics.records_recovered + MARGIN, name
        assert m.mean_feature_accuracy <= prior.metrics.mean_feature_accuracy + MARGIN, name
        assert outcome.round_records_recovered <= prior.round_records_recovered + MARGIN, name


# --------------------------------------------------------------------------- what is observed
@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_the_observed_update_is_the_records_gradient_computed_by_site_fit(model: str) -> None:
    c = config(model=model)
    data = build_federation(c.data)
    observed = observe_updates(c, data, site="hungarian", rows=[0, 5, 9], seed=1)
    assert observed.payloads == 1 and observed.round_sites == (("hungarian",),) * 3
    net = DenseGradients(FlatModel(build_model(c.model, data.n_features)), observed.params)
    expected = net(observed.inputs, observed.labels).double()
    # the update is w_local - w_global in float32: the gradient is exact to rounding
    torch.testing.assert_close(observed.gradients, expected, rtol=1e-3, atol=1e-5)
    assert torch.equal(observed.inputs, data.sites[1].x_train[[0, 5, 9]])


def test_clipping_alone_does_not_protect() -> None:
    # Central noise is added by the aggregator after it has read each site's clipped update:
    # what it reads is clipping alone, which rescales every first-layer gradient together.
    clip = 0.01
    c = config(privacy__level="site", privacy__noise="central", privacy__clip_norm=clip)
    data = build_federation(c.data, private=True)
    observed = observe_updates(c, data, site="cleveland", rows=list(range(10)))
    unclipped = observe_updates(config(data__standardize="bounds"), data, site="cleveland",
                                rows=list(range(10)))
    assert (unclipped.update_norms > 2 * clip).all()  # so every update was clipped...
    assert observed.update_norms.max() <= clip and observed.update_norms.min() > 0.999 * clip
    result = audit_gradient_leakage(c, n_records=30, method=["analytic", "neurons"], seed=0)
    assert "without noise" in result.view
    for outcome in result.attacks.values():  # ...and the record still comes back
        assert outcome.metrics.records_recovered >= 0.95
        assert outcome.metrics.label_accuracy >= 0.95


# --------------------------------------------------------------------------- no protection
@pytest.mark.parametrize(("dataset", "model", "method"), [
    ("breast-cancer", "mlp", ["analytic", "neurons", "idlg"]),  # the iDLG, 30-32-1
    ("heart-disease", "mlp", ["analytic", "tableak"]),
    ("heart-disease", "logreg", ["analytic"]),
])
def test_batch_size_one_without_protection_recovers_the_records(dataset: str, model: str,
                                                                method: list[str]) -> None:
    result = audit_gradient_leakage(config(dataset, model), n_records=25, method=method, seed=0)
    assert result.payloads == 1 and "alone (plain)" in result.view
    for name, outcome in result.attacks.items():
        assert outcome.metrics.records_recovered >= 0.95, name
        assert outcome.metrics.label_accuracy >= 0.95, name
        assert outcome.round_records_recovered >= 0.95, name
    assert result.prior.metrics.records_recovered <= 0.05  # the prior alone recovers nobody


# --------------------------------------------------------------------------- DP
@pytest.mark.parametrize(("dataset", "values"), [
    # distributed: the site adds its noise share before sending, so the aggregator reads a
    # noised update (with central noise it would read it unnoised; see clipping above)
    ("heart-disease", {"privacy__level": "site", "privacy__noise": "distributed"}),
    ("breast-cancer", {"privacy__level": "site", "privacy__noise": "distributed"}),
    # record level: DP-SGD at the site; its update is noised before it leaves
    ("heart-disease", {"privacy__level": "record"}),
    ("breast-cancer", {"privacy__level": "record"}),
])
def test_dp_at_epsilon_one_leaves_no_more_than_the_prior(dataset: str,
                                                         values: dict[str, Any]) -> None:
    c = config(dataset, privacy__epsilon=1.0, **values)
    result = audit_gradient_leakage(c, n_records=20, method="auto", seed=0)
    assert result.noise_multiplier > 1 and result.payloads == 1
    assert_no_better_than_prior(result)


# --------------------------------------------------------------------------- sums
@pytest.mark.parametrize("scheme", ["secagg", "ckks"])
def test_a_sum_over_four_sites_hides_a_logistic_regression_record(scheme: str) -> None:
    c = config(model="logreg", protection__scheme=scheme)
    result = audit_gradient_leakage(c, n_records=15, method="all", seed=0)
    assert result.payloads == 4 and f"sum of 4 sites' payloads ({scheme})" in result.view
    assert_no_better_than_prior(result)


@pytest.mark.parametrize("dataset", ["heart-disease", "breast-cancer"])
def test_a_sum_over_four_sites_does_not_hide_records_behind_exclusive_relu_units(
        dataset: str) -> None:
    # Pan et al. 2022: a hidden unit that only one of the summed records activates carries
    # that record exactly. Secure aggregation alone is no defence at batch size 1.
    c = config(dataset, protection__scheme="secagg")
    result = audit_gradient_leakage(c, n_records=20, method=["analytic", "neurons"], seed=0)
    assert result.payloads == 4
    neurons, analytic, prior = (result.attacks["neurons"], result.attacks["analytic"],
                                result.prior)
    assert neurons.round_records_recovered >= 0.5
    assert neurons.metrics.records_recovered > prior.metrics.records_recovered + 0.1
    # the least-squares combination of all rows is a blend of the four records
    assert analytic.metrics.records_recovered <= prior.metrics.records_recovered + MARGIN


def test_secagg_with_distributed_noise_leaves_no_more_than_the_prior() -> None:
    c = config("breast-cancer", protection__scheme="secagg", privacy__level="site",
               privacy__noise="distributed", privacy__epsilon=1.0)
    result = audit_gradient_leakage(c, n_records=15, method=["analytic", "neurons"], seed=0)
    assert "noise shares" in result.view
    assert_no_better_than_prior(result)


# --------------------------------------------------------------------------- every attack
def exact_gradients(model: str, n: int, seed: int = 0) -> tuple[FlatModel, torch.Tensor,
                                                               torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """Heart-disease-shaped records (one-hot blocks) and their exact gradients."""
    layout = FeatureLayout.of(HEART_SCHEMA)
    generator = torch.Generator().manual_seed(seed)
    flat = FlatModel(build_model(config(model=model).model, layout.n_features))
    params = flat.init_params(generator)
    x = torch.zeros(n, layout.n_features)
    x[:, :layout.n_numeric] = torch.rand(n, layout.n_numeric, generator=generator) * 2 - 1
    for block in layout.blocks:
        pick = torch.randint(block.n_categories, (n,), generator=generator)
        for row, k in enumerate(pick.tolist()):
            if k:  # drop_first: category 0 is the all-zero block
                x[row, block.start + k - 1] = 1.0
    y = (torch.rand(n, generator=generator) < 0.5).float()
    return flat, params, x, y, DenseGradients(flat, params)(x, y)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_fits_the_same_way_and_is_reproducible(name: str) -> None:
    flat, params, x, y, g = exact_gradients("mlp", 4)
    layout = FeatureLayout.of(HEART_SCHEMA)

    def fitted() -> Any:
        attack = build_attack(name, seed=3)
        if hasattr(attack, "steps"):
            attack.steps = 300  # settings are public attributes; fewer steps keep this fast
        return attack.fit(g, model=flat, params=params, layout=layout)

    first, again = fitted(), fitted()
    assert first.name == name
    assert first.inputs_.shape == x.shape and first.labels_.shape == y.shape
    assert len(first.candidates_) == 4
    for j, claimed in enumerate(first.candidates_):
        assert claimed.ndim == 2 and 1 <= claimed.shape[0] <= 1
        assert torch.equal(claimed[0], first.inputs_[j])
    assert torch.equal(first.inputs_, again.inputs_)
    assert torch.equal(first.labels_, again.labels_)
    assert torch.equal(first.labels_, y)  # every attack reads the label at batch size 1


def test_analytic_inversion_is_exact_and_blind_to_the_gradients_scale() -> None:
    flat, params, x, _, g = exact_gradients("mlp", 6)
    layout = FeatureLayout.of(HEART_SCHEMA)
    attack = AnalyticInversion().fit(g, model=flat, params=params, layout=layout)
    torch.testing.assert_close(attack.inputs_, x, rtol=0, atol=1e-5)
    scaled = AnalyticInversion().fit(g * 1e-3, model=flat, params=params, layout=layout)
    torch.testing.assert_close(scaled.inputs_, x, rtol=0, atol=1e-5)
    assert attack.recoverable_.all()


def test_exclusive_neurons_separates_the_records_of_a_sum() -> None:
    flat, params, x, _, g = exact_gradients("mlp", 4, seed=2)
    layout = FeatureLayout.of(HEART_SCHEMA)
    attack = ExclusiveNeurons().fit(g.sum(0) / 4, model=flat, params=params, layout=layout,
                                    payloads=4)
    claimed = attack.candidates_[0]
    assert 1 <= claimed.shape[0] <= 4
    hits = [int((claimed - x[k]).abs().amax(dim=1).min() < 1e-4) for k in range(4)]
    assert sum(hits) == claimed.shape[0] >= 2  # every claim is one of the four records


def test_tableak_pools_restarts_into_valid_one_hot_blocks() -> None:
    flat, params, x, _, g = exact_gradients("mlp", 5, seed=1)
    layout = FeatureLayout.of(HEART_SCHEMA)
    attack = TabLeak(steps=400, restarts=3, seed=0).fit(g, model=flat, params=params,
                                                        layout=layout)
    assert attack.loss_.shape == (5, 3)
    for block in layout.blocks:
        part = attack.inputs_[:, block.start:block.stop]
        assert set(torch.unique(part).tolist()) <= {0.0, 1.0} and (part.sum(1) <= 1).all()
    decoder = RecordDecoder(layout, np.zeros(8), np.ones(8), np.full((8, 2), np.nan))
    truth, guess = decoder.decode(x), decoder.decode(attack.inputs_)
    assert np.array_equal(truth.categorical, guess.categorical)


def test_dlg_recovers_the_label_it_optimises() -> None:
    flat, params, _, y, g = exact_gradients("logreg", 6, seed=4)
    layout = FeatureLayout.of(HEART_SCHEMA)
    attack = DLG(label="optimize", steps=600, restarts=2, seed=0).fit(
        g, model=flat, params=params, layout=layout)
    assert attack.name == "dlg" and torch.equal(attack.labels_, y)
    assert torch.equal(idlg_labels(g, flat.spec), y)


# --------------------------------------------------------------------------- metrics
def test_metrics_count_numeric_within_tolerance_and_categories_exactly() -> None:
    layout = FeatureLayout(("age", "sex"), FeatureLayout.of(HEART_SCHEMA).blocks[:1])
    truth = Records(np.array([[50.0, 1.0], [60.0, 0.0]]), np.array([[2], [0]]))
    guess = Records(np.array([[53.0, 1.0], [70.0, 0.0]]), np.array([[2], [1]]))
    tolerance = np.array([4.1, 0.05])  # 0.05 of ranges (18, 100) and (0, 1)
    m = reconstruction_metrics(truth, guess, [1, 0], [1, 1], layout=layout,
                               tolerance=tolerance)
    assert m.feature_accuracy == {"age": 0.5, "sex": 1.0, "cp": 0.5}
    assert m.records_recovered == 0.5 and m.label_accuracy == 0.5
    assert m.mean_feature_accuracy == pytest.approx(2 / 3)
    assert records_found(truth, Records(guess.numeric[:1], guess.categorical[:1]),
                         tolerance=tolerance) == 1


def test_prior_guess_takes_the_densest_window_and_the_modes() -> None:
    public = Records(np.array([[40.0, 1.0], [41.0, 1.0], [42.0, 0.0], [80.0, 1.0]]),
                     np.array([[3], [3], [1], [0]]))
    guess, label = prior_guess(public, [1, 0, 0, 0], tolerance=np.array([1.0, 0.05]))
    assert 40.0 <= guess.numeric[0, 0] <= 42.0  # within 1 of 40, 41 and 42
    assert guess.numeric[0, 1] == pytest.approx(1.05)  # within 0.05 of the three ones
    assert guess.categorical[0, 0] == 3 and label == 0.0


def test_the_decoder_maps_back_to_the_schema_and_its_bounds() -> None:
    c = config()
    data = build_federation(c.data, private=True)  # bounds: (x - mid) / half-range
    decoder = RecordDecoder.for_site(data, "cleveland")
    records = decoder.decode(data.sites[0].x_train[:3])
    assert ((records.numeric[:, 0] >= 18) & (records.numeric[:, 0] <= 100)).all()
    assert decoder.tolerance(0.05)[0] == pytest.approx(0.05 * 82)
    far = data.sites[0].x_train[:1].clone()
    far[0, 0] = 50.0  # an attack's wild value is clipped to the public range
    assert decoder.decode(far).numeric[0, 0] == 100.0


def test_result_is_frozen_and_serialisable() -> None:
    result = audit_gradient_leakage(config(model="logreg"), n_records=5, method="analytic",
                                    seed=0)
    text = json.dumps(result.to_dict())
    back = json.loads(text)
    assert back["attacks"]["analytic"]["records_recovered"] == 1.0
    assert back["epsilon"] == "inf" and back["best"] == "analytic"
    assert back["prior"]["n_records"] == 5 and "feature_accuracy" in back["prior"]
    assert 0 < back["median_update_norm"] < 10 and back["payloads"] == 1
    with pytest.raises(AttributeError):
        result.seed = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- bad input
def test_a_wrong_length_or_non_finite_update_is_refused_naming_it() -> None:
    flat, params, _, _, g = exact_gradients("mlp", 2)
    layout = FeatureLayout.of(HEART_SCHEMA)
    with pytest.raises(DataError, match=rf"shape \(2, {flat.spec.size - 1}\).*expected "
                                        rf"\(n_records, {flat.spec.size}\)"):
        AnalyticInversion().fit(g[:, 1:], model=flat, params=params, layout=layout)
    bad = g.clone()
    bad[1, 3] = math.nan
    with pytest.raises(DataError, match=r"record 1 has value nan at index 3 \(0.weight\[3\]\)"):
        build_attack("tableak").fit(bad, model=flat, params=params, layout=layout)
    payload = torch.cat([g[0], torch.tensor([1.0])])
    with pytest.raises(DataError, match=r"payload of site 'x', round 2 has shape \(5\,\)"):
        update_to_gradient(payload[:5], spec=flat.spec, lr=0.1, payloads=1,
                           where="site 'x', round 2")
    payload[-1] = math.inf
    with pytest.raises(DataError, match="weight slot"):
        update_to_gradient(payload, spec=flat.spec, lr=0.1, payloads=1, where="site 'x'")
    with pytest.raises(DataError, match="global parameters"):
        AnalyticInversion().fit(g, model=flat, params=params[:-1], layout=layout)
    with pytest.raises(DataError, match="must be a tensor"):
        check_gradients(g.numpy(), flat.spec, attack="analytic")  # type: ignore[arg-type]


def test_bad_settings_are_refused_naming_them() -> None:
    flat, params, _, _, g = exact_gradients("mlp", 1)
    layout = FeatureLayout.of(HEART_SCHEMA)
    with pytest.raises(ConfigError, match="'steps' parameter of tableak"):
        TabLeak(steps=0).fit(g, model=flat, params=params, layout=layout)
    with pytest.raises(ConfigError, match="'label' parameter of DLG"):
        DLG(label="guess").fit(g, model=flat, params=params, layout=layout)
    with pytest.raises(ConfigError, match="payloads"):
        ExclusiveNeurons().fit(g, model=flat, params=params, layout=layout, payloads=0)
    with pytest.raises(ConfigError, match="'auto', 'all'"):
        resolve_methods(["analytic", "magic"], HEART_SCHEMA)
    with pytest.raises(ConfigError, match="Unknown gradient attack 'magic'"):
        build_attack("magic")
    with pytest.raises(ConfigError, match=r"n_records must be an int in \[1, \d+\] \(site "
                                          r"'cleveland'"):
        audit_gradient_leakage(config(), n_records=10_000, seed=0)
    with pytest.raises(ConfigError, match="Unknown target site 'mars'"):
        audit_gradient_leakage(config(), n_records=1, site="mars", seed=0)
    with pytest.raises(ConfigError, match="tolerance"):
        audit_gradient_leakage(config(), n_records=1, tolerance=0.0, seed=0)
    assert issubclass(DataError, FedcareError)


def test_auto_picks_tableak_for_mixed_types_and_idlg_for_numeric_data() -> None:
    assert resolve_methods("auto", HEART_SCHEMA) == ["analytic", "neurons", "tableak"]
    breast = build_federation(config("breast-cancer").data).schema
    assert resolve_methods("auto", breast) == ["analytic", "neurons", "idlg"]
    assert resolve_methods("all", HEART_SCHEMA) == list(ATTACKS)
