"""A site's Flower SuperNode, with warm ClientApp processes and a quicker poll.

Flower 1.42's SuperNode answers every message in a new ``flwr-clientapp``
process, which imports Flower, torch and fedcare before it starts (1.7 s of
CPU on a quiet core; 7-8 s with four sites on two cores), and, when idle,
asks the SuperLink for a message every 3 s. A fedcare round is one to four
message exchanges, so both add up to most of a deployed round.

``python -m fedcare.runtime.supernode ARGS`` runs ``flower-supernode ARGS
--isolation process`` and, as its child, fedcare's SuperExec: Flower's own
SuperExec loop (`flwr.supercore.superexec.run_superexec`) with `WarmExecutor`,
which forks each ClientApp from a fork server that imported Flower, torch
and fedcare's ClientApp module once. Each message still runs in a process of
its own (a fresh copy of the warm one: nothing a ClientApp does is seen by
the next), so the isolation Flower gives is kept. The SuperNode's idle poll
is `NODE_POLL` seconds instead of 3, and its heartbeat `HEARTBEAT_SECONDS`
instead of 30, so that a dead site is seen within 20 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing import forkserver, get_context
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

MODULE = "fedcare.runtime.supernode"

NODE_POLL = 0.5
"""Seconds the SuperNode waits between looks for a message when idle (Flower: 3).

Each look is one signed HTTPS request to the SuperLink; with 4 sites at 0.5 s
the SuperLink answers 8 a second while idle (see BENCHMARKS.md, Deployment)."""

HEARTBEAT_SECONDS = 10.0
"""The node's announced heartbeat interval (Flower 1.42: a fixed 30 s).

Flower's SuperLink holds a node online for ``HEARTBEAT_PATIENCE`` (2) times the
interval the node announces and answers every message to a node no longer
online with ``NODE_UNAVAILABLE`` at once (``flwr/server/superlink/linkstate``);
the aggregator then leaves that site out of the round. 10 s is the least a
Flower 1.42 SuperLink accepts (``HEARTBEAT_MIN_INTERVAL``): the node sends one
every (10 - 5) x 0.8 s (Flower's call timeout and jitter) and a dead site is
seen within 2 x 10 s instead of a minute. A node that stops normally
deactivates itself and is seen at once either way."""

PRELOAD = ["torch", "flwr.supernode.runtime.run_clientapp", "fedcare.runtime.flower_client"]
"""Modules the fork server imports once, so that a ClientApp starts without importing."""


class _QuickTime:
    """The `time` module, with every sleep capped at `NODE_POLL` seconds."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, NODE_POLL))


def _client_app(address: str, token: str, insecure: bool, root_certificates: str | None,
                parent_pid: int | None) -> None:
    """One ClientApp task, in a process forked from the warm fork server."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(runtime_api_address=address, token=token, insecure=insecure,
                  certificates=validate_and_resolve_root_certificates(root_certificates,
                                                                      insecure),
                  parent_pid=parent_pid, runtime_dependency_install=False)


class WarmExecutor:
    """A Flower SuperExec executor that forks ClientApps from a warm fork server.

    Follows Flower's `Executor` protocol (`flwr.supercore.superexec.executor.types`).
    """

    def __init__(self) -> None:
        self._context = get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()  # import now, not on the first message
        self._running: list[BaseProcess] = []

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *,
                              insecure: bool = False, root_certificates_path: str | None = None
                              ) -> tuple[set[TaskType], set[str]]:
        from flwr.supercore.constant import TaskType

        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None
                          ) -> None:
        """No capacity gate: a site runs the messages it is sent."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        from flwr.supercore.superexec.executor.types import LaunchResult

        process = self._context.Process(
            target=_client_app, name=f"flwr-clientapp task {spec.task_id}",
            args=(spec.runtime_api_address, spec.token, spec.insecure,
                  spec.root_certificates_path, spec.parent_pid))
        process.start()
        self._running.append(process)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        self._running = [p for p in self._running if p.is_alive()]  # reaps the finished

    def close(self) -> None:
        for process in self._running:
            process.terminate()


def run_superexec(runtime_api_address: str, parent_pid: int) -> None:
    """Flower's SuperExec loop for this SuperNode, with `WarmExecutor`."""
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.get_executor = lambda *args, **kwargs: WarmExecutor()  # type: ignore[attr-defined]
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True,
                            parent_pid=parent_pid, runtime_dependency_install=False)


def run_supernode(argv: Sequence[str]) -> None:
    """``flower-supernode argv --isolation process`` with fedcare's SuperExec beside it."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9094)
    known, _ = parser.parse_known_args(argv)
    host = f"[{known.host}]" if ":" in known.host else known.host
    subprocess.Popen([sys.executable, "-m", MODULE, "--superexec", f"{host}:{known.port}",
                      str(os.getpid())])
    start_client_internal.time = _QuickTime()  # type: ignore[attr-defined,assignment]
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    for module in (heartbeat, fleet_http_connection):  # read by the node's heartbeat sender
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise SystemExit(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL: this is "
                             "not the Flower 1.42 fedcare was built on; run flower-supernode "
                             "itself (slower, and a dead site is seen within a minute).")
        module.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # type: ignore[attr-defined]
    sys.argv = ["flower-supernode", *argv, "--isolation", "process"]
    flower_supernode()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--superexec"]:
        run_superexec(args[1], int(args[2]))
    else:
        run_supernode(args)


if __name__ == "__main__":
    # Through the module's own name: the fork server unpickles `_client_app` by it.
    from fedcare.runtime.supernode import main as module_main

    module_main()
