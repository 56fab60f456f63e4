"""Same numbers everywhere: a site's data as it prepares them alone, and the deployed model.

A deployed site reads only its own file; ``fedcare run --data-dir`` reads every site's.
Both must give each site the same split, imputation and encoding, and federated
standardisation must sum the sites' moments under the protection scheme in both, so
the deployment trains the model ``fedcare run`` trains on the same files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import RecordDict
from loopback import SITES, Loopback, rounds_done, small_config, wait_until

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation, split_sites
from fedcare.data.preprocess import count_and_sums, squared_deviations
from fedcare.errors import ConfigError, ProtocolError
from fedcare.protection import build_scheme
from fedcare.protection.base import AggregatorSession, Exchange, Scheme, SiteSession
from fedcare.runtime.flower_site import (
    MomentsRequest,
    NodeSettings,
    SiteNode,
    Standardization,
    recall_standardization,
    receive_standardization,
)
from fedcare.runtime.local import load_federation, scheme_sum

SCHEMA_TOML = """\
target = "outcome"
positive = ["1"]
negative = ["0"]

[numeric]
columns = ["age", "sbp", "creatinine"]

[categorical]
smoker = ["no", "yes"]

[bounds]
age = [18, 100]
sbp = [70, 220]
creatinine = [20, 800]
"""


def write_sites(directory: Path, sizes: dict[str, int], seed: int = 7) -> Path:
    """One CSV per site, in the site's own units and mix, with some cells missing."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(sizes.items()):
        age = rng.normal(55 + 6 * k, 12, n)
        sbp = rng.normal(130 + 5 * k, 18, n)
        creatinine = rng.lognormal(4.4 + 0.1 * k, 0.3, n)
        smoker = rng.random(n) < 0.3 + 0.1 * k
        risk = 0.05 * (age - 60) + 0.03 * (sbp - 130) + 0.004 * (creatinine - 90) + smoker - 0.5
        outcome = rng.random(n) < 1 / (1 + np.exp(-risk))
        lines = ["age,sbp,creatinine,smoker,outcome"]
        for i in range(n):
            cells = [f"{age[i]:.1f}", f"{sbp[i]:.0f}", f"{creatinine[i]:.1f}",
                     "yes" if smoker[i] else "no", str(int(outcome[i]))]
            if i % 17 == 3:  # a missing value here and there, imputed from the site's rows
                cells[i % 3] = ""
            lines.append(",".join(cells))
        (directory / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


SIZES = {"site-0": 90, "site-1": 140, "site-2": 65}


def files_config(tmp_path: Path, scheme: str = "plain", rounds: int = 2) -> RunConfig:
    config = small_config(scheme, rounds)
    config.data.data_dir = str(write_sites(tmp_path / "sites", SIZES))
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA_TOML, encoding="utf-8")
    config.data.schema = str(schema)
    config.data.missing = "impute"
    return config


def alone(config: RunConfig, site: str) -> RunConfig:
    """The config as a deployed site runs it: its own file only (`NodeSettings.apply`)."""
    return NodeSettings(site=site, data_file=str(Path(config.data.data_dir) / f"{site}.csv")
                        ).apply(config)


# ------------------------------------------------------------------ a site alone
@pytest.mark.parametrize("standardize", ["site", "bounds", "none"])
def test_a_site_alone_splits_imputes_and_encodes_as_among_all_sites(
        standardize: str, tmp_path: Path) -> None:
    config = files_config(tmp_path)
    config.data.standardize = standardize
    together = build_federation(config.data)
    every = split_sites(config.data)
    for position, site in enumerate(SIZES):
        lone = split_sites(alone(config, site).data)
        (train, test), = lone.splits
        np.testing.assert_array_equal(train.rows, every.splits[position][0].rows)
        np.testing.assert_array_equal(test.rows, every.splits[position][1].rows)
        np.testing.assert_array_equal(train.numeric, every.splits[position][0].numeric)
        (data,) = build_federation(alone(config, site).data).sites
        mine = together.sites[position]
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(data, name), getattr(mine, name)), (site, name)
        # The node a deployment starts reads the same tensors.
        node = SiteNode(config, NodeSettings(site=site, data_file=str(
            Path(config.data.data_dir) / f"{site}.csv")))
        assert torch.equal(node.data.x_train, mine.x_train)


def test_the_stratified_split_is_keyed_by_the_site_name_and_seed(tmp_path: Path) -> None:
    config = files_config(tmp_path)
    first = split_sites(alone(config, "site-1").data).splits[0][1].rows
    config.data.split_seed = 1
    other_seed = split_sites(alone(config, "site-1").data).splits[0][1].rows
    assert not np.array_equal(first, other_seed)
    # Another name for the same rows: another split (the name keys it, not the position).
    renamed = tmp_path / "renamed" / "site-9.csv"
    renamed.parent.mkdir()
    renamed.write_bytes((Path(config.data.data_dir) / "site-1.csv").read_bytes())
    config.data.split_seed = 0
    config.data.data_dir, config.data.files = "", [str(renamed)]
    assert not np.array_equal(split_sites(config.data).splits[0][1].rows, first)


# ------------------------------------------------------------------ federated moments
class WatchedScheme:
    """A scheme whose aggregator sessions record every payload they combine."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self.name = scheme.name
        self.received: list[object] = []

    def site_session(self, round_number: int, site: int) -> SiteSession:
        return self.scheme.site_session(round_number, site)

    def aggregator_session(self, round_number: int, cohort: Sequence[int],
                           length: int) -> AggregatorSession:
        inner = self.scheme.aggregator_session(round_number, cohort, length)
        watcher = self

        class Watched:
            def setup(self, exchange: Exchange) -> list[int]:
                return inner.setup(exchange)

            def add(self, site: int, payload: object) -> None:
                watcher.received.append(payload)
                inner.add(site, payload)

            def reveal(self, exchange: Exchange) -> torch.Tensor:
                return inner.reveal(exchange)

        return Watched()


@pytest.mark.parametrize(("scheme", "tolerance"),
                         [("plain", 0.0), ("secagg", 1e-8), ("ckks", 1e-5)])
def test_federated_moments_are_summed_under_the_protection_scheme(
        scheme: str, tolerance: float, tmp_path: Path) -> None:
    config = files_config(tmp_path, scheme)
    reference = build_federation(config.data)  # plain numpy sums
    watched = WatchedScheme(build_scheme(config.protection))

    data = build_federation(config.data, scheme_sum(watched))

    for site in SIZES:
        for key in ("mean", "std"):
            np.testing.assert_allclose(data.standardization[site][key],
                                       reference.standardization[site][key],
                                       rtol=0, atol=tolerance * 100)
    trains = [train for train, _ in split_sites(config.data).splits]
    first = [count_and_sums(t) for t in trains]
    mean = np.sum(first, axis=0)[1:] / np.sum(first, axis=0)[0]
    own = first + [squared_deviations(t, mean) for t in trains]
    assert len(watched.received) == 2 * len(SIZES)  # two sums, one payload per site each
    if scheme == "plain":  # the aggregator reads each site's moments
        for payload, vector in zip(watched.received, own, strict=True):
            np.testing.assert_allclose(np.asarray(payload), vector, rtol=1e-12)
    else:  # it holds masked vectors or ciphertexts only
        assert not any(isinstance(p, torch.Tensor | np.ndarray) for p in watched.received)
    # `fedcare run` standardises this way (load_federation).
    local = load_federation(config)
    np.testing.assert_allclose(local.standardization["site-0"]["mean"],
                               reference.standardization["site-0"]["mean"], atol=tolerance * 100)


def test_moments_beyond_the_schemes_range_are_refused_with_what_to_do() -> None:
    from fedcare.errors import QuorumError
    from fedcare.protection.secagg import SecAggScheme

    total = scheme_sum(SecAggScheme())
    np.testing.assert_allclose(total([np.array([3.0, 1.5]), np.array([2.0, -0.5])]),
                               [5.0, 1.0])
    with pytest.raises(QuorumError, match=r"column moments .* must be rescaled in the files"):
        total([np.array([300.0, 3e12]), np.array([200.0, 1e12])])


def test_a_deployed_site_waits_for_the_pooled_statistics_then_encodes_as_fedcare_run(
        tmp_path: Path) -> None:
    config = files_config(tmp_path)  # standardize = auto: federated without privacy
    together = build_federation(config.data)
    stats = Standardization(tuple(together.standardization["site-2"]["mean"]),
                            tuple(together.standardization["site-2"]["std"]))
    settings = NodeSettings(site="site-2", data_file=str(
        Path(config.data.data_dir) / "site-2.csv"))
    node = SiteNode(config, settings)
    with pytest.raises(ProtocolError, match="has not received the federation's standard"):
        node.site(2, node.protection)
    assert node.hello().n_numeric == 3
    own_train = split_sites(config.data).splits[2][0]
    np.testing.assert_array_equal(node.moments(MomentsRequest(1)), count_and_sums(own_train))
    np.testing.assert_array_equal(node.moments(MomentsRequest(2, stats.mean)),
                                  squared_deviations(own_train, np.asarray(stats.mean)))
    with pytest.raises(ProtocolError, match="step 2 with 3 finite means"):
        node.moments(MomentsRequest(2, (1.0,)))
    with pytest.raises(ProtocolError, match="positive deviations"):
        node.standardize_with(Standardization(stats.mean, (0.0, 1.0, 1.0)))

    state = RecordDict()
    assert receive_standardization(stats, node, state) == stats
    assert torch.equal(node.data.x_train, together.sites[2].x_train)
    assert torch.equal(node.data.x_test, together.sites[2].x_test)
    # The next message runs in a new process: the node state carries the statistics.
    later = SiteNode(config, settings)
    recall_standardization(state, later)
    assert torch.equal(later.data.x_train, together.sites[2].x_train)


def test_federated_standardisation_is_refused_in_a_private_run_at_the_site_too(
        tmp_path: Path) -> None:
    config = files_config(tmp_path)
    config.privacy.level, config.data.standardize = "record", "federated"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'ledger = "{tmp_path / "ledger.jsonl"}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="outside the differential privacy guarantee"):
        SiteNode(config, NodeSettings(site="site-0", policy=str(policy), data_file=str(
            Path(config.data.data_dir) / "site-0.csv")))
    with pytest.raises(ConfigError, match="outside the differential privacy guarantee"):
        load_federation(config)


# ------------------------------------------------------------------ the deployed model
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["plain", "secagg", "ckks"])
def test_a_deployment_on_the_sites_own_files_trains_the_model_of_fedcare_run(
        scheme: str, tmp_path: Path, loopback_factory: Callable[..., Loopback]) -> None:
    """Three SuperNodes, each with only its own file, federated standardisation (the
    default), against ``fedcare run --data-dir`` on the same files. Under secagg and ckks
    the deployment runs as a consortium's does: TLS and node authentication, and a
    fourth node with a key the coordinator never registered is refused."""
    from fedcare.cli.main import main
    from fedcare.runtime.flower_deploy import make_certificates
    from fedcare.runtime.flower_server import STANDARDIZATION_FILE, ServerSettings

    config = files_config(tmp_path, scheme, rounds=2 if scheme == "plain" else 1)
    keys = ""
    if scheme == "ckks":
        from fedcare.protection.ckks import generate_keys

        generate_keys(tmp_path / "keys")
        keys = config.protection.keys = str(tmp_path / "keys")
    config_file = tmp_path / "federation.toml"
    config_file.write_text(config.to_toml(), encoding="utf-8")
    assert main(["run", str(config_file), "--quiet", "--out", str(tmp_path / "local")]) == 0
    local = torch.load(tmp_path / "local" / "model.pt", weights_only=True)["params"]

    tls = scheme != "plain"
    net = loopback_factory(tls=tls)
    net.start_superlink()
    for site in SITES:
        net.start_site(site, keys=keys, data_file=str(Path(config.data.data_dir) / f"{site}.csv"))
    if tls:  # an intruder: a node key the coordinator never registered
        net.start_site("intruder", key=make_certificates(tmp_path / "other", ["site-0"])
                       .sites["site-0"][1])
    run_dir = tmp_path / "run"
    run = net.run(config, ServerSettings(run_dir=str(run_dir), roster=tuple(SITES),
                                         wait_timeout=240, message_timeout=240,
                                         node_keys=net.node_keys() if tls else ()), 900)
    wait_until(lambda: run.poll() is not None, 900, "the run to finish", net)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert all(r["participants"] == SITES for r in rounds_done(run_dir))
    if tls:  # only the three registered node keys were let in
        assert "intruder" not in json.dumps(summary)
        assert net.log("superlink").count("[Fleet.ActivateNode] Activated") == 3
        assert "Connection attempt failed" in net.log("intruder")
    deployed = torch.load(run_dir / "model.pt", weights_only=True)["params"]
    pooled = json.loads((run_dir / STANDARDIZATION_FILE).read_text())
    reference = build_federation(config.data).standardization["site-0"]
    np.testing.assert_allclose(pooled["mean"], reference["mean"],
                               atol=1e-4 if scheme == "ckks" else 1e-9)
    tolerance = 1e-5 if scheme == "ckks" else 1e-6  # ckks decryptions are noise-flooded
    assert torch.allclose(deployed, local, atol=tolerance, rtol=0), \
        (deployed - local).abs().max().item()
