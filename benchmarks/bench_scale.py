"""Scale: the local runtime with 1,000 and 10,000 sites on a generated cohort.

Workload: the ``synthetic`` dataset (100,000 generated patients, 30 features,
80/20 stratified split, split_seed 0), IID partition into S sites
(S = 1,000 and 10,000), logistic regression and MLP 30-64-64-1, 1 local epoch,
batch 32, SGD lr 0.05, 20 rounds, every site every round, FedAvg, no baselines,
no per-round evaluation (the pooled test set is evaluated once, at the end).
torch runs with one intra-op thread (``--threads``), like ``fedcare run``.

Each configuration runs in a fresh subprocess (``bench_scale.py --one S MODEL``)
so that its peak resident memory (``ru_maxrss``) is its own; the parent
collects the JSON line each child prints.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_scale.py           # full run, ~5-8 minutes
    /work/venv/bin/python benchmarks/bench_scale.py --quick   # smoke run, under a minute
    /work/venv/bin/python benchmarks/bench_scale.py --one 10000 logreg   # one configuration
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _env import git_state  # benchmarks/ is sys.path[0] when a script runs

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("logreg", "mlp")


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(sites: int, model: str, rounds: int, patients: int, threads: int,
            seed: int) -> dict[str, Any]:
    """One configuration in this process; returns its measurements."""
    t_start = time.perf_counter()
    import torch

    from fedcare.config import (
        BaselineConfig,
        DataConfig,
        FederationConfig,
        ModelConfig,
        RunConfig,
    )
    from fedcare.data.datasets import build_federation
    from fedcare.evaluation import binary_metrics
    from fedcare.runtime.local import LocalRuntime

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    import_s = time.perf_counter() - t_start
    rss_imports = max_rss_mib()

    config = RunConfig(
        seed=seed,
        data=DataConfig(dataset="synthetic", n_patients=patients, partition="iid", sites=sites,
                        split_seed=0),
        model=ModelConfig(name=model, hidden=[64, 64]),
        federation=FederationConfig(strategy="fedavg", rounds=rounds, fraction=1.0,
                                    local_epochs=1, batch_size=32, lr=0.05),
        baselines=BaselineConfig(enabled=False),
    )
    if hasattr(config, "threads"):  # newer fedcare: run_experiment applies it
        config.threads = torch.get_num_threads()
    t0 = time.perf_counter()
    data = build_federation(config.data)
    build_s = time.perf_counter() - t0
    rss_data = max_rss_mib()

    t0 = time.perf_counter()
    runtime = LocalRuntime(data, config)
    setup_s = time.perf_counter() - t0

    stamps: list[float] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    params = runtime.run(lambda p, r: stamps.append(time.perf_counter()))
    train_s = time.perf_counter() - t0
    train_cpu_s = time.process_time() - cpu0
    rss_peak = max_rss_mib()
    rounds_s = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]

    runtime.model.load(params)
    x, y = data.pooled_test()
    metrics = binary_metrics(runtime.model.predict_logits(x), y)
    n_train = [s.n_train for s in data.sites]
    return {
        "sites": sites,
        "model": model,
        "n_parameters": runtime.model.spec.size,
        "patients": patients,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "torch_default_threads": default_threads,
        "n_train_total": sum(n_train),
        "n_train_per_site_min_max": [min(n_train), max(n_train)],
        "n_test_total": int(y.shape[0]),
        "import_s": import_s,
        "data_build_s": build_s,
        "runtime_setup_s": setup_s,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "round_s": rounds_s,
        "round_median_s": statistics.median(rounds_s),
        "site_round_median_us": statistics.median(rounds_s) / sites * 1e6,
        "total_s": time.perf_counter() - t_start,
        "rss_after_imports_mib": rss_imports,
        "peak_rss_after_data_mib": rss_data,
        "peak_rss_mib": rss_peak,
        "rss_at_end_mib": current_rss_mib(),
        "pooled_test": {k: metrics[k] for k in ("accuracy", "roc_auc", "n")},
        "loadavg_at_end": list(os.getloadavg()),
    }




def machine() -> dict[str, Any]:
    import torch

    import fedcare

    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "fedcare": fedcare.__version__,
        "loadavg_at_start": list(os.getloadavg()),
        "git": git_state(),
    }


def child(sites: int, model: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(sites), model,
           "--rounds", str(args.rounds), "--patients", str(args.patients),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"configuration {sites} {model} failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(cmd)
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'sites':>6} {'model':>6} {'params':>6} {'rows/site':>9} {'build s':>7} "
            f"{'round s':>7} {'us/site-rnd':>11} {'train s':>7} {'total s':>7} "
            f"{'RSS MiB':>7} {'(data)':>7} {'(import)':>8} {'acc':>6} {'auc':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lo, hi = r["n_train_per_site_min_max"]
        print(f"{r['sites']:>6} {r['model']:>6} {r['n_parameters']:>6} {f'{lo}-{hi}':>9} "
              f"{r['data_build_s']:>7.1f} {r['round_median_s']:>7.2f} "
              f"{r['site_round_median_us']:>11.0f} {r['train_s']:>7.1f} {r['total_s']:>7.1f} "
              f"{r['peak_rss_mib']:>7.0f} {r['peak_rss_after_data_mib']:>7.0f} "
              f"{r['rss_after_imports_mib']:>8.0f} {r['pooled_test']['accuracy']:>6.4f} "
              f"{r['pooled_test']['roc_auc']:>6.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=2, metavar=("SITES", "MODEL"),
                        help="run one configuration in this process and print its JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1,000 sites, both models, 3 rounds")
    parser.add_argument("--sites", default="1000,10000", help="comma-separated site counts")
    parser.add_argument("--models", default="logreg,mlp", help="comma-separated: logreg,mlp")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, as `fedcare run` uses; "
                             "0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/scale.json; "
                             "scale-quick.json with --quick)")
    args = parser.parse_args(argv)

    if args.one:
        sites, model = int(args.one[0]), args.one[1]
        if model not in MODELS:
            parser.error(f"MODEL must be one of {MODELS}; got {model!r}")
        result = run_one(sites, model, args.rounds, args.patients, args.threads, args.seed)
        print(json.dumps(result))
        return 0

    if args.quick:
        args.sites, args.rounds = "1000", min(args.rounds, 3)
    out = args.out or RESULTS / ("scale-quick.json" if args.quick else "scale.json")
    info = machine()
    print(f"machine: nproc={info['nproc']} torch={info['torch']} "
          f"default threads={info['torch_default_threads']} "
          f"threads used={args.threads or info['torch_default_threads']} "
          f"load={info['loadavg_at_start']}")
    rows = []
    started = time.perf_counter()
    for sites in (int(s) for s in args.sites.split(",")):
        for model in args.models.split(","):
            print(f"  {sites} sites, {model} ...", end=" ", flush=True)
            rows.append(child(sites, model, args))
            r = rows[-1]
            print(f"build {r['data_build_s']:.1f} s, train {r['train_s']:.1f} s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    print()
    print_table(rows)
    print("\nround s = median wall time of one round (all sites); us/site-rnd = that / sites;\n"
          "total s = child process from before `import torch` to the end of training;\n"
          "RSS = peak resident set (ru_maxrss) of the child; (data) = peak after building the\n"
          "data; (import) = after importing torch and fedcare; acc/auc = pooled test set.")
    result = {
        "benchmark": "scale",
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "workload": {"dataset": "synthetic", "patients": args.patients,
                     "split": "80/20 stratified, split_seed 0", "partition": "iid",
                     "local_epochs": 1, "batch_size": 32, "lr": 0.05, "rounds": args.rounds,
                     "strategy": "fedavg", "fraction": 1.0},
        "machine": info,
        "wall_seconds": time.perf_counter() - started,
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
