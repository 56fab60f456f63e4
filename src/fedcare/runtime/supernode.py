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
the next), so the isolation Flower gives is kept. The SuperNode and its SuperExec look
for work quickly after a message and slow down to `NODE_POLL` seconds (Flower:
3) and the SuperExec's interval when idle (`fedcare.runtime.polling`), and the
node's heartbeat is `HEARTBEAT_SECONDS` instead of 30, so that a dead site is
seen within 20 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing import forkserver, get_context
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from fedcare.runtime.polling import LookingTime, Looks, quick_object_retries

if TYPE_CHECKING:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

MODULE = "fedcare.runtime.supernode"

NODE_POLL = 0.5
"""Seconds the SuperNode waits between looks for a message when idle (Flower: 3);
`polling.FIRST_LOOK` after it answered one, doubling.

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

PRELOAD = ["torch", "flwr.supernode.runtime.run_clientapp", "fedcare.runtime.flower_client",
           # imported on a ClientApp's first call to its node (0.5 s of CPU each time)
           "httpcore", "cryptography.hazmat.primitives.ciphers.aead",
           # imported when a site builds its protection scheme
           "fedcare.protection.secagg", "fedcare.protection.ckks"]
"""Modules the fork server imports once, so that a ClientApp starts without importing
(the list is what a profile of the ClientApps of a secagg deployment showed imported)."""


FLOWER_IDLE_SLEEP = 3.0
"""Seconds Flower 1.42's SuperNode loop sleeps when it found no message."""

def _client_app(address: str, token: str, insecure: bool, root_certificates: str | None,
                parent_pid: int | None) -> None:
    """One ClientApp task, in a process forked from the warm fork server."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    quick_object_retries()  # the message's content may still be on its way to the node
    run_clientapp(runtime_api_address=address, token=token, insecure=insecure,
                  certificates=validate_and_resolve_root_certificates(root_certificates,
                                                                      insecure),
                  parent_pid=parent_pid, runtime_dependency_install=False)


class WarmExecutor:
    """A Flower SuperExec executor that forks ClientApps from a warm fork server.

    Follows Flower's `Executor` protocol (`flwr.supercore.superexec.executor.types`).
    """

    def __init__(self, looks: Looks | None = None) -> None:
        self.looks = looks
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
        if self.looks is not None:
            self.looks.activity()  # the next message of this exchange is near
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        self._running = [p for p in self._running if p.is_alive()]  # reaps the finished

    def close(self) -> None:
        for process in self._running:
            process.terminate()


def run_superexec(runtime_api_address: str, parent_pid: int) -> None:
    """Flower's SuperExec loop for this SuperNode, with `WarmExecutor`."""
    from flwr.supercore.superexec import run_superexec as superexec

    looks = Looks(idle=superexec._get_task_poll_interval())
    superexec.__dict__["time"] = LookingTime(looks, idle_sleep=looks.idle)
    superexec.get_executor = (  # type: ignore[attr-defined]
        lambda *args, **kwargs: WarmExecutor(looks))
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
    looks = Looks(idle=NODE_POLL)
    start_client_internal.__dict__["time"] = LookingTime(looks, idle_sleep=FLOWER_IDLE_SLEEP)
    push_messages = start_client_internal._push_messages

    def push_and_look_soon(*args: Any, **kwargs: Any) -> None:
        push_messages(*args, **kwargs)
        looks.activity()  # the next step of the same exchange usually follows at once

    start_client_internal.__dict__["_push_messages"] = push_and_look_soon
    quick_object_retries()
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
