"""Utility of record-level DP on Fed-Heart-Disease (FLamby protocol): accuracy vs epsilon.

Usage (from the repository root)::

    python benchmarks/bench_dp_utility.py           # test evaluation with the recorded settings
    python benchmarks/bench_dp_utility.py --tune    # validation sweep first (~15-20 min on 2 cores)
    python benchmarks/bench_dp_utility.py --quick   # smoke run: 2 seeds, tiny grid, no file

Protocol
--------
Same data and test protocol as ``bench_quality.py`` (bundled UCI Heart
Disease, ``data.protocol = "flamby"``, ``data.split_seed = 0``, metrics on the
pooled test set, training seeds 0-4), trained with
``privacy.level = "record"``: DP-SGD at every hospital, each hospital's noise
multiplier calibrated (PLD accountant) so that all its steps over all rounds
fit ``privacy.epsilon`` at ``privacy.delta = 1e-5``, noise and Poisson sampling
from the CSPRNG (``privacy.secure = true``). Because the noise and the
sampling come from the CSPRNG, a run is not reproducible: the training seed
fixes only the initialisation, and the std over seeds is mostly DP noise.

Hyper-parameters are chosen on validation data exactly as ``bench_quality.py
--tune`` does (its machinery is imported): each hospital's training rows are
split again 66/34 into inner-train/validation (5 splits, ``data.split_seed``
100-104), the criterion is the mean pooled validation accuracy, and the
cheapest setting (fewest DP-SGD steps) within one standard error of the best is
kept. Test rows are never read during tuning. Each epsilon is tuned on its
own (the noise, hence the best clip norm and learning rate, depend on it); the
test table also shows epsilon 1's choice used at every epsilon. Unlike the
non-private sweep, the rounds axis cannot be read from one long run: the noise
is calibrated to the planned number of rounds, so each round count is its own
run.

Speed: the results in results/dp_utility.json were measured while fedcare's
ledger still recomputed each site's PLD epsilon before every round; the worker
processes then memoised the accountant. The ledger now proves the whole plan
once at start-up, so no memo is needed; the numbers are unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import fedcare
from fedcare.config import DataConfig
from fedcare.data.datasets import build_federation
from fedcare.errors import FedcareError
from fedcare.experiment import run_experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import loadavg
from bench_quality import (
    TEST_SEEDS,
    TUNE_SPLITS,
    VAL_FRACTION,
    Settings,
    _pick,
    _record,
    code_fingerprint,
    dev_settings,
    grid,
    label,
    make_config,
    mean,
    select,
    sgd_steps,
    write_dev_data,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "dp_utility.json"

EPSILONS = (0.5, 1.0, 3.0, 8.0)
TARGET_EPSILON = 1.0
DELTA = 1e-5
TARGET = 0.75  # accuracy at epsilon 1
METRICS = ("accuracy", "roc_auc")

# FLamby (du Terrail et al., NeurIPS 2022 datasets track), Fed-Heart-Disease, DP-FedAvg
# (Opacus DP-SGD at each client, clip 1.1, deltas 1e-1..1e-4): about 0.70 accuracy at
# epsilon 1; non-private FedAvg 0.748 (see /work/shared/datasets/README.md).
FLAMBY_DP_EPS1 = 0.70
FLAMBY_FEDAVG = 0.748
NONPRIVATE_BENCHMARKS_MD = 0.809  # BENCHMARKS.md, Quality: FedAvg, tuned = defaults

PRIVACY: Settings = {"privacy.level": "record", "privacy.delta": DELTA,
                     "privacy.secure": True, "privacy.accountant": "pld"}
BASE: Settings = {"model.name": "logreg", "federation.strategy": "fedavg",
                  "federation.local_epochs": 1, "baselines.enabled": False}

GRID: dict[str, Sequence[Any]] = {
    "federation.rounds": (5, 10, 20),
    "federation.batch_size": (16, 32, 64),
    "privacy.clip_norm": (0.1, 0.5, 1.0, 2.0),
    "federation.lr": (0.05, 0.1, 0.3, 1.0),
}
QUICK_GRID: dict[str, Sequence[Any]] = {
    "federation.rounds": (10,), "federation.batch_size": (32,),
    "privacy.clip_norm": (0.5, 1.0), "federation.lr": (0.1, 1.0)}

# The choice of `--tune` per epsilon (recorded in results/dp_utility.json and
# BENCHMARKS.md, Differential privacy); used by a plain run. `--tune` recomputes it.
TUNED: dict[float, Settings] = {
    0.5: {"federation.rounds": 5, "federation.batch_size": 64,
          "privacy.clip_norm": 1.0, "federation.lr": 0.3},
    1.0: {"federation.rounds": 5, "federation.batch_size": 64,
          "privacy.clip_norm": 1.0, "federation.lr": 1.0},
    3.0: {"federation.rounds": 5, "federation.batch_size": 64,
          "privacy.clip_norm": 2.0, "federation.lr": 1.0},
    8.0: {"federation.rounds": 5, "federation.batch_size": 32,
          "privacy.clip_norm": 2.0, "federation.lr": 1.0},
}


# --------------------------------------------------------------------------- workers
def _init_worker() -> None:
    torch.set_num_threads(1)


def run_jobs(fn: Any, jobs: Sequence[tuple[Any, ...]], workers: int, what: str) -> list[Any]:
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    print(f"  {what}: {len(jobs)} runs on {workers} worker(s) ...", end="", flush=True)
    if workers <= 1:
        _init_worker()
        results = [fn(*args) for args in jobs]
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            results = list(pool.map(fn, *zip(*jobs, strict=True), chunksize=1))
    print(f" {time.perf_counter() - started:.0f} s", flush=True)
    return results


def _privacy_record(summary: Mapping[str, Any]) -> dict[str, Any]:
    p = summary.get("privacy") or {}
    return {"epsilon_per_site": {k: round(v, 4) for k, v in p.get("epsilon_per_site", {}).items()},
            "noise_multiplier": {k: round(v["noise_multiplier"], 4)
                                 for k, v in p.get("mechanism", {}).items()},
            "sample_rate": {k: round(v["sample_rate"], 4)
                            for k, v in p.get("mechanism", {}).items()},
            "steps_per_epoch": {k: v["steps_per_epoch"]
                                for k, v in p.get("mechanism", {}).items()}}


def tune_job(settings: Settings, dev_dir: str, split: int) -> Mapping[str, float] | str:
    """Pooled validation metrics of one DP config on one inner split."""
    run = {**settings, **dev_settings(dev_dir, split)}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = run_experiment(make_config(run), out=Path(tmp) / "run")
        except FedcareError as exc:  # e.g. local training diverged
            return f"{type(exc).__name__}: {exc}"
    return _pick(result.federated.pooled)


def test_job(settings: Settings, seed: int) -> dict[str, Any]:
    """One run on the official split: pooled test metrics and the privacy spent."""
    run = {**settings, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_experiment(make_config(run), out=Path(tmp) / "run")
        elapsed = time.perf_counter() - started
    return {"metrics": _pick(result.federated.pooled), "seconds": elapsed,
            "privacy": _privacy_record(result.summary)}


# --------------------------------------------------------------------------- tuning
def tune(workers: int, quick: bool, eps: float) -> dict[str, Any]:
    started = time.perf_counter()
    candidates = grid({**BASE, **PRIVACY, "privacy.epsilon": eps},
                      QUICK_GRID if quick else GRID)
    splits = TUNE_SPLITS[:2] if quick else TUNE_SPLITS
    with tempfile.TemporaryDirectory() as tmp:
        write_dev_data(Path(tmp))
        dev = build_federation(make_config(dev_settings(tmp, splits[0])).data)
        jobs = [(c, tmp, s) for c in candidates for s in splits]
        results = iter(run_jobs(tune_job, jobs, workers, f"DP grid at epsilon {eps:g}"))
        records = []
        for candidate in candidates:
            per_split = [next(results) for _ in splits]
            vals = [r if isinstance(r, dict) else None for r in per_split]
            records.append(_record(candidate, vals, [r for r in per_split if isinstance(r, str)]))
    n_train = [s.n_train for s in build_federation(DataConfig()).sites]
    choice = select(records, lambda s: sgd_steps(s, n_train))
    return {"records": records, "choice": choice, "seconds": time.perf_counter() - started,
            "epsilon": eps,
            "validation_rows": sum(s.n_test for s in dev.sites),
            "inner_train_rows": {s.name: s.n_train for s in dev.sites}}


def compact(record: Mapping[str, Any]) -> dict[str, Any]:
    val = record["val"]
    keys = ("federation.rounds", "federation.batch_size", "privacy.clip_norm", "federation.lr")
    out = {"settings": {k: record["settings"][k] for k in keys},
           "val_accuracy": round(mean(val["accuracy"]), 5),
           "val_accuracy_splits": [round(x, 4) for x in val["accuracy"]],
           "val_roc_auc": round(mean(val["roc_auc"]), 4),
           "val_log_loss": round(mean(val["log_loss"]), 4)}
    return {**out, "errors": record["errors"]} if record["errors"] else out


def summarize_tuning(study: Mapping[str, Any]) -> dict[str, Any]:
    c = study["choice"]
    return {
        "protocol": (f"each hospital's training rows (split_seed 0) split again "
                     f"{1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} (stratified) into inner-train "
                     f"and validation with data.split_seed in {list(TUNE_SPLITS)}, training "
                     f"seed = split seed; record-level DP at epsilon {study['epsilon']:g}, delta "
                     f"{DELTA:g}, secure noise; criterion: pooled validation accuracy, mean over "
                     "the splits; one-standard-error rule towards the cheapest run (fewest "
                     "DP-SGD steps, ties: higher accuracy, then lower log loss)"),
        "epsilon": study["epsilon"],
        "validation_rows_per_split": study["validation_rows"],
        "inner_train_rows": study["inner_train_rows"],
        "seconds": study["seconds"],
        "chosen": compact(c["chosen"]), "best": compact(c["best"]),
        "threshold": c["threshold"], "se": c["se"], "n_eligible": c["n_eligible"],
        "n_candidates": c["n_candidates"],
        "records": [compact(r) for r in study["records"]],
    }


# --------------------------------------------------------------------------- test
def test_table(rows: Mapping[str, Settings], seeds: Sequence[int], workers: int) -> dict[str, Any]:
    keys = list(rows)
    jobs = [(rows[k], seed) for k in keys for seed in seeds]
    results = iter(run_jobs(test_job, jobs, workers, "test runs"))
    table = {}
    for key in keys:
        outs = [next(results) for _ in seeds]
        row: dict[str, Any] = {"settings": rows[key],
                               "seconds_per_run": statistics.fmean(o["seconds"] for o in outs)}
        for metric in METRICS:
            xs = [o["metrics"][metric] for o in outs]
            row[metric] = {"mean": statistics.fmean(xs),
                           "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                           "values": [round(x, 4) for x in xs]}
        if rows[key].get("privacy.level") == "record":
            row["privacy"] = [o["privacy"] for o in outs]
            spent = [max(o["privacy"]["epsilon_per_site"].values()) for o in outs]
            row["max_epsilon_spent"] = max(spent)
        table[key] = row
    return table


def pm(cell: Mapping[str, Any], metric: str) -> str:
    return f"{cell[metric]['mean']:.3f} ± {cell[metric]['std']:.3f}"


def markdown(table: Mapping[str, Any]) -> str:
    lines = ["| epsilon (delta 1e-5) | accuracy | ROC AUC | per seed (accuracy) | "
             "max epsilon spent (any site) |", "|---|---|---|---|---|"]
    for key, row in table.items():
        spent = f"{row['max_epsilon_spent']:.4f}" if "max_epsilon_spent" in row else "-"
        per_seed = " / ".join(f"{x:.3f}" for x in row["accuracy"]["values"])
        lines.append(f"| {key} | {pm(row, 'accuracy')} | {pm(row, 'roc_auc')} | {per_seed} | "
                     f"{spent} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seeds 0-1, epsilons 1 and 8, tiny grid; no file "
                             "unless --out is given")
    parser.add_argument("--tune", action="store_true",
                        help="run the validation sweep at epsilon 1 first and use its choice")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (default: 2)")
    parser.add_argument("--out", type=Path, help=f"JSON to write (default: {RESULTS})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load_start = loadavg()
    seeds = TEST_SEEDS[:2] if args.quick else TEST_SEEDS
    epsilons = (1.0, 8.0) if args.quick else EPSILONS
    out: Path | None = args.out or (None if args.quick else RESULTS)
    previous = json.loads(out.read_text()) if out is not None and out.exists() else {}

    if args.tune:
        print("Tuning on validation splits of the training rows (no test row is read):")
        tuning: dict[str, Any] = {}
        for eps in epsilons:
            record = summarize_tuning(tune(args.jobs, args.quick, eps))
            tuning[f"{eps:g}"] = record
            print(f"  epsilon {eps:g}: chosen {label(record['chosen']['settings'])} val acc "
                  f"{record['chosen']['val_accuracy']:.3f} (best "
                  f"{record['best']['val_accuracy']:.3f}: {label(record['best']['settings'])}; "
                  f"{record['n_eligible']}/{record['n_candidates']} within 1 SE)", flush=True)
        chosen = {eps: tuning[f"{eps:g}"]["chosen"]["settings"] for eps in epsilons}
    else:
        if not TUNED:
            parser.error("no tuned settings recorded in TUNED; run with --tune first")
        tuning = previous.get("tuning") or {}
        chosen = {eps: TUNED[eps] for eps in epsilons}
        recorded = {eps: tuning[f"{eps:g}"]["chosen"]["settings"] for eps in epsilons
                    if f"{eps:g}" in tuning}
        if recorded != chosen:
            print(f"warning: TUNED differs from the tuning study recorded in {out}")
    load_tuned = loadavg()

    print(f"Test evaluation: pooled test set of the official split, seeds {list(seeds)}:")
    rows: dict[str, Settings] = {
        f"{eps:g}": {**BASE, **chosen[eps], **PRIVACY, "privacy.epsilon": eps} for eps in epsilons}
    rows |= {f"{eps:g}, epsilon {TARGET_EPSILON:g}'s settings":
             {**BASE, **chosen[TARGET_EPSILON], **PRIVACY, "privacy.epsilon": eps}
             for eps in epsilons if chosen[eps] != chosen[TARGET_EPSILON]}
    # A private run holds out each record by a keyed hash of its row (data.split = "auto"),
    # so its test patients differ from the stratified split's: the reference without DP is
    # run on the same keyed split and public-bounds preprocessing.
    rows["no DP, public bounds, keyed split"] = {**BASE, "data.standardize": "bounds",
                                                 "data.split": "keyed"}
    rows["no DP (FedAvg, defaults)"] = {**BASE}
    test_started = time.perf_counter()
    table = test_table(rows, seeds, args.jobs)
    test_seconds = time.perf_counter() - test_started
    print()
    print(markdown(table))
    acc1 = table["1"]["accuracy"]["mean"]
    target = {"epsilon": TARGET_EPSILON, "threshold": TARGET, "accuracy": acc1,
              "met": acc1 >= TARGET, "margin": acc1 - TARGET,
              "flamby_dp_fedavg_eps1": FLAMBY_DP_EPS1}
    print(f"\nTarget (accuracy >= {TARGET} at epsilon 1): {acc1:.3f} -> "
          f"{'met' if target['met'] else 'NOT met'} (FLamby DP-FedAvg about {FLAMBY_DP_EPS1})")

    result = {
        "benchmark": ("Fed-Heart-Disease (FLamby protocol), record-level DP (DP-SGD at every "
                      "hospital): pooled test accuracy and ROC AUC vs epsilon"),
        "command": "python benchmarks/bench_dp_utility.py" + (" --quick" if args.quick else "")
                   + (" --tune" if args.tune else ""),
        "fedcare_version": fedcare.__version__,
        "fedcare_sources": code_fingerprint(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "workers": args.jobs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": time.perf_counter() - started,
        "test_seconds": test_seconds,
        "loadavg_start": load_start, "loadavg_after_tuning": load_tuned, "loadavg_end": loadavg(),
        "test_protocol": ("bundled UCI Heart Disease, data.protocol = flamby, data.split_seed = 0 "
                          "(private runs and the keyed reference: each record held out with "
                          "probability 0.34 by a keyed hash of its row, 261 test patients; the "
                          "defaults row: per-hospital stratified 66/34 split, 250), metrics on "
                          f"the pooled test set, training seeds {list(seeds)}; noise and Poisson "
                          "sampling from the CSPRNG, so runs are not reproducible"),
        "privacy": {k.split(".")[1]: v for k, v in PRIVACY.items()},
        "epsilons": list(epsilons),
        "chosen_settings": {f"{eps:g}": c for eps, c in chosen.items()},
        "flamby": {"dp_fedavg_accuracy_eps1": FLAMBY_DP_EPS1, "fedavg_accuracy": FLAMBY_FEDAVG},
        "nonprivate_fedavg_benchmarks_md": NONPRIVATE_BENCHMARKS_MD,
        "table": table,
        "target": target,
        "tuning": tuning,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dump(result) + "\n", encoding="utf-8")
        print(f"\nwrote {out}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def dump(result: Mapping[str, Any]) -> str:
    """JSON, indented, with one line per tuning record."""
    tuning = result.get("tuning")
    if not tuning:
        return json.dumps(result, indent=1)
    head = json.dumps({k: v for k, v in result.items() if k != "tuning"}, indent=1)[:-2]
    studies = []
    for eps, study in tuning.items():
        parts = [f"   {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
                 for k, v in study.items() if k != "records"]
        records = ",\n".join(f"    {json.dumps(r, separators=(',', ':'))}"
                             for r in study["records"])
        parts.append(f'   "records": [\n{records}\n   ]')
        studies.append(f"  {json.dumps(eps)}: {{\n" + ",\n".join(parts) + "\n  }")
    return head + ',\n "tuning": {\n' + ",\n".join(studies) + "\n }\n}"


if __name__ == "__main__":
    sys.exit(main())
