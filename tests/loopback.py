"""Loopback deployments for tests: a SuperLink and SuperNodes as processes on 127.0.0.1.

Shared by the test modules that start Flower's processes (``from loopback import ...``;
pytest puts ``tests/`` on ``sys.path``). Every wait is on an event (a port, a file, a
process exit), bounded by a timeout that prints the processes' logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fedcare.config import RunConfig

MARK = "FEDCARE_LOOPBACK_PROCESS"
"""Environment variable marking one started process and all its descendants."""


def small_config(scheme: str, rounds: int = 3) -> RunConfig:
    config = RunConfig()
    config.federation.rounds = rounds
    config.protection.scheme = scheme
    config.baselines.enabled = False
    return config


class Loopback:
    """A SuperLink and SuperNodes as separate processes on 127.0.0.1, stopped by `close`.

    Every process is started in its own session and stopped by its id (the
    SuperLink's ServerApp and the SuperNodes' ClientApps are its children).
    """

    def __init__(self, root: Path, sites: list[str], *, tls: bool) -> None:
        from fedcare.runtime.flower_deploy import (
            flower_environment,
            make_certificates,
            write_flower_home,
        )

        self.root = root
        self.sites = sites
        self.port = free_port()
        self.certs = make_certificates(root / "certs", sites) if tls else None
        self.home = write_flower_home(root / "home", f"127.0.0.1:{self.port}",
                                      self.certs.ca if self.certs else None)
        self.env = flower_environment(self.home)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.marks: dict[str, str] = {}
        (root / "logs").mkdir(exist_ok=True)

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        self.marks[name] = uuid.uuid4().hex  # inherited by all it starts, in any session
        process = subprocess.Popen(command, env={**self.env, MARK: self.marks[name]},
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def start_superlink(self) -> None:
        from fedcare.cli.deploy import wait_for_port
        from fedcare.runtime.flower_deploy import (
            check_site_certificate,
            register_sites,
            superlink_command,
        )

        certs = None if self.certs is None else self.certs.ca.parent
        self.start("superlink", superlink_command(host="127.0.0.1", port=self.port,
                                                  certs=certs,
                                                  database=self.root / "superlink.db"))
        wait_for_port("127.0.0.1", self.port, timeout=60)
        if self.certs is not None:
            register_sites(self.home, {
                site: check_site_certificate(self.certs.ca, cert, site, key)
                for site, (cert, key) in self.certs.sites.items()})

    def start_site(self, site: str, key: Path | None = None, policy: Path | None = None,
                   *, keys: str = "", data_file: str = "") -> None:
        from fedcare.runtime.flower_deploy import node_config_text, supernode_command

        ca = None if self.certs is None else self.certs.ca
        identity = None
        if self.certs is not None and key is None:
            key = self.certs.sites[site][1]
            identity = (self.certs.ca, *self.certs.sites[site])  # signs its secagg keys
        self.start(site, supernode_command(
            superlink=f"127.0.0.1:{self.port}", site=site, port=free_port(), ca=ca, key=key,
            node_config=node_config_text(site, policy="" if policy is None else str(policy),
                                         identity=identity, keys=keys, data_file=data_file)))

    def node_keys(self) -> tuple[tuple[str, str], ...]:
        """Each site's certified node key, as `fedcare serve` binds names to keys."""
        from fedcare.runtime.flower_deploy import check_site_certificate
        from fedcare.runtime.flower_server import node_key_fingerprint

        assert self.certs is not None
        return tuple((site, node_key_fingerprint(check_site_certificate(
            self.certs.ca, self.certs.sites[site][0], site))) for site in self.sites)

    def run(self, config: RunConfig, settings: object, timeout: float
            ) -> subprocess.Popen[bytes]:
        from fedcare.runtime.flower_deploy import run_command, write_app

        app = write_app(self.root / "app", config, settings)  # type: ignore[arg-type]
        return self.start("run", run_command(app))

    def stop(self, name: str) -> None:
        """SIGKILL process `name` and everything it started, the SuperLink's detached
        SuperExec and ServerApp included; return once they are all gone."""
        from fedcare.runtime.supervise import marked_processes

        process, mark = self.processes.pop(name), self.marks.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 60
        while pids := marked_processes(mark, MARK):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert time.monotonic() < deadline, f"processes {pids} of {name} do not die"
            time.sleep(0.1)

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rounds_done(run_dir: Path) -> list[dict[str, object]]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               loopback: Loopback) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{loopback.log(name)[-3000:]}"
                             for name in loopback.processes)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
        time.sleep(1.0)


def three_site_config(scheme: str, rounds: int) -> RunConfig:
    config = small_config(scheme, rounds)
    config.data.dataset, config.data.partition = "synthetic", "iid"
    config.data.sites, config.data.n_patients = 3, 600
    return config


SITES = ["site-0", "site-1", "site-2"]




