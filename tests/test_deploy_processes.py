"""`fedcare serve` and `fedcare site` as processes: stopped, restarted, resumed, refused.

Each test starts the real commands (``python -m fedcare.cli.main``) on 127.0.0.1,
marks each with an environment variable of its own (inherited by every process
Flower starts under it, in whatever session) to find all of them, and waits on
events (a log line, metrics.jsonl, summary.json, a process exit), never on time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from loopback import free_port, rounds_done, three_site_config

from fedcare.runtime.supervise import marked_processes

SITES = ["site-0", "site-1", "site-2"]
TREE = "FEDCARE_TEST_TREE"
"""Environment variable marking one command and all its descendants in these tests."""


class Commands:
    """fedcare commands started as processes, each with its log and its process tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *arguments: str) -> subprocess.Popen[bytes]:
        tree = uuid.uuid4().hex
        log = (self.root / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "-m", "fedcare.cli.main", *arguments],
                                   env={**os.environ, TREE: tree}, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=self.root)
        self.processes[name] = (process, tree)
        return process

    def tree(self, name: str) -> list[int]:
        """Live processes of command `name` and every descendant (by the mark)."""
        return marked_processes(self.processes[name][1], TREE)

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)[-4000:]}" for name in self.processes)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 600
                   ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                     f"{self.logs()}")
            time.sleep(0.5)

    def wait_exit(self, name: str, timeout: float = 600) -> int:
        process = self.processes[name][0]
        self.wait_until(lambda: process.poll() is not None, f"{name} to exit", timeout)
        return int(process.returncode)

    def kill_all(self) -> None:
        for process, tree in self.processes.values():
            for pid in [process.pid, *marked_processes(tree, TREE)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(timeout=30)


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[Commands]:
    started = Commands(tmp_path)
    yield started
    started.kill_all()


def write_config(path: Path, scheme: str = "plain", rounds: int = 2) -> Path:
    path.write_text(three_site_config(scheme, rounds).to_toml(), encoding="utf-8")
    return path


def serve(commands: Commands, name: str, config: Path, run_dir: Path, port: int,
          *extra: str) -> subprocess.Popen[bytes]:
    return commands.start(name, "serve", str(config), "--sites", ",".join(SITES),
                          "--run-dir", str(run_dir), "--address", f"127.0.0.1:{port}",
                          "--wait", "600", "--message-timeout", "300", *extra)


def site(commands: Commands, name: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return commands.start(name, "site", "--name", name, "--aggregator", f"127.0.0.1:{port}",
                          "--port", str(free_port()), "--state",
                          str(commands.root / f"state-{name}"), *extra)


def flower_programs(commands: Commands, name: str) -> set[str]:
    """Names of the Flower programs running in command `name`'s tree."""
    found = set()
    for pid in commands.tree(name):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found.update(Path(part.decode()).name for part in argv[:2]
                     if b"flower-" in part or b"flwr" in part)
    return found


# ----------------------------------------------------------------------------- signals
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_serve_or_site_stops_every_process_it_started(
        signum: int, tmp_path: Path, commands: Commands) -> None:
    port = free_port()
    serve(commands, "serve", write_config(tmp_path / "federation.toml", rounds=50),
          tmp_path / "run", port, "--insecure")
    for name in SITES:
        site(commands, name, port, "--insecure")
    # The whole tree is up: the SuperLink's detached SuperExec runs the ServerApp, which
    # has started rounds (a ClientApp per message at the sites).
    commands.wait_until(lambda: len(rounds_done(tmp_path / "run")) >= 1, "round 1")
    assert {"flower-superlink", "flower-superexec", "flwr-serverapp"} <= \
        flower_programs(commands, "serve")
    assert {"flower-supernode", "flower-superexec"} <= flower_programs(commands, "site-0")
    for name in ["site-0", "serve"]:
        before = commands.tree(name)
        commands.processes[name][0].send_signal(signum)
        assert commands.wait_exit(name, timeout=120) == 128 + signum, commands.logs()
        commands.wait_until(lambda name=name: not commands.tree(name),  # type: ignore[misc]
                            f"every process of {name} to be gone", timeout=60)
        assert len(before) >= 3
    assert "are stopped" in commands.log("serve")
