"""What the released model leaks: membership inference and a one-run epsilon lower bound.

Usage (from the repository root)::

    /work/venv/bin/python benchmarks/bench_audit_membership.py          # full run, writes JSON
    /work/venv/bin/python benchmarks/bench_audit_membership.py --quick  # smoke run, no file

Protocol
--------
Two datasets: breast cancer (scikit-learn copy, 569 patients, 80/20 split,
IID over 2 sites) and UCI heart disease (FLamby protocol, 740 patients, its 4
hospitals, 66/34 split per hospital). One model: an MLP with two hidden layers
of 256 (30-256-256-1 on breast cancer, the issue's reference shape with one
logit instead of two; 13-256-256-1 on heart disease), FedAvg, SGD. Four
training settings per dataset (`ROWS`):

- ``no DP, over-fitted``: 30 rounds x 10 local epochs, lr 0.2, batch 32
  (300 passes over the data: training accuracy 1.0 on breast cancer);
- ``no DP, DP schedule``: the DP rows' schedule without DP, to separate what DP
  does from what shorter training does;
- ``DP eps 8`` / ``DP eps 1``: record-level DP-SGD at every site, noise
  calibrated by the PLD accountant to epsilon at delta 1e-5, noise and Poisson
  sampling from the CSPRNG; 10 rounds x 1 local epoch, lr 0.5, batch 64, clip
  0.5. These were picked by hand from a few single runs so that DP trains at
  all (heart disease at epsilon 1: about 0.7-0.76 accuracy); they are not
  tuned, and utility is `bench_dp_utility.py`'s subject, not this one's.

Membership inference (`fedcare.audit.audit_membership`): 17 models per
setting, each trained by fedcare's local runtime on its own random half of
each site's rows (train and test rows together form the pool); each model in
turn is the target and the other 16 its references (LiRA online and offline,
global variance; loss and logit-margin thresholds). Metrics pool the 17
targets: about 17 x 284 members and as many non-members on breast cancer, so
the TPR at 0.1% FPR rests on about 5 false positives.

Canary audit (`fedcare.audit.audit_canaries`): 100 canaries, records of the
largest site's training rows with their label flipped, each included with
probability 1/2; one training run; the one-run lower bound of Steinke et al.
(2023) at 95% confidence with delta = 1e-5, next to the accountant's epsilon
for that site. Three canary seeds per setting (the bound of one run is itself
a random quantity).

Reference (the issue, breast cancer, 30-256-256-2 MLP): canary AUC 0.97
without DP, 0.60 at epsilon 8, 0.49 at epsilon 1; one-run lower bound about
2.3 without DP and about 0 with DP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _env import git_state, loadavg  # benchmarks/ is sys.path[0] when a script runs

RESULTS = Path(__file__).resolve().parent / "results" / "audit_membership.json"
DELTA = 1e-5
N_REFERENCE = 16
N_CANARIES = 100
CANARY_SEEDS = (0, 1, 2)
CONFIDENCE = 0.95

Settings = dict[str, Any]
DATASETS: dict[str, Settings] = {
    "breast-cancer": {"data.dataset": "breast-cancer", "data.partition": "iid",
                      "data.sites": 2},
    "heart-disease": {"data.dataset": "heart-disease", "data.protocol": "flamby"},
}
MODEL: Settings = {"model.name": "mlp", "model.hidden": [256, 256],
                   "federation.strategy": "fedavg", "baselines.enabled": False}
OVERFIT: Settings = {"federation.rounds": 30, "federation.local_epochs": 10,
                     "federation.lr": 0.2, "federation.batch_size": 32}
DP_SCHEDULE: Settings = {"federation.rounds": 10, "federation.local_epochs": 1,
                         "federation.lr": 0.5, "federation.batch_size": 64,
                         "privacy.clip_norm": 0.5}
PRIVATE: Settings = {"privacy.level": "record", "privacy.delta": DELTA, "privacy.secure": True,
                     "privacy.accountant": "pld"}
ROWS: dict[str, Settings] = {
    "no DP, over-fitted": OVERFIT,
    "no DP, DP schedule": DP_SCHEDULE,
    "DP eps 8": {**DP_SCHEDULE, **PRIVATE, "privacy.epsilon": 8.0},
    "DP eps 1": {**DP_SCHEDULE, **PRIVATE, "privacy.epsilon": 1.0},
}
QUICK: Settings = {"federation.rounds": 2}

REFERENCE = {"source": "issue 5 (breast cancer, 30-256-256-2 MLP)",
             "canary_auc": {"no DP": 0.97, "eps 8": 0.60, "eps 1": 0.49},
             "one_run_lower_bound": {"no DP": 2.3, "DP": 0.0}}


def make_config(settings: Mapping[str, Any]) -> Any:
    from fedcare.config import RunConfig

    config = RunConfig()
    for key, value in settings.items():
        config.set_value(key, value)
    return config


# --------------------------------------------------------------------------- jobs
def membership_job(dataset: str, row: str, settings: Settings, n_reference: int) -> dict[str, Any]:
    import torch

    from fedcare.audit import audit_membership

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit_membership(make_config(settings), n_reference=n_reference, seed=0)
    out = result.to_dict()
    out.pop("config")
    return {"dataset": dataset, "row": row, "kind": "membership", "result": out}


def canary_job(dataset: str, row: str, settings: Settings, seed: int) -> dict[str, Any]:
    import torch

    from fedcare.audit import audit_canaries

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit_canaries(make_config(settings), n_canaries=N_CANARIES, seed=seed,
                                confidence=CONFIDENCE)
    out = result.to_dict()
    out.pop("config")
    return {"dataset": dataset, "row": row, "kind": "canary", "seed": seed, "result": out}


def run(job: tuple[Any, ...]) -> dict[str, Any]:
    kind, *args = job
    started = time.perf_counter()
    out = (membership_job if kind == "membership" else canary_job)(*args)
    out["seconds"] = time.perf_counter() - started
    return out


def jobs(quick: bool, n_reference: int) -> list[tuple[Any, ...]]:
    """Every job, the costliest first (DP membership audits train 17 DP-SGD models)."""
    out: list[tuple[Any, ...]] = []
    seeds = CANARY_SEEDS[:1] if quick else CANARY_SEEDS
    datasets = list(DATASETS)[:1] if quick else list(DATASETS)
    for kind in ("membership", "canary"):
        for row in ("DP eps 1", "DP eps 8", "no DP, over-fitted", "no DP, DP schedule"):
            for dataset in datasets:
                data = DATASETS[dataset]
                settings = {**data, **MODEL, **ROWS[row], **(QUICK if quick else {})}
                if kind == "membership":
                    out.append((kind, dataset, row, settings, n_reference))
                else:
                    out += [(kind, dataset, row, settings, seed) for seed in seeds]
    return out


# --------------------------------------------------------------------------- report
def collect(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        table[dataset] = {}
        for row in ROWS:
            mine = [r for r in results if r["dataset"] == dataset and r["row"] == row]
            membership = next(r for r in mine if r["kind"] == "membership")
            canaries = sorted((r for r in mine if r["kind"] == "canary"),
                              key=lambda r: r["seed"])
            bounds = [c["result"]["epsilon_lower_bound"] for c in canaries]
            aucs = [c["result"]["canary_auc"] for c in canaries]
            table[dataset][row] = {
                "settings": ROWS[row],
                "membership": membership["result"],
                "membership_seconds": membership["seconds"],
                "canary": [{"seed": c["seed"], "seconds": c["seconds"], **c["result"]}
                           for c in canaries],
                "canary_summary": {
                    "canary_auc_mean": statistics.fmean(aucs),
                    "epsilon_lower_bound": bounds,
                    "accountant_epsilon": [c["result"]["accountant_epsilon"] for c in canaries],
                    "any_failed": any(c["result"]["failed"] for c in canaries),
                    "accuracy_mean": statistics.fmean(c["result"]["accuracy"] for c in canaries),
                },
            }
    return table


def fmt_eps(value: Any) -> str:
    return "∞" if value == "inf" else f"{value:.2f}"


def markdown(table: Mapping[str, Any]) -> str:
    lines = ["| dataset | training | accountant ε | accuracy members / non-members | "
             "LiRA online AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | LiRA offline AUC | "
             "loss AUC | members / non-members scored |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dataset, rows in table.items():
        for row, cell in rows.items():
            m = cell["membership"]
            lira, offline, loss = (m["attacks"][k] for k in
                                   ("lira_online", "lira_offline", "loss"))
            lines.append(
                f"| {dataset} | {row} | {fmt_eps(m['accountant_epsilon'])} | "
                f"{m['accuracy']['members']:.3f} / {m['accuracy']['non_members']:.3f} | "
                f"{lira['roc_auc']:.3f} | {lira['tpr_at_fpr']['0.01']:.4f} | "
                f"{lira['tpr_at_fpr']['0.001']:.4f} | {offline['roc_auc']:.3f} | "
                f"{loss['roc_auc']:.3f} | {lira['n_members']} / {lira['n_non_members']} |")
    lines += ["", "| dataset | training | accountant ε (canary site) | canary AUC per seed | "
              "one-run ε lower bound (95%) per seed | guesses right | failed | "
              "test accuracy (with canaries) |", "|---|---|---|---|---|---|---|---|"]
    for dataset, rows in table.items():
        for row, cell in rows.items():
            runs = cell["canary"]
            aucs = " / ".join(f"{c['canary_auc']:.2f}" for c in runs)
            bounds = " / ".join(f"{c['epsilon_lower_bound']:.2f}" for c in runs)
            right = " / ".join(f"{c['bound']['n_correct']}/{c['bound']['n_guesses']}"
                               for c in runs)
            claimed = " / ".join(fmt_eps(c["accountant_epsilon"]) for c in runs)
            failed = "yes" if cell["canary_summary"]["any_failed"] else "no"
            lines.append(f"| {dataset} | {row} | {claimed} | {aucs} | {bounds} | {right} | "
                         f"{failed} | {cell['canary_summary']['accuracy_mean']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: breast cancer only, 2 rounds, 3 reference models, "
                             "one canary seed; no file unless --out is given")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (default: 2)")
    parser.add_argument("--out", type=Path, help=f"JSON to write (default: {RESULTS})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load_start = loadavg()
    n_reference = 3 if args.quick else N_REFERENCE
    out: Path | None = args.out or (None if args.quick else RESULTS)
    todo = jobs(args.quick, n_reference)
    print(f"{len(todo)} audits on {args.jobs} worker(s) ...", flush=True)
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for done in pool.map(run, todo, chunksize=1):
            results.append(done)
            label = f"seed {done['seed']}" if done["kind"] == "canary" else ""
            print(f"  {done['kind']:>10} {done['dataset']:>13} {done['row']:<20} {label:<7} "
                  f"{done['seconds']:6.0f} s", flush=True)
    table = collect(results)
    print()
    print(markdown(table))

    import torch

    import fedcare

    result = {
        "benchmark": ("membership inference (loss, margin, LiRA online/offline) against the "
                      "released model and a one-run canary epsilon lower bound next to the "
                      "accountant's epsilon: no DP vs record-level DP at epsilon 8 and 1"),
        "command": "python benchmarks/bench_audit_membership.py"
                   + (" --quick" if args.quick else ""),
        "fedcare_version": fedcare.__version__,
        "git": git_state(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "workers": args.jobs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": time.perf_counter() - started,
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "protocol": {"datasets": DATASETS, "model": MODEL, "rows": ROWS,
                     "quick_overrides": QUICK if args.quick else {},
                     "n_reference": n_reference, "n_targets": n_reference + 1,
                     "membership_seed": 0, "n_canaries": N_CANARIES,
                     "canary_kind": "flip", "canary_site": "largest training site",
                     "canary_seeds": list(CANARY_SEEDS[:1] if args.quick else CANARY_SEEDS),
                     "confidence": CONFIDENCE, "delta": DELTA},
        "reference": REFERENCE,
        "table": table,
        "markdown": markdown(table),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {out}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
