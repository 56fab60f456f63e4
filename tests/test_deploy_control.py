"""Only the coordinator controls the SuperLink: an uncertified party on the network is refused.

The review's impostor had only the public ``ca.crt``: it registered a node key
of its own with ``flwr supernode register`` and joined as a hospital, listed
the runs, read the aggregator's log and stopped the run. Here it plays from
this machine's network address (not loopback), as a machine in the hospital
network would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from cryptography.hazmat.primitives.asymmetric import ec
from loopback import free_port, wait_until

from fedcare.runtime.superlink import REFUSAL, LoopbackOnly, allowed, from_loopback


def ask(path: str, client: tuple[str, int] | None) -> tuple[int, bytes]:
    """One HTTP request through `LoopbackOnly` in front of an app that answers 200."""
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "client": client,
             "query_string": b"", "root_path": "", "scheme": "https", "server": ("x", 1)}
    asyncio.run(LoopbackOnly(app)(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


def test_only_the_fleet_api_is_served_to_other_machines() -> None:
    remote, local = ("10.1.2.3", 40000), ("127.0.0.1", 40000)
    for path in ("/v1/fleet/pull-messages", "/v1/fleet/activate-node"):
        assert ask(path, remote)[0] == 200
    for path in ("/v1/control/register-node", "/v1/control/stop-run",
                 "/v1/control/stream-logs", "/v1/control/list-runs",
                 "/v1/runtime/pull-messages", "/docs", "/v1/fleetx", "/"):
        status, body = ask(path, remote)
        assert status == 403 and REFUSAL in json.loads(body)["detail"], path
        assert ask(path, local)[0] == 200
    assert ask("/v1/control/list-runs", ("::1", 1))[0] == 200
    # No peer address, or one that is not an address, is not loopback.
    assert not from_loopback(None) and not from_loopback(("testclient", 1))
    assert not allowed("/v1/control/list-runs", ("localhost", 1))


def network_address() -> str | None:
    """An address of this machine that is not loopback, or None."""
    for target in ("203.0.113.1", "10.255.255.254"):  # documentation / private addresses
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target, 9))  # sends nothing: picks the outgoing address
            except OSError:
                continue
            address = str(probe.getsockname()[0])
            if not address.startswith("127.") and address != "0.0.0.0":
                return address
    return None


def said(done: subprocess.CompletedProcess[str]) -> str:
    """What a ``flwr`` command printed, without its box drawing and line wrapping."""
    text = (done.stdout + done.stderr).replace("│", " ").replace("╭", " ").replace("╰", " ")
    return " ".join(text.split())


def flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from fedcare.runtime.flower_deploy import flower_environment, flower_program

    return subprocess.run([flower_program("flwr"), *args], env=flower_environment(home),
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_an_uncertified_party_on_the_network_cannot_register_list_read_or_stop(
        tmp_path: Path) -> None:
    from fedcare.cli.deploy import wait_for_port
    from fedcare.runtime.flower_deploy import (
        CONNECTION,
        check_site_certificate,
        flower_environment,
        make_certificates,
        register_site,
        ssh_public_key,
        superlink_command,
        supernode_command,
        write_flower_home,
    )

    address = network_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    port = free_port()
    certs = make_certificates(tmp_path / "certs", ["cleveland"],
                              hosts=("localhost", "127.0.0.1", address))
    (certs.ca.parent / "ca.key").unlink()  # kept offline: the aggregator never needs it
    coordinator = write_flower_home(tmp_path / "coordinator", f"127.0.0.1:{port}", certs.ca)
    # The impostor has the public CA certificate and reaches the SuperLink over the network.
    impostor = write_flower_home(tmp_path / "impostor", f"{address}:{port}", certs.ca)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, command: list[str]) -> None:
        processes[name] = subprocess.Popen(
            command, env=flower_environment(coordinator), start_new_session=True,
            stdout=(logs / f"{name}.log").open("ab"), stderr=subprocess.STDOUT)

    class Logs:  # what wait_until prints on a timeout
        def __init__(self) -> None:
            self.processes = processes

        def log(self, name: str) -> str:
            return (logs / f"{name}.log").read_text(errors="replace")

    try:
        start("superlink", superlink_command(host="0.0.0.0", port=port,
                                             certs=certs.ca.parent,
                                             database=tmp_path / "superlink.db"))
        wait_for_port("127.0.0.1", port, timeout=120)
        cert, key = certs.sites["cleveland"]
        register_site(coordinator, check_site_certificate(certs.ca, cert, "cleveland", key),
                      "cleveland")
        # The impostor's own node key, registered under a hospital's name: refused.
        (tmp_path / "impostor.pub").write_bytes(
            ssh_public_key(ec.generate_private_key(ec.SECP384R1()).public_key()) + b"\n")
        refused = flwr(impostor, "supernode", "register", str(tmp_path / "impostor.pub"),
                       CONNECTION, "--name", "cleveland")
        assert refused.returncode != 0 and REFUSAL in said(refused), said(refused)
        for command in (("ls", CONNECTION), ("log", "1", CONNECTION),
                        ("stop", "1", CONNECTION), ("supernode", "list", CONNECTION)):
            done = flwr(impostor, *command)
            assert done.returncode != 0 and REFUSAL in said(done), (command, said(done))
        # The coordinator, on its own machine, still controls it: one node, the real one.
        listed = flwr(coordinator, "supernode", "list", CONNECTION, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)["nodes"]) == 1
        # A site reaches the Fleet API over the network with its certified key.
        start("cleveland", supernode_command(
            superlink=f"{address}:{port}", site="cleveland", port=free_port(), ca=certs.ca,
            key=key, node_config='site="cleveland"'))
        wait_until(lambda: "Activated" in Logs().log("superlink"), 180,
                   "the site to activate over the network", Logs())  # type: ignore[arg-type]
        superlink_log = Logs().log("superlink")
        assert superlink_log.count("[Fleet.ActivateNode] Activated") == 1
        assert "/v1/control/register-node" in superlink_log  # the impostor's try, refused
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)


def test_a_new_hospital_gets_one_certificate_and_nothing_else_changes(tmp_path: Path) -> None:
    import argparse

    from fedcare.cli.deploy import add_deploy_parser
    from fedcare.errors import ConfigError
    from fedcare.runtime.flower_deploy import check_site_certificate, make_certificates

    pki = make_certificates(tmp_path / "pki", ["cleveland", "va"])
    before = {p.name: p.read_bytes() for p in pki.ca.parent.iterdir()}
    parser = argparse.ArgumentParser()
    add_deploy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", "add-site", "zurich", "--certs", str(tmp_path / "pki")])
    assert args.handler(args) == 0
    after = {p.name: p.read_bytes() for p in pki.ca.parent.iterdir()}
    assert set(after) - set(before) == {"zurich.crt", "zurich.key"}
    assert all(after[name] == data for name, data in before.items())
    assert check_site_certificate(pki.ca, tmp_path / "pki" / "zurich.crt", "zurich",
                                  tmp_path / "pki" / "zurich.key") is not None
    with pytest.raises(ConfigError, match="already has a certificate"):
        args.handler(args)
    (tmp_path / "pki" / "ca.key").unlink()
    args = parser.parse_args(["certs", "add-site", "basel", "--certs", str(tmp_path / "pki")])
    with pytest.raises(ConfigError, match="needs the CA's key"):
        args.handler(args)


def test_each_federation_has_its_own_ca_name_and_a_foreign_certificate_says_which(
        tmp_path: Path) -> None:
    from fedcare.errors import ConfigError
    from fedcare.runtime.flower_deploy import check_site_certificate, make_certificates

    ours = make_certificates(tmp_path / "ours", ["va"])
    theirs = make_certificates(tmp_path / "theirs", ["va"])
    with pytest.raises(ConfigError) as refused:
        check_site_certificate(ours.ca, theirs.sites["va"][0], "va")
    names = [part for part in str(refused.value).split("'") if part.startswith("fedcare fed")]
    assert len(names) == 2 and names[0] != names[1], str(refused.value)
