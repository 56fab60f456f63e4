"""A hospital's own privacy policy and ledger: what a coordinator's config can no longer do.

Each attack from the review is played by a coordinator that edits the job's
configuration (the only thing it controls at a site) and is shown to fail at a
hospital's node; the same jobs still run at a node without a policy of its own
(Flower's simulation engine).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from fedcare.cli.main import main
from fedcare.config import RunConfig
from fedcare.errors import BudgetExceeded, ConfigError
from fedcare.federation.site import FitInstructions
from fedcare.federation.training import TrainingPlan
from fedcare.privacy.accounting import GaussianEvent, epsilon
from fedcare.privacy.plan import noise_factory
from fedcare.privacy.policy import PolicyRefused, SitePolicy
from fedcare.privacy.site_ledger import Release, SiteLedger
from fedcare.runtime.flower_site import NodeSettings, SiteNode


def write_policy(folder: Path, **values: Any) -> Path:
    """A hospital's policy file with a ledger beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    policy = SitePolicy.from_dict({"ledger": "ledger.jsonl", **values})
    path = folder / "policy.toml"
    path.write_text(policy.to_toml(), encoding="utf-8")
    return path


def job(**values: Any) -> RunConfig:
    """A record-level DP job on the bundled heart-disease sites, as a coordinator sends it."""
    config = RunConfig()
    config.federation.rounds = 3
    config.privacy.level, config.privacy.epsilon = "record", 1.0
    for key, value in values.items():
        config.set_value(key.replace("__", "."), value)
    return config


def hospital(policy: Path, site: str = "cleveland") -> NodeSettings:
    return NodeSettings(site=site, policy=str(policy))


def fit(round_number: int, epochs: int = 1, cohort: int = 0) -> FitInstructions:
    return FitInstructions(round_number, TrainingPlan(epochs=epochs, batch_size=32, lr=0.1),
                           cohort=cohort)


def ledger_lines(policy: Path) -> list[dict[str, Any]]:
    path = Path(SitePolicy.load(policy).ledger)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the policy file
def test_a_policy_file_says_which_key_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('min_level = "record"\nepsilon = -1\n')
    with pytest.raises(ConfigError, match=rf"site policy {bad}: epsilon must be a number > 0"):
        SitePolicy.load(bad)
    bad.write_text('min_levle = "record"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['min_levle'\]"):
        SitePolicy.load(bad)
    bad.write_text('seeded_noise = "yes"\n')
    with pytest.raises(ConfigError, match="seeded_noise must be bool"):
        SitePolicy.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        SitePolicy.load(tmp_path / "missing.toml")


def test_a_policy_round_trips_and_its_ledger_lives_beside_it(tmp_path: Path) -> None:
    path = write_policy(tmp_path / "hospital", min_level="site", epsilon=2.0, max_rounds=7)
    policy = SitePolicy.load(path)
    assert policy.ledger == str((tmp_path / "hospital" / "ledger.jsonl").resolve())
    assert (policy.min_level, policy.epsilon, policy.max_rounds) == ("site", 2.0, 7)
    assert math.isinf(policy.lifetime_epsilon) and not policy.seeded_noise
    assert SitePolicy.from_dict(json.loads(json.dumps({"epsilon": 2}))).epsilon == 2.0


# ----------------------------------------------------------------------------- attacks
def test_a_coordinator_cannot_make_a_site_draw_noise_it_can_regenerate(tmp_path: Path) -> None:
    seeded = job(privacy__secure=False)
    # The attack: a node that runs seeded noise draws exactly what the coordinator can
    # compute from the job's public seed, so it subtracts the noise bit for bit.
    simulated = SiteNode(seeded, NodeSettings(partition=0))
    assert simulated.noise_for is not None
    site_draw = simulated.noise_for(1, 0).gaussian(16, 1.0)
    coordinator_draw = noise_factory(seeded)(1, 0).gaussian(16, 1.0)
    assert torch.equal(site_draw, coordinator_draw)
    # A hospital's node refuses the job before it loads its data or computes anything.
    policy = write_policy(tmp_path)
    with pytest.raises(PolicyRefused, match=r"seeded noise \(privacy.secure = false\)"):
        SiteNode(seeded, hospital(policy))
    assert ledger_lines(policy) == []
    # With its CSPRNG, two draws of the same round and party differ: nothing to regenerate.
    secure = SiteNode(job(), hospital(policy))
    assert secure.noise_for is not None
    assert not torch.equal(secure.noise_for(1, 0).gaussian(16, 1.0),
                           secure.noise_for(1, 0).gaussian(16, 1.0))


def test_a_coordinators_noise_multiplier_cannot_lift_a_sites_cap(tmp_path: Path) -> None:
    override = job(privacy__epsilon=8.0, privacy__noise_multiplier=0.3)
    node = SiteNode(override, hospital(write_policy(tmp_path, epsilon=0.5)))
    mine = node.record_privacy
    assert mine is not None and mine.noise_multiplier > 0.3
    steps = override.federation.rounds * override.federation.local_epochs * mine.steps_per_epoch

    def job_epsilon(sigma: float) -> float:
        return epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=mine.sample_rate,
                                      steps=steps)], delta=1e-5)

    assert job_epsilon(mine.noise_multiplier) <= 0.5 * (1 + 1e-6)
    assert job_epsilon(0.3) > 20  # what the override would have given
    assert node.hello().epsilon_cap == 0.5
    # More noise than the site's own calibration is taken: it never weakens the guarantee.
    louder = SiteNode(job(privacy__noise_multiplier=50.0), hospital(write_policy(tmp_path)))
    assert louder.record_privacy is not None
    assert louder.record_privacy.noise_multiplier == 50.0


def test_a_site_that_requires_dp_refuses_a_job_without_it(tmp_path: Path) -> None:
    record_only = write_policy(tmp_path / "a", min_level="record")
    with pytest.raises(PolicyRefused, match=r"requires privacy.level 'record' or stronger; the "
                                            r"job asks for privacy.level = 'none'"):
        SiteNode(job(privacy__level="none"), hospital(record_only))
    assert SiteNode(job(), hospital(record_only)).record_privacy is not None
    site_only = write_policy(tmp_path / "b", min_level="site")
    with pytest.raises(PolicyRefused, match=r"requires privacy.level 'site'"):
        SiteNode(job(), hospital(site_only))


@pytest.mark.parametrize(("values", "policy", "refusal"), [
    ({"privacy__delta": 1e-3}, {}, r"privacy.delta = 0.001; this site's policy allows at most "
                                   r"1e-05"),
    ({"privacy__level": "site"}, {}, "central noise"),
    ({"federation__rounds": 30}, {"max_rounds": 20}, r"30 rounds.*at most 20"),
    ({"federation__local_epochs": 3}, {"max_local_epochs": 2}, r"3 local epochs.*at most 2"),
])
def test_a_job_beyond_the_policy_is_refused_saying_which_rule(
        tmp_path: Path, values: dict[str, Any], policy: dict[str, Any], refusal: str) -> None:
    with pytest.raises(PolicyRefused, match=refusal):
        SiteNode(job(**values), hospital(write_policy(tmp_path, **policy)))


def test_central_noise_runs_only_where_the_hospital_trusts_the_coordinator(
        tmp_path: Path) -> None:
    central = job(privacy__level="site", privacy__epsilon=4.0)
    node = SiteNode(central, hospital(write_policy(tmp_path, central_noise=True)))
    assert node.site_privacy is not None and node.site_privacy.noise == "central"


def test_a_private_job_needs_a_site_ledger() -> None:
    with pytest.raises(PolicyRefused, match="keeps no ledger"):
        SiteNode(job(), NodeSettings(site="cleveland"))
    assert SiteNode(job(privacy__level="none"), NodeSettings(site="cleveland")).name == \
        "cleveland"


def test_distributed_noise_read_one_update_at_a_time_is_charged_as_the_coordinator_sees_it(
        tmp_path: Path) -> None:
    """Under plain, the coordinator reads each update with sigma / sqrt(n) of the noise."""
    policy = write_policy(tmp_path, epsilon=8.0)
    plain = job(privacy__level="site", privacy__noise="distributed", privacy__epsilon=4.0)
    with pytest.raises(BudgetExceeded, match="caps one job at epsilon 8"):
        SiteNode(plain, hospital(policy)).hello()
    plain.protection.scheme = "secagg"  # the coordinator sees only the sum: the full sigma
    SiteNode(plain, hospital(policy)).hello()


# ----------------------------------------------------------------------------- the site ledger
def test_the_site_ledger_spans_jobs_and_restarts_and_refuses_before_computing(
        tmp_path: Path) -> None:
    policy = write_policy(tmp_path, epsilon=1.0, lifetime_epsilon=1.2)
    first = job()
    node = SiteNode(first, hospital(policy))
    node.hello()
    for round_number in (1, 2, 3):
        SiteNode(first, hospital(policy)).charge(fit(round_number))  # a process per message
    lines = ledger_lines(policy)
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert len({line["job"] for line in lines}) == 1
    spent = SiteLedger(Path(SitePolicy.load(policy).ledger), SitePolicy.load(policy)).spent()
    assert 0.9 < spent <= 1.0 + 1e-9
    # A new job (another config) would pass the lifetime cap: refused at hello.
    second = job(seed=1)
    with pytest.raises(BudgetExceeded, match=r"lifetime budget is epsilon 1.2"):
        SiteNode(second, hospital(policy)).hello()
    # The same job asked for a fourth round (or a round again) passes its job cap.
    with pytest.raises(BudgetExceeded, match="caps one job at epsilon 1"):
        SiteNode(first, hospital(policy)).charge(fit(3))
    assert len(ledger_lines(policy)) == 3  # nothing charged for what was refused


def test_more_local_epochs_than_planned_are_refused_by_the_job_cap(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, epsilon=1.0)
    node = SiteNode(job(), hospital(policy))
    with pytest.raises(BudgetExceeded, match="training round 1 would bring it to"):
        node.charge(fit(1, epochs=40))
    assert ledger_lines(policy) == []
    node.charge(fit(1))
    assert len(ledger_lines(policy)) == 1


def test_a_refused_round_trains_nothing_and_the_coordinator_gets_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedcare.runtime import flower_client
    from fedcare.runtime.flower_wire import to_record

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    policy = write_policy(tmp_path, epsilon=1.0)
    config = job()
    node = flower_client.site_node(config, hospital(policy))

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained although the round was refused")

    monkeypatch.setattr(node.trainer, "train", no_training)
    params = torch.zeros(node.trainer.model.spec.size)
    message = Message(to_record(((), (params, fit(1, epochs=40)))), dst_node_id=1,
                      message_type="train")
    message.content["fedcare-header"] = ConfigRecord(
        {"kind": "fit", "site": "cleveland", "round": 1, "attempt": 0, "index": 0})
    context = Context(run_id=1, node_id=1, node_config={"site": "cleveland",
                                                        "policy": str(policy)},
                      state=RecordDict(), run_config={})
    reply = flower_client.build_client_app(config)(message, context)
    refusal = reply.content.config_records["fedcare-error"]
    assert refusal["type"] == "BudgetExceeded"
    assert "caps one job at epsilon 1" in str(refusal["message"])
    assert ledger_lines(policy) == []


def test_concurrent_charges_never_pass_the_lifetime_cap(tmp_path: Path) -> None:
    policy = SitePolicy(lifetime_epsilon=1.0, ledger=str(tmp_path / "ledger.jsonl"))
    one = Release("job", 1, "one query", noise_multiplier=10.0, sample_rate=1.0, steps=1)
    fit_at_most = max(n for n in range(1, 20)
                      if epsilon([GaussianEvent(noise_multiplier=10.0, sample_rate=1.0,
                                                steps=n)], delta=policy.delta) <= 1.0)
    assert fit_at_most == 7  # eps 0.986 after 7, 1.061 after 8
    refused: list[Exception] = []

    def charge() -> None:
        try:
            SiteLedger(Path(policy.ledger), policy).charge([one])
        except BudgetExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=charge) for _ in range(fit_at_most + 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ledger = SiteLedger(Path(policy.ledger), policy)
    assert len(ledger.releases()) == fit_at_most and len(refused) == 4
    assert ledger.spent() <= 1.0 + 1e-9


def test_a_damaged_site_ledger_refuses_instead_of_forgetting(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, lifetime_epsilon=5.0)
    SiteNode(job(), hospital(policy)).charge(fit(1))
    path = Path(SitePolicy.load(policy).ledger)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(Exception, match=r"line 2: not a release.*refuses every private job"):
        SiteNode(job(), hospital(policy)).charge(fit(2))


# ----------------------------------------------------------------------------- fedcare site
def test_fedcare_site_budget_shows_what_is_spent_and_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    args = ["site", "--name", "cleveland", "--state", str(state), "--lifetime-epsilon", "3"]
    assert main([*args, "--budget"]) == 0
    assert "nothing released yet" in capsys.readouterr().out
    policy = state / "policy.toml"
    assert policy.stat().st_mode & 0o777 == 0o600
    SiteNode(job(), hospital(policy)).charge(fit(1))
    assert main([*args, "--budget"]) == 0
    out = capsys.readouterr().out
    assert "1 release(s)" in out and "cap 3, left" in out


def test_fedcare_site_runs_seeded_noise_only_in_a_loopback_test(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write_policy(tmp_path, seeded_noise=True)
    assert main(["site", "--name", "va", "--aggregator", "127.0.0.1:9092", "--certs",
                 str(tmp_path), "--policy", str(policy), "--state", str(tmp_path / "s")]) == 2
    assert "only a loopback test (--insecure) may run it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what a refusal says
def test_a_sites_data_error_reaches_the_coordinator_as_its_category_only(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A bad cell's value and the file's path stay at the site, in its own log."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedcare.runtime.flower_client import build_client_app
    from fedcare.runtime.flower_wire import to_record

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    schema = tmp_path / "schema.toml"
    schema.write_text('target = "outcome"\npositive = ["1"]\nnegative = ["0"]\n'
                      '[numeric]\ncolumns = ["age", '
                      '"cholesterol"]\n[categorical]\n')
    data = tmp_path / "exports" / "va-2026.csv"
    data.parent.mkdir()
    data.write_text("age,cholesterol,outcome\n63,233,1\n41,204,0\n57,9x41,1\n")
    config = RunConfig()
    config.data.schema, config.data.standardize = str(schema), "bounds"
    message = Message(to_record(None), dst_node_id=1, message_type="query.fedcare_hello")
    message.content["fedcare-header"] = ConfigRecord({"kind": "hello", "site": ""})
    context = Context(run_id=1, node_id=1, node_config={"site": "va", "data-file": str(data)},
                      state=RecordDict(), run_config={})
    reply = build_client_app(config)(message, context)
    refusal = reply.content.config_records["fedcare-error"]
    told = str(refusal["message"])
    assert refusal["type"] == "SchemaError"
    assert "site 'va': its data do not match the federation's schema" in told
    for secret in ("9x41", "va-2026", str(tmp_path), "row"):
        assert secret not in told
    site_log = capfd.readouterr().err
    assert "9x41" in site_log and str(data) in site_log  # the operator sees what to fix


# ----------------------------------------------------------------------------- identity
def test_a_registered_hospital_cannot_take_another_sites_identity() -> None:
    """The roster binds a site's name to the node key of its CA-signed certificate."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.node_pb2 import NodeInfo

    from fedcare.runtime.flower_server import (
        FanOut,
        Roster,
        ServerSettings,
        node_key_fingerprint,
    )
    from fedcare.runtime.flower_site import SiteHello

    keys = {site: ec.generate_private_key(ec.SECP384R1()).public_key()
            for site in ("cleveland", "va")}

    def pem(site: str) -> bytes:
        return keys[site].public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)

    class Grid:  # what Flower's SuperLink tells the ServerApp of its authenticated nodes
        def __init__(self, nodes: dict[int, bytes]) -> None:
            self.nodes = nodes

        def get_nodes(self) -> list[Any]:
            return [NodeInfo(node_id=i, public_key=key) for i, key in self.nodes.items()]

    class Messenger:  # every node says it is cleveland
        def ask_many(self, requests: list[Any]) -> dict[str, object]:
            return {str(r[0]): SiteHello("cleveland", 13, None, math.inf) for r in requests}

    settings = ServerSettings(roster=("cleveland", "va"), node_keys=tuple(
        (site, node_key_fingerprint(key)) for site, key in keys.items()))
    assert ServerSettings.from_run_config(settings.to_run_config()) == settings
    logged: list[str] = []
    fan_out = FanOut(Messenger(), lambda round_number: [])  # type: ignore[arg-type]
    roster = Roster(RunConfig(), settings, Messenger(), fan_out,  # type: ignore[arg-type]
                    logged.append)
    # va's node (registered, authenticated with va's key) claims to be cleveland: refused.
    roster.refresh(Grid({7: pem("va")}))  # type: ignore[arg-type]
    assert roster.connected() == []
    assert "node 7 says it is site 'cleveland', but it did not authenticate with the node key " \
           "of 'cleveland'" in logged[-1]
    assert roster.refusals[7] == logged[-1]  # the QuorumError at the deadline says it
    # Cleveland's own node is let in.
    roster.refresh(Grid({7: pem("va"), 9: pem("cleveland")}))  # type: ignore[arg-type]
    assert roster.connected() == ["cleveland"]
    assert next(s for s in roster.sites if s.name == "cleveland").node_id == 9


def test_a_node_signs_with_its_own_certificate_only(tmp_path: Path) -> None:
    from fedcare.protection.secagg import SecAggScheme
    from fedcare.runtime.flower_deploy import make_certificates

    pki = make_certificates(tmp_path / "pki", ["cleveland", "va"])
    with pytest.raises(ConfigError, match="go together"):
        NodeSettings.from_node_config({"site": "va", "ca": str(pki.ca)})
    cert, key = pki.sites["cleveland"]
    wrong = NodeSettings(site="va", ca=str(pki.ca), certificate=str(cert), identity_key=str(key))
    with pytest.raises(ConfigError, match="names site 'cleveland'; this node is site 'va'"):
        wrong.identity()
    right = NodeSettings(site="cleveland", ca=str(pki.ca), certificate=str(cert),
                         identity_key=str(key))
    config = RunConfig()
    config.protection.scheme = "secagg"
    scheme = SiteNode(config, right).protection
    assert isinstance(scheme, SecAggScheme) and scheme.identity is not None
    assert scheme.identity.name == "cleveland"
