"""Flower deployment vs the local runtime on the default job.

Workload: the default job (bundled Fed-Heart-Disease, its 4 hospitals,
logistic regression, FedAvg, 1 local epoch, batch 32), no baselines, with
``plain``, ``secagg`` and ``ckks`` protection (``--schemes``). Measured:

* per-round wall time of the local runtime (20 rounds), of Flower's
  simulation engine (in-process backend) and of a real multi-process
  deployment on 127.0.0.1 (a SuperLink and 4 SuperNodes as processes,
  TLS and SuperNode authentication, ``--rounds`` rounds, default 3);
* bytes on the wire per round per site, both directions, as Flower
  serialises fedcare's messages (every object of the message, once);
* time from starting the SuperLink (what ``fedcare serve`` does first) to
  the end of the first round;
* the load average when each deployment starts, and the Flower settings
  fedcare uses (the SuperExec's task poll interval, the ServerApp's reply
  poll interval).

The final model of every runtime is compared with the local runtime's.

Run from the repository root (the venv must have flwr==1.42.0)::

    /work/venv/bin/python benchmarks/bench_flower.py --rounds 2      # ~10-15 minutes
    /work/venv/bin/python benchmarks/bench_flower.py --quick         # 1 deployment round
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _env import git_state  # benchmarks/ is sys.path[0] when a script runs

from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.runtime.flower import run_simulation
from fedcare.runtime.flower_deploy import (
    check_site_certificate,
    flower_environment,
    flower_program,
    make_certificates,
    node_config_text,
    register_site,
    run_command,
    superlink_command,
    supernode_command,
    write_app,
    write_flower_home,
)
from fedcare.runtime.flower_server import Messenger, ServerSettings
from fedcare.runtime.local import LocalRuntime

SITES = ["cleveland", "hungarian", "switzerland", "va"]


def default_job(scheme: str, rounds: int, keys: Path | None = None) -> RunConfig:
    config = RunConfig()
    config.federation.rounds = rounds
    config.protection.scheme = scheme
    config.baselines.enabled = False
    if keys is not None:
        config.protection.keys = str(keys)
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def local_rounds(config: RunConfig) -> tuple[float, torch.Tensor]:
    runtime = LocalRuntime(build_federation(config.data), config)
    tic = time.perf_counter()
    params = runtime.run()
    return (time.perf_counter() - tic) / config.federation.rounds, params


def deployment(config: RunConfig, root: Path, timeout: float, *, stock_node: bool = False
               ) -> dict[str, Any]:
    """One loopback deployment with TLS and node auth; every process stopped by its id.

    `stock_node`: the sites run Flower's own ``flower-supernode`` (a new ClientApp
    process per message, a 3 s idle poll) instead of `fedcare.runtime.supernode`.
    """
    from fedcare.cli.deploy import wait_for_port

    port = free_port()
    certs = make_certificates(root / "certs", SITES)
    home = write_flower_home(root / "home", f"127.0.0.1:{port}", certs.ca)
    env = flower_environment(home)
    run_dir = root / "run"
    app = write_app(root / "app", config, ServerSettings(
        run_dir=str(run_dir), roster=tuple(SITES), wait_timeout=600, message_timeout=600))
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (root / f"{name}.log").open("ab")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        processes.append(process)
        return process

    started = time.perf_counter()
    try:
        start(superlink_command(host="127.0.0.1", port=port, certs=certs.ca.parent),
              "superlink")
        wait_for_port("127.0.0.1", port, 120)
        for site in SITES:
            cert, key = certs.sites[site]
            register_site(home, check_site_certificate(certs.ca, cert, site, key), site)
            command = supernode_command(superlink=f"127.0.0.1:{port}", site=site,
                                       port=free_port(), ca=certs.ca, key=key,
                                       node_config=node_config_text(site))
            if stock_node:  # [python, -m, fedcare.runtime.supernode, *flower-supernode's args]
                command = [flower_program("flower-supernode"), *command[3:]]
            start(command, site)
        run = start(run_command(app), "run")
        first_round = None
        deadline = time.monotonic() + timeout
        metrics = run_dir / "metrics.jsonl"
        while run.poll() is None and time.monotonic() < deadline:
            if first_round is None and metrics.exists() and metrics.read_text().strip():
                first_round = time.perf_counter() - started
            time.sleep(0.5)
        if run.poll() is None:
            raise TimeoutError(f"the deployment did not finish within {timeout:g} s")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"summary": summary, "rounds": rounds, "first_round_end_s": first_round,
            "params": torch.load(run_dir / "model.pt", weights_only=True)["params"]}


def per_site_bytes(traffic: dict[str, dict[str, dict[str, int]]]) -> dict[str, float]:
    to_site = [v["to_site"] for site, rows in traffic.items() if site != "(hello)"
               for r, v in rows.items() if r != "0"]
    from_site = [v["from_site"] for site, rows in traffic.items() if site != "(hello)"
                 for r, v in rows.items() if r != "0"]
    return {"to_site_median": statistics.median(to_site),
            "from_site_median": statistics.median(from_site)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="deployment rounds")
    parser.add_argument("--quick", action="store_true", help="1 deployment round, plain only")
    parser.add_argument("--schemes", default="plain,secagg,ckks", metavar="A,B",
                        help="protection schemes to measure (default plain,secagg,ckks)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference deployment with Flower's own flower-supernode")
    parser.add_argument("--out", default="benchmarks/results/flower.json")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    schemes = ["plain"] if args.quick else [s.strip() for s in args.schemes.split(",")]
    poll = inspect.signature(Messenger).parameters["poll_interval"].default
    results: dict[str, Any] = {
        "git": git_state(), "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
        "flwr": "1.42.0", "torch_threads": 1,
        "flower_settings": {
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL":
                flower_environment()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"],
            "serverapp_reply_poll_interval_s": poll},
        "schemes": {}}
    torch.set_num_threads(1)
    for scheme in schemes:
        with tempfile.TemporaryDirectory(prefix="fedcare-bench-") as scratch:
            keys = None
            if scheme == "ckks":
                from fedcare.protection.ckks import generate_keys

                keys = Path(scratch) / "keys"
                generate_keys(keys)
            row = measure(default_job(scheme, 20, keys), default_job(scheme, rounds, keys),
                          Path(scratch) / "deployment", not args.no_reference)
        results["schemes"][scheme] = row
        print(scheme, json.dumps(row, indent=1), flush=True)
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def measure(long_job: RunConfig, config: RunConfig, scratch: Path, compare_nodes: bool
            ) -> dict[str, Any]:
    """One scheme: local rounds, simulation, and a loopback deployment of `config`."""
    row: dict[str, Any] = {}
    local_s, _ = local_rounds(long_job)
    row["local_round_s"] = local_s
    _, local_params = local_rounds(config)
    tic = time.perf_counter()
    simulated = run_simulation(config, n_sites=len(SITES))
    row["simulation_round_s"] = statistics.median(simulated.round_seconds)
    row["simulation_total_s"] = time.perf_counter() - tic
    row["simulation_max_abs_diff"] = float((simulated.params - local_params).abs().max())
    for node in ("fedcare", "flower") if compare_nodes else ("fedcare",):
        # fedcare's SuperNode (warm ClientApps, 0.5 s poll), then Flower's own as reference.
        prefix = "deployment" if node == "fedcare" else "flower_supernode"
        row[f"{prefix}_load_average"] = os.getloadavg()
        deployed = deployment(config, scratch / node, timeout=3600,
                              stock_node=node == "flower")
        seconds = [r["seconds"] for r in deployed["rounds"]]
        row[f"{prefix}_round_s"] = seconds
        row[f"{prefix}_round_s_median"] = statistics.median(seconds)
        row[f"{prefix}_max_abs_diff"] = float((deployed["params"] - local_params).abs().max())
        row[f"{prefix}_serve_to_first_round_end_s"] = deployed["first_round_end_s"]
        if node == "fedcare":
            row["deployment_overhead_per_round_s"] = statistics.median(seconds) - local_s
            row["bytes_per_round_per_site"] = per_site_bytes(deployed["summary"]["traffic"])
    if compare_nodes:
        row["speedup_vs_flower_supernode"] = (row["flower_supernode_round_s_median"]
                                              / row["deployment_round_s_median"])
    return row


if __name__ == "__main__":
    main()
