"""The Flower runtime: wire format, site sessions across processes, equivalence with local."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict
from loopback import (
    SITES,
    Loopback,
    rounds_done,
    small_config,
    three_site_config,
    wait_until,
)

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.errors import ConfigError, ProtocolError
from fedcare.federation.site import FitInstructions, FitResult
from fedcare.federation.training import TrainingPlan
from fedcare.privacy.dpsgd import RecordPrivacy
from fedcare.protection.secagg import (
    KeyRoster,
    MaskedInput,
    RoundSetup,
    SecAggScheme,
    ShareBundle,
    SharesForSite,
    UnmaskRequest,
    UnmaskResponse,
)
from fedcare.runtime.flower_site import NodeSettings, SessionStore, SiteHello
from fedcare.runtime.flower_wire import from_record, to_record, wire_bytes
from fedcare.runtime.local import LocalRuntime


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower stamps every Message with the task it runs in; outside a run, name one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def roundtrip(message: object) -> object:
    """Through the wire format *and* Flower's protobuf form, as a deployment sends it."""
    from flwr.app import Message
    from flwr.common.serde import message_from_proto, message_to_proto

    sent = Message(to_record(message), dst_node_id=1, message_type="query.x")
    return from_record(message_from_proto(message_to_proto(sent)).content)


# ----------------------------------------------------------------------------- wire format
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_tensors_arrive_bit_for_bit_with_their_dtype(dtype: torch.dtype) -> None:
    tensor = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e3).to(dtype)
    back = roundtrip(tensor)
    assert isinstance(back, torch.Tensor) and back.dtype == dtype
    assert torch.equal(back, tensor)
    back.add_(1)  # a writable tensor of its own


def test_fit_messages_keep_types_nan_and_nesting() -> None:
    instructions = FitInstructions(3, TrainingPlan(2, 16, 0.05, 0.9, 0.01), cohort=4,
                                   clip_norm=0.5)
    params = torch.arange(7, dtype=torch.float32)
    assert roundtrip((params, instructions))[1] == instructions  # type: ignore[index]
    result = roundtrip(FitResult("va", torch.ones(3), 0, math.nan))
    assert isinstance(result, FitResult) and result.site == "va"
    assert math.isnan(result.train_loss) and torch.equal(result.payload, torch.ones(3))
    hello = SiteHello("va", 11, RecordPrivacy(1.0, 1.2, 0.1, 10), math.inf)
    assert roundtrip(hello) == hello
    assert roundtrip({"a": (1, b"\x00\xff", None), 2: [True, 2**600]}) == {
        "a": (1, b"\x00\xff", None), 2: [True, 2**600]}


def test_every_secagg_message_survives_a_whole_round_over_the_wire() -> None:
    """Drive a real secagg round where every message crosses the wire format."""
    scheme = SecAggScheme()
    sites = {i: scheme.site_session(1, i) for i in range(3)}
    updates = {i: torch.full((5,), float(i + 1), dtype=torch.float64) for i in range(3)}
    session = scheme.aggregator_session(1, [0, 1, 2], 5)
    seen: set[type] = set()

    def exchange(messages: dict[int, object]) -> dict[int, object]:
        replies = {}
        for i, message in messages.items():
            message = roundtrip(message)
            seen.add(type(message))
            replies[i] = roundtrip(sites[i].handle(message))
            seen.add(type(replies[i]))
        return replies

    ready = session.setup(exchange)  # type: ignore[arg-type]
    for i in ready:
        masked = roundtrip(sites[i].protect(updates[i]))
        seen.add(type(masked))
        session.add(i, masked)
    total = session.reveal(exchange)  # type: ignore[arg-type]
    assert torch.allclose(total, torch.full((5,), 6.0, dtype=torch.float64))
    assert {RoundSetup, KeyRoster, ShareBundle, SharesForSite, MaskedInput, UnmaskRequest,
            UnmaskResponse} <= seen


def test_a_message_naming_a_foreign_type_is_refused_before_anything_is_built() -> None:
    record = to_record(RoundSetup(1, (1, 2), 2, 3))
    tree = str(record.config_records["fedcare"]["tree"])
    record.config_records["fedcare"]["tree"] = tree.replace(
        "fedcare.protection.secagg:RoundSetup", "os:system")
    with pytest.raises(ProtocolError, match="not one of fedcare's wire message types"):
        from_record(record)
    with pytest.raises(ProtocolError, match="without a readable fedcare payload"):
        from_record(RecordDict())
    with pytest.raises(TypeError, match="cannot send"):
        to_record(object())


def test_wire_bytes_counts_the_payload() -> None:
    small, large = to_record(torch.zeros(10)), to_record(torch.zeros(10_000))
    assert wire_bytes(large) - wire_bytes(small) == pytest.approx(4 * 9_990, abs=16)
    assert wire_bytes(to_record(MaskedInput(1, bytes(8000)))) >= 8000


# ----------------------------------------------------------------------------- sessions
def test_a_secagg_session_survives_between_processes_through_the_node_state() -> None:
    """Each message runs in a new ClientApp process: the session must come back intact."""
    scheme = SecAggScheme()
    state = RecordDict()
    setup = RoundSetup(4, (1, 2), 2, 3)
    other = scheme.site_session(4, 1)

    first = SessionStore(scheme, state, attempt=0)
    advert = first.site_session(4, 0).handle(setup)
    first.save()
    assert b"PRIVATE" not in bytes(state.config_records["fedcare-session"]["session"])  # type: ignore[arg-type]

    roster = KeyRoster((advert, other.handle(setup)))  # type: ignore[arg-type]
    second = SessionStore(scheme, state, attempt=0)  # a new process
    bundle = second.site_session(4, 0).handle(roster)
    assert isinstance(bundle, ShareBundle) and bundle.site == 1
    second.save()
    # A retried round (attempt 1) starts from a fresh session, not the old one.
    retry = SessionStore(scheme, state, attempt=1).site_session(4, 0)
    with pytest.raises(ProtocolError, match="before the round setup"):
        retry.handle(roster)


def test_node_settings_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="names no site"):
        NodeSettings.from_node_config({})
    with pytest.raises(ConfigError, match="epsilon-cap"):
        NodeSettings.from_node_config({"site": "va", "epsilon-cap": -1.0})
    with pytest.raises(ConfigError, match="must be a string"):
        NodeSettings.from_node_config({"site": 3})
    settings = NodeSettings.from_node_config({"site": "va", "epsilon-cap": 0.5})
    assert settings.site == "va" and settings.epsilon_cap == 0.5
    # A site with its own file takes federated standardisation (the default) too: the
    # aggregator sums the moments under the protection scheme (test_deploy_same_numbers).
    local = NodeSettings(site="va", data_file="va.csv").apply(RunConfig())
    assert (local.data.dataset, local.data.files, local.data.standardize) == (
        "files", ["va.csv"], "auto")


def test_a_node_refuses_a_message_addressed_to_another_site() -> None:
    from flwr.app import ConfigRecord, Message

    from fedcare.runtime.flower import build_client_app

    config = RunConfig()
    message = Message(to_record(None), dst_node_id=1, message_type="query.fedcare_hello")
    message.content["fedcare-header"] = ConfigRecord({"kind": "hello", "site": "cleveland"})
    context = Context(run_id=1, node_id=1, node_config={"site": "va"}, state=RecordDict(),
                      run_config={})
    reply = build_client_app(config)(message, context)
    refusal = reply.content.config_records["fedcare-error"]
    assert "this node is site 'va'" in str(refusal["message"])


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["plain", "secagg"])
def test_flower_simulation_reaches_the_local_runtimes_model(scheme: str, tmp_path: Path) -> None:
    from fedcare.runtime.flower import run_simulation

    config = small_config(scheme)
    local = LocalRuntime(build_federation(config.data), config).run()
    result = run_simulation(config, n_sites=4, run_dir=tmp_path / "run")
    assert result.rounds_completed == 3
    assert torch.allclose(result.params, local, atol=1e-6, rtol=0)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    sent = result.traffic.sent
    assert {site for site, _ in sent} >= {"cleveland", "hungarian", "switzerland", "va"}


@pytest.mark.slow
def test_flower_simulation_with_ckks_sums_under_encryption(tmp_path: Path) -> None:
    from fedcare.protection.ckks import generate_keys
    from fedcare.runtime.flower import run_simulation

    generate_keys(tmp_path / "keys")
    config = small_config("ckks", rounds=2)
    config.protection.keys = str(tmp_path / "keys")
    local = LocalRuntime(build_federation(config.data), config).run()
    result = run_simulation(config, n_sites=4, run_dir=tmp_path / "run")
    # Each decryption is flooded with fresh noise (std 2**-20 on the sum), so the two
    # runs agree only to the flooding's effect on the averaged update.
    assert torch.allclose(result.params, local, atol=1e-5, rtol=0)


def make_certificates_elsewhere(directory: Path, site: str) -> Path:
    """A key pair and certificate for `site` from a CA the federation does not know."""
    from fedcare.runtime.flower_deploy import make_certificates

    return make_certificates(directory, [site]).sites[site][1]


def test_a_site_with_a_wrong_certificate_is_refused_and_told_why(tmp_path: Path) -> None:
    from fedcare.runtime.flower_deploy import check_site_certificate, make_certificates

    ours = make_certificates(tmp_path / "ours", ["site-0", "site-1"])
    theirs = make_certificates(tmp_path / "theirs", ["site-0"])
    cert, key = ours.sites["site-0"]
    assert check_site_certificate(ours.ca, cert, "site-0", key) is not None
    with pytest.raises(ConfigError, match="not issued by the federation's CA"):
        check_site_certificate(ours.ca, theirs.sites["site-0"][0], "site-0")
    with pytest.raises(ConfigError, match="issued to \\['site-0'\\], not to site 'site-1'"):
        check_site_certificate(ours.ca, cert, "site-1")
    with pytest.raises(ConfigError, match="does not belong to certificate"):
        check_site_certificate(ours.ca, cert, "site-0", ours.sites["site-1"][1])
    with pytest.raises(ConfigError, match="does not exist"):
        check_site_certificate(ours.ca, tmp_path / "none.crt", "site-0")
    # The command refuses before starting anything.
    import argparse

    from fedcare.cli.deploy import add_deploy_parser

    parser = argparse.ArgumentParser()
    add_deploy_parser(parser.add_subparsers(dest="command"))
    shutil.copy(theirs.sites["site-0"][0], tmp_path / "ours" / "site-0.crt")
    args = parser.parse_args(["site", "--name", "site-0", "--aggregator", "127.0.0.1:1",
                              "--state", str(tmp_path / "state"),
                              "--certs", str(tmp_path / "ours")])
    with pytest.raises(ConfigError, match="not issued by the federation's CA"):
        args.handler(args)


@pytest.mark.slow
def test_a_site_killed_mid_round_leaves_the_others_to_finish_it(
        tmp_path: Path, loopback_factory: Callable[..., Loopback]) -> None:
    from fedcare.runtime.flower_server import ServerSettings

    config = three_site_config("secagg", rounds=3)
    config.federation.min_sites = 2
    net = loopback_factory(tls=False)
    net.start_superlink()
    for site in SITES:
        net.start_site(site)
    run_dir = tmp_path / "run"
    net.run(config, ServerSettings(run_dir=str(run_dir), roster=tuple(SITES),
                                   wait_timeout=240, message_timeout=45, round_retries=1), 900)
    wait_until(lambda: len(rounds_done(run_dir)) >= 1, 600, "round 1", net)
    net.stop("site-2")  # SIGKILL, while round 2 is under way
    wait_until(lambda: (run_dir / "summary.json").exists(), 900, "the run's summary", net)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    rounds = rounds_done(run_dir)
    assert rounds[0]["participants"] == SITES
    assert rounds[-1]["participants"] == ["site-0", "site-1"]
    assert "site-2" in rounds[-1]["failures"]  # type: ignore[operator]
