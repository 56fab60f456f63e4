"""Speed: fedcare's local runtime vs a plain hand-written PyTorch FedAvg loop.

Workload (from the issue): breast cancer (scikit-learn copy), 80/20 stratified
split, IID partition into K sites (K = 10, then 100), MLP 30-64-64-1 with one
logit and BCE-with-logits, 1 local epoch, batch 32, SGD lr 0.05, 20 rounds,
every site every round, FedAvg, no baselines, no per-round evaluation.

Both implementations train on exactly the same per-site tensors, built once by
`build_federation`. Only the training is timed: `LocalRuntime(...).run()` on
the fedcare side, the round loop on the plain side (model construction and data
building are outside the timer on both sides). Repetitions are interleaved
(fedcare, plain, fedcare, plain, ...) after one untimed warm-up of each, and the
median wall time is reported, under torch's default thread count and under
``torch.set_num_threads(1)``.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_speed.py            # full run, ~2-4 minutes
    /work/venv/bin/python benchmarks/bench_speed.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _env import git_state  # benchmarks/ is sys.path[0] when a script runs
from torch import nn
from torch.nn.utils import parameters_to_vector

import fedcare
from fedcare.config import BaselineConfig, DataConfig, FederationConfig, ModelConfig, RunConfig
from fedcare.data.datasets import build_federation
from fedcare.data.site_data import FederatedData
from fedcare.evaluation import binary_metrics
from fedcare.runtime.local import LocalRuntime
from fedcare.seeding import LOCAL_TRAINING, torch_generator

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_THREADS = torch.get_num_threads()
HIDDEN = (64, 64)
EPOCHS, BATCH_SIZE, LR = 1, 32, 0.05

Shuffle = Callable[[int, int, int], torch.Tensor]


# ------------------------------------------------------------------ fedcare side
def fedcare_config(sites: int, rounds: int, seed: int, threads: int = 0) -> RunConfig:
    config = RunConfig(
        seed=seed,
        data=DataConfig(dataset="breast-cancer", partition="iid", sites=sites, split_seed=0),
        model=ModelConfig(name="mlp", hidden=list(HIDDEN)),
        federation=FederationConfig(strategy="fedavg", rounds=rounds, fraction=1.0,
                                    local_epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR),
        baselines=BaselineConfig(enabled=False),
    )
    if threads and hasattr(config, "threads"):  # newer fedcare: run_experiment applies it
        config.threads = threads
    return config


def time_fedcare(data: FederatedData, config: RunConfig) -> tuple[float, float, torch.Tensor]:
    runtime = LocalRuntime(data, config)  # not timed: model and site objects
    cpu, start = time.process_time(), time.perf_counter()
    params = runtime.run()
    return time.perf_counter() - start, time.process_time() - cpu, params


# ------------------------------------------------------------------ plain side
def plain_mlp(n_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_features
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def plain_fedavg(model: nn.Module, sites: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 rounds: int, shuffle: Shuffle | None = None) -> torch.Tensor:
    """FedAvg as a competent engineer writes it by hand: one model, no DataLoader.

    `shuffle` is only for the equivalence check (fedcare's permutations); the
    timed runs use ``torch.randperm`` on the global generator.
    """
    loss_fn = nn.BCEWithLogitsLoss()
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    global_vec = parameters_to_vector(model.parameters()).detach()
    for r in range(1, rounds + 1):
        total: torch.Tensor | None = None
        n_total = 0
        for i, (x, y) in enumerate(sites):
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            n = len(y)
            for _ in range(EPOCHS):
                perm = torch.randperm(n) if shuffle is None else shuffle(r, i, n)
                for b in range(0, n, BATCH_SIZE):
                    idx = perm[b:b + BATCH_SIZE]
                    opt.zero_grad()
                    loss = loss_fn(model(x[idx]).squeeze(-1), y[idx])
                    loss.backward()
                    opt.step()
            local = parameters_to_vector(model.parameters()).detach() * n
            total = local if total is None else total.add_(local)
            n_total += n
        assert total is not None
        global_vec = total / n_total
        chunks = global_vec.split([p.numel() for p in model.parameters()])
        global_state = {name: c.view_as(p)
                        for (name, p), c in zip(model.named_parameters(), chunks, strict=True)}
    return global_vec


def time_plain(data: FederatedData, rounds: int, seed: int) -> tuple[float, float, torch.Tensor]:
    torch.manual_seed(seed)  # same init and shuffles every repetition
    model = plain_mlp(data.n_features)  # not timed, like LocalRuntime(...)
    sites = [(s.x_train, s.y_train) for s in data.sites]
    cpu, start = time.process_time(), time.perf_counter()
    params = plain_fedavg(model, sites, rounds)
    return time.perf_counter() - start, time.process_time() - cpu, params


# ------------------------------------------------------------------ checks
def pooled_test_metrics(data: FederatedData, params: torch.Tensor) -> dict[str, float]:
    model = plain_mlp(data.n_features)
    torch.nn.utils.vector_to_parameters(params.clone(), model.parameters())
    x, y = data.pooled_test()
    with torch.no_grad():
        logits = model(x).squeeze(-1)
    m = binary_metrics(logits, y)
    return {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"], "n": m["n"]}


def equivalence_check(data: FederatedData, config: RunConfig) -> float:
    """Max |difference| of the final vectors when the plain loop gets fedcare's
    initial weights and shuffles: both then compute the same FedAvg, up to
    float summation order."""
    runtime = LocalRuntime(data, config)
    ours = runtime.run()
    model = plain_mlp(data.n_features)
    torch.nn.utils.vector_to_parameters(runtime.initial_params(), model.parameters())

    def shuffle(r: int, i: int, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch_generator(config.seed, LOCAL_TRAINING, r, i))

    sites = [(s.x_train, s.y_train) for s in data.sites]
    plain = plain_fedavg(model, sites, config.federation.rounds, shuffle)
    return float((ours - plain).abs().max())


def accuracy_over_seeds(data: FederatedData, rounds: int, seeds: int) -> dict[str, Any]:
    """Pooled test accuracy of both sides over `seeds` training seeds (untimed).

    One seed compares two random initialisations; several show whether the
    two sides land in the same place on average.
    """
    sites = len(data.sites)
    ours = [pooled_test_metrics(data, time_fedcare(data, fedcare_config(sites, rounds, s))[2])
            for s in range(seeds)]
    plain = [pooled_test_metrics(data, time_plain(data, rounds, s)[2]) for s in range(seeds)]

    def summary(ms: list[dict[str, float]], key: str) -> dict[str, float]:
        v = [m[key] for m in ms]
        return {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}

    return {"seeds": seeds,
            "fedcare_accuracy": summary(ours, "accuracy"), "plain_accuracy": summary(plain,
                                                                                 "accuracy"),
            "fedcare_roc_auc": summary(ours, "roc_auc"), "plain_roc_auc": summary(plain,
                                                                              "roc_auc")}


# ------------------------------------------------------------------ driver
def bench(data: FederatedData, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timed repetitions of one (sites, threads) configuration."""
    torch.set_num_threads(threads)
    sites, rounds, seed = len(data.sites), args.rounds, args.seed
    config = fedcare_config(sites, rounds, seed, threads)
    run_ours, run_plain = args.only in ("", "fedcare"), args.only in ("", "plain")
    # Warm-up (one round of each, not counted): lazy initialisation, allocator, caches.
    if run_ours:
        time_fedcare(data, fedcare_config(sites, 1, seed, threads))
    if run_plain:
        time_plain(data, 1, seed)
    ours: list[float] = []
    plain: list[float] = []
    ours_cpu: list[float] = []
    plain_cpu: list[float] = []
    load: list[float] = []
    ours_params = plain_params = None
    started = time.perf_counter()
    for rep in range(args.reps):  # interleaved, so load from other users hits both alike
        if rep >= args.min_reps and time.perf_counter() - started > args.budget:
            break
        load.append(os.getloadavg()[0])
        if run_ours:
            t, c, ours_params = time_fedcare(data, config)
            ours.append(t)
            ours_cpu.append(c)
        if run_plain:
            t, c, plain_params = time_plain(data, rounds, seed)
            plain.append(t)
            plain_cpu.append(c)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"something changed torch's thread count to {torch.get_num_threads()}"
                           f" during the {threads}-thread measurement")
    steps = rounds * EPOCHS * sum(-(-s.n_train // BATCH_SIZE) for s in data.sites)
    row: dict[str, Any] = {
        "sites": sites,
        "threads": threads,
        "rounds": rounds,
        "reps": len(load),
        "n_train": [s.n_train for s in data.sites],
        "sgd_steps_per_run": steps,
        "loadavg_1min_during": load,
        "fedcare_seconds": ours,
        "plain_seconds": plain,
        "fedcare_cpu_seconds": ours_cpu,
        "plain_cpu_seconds": plain_cpu,
    }
    if ours_params is not None:
        row["fedcare_median_s"] = statistics.median(ours)
        row["fedcare_us_per_step"] = row["fedcare_median_s"] / steps * 1e6
        row["fedcare_pooled_test"] = pooled_test_metrics(data, ours_params)
    if plain_params is not None:
        row["plain_median_s"] = statistics.median(plain)
        row["plain_us_per_step"] = row["plain_median_s"] / steps * 1e6
        row["plain_pooled_test"] = pooled_test_metrics(data, plain_params)
    if ours_params is not None and plain_params is not None:
        med_ours, med_plain = row["fedcare_median_s"], row["plain_median_s"]
        row["ratio_of_medians"] = med_ours / med_plain
        row["median_paired_ratio"] = statistics.median(
            a / b for a, b in zip(ours, plain, strict=True))
        row["cpu_ratio_of_medians"] = statistics.median(ours_cpu) / statistics.median(plain_cpu)
        row["overhead_us_per_site_round"] = (med_ours - med_plain) / (rounds * sites) * 1e6
    return row




def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_default_threads": DEFAULT_THREADS,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "fedcare": fedcare.__version__,
        "loadavg_at_start": list(os.getloadavg()),
        "git": git_state(),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'threads':>7} {'sites':>5} {'fedcare s':>10} {'plain s':>9} {'ratio':>6} "
            f"{'paired':>6} {'cpu ratio':>9} {'ovh us/site-rnd':>15} {'acc fedcare':>11} "
            f"{'acc plain':>9} {'maxdiff':>8} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['threads']:>7} {r['sites']:>5} {r['fedcare_median_s']:>10.3f} "
              f"{r['plain_median_s']:>9.3f} {r['ratio_of_medians']:>6.3f} "
              f"{r['median_paired_ratio']:>6.3f} {r['cpu_ratio_of_medians']:>9.3f} "
              f"{r['overhead_us_per_site_round']:>15.1f} "
              f"{r['fedcare_pooled_test']['accuracy']:>11.4f} "
              f"{r['plain_pooled_test']['accuracy']:>9.4f} "
              f"{r['max_abs_diff_same_init_and_shuffles']:>8.1e} "
              f"{statistics.median(r['loadavg_1min_during']):>5.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 repetitions, 5 rounds (numbers not for quoting)")
    parser.add_argument("--reps", type=int, default=9,
                        help="timed repetitions of each side (at most)")
    parser.add_argument("--min-reps", type=int, default=5,
                        help="repetitions always run, whatever --budget says")
    parser.add_argument("--budget", type=float, default=90.0,
                        help="seconds per configuration after which no repetition beyond "
                             "--min-reps starts")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sites", default="10,100", help="comma-separated site counts")
    parser.add_argument("--threads", default=f"{DEFAULT_THREADS},1",
                        help="comma-separated torch thread counts (default: torch's, then 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--acc-seeds", type=int, default=5,
                        help="training seeds for the (untimed) accuracy comparison; 0: skip")
    parser.add_argument("--only", choices=("fedcare", "plain"), default="",
                        help="time one side only (for profiling); no comparison table")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/speed.json; "
                             "speed-quick.json with --quick, speed-fedcare.json with "
                             "--only fedcare)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.min_reps = min(args.reps, 3), min(args.min_reps, 3)
        args.acc_seeds = min(args.acc_seeds, 2)
        args.rounds = min(args.rounds, 5)
    stem = "speed" + (f"-{args.only}" if args.only else "") + ("-quick" if args.quick else "")
    out = args.out or RESULTS / f"{stem}.json"
    sites = [int(s) for s in args.sites.split(",")]
    threads = [int(t) for t in args.threads.split(",")]

    info = machine()
    print(f"machine: nproc={info['nproc']} torch={info['torch']} "
          f"default threads={DEFAULT_THREADS} load={info['loadavg_at_start']}")
    rows = []
    equivalence: dict[int, float] = {}
    accuracy: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()
    datasets = {k: build_federation(fedcare_config(k, args.rounds, args.seed).data)
                for k in sites}
    if not args.only:
        # Equal work, checked once per K (untimed, one thread: results do not depend on it).
        torch.set_num_threads(1)
        for k in sites:
            config = fedcare_config(k, args.rounds, args.seed)
            equivalence[k] = equivalence_check(datasets[k], config)
            if args.acc_seeds:
                accuracy[k] = accuracy_over_seeds(datasets[k], args.rounds, args.acc_seeds)
            print(f"  sites={k}: max |fedcare - plain| with the same init and shuffles "
                  f"{equivalence[k]:.1e}", flush=True)
    for t in threads:
        for k in sites:
            row = bench(datasets[k], t, args)
            if k in equivalence:
                row["max_abs_diff_same_init_and_shuffles"] = equivalence[k]
            if k in accuracy:
                row["accuracy_over_seeds"] = accuracy[k]
            rows.append(row)
            print(f"  threads={t} sites={k}: {row['reps']} reps, "
                  f"fedcare {row.get('fedcare_median_s', math.nan):.3f} s, "
                  f"plain {row.get('plain_median_s', math.nan):.3f} s", flush=True)
    torch.set_num_threads(DEFAULT_THREADS)
    if not args.only:
        print()
        print_table(rows)
        print("\nratio = median fedcare / median plain wall time; paired = median of per-pair "
              "ratios;\ncpu ratio = the same for process CPU time; ovh = (fedcare - plain) per "
              "site-round;\nacc = pooled test accuracy of the final model; maxdiff = max "
              "|fedcare - plain| of the\nfinal vectors with the same init and shuffles; load = "
              "median 1-min load average")
        if accuracy:
            print(f"\npooled test accuracy over training seeds 0..{args.acc_seeds - 1} "
                  "(mean [min, max]):")
            for k, a in accuracy.items():
                f, pl = a["fedcare_accuracy"], a["plain_accuracy"]
                print(f"  sites={k:>4}: fedcare {f['mean']:.4f} [{f['min']:.4f}, "
                      f"{f['max']:.4f}]   plain {pl['mean']:.4f} [{pl['min']:.4f}, "
                      f"{pl['max']:.4f}]")
    result = {
        "benchmark": "speed",
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "workload": {"dataset": "breast-cancer", "split": "80/20 stratified, split_seed 0",
                     "partition": "iid", "model": "mlp 30-64-64-1 (one logit, BCE)",
                     "local_epochs": EPOCHS, "batch_size": BATCH_SIZE, "lr": LR,
                     "rounds": args.rounds, "strategy": "fedavg", "fraction": 1.0},
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
