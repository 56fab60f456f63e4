"""Client-level DP at scale: K = 100, 1,000 and 10,000 sites at epsilon 8 (Geyer et al. 2017).

The healthcare analogue of Geyer, Klein & Nabi 2017 ("Differentially private
federated learning: a client level perspective"): one generated cohort
(``synthetic``, 100,000 patients, 30 features, 80/20 stratified split) split
IID into K sites, DP-FedAvg with ``privacy.level = "site"`` (each site's whole
dataset protected), epsilon 8, delta 1e-5 (< 1/K for every K here), Poisson
site sampling with rate q (expected cohort qK), updates clipped to C, Gaussian
noise sigma C on the sum (sigma calibrated by fedcare from epsilon, delta, q
and the rounds R, PLD accountant), divided by qK. The noise std on the mean
update is sigma C / (qK): a larger federation can carry the same epsilon with
less noise on the model, which is what the experiment shows.

Each K is compared with the non-private run (``privacy.level = "none"``) with
the same settings (q, R, C unused, local epochs, batch, lr), in the same
invocation. ``noise = "central"`` for every K, plus ``noise = "distributed"``
at K = 1,000.

Settings are chosen on a validation cohort, not on the test set: the synthetic
cohort is generated from ``data.split_seed``, so ``split_seed = 1`` is an
independent cohort from the same distribution; its held-out 20% is the
validation set. The test numbers use ``split_seed = 0``. The search is small
(`GRID`: local lr x clip norm C, q and R fixed per K), private central runs
only, one run each (DP noise from the CSPRNG, so every run draws new noise).

Every configuration runs in a fresh subprocess through the library API
(``fedcare.experiment.run_experiment`` with a ``RunConfig``, baselines off,
one torch thread), so its wall time, peak RSS (``ru_maxrss``) and load average
are its own. Validation runs of one K share one subprocess (the noise
calibration is cached across them).

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_dp_scale.py            # search + test runs
    /work/venv/bin/python benchmarks/bench_dp_scale.py --no-tune  # test runs with SETTINGS
    /work/venv/bin/python benchmarks/bench_dp_scale.py --quick    # smoke run: K = 100, 3 rounds
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _env import git_state  # benchmarks/ is sys.path[0] when a script runs

RESULTS = Path(__file__).resolve().parent / "results"
EPSILON = 8.0
DELTA = 1e-5
PATIENTS = 100_000
TEST_SPLIT_SEED = 0
VALIDATION_SPLIT_SEED = 1

# Per K: sample rate q (expected cohort qK = 30, 100, 1,000: Geyer et al.'s m for
# K = 100 and 1,000 and 10% at 10,000) and rounds R. Fixed, not searched.
PLAN: dict[int, dict[str, Any]] = {
    100: {"fraction": 0.3, "rounds": 50},
    1000: {"fraction": 0.1, "rounds": 50},
    10000: {"fraction": 0.1, "rounds": 50},
}
# Searched on validation, per K: local SGD lr x clip norm C.
GRID: list[dict[str, float]] = [{"lr": lr, "clip_norm": c} for lr in (0.1, 0.5)
                                for c in (0.3, 1.5)]
# Chosen by the last --tune run (validation accuracy, then ROC AUC); --no-tune uses these.
SETTINGS: dict[int, dict[str, float]] = {
    100: {"lr": 0.5, "clip_norm": 0.3},
    1000: {"lr": 0.5, "clip_norm": 1.5},
    10000: {"lr": 0.5, "clip_norm": 1.5},
}
COMMON = {"local_epochs": 1, "batch_size": 32, "strategy": "fedavg", "model": "logreg"}


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_config(sites: int, level: str, noise: str, lr: float, clip_norm: float,
                rounds: int, fraction: float, split_seed: int, patients: int,
                seed: int) -> Any:
    from fedcare.config import RunConfig

    config = RunConfig()
    config.seed = seed
    config.threads = 1
    config.data.dataset = "synthetic"
    config.data.n_patients = patients
    config.data.partition = "iid"
    config.data.sites = sites
    config.data.split_seed = split_seed
    config.model.name = COMMON["model"]
    f = config.federation
    f.strategy, f.rounds, f.fraction = COMMON["strategy"], rounds, fraction
    f.local_epochs, f.batch_size, f.lr = COMMON["local_epochs"], COMMON["batch_size"], lr
    config.baselines.enabled = False
    p = config.privacy
    p.level = level
    if level == "site":
        p.epsilon, p.delta, p.clip_norm, p.noise = EPSILON, DELTA, clip_norm, noise
        p.accountant = "pld"
    return config


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One run through run_experiment in this process; its measurements."""
    t_start = time.perf_counter()
    import torch

    from fedcare.experiment import run_experiment

    torch.set_num_threads(1)
    import_s = time.perf_counter() - t_start
    config = make_config(**spec)
    rounds_at: list[float] = []
    participants: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_experiment(config, out=Path(tmp) / "run",
                                on_round=lambda report, _: (
                                    rounds_at.append(time.perf_counter()),
                                    participants.append(len(report.participants))))
        run_s = time.perf_counter() - t0
    round_s = [b - a for a, b in itertools.pairwise(rounds_at)]
    summary = result.summary
    pooled = summary["federated"]["pooled"]
    privacy = summary.get("privacy")
    if privacy is not None:
        privacy = {k: v for k, v in privacy.items() if k != "sentence"}
    return {
        **spec,
        "accuracy": pooled["accuracy"],
        "roc_auc": pooled["roc_auc"],
        "n_test": pooled["n"],
        "privacy": privacy,
        "noise_std_on_mean_update": (
            None if privacy is None else privacy["noise_multiplier"] * privacy["clip_norm"]
            / (spec["fraction"] * spec["sites"])),
        "participants_mean": sum(participants) / max(len(participants), 1),
        "participants_min_max": [min(participants), max(participants)] if participants else None,
        "import_s": import_s,
        "run_experiment_s": run_s,
        "summary_elapsed_s": summary["elapsed_seconds"],
        "before_first_round_s": (rounds_at[0] - t0 - (round_s[0] if round_s else 0.0)
                                 if rounds_at else None),
        "round_median_s": sorted(round_s)[len(round_s) // 2] if round_s else None,
        "round_mean_s": sum(round_s) / len(round_s) if round_s else None,
        "after_last_round_s": t0 + run_s - rounds_at[-1] if rounds_at else None,
        "total_s": time.perf_counter() - t_start,
        "peak_rss_mib": max_rss_mib(),
        "loadavg_at_end": list(os.getloadavg()),
    }


def child(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run `specs` one after the other in one fresh subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(specs)]
    load = list(os.getloadavg())
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child failed (exit {done.returncode}): {specs}")
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        row["loadavg_at_start"] = load
    return rows


def spec(sites: int, level: str, noise: str, setting: dict[str, float], split_seed: int,
         args: argparse.Namespace) -> dict[str, Any]:
    plan = PLAN[sites]
    return {"sites": sites, "level": level, "noise": noise, "lr": setting["lr"],
            "clip_norm": setting["clip_norm"], "rounds": args.rounds or plan["rounds"],
            "fraction": plan["fraction"], "split_seed": split_seed,
            "patients": args.patients, "seed": args.seed}


def tune(sites: int, args: argparse.Namespace) -> tuple[dict[str, float], list[dict[str, Any]]]:
    rows = child([spec(sites, "site", "central", s, VALIDATION_SPLIT_SEED, args) for s in GRID])
    best = max(rows, key=lambda r: (r["accuracy"], r["roc_auc"]))
    return {"lr": best["lr"], "clip_norm": best["clip_norm"]}, rows




def machine() -> dict[str, Any]:
    import torch

    import fedcare

    return {"nproc": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "fedcare": fedcare.__version__, "loadavg_at_start": list(os.getloadavg()),
            "git": git_state()}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'K':>6} {'noise':>11} {'q':>4} {'R':>3} {'lr':>4} {'C':>4} {'sigma':>6} "
            f"{'eps':>5} {'std/mean':>8} {'acc':>6} {'auc':>6} {'round s':>7} "
            f"{'run s':>6} {'total s':>7} {'RSS':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        p = r["privacy"]
        label = "none" if p is None else r["noise"]
        sigma = "-" if p is None else f"{p['noise_multiplier']:.3f}"
        eps = "-" if p is None else f"{p['epsilon']:.2f}"
        std = "-" if p is None else f"{r['noise_std_on_mean_update']:.4f}"
        print(f"{r['sites']:>6} {label:>11} {r['fraction']:>4} {r['rounds']:>3} {r['lr']:>4} "
              f"{r['clip_norm']:>4} {sigma:>6} {eps:>5} {std:>8} {r['accuracy']:>6.4f} "
              f"{r['roc_auc']:>6.4f} {r['round_median_s']:>7.2f} {r['run_experiment_s']:>6.1f} "
              f"{r['total_s']:>7.1f} {r['peak_rss_mib']:>5.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sites", default="100,1000,10000", help="comma-separated K")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip the validation search; use SETTINGS")
    parser.add_argument("--distributed-at", type=int, default=1000,
                        help="K that also runs with noise = distributed (0: none)")
    parser.add_argument("--rounds", type=int, default=0, help="override R for every K")
    parser.add_argument("--patients", type=int, default=PATIENTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: K = 100, 3 rounds, no search, no file")
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_scale.json")
    args = parser.parse_args(argv)

    if args.child:
        rows = [run_one(s) for s in json.loads(args.child)]
        print(json.dumps(rows))
        return 0
    if args.quick:
        args.sites, args.rounds, args.no_tune, args.distributed_at = "100", 3, True, 100

    info = machine()
    print(f"machine: nproc={info['nproc']} torch={info['torch']} load={info['loadavg_at_start']}")
    started = time.perf_counter()
    sites_list = [int(s) for s in args.sites.split(",")]
    chosen: dict[int, dict[str, float]] = {}
    tuning: dict[str, Any] = {}
    for k in sites_list:
        if args.no_tune:
            chosen[k] = SETTINGS[k]
            continue
        t0 = time.perf_counter()
        chosen[k], rows = tune(k, args)
        tuning[str(k)] = {"chosen": chosen[k], "wall_s": time.perf_counter() - t0, "runs": rows}
        print(f"validation K={k}: " + ", ".join(
            f"lr {r['lr']} C {r['clip_norm']}: {r['accuracy']:.4f}/{r['roc_auc']:.4f}"
            for r in rows) + f" -> {chosen[k]}", flush=True)

    results: list[dict[str, Any]] = []
    for k in sites_list:
        runs = [("site", "central"), ("none", "central")]
        if k == args.distributed_at:
            runs.insert(1, ("site", "distributed"))
        for level, noise in runs:
            [row] = child([spec(k, level, noise, chosen[k], TEST_SPLIT_SEED, args)])
            results.append(row)
            print(f"  K={k} {level}/{noise}: acc {row['accuracy']:.4f} auc {row['roc_auc']:.4f} "
                  f"total {row['total_s']:.1f} s", flush=True)
    print()
    print_table(results)
    if args.quick:
        return 0
    out = {
        "benchmark": "dp_scale",
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "workload": {"dataset": "synthetic", "patients": args.patients, "partition": "iid",
                     "split": "80/20 stratified", "test_split_seed": TEST_SPLIT_SEED,
                     "validation_split_seed": VALIDATION_SPLIT_SEED, "epsilon": EPSILON,
                     "delta": DELTA, "accountant": "pld", **COMMON, "plan": PLAN,
                     "grid": GRID, "chosen": {str(k): v for k, v in chosen.items()},
                     "seed": args.seed},
        "machine": info,
        "tuning": tuning or None,
        "wall_seconds": time.perf_counter() - started,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
