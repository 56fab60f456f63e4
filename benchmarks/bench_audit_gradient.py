"""Gradient inversion against what the aggregator reads: records recovered per configuration.

Usage (from the repository root)::

    python benchmarks/bench_audit_gradient.py           # -> results/audit_gradient.json
    python benchmarks/bench_audit_gradient.py --quick   # 30 records, no file unless --out

Protocol
--------
`fedcare.audit.gradient.audit_gradient_leakage` on the bundled heart-disease
data (4 hospitals, FLamby protocol: 8 numeric and 2 categorical columns, the
target site is Cleveland) and the scikit-learn breast-cancer data (30 numeric
columns, IID partition into 4 sites, ``data.split_seed = 0``; the target is
``site-0``). Model: MLP with one hidden layer of 32 ReLU units (13-32-1 and
30-32-1); the sum is also run with logistic regression. The leakage setup:
every site holds one record and takes one SGD step (batch size 1, lr 0.1),
from the initial global model (``seed = 0``); ``federation.rounds = 1``, so
a private configuration puts its whole budget into the one round observed
(the least noise its epsilon allows, the attacker's best case). Each target
record (``--records``, drawn from the target site's training rows with
seed 0) gets its own round.

Configurations (what the aggregator reads):

- ``plain``: the target site's payload ``[delta, 1]``;
- ``clip only (C 0.01)``: client-level DP with central noise: the aggregator
  reads each clipped update before it adds the noise; C = 0.01 is a tenth of
  the smallest update norms (about 0.09-0.17 with lr 0.1), so every update
  is clipped;
- ``site DP eps 1`` / ``eps 8``: client-level DP, distributed noise, C = 0.1
  (about the median update norm): the target's update carries its share of
  the noise (standard deviation sigma C / 2 of the 4 sites');
- ``record DP eps 1``: DP-SGD at the site, C = 1 on the record's gradient
  (about its median norm; per-record clipping and noise);
- ``sum of 4 (secagg)``: only the sum of the 4 sites' payloads, with the
  MLP and with logistic regression.

DP noise comes from the CSPRNG (``privacy.secure = true``), so private rows
vary between runs; everything else is seeded. Metrics as defined in
`fedcare.audit.gradient`: a numeric feature is right within 0.05 of its
public range (the schema's bounds), a categorical one if it is the right
category, a record when all its features are; ``round`` is the share of all
records inside the observed payloads that some record the attack claims
matches (differs from ``records`` only for sums). The prior baseline guesses
each feature from the other sites' training rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import fedcare
from fedcare.audit.gradient import ATTACKS, audit_gradient_leakage
from fedcare.config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import git_state, loadavg  # benchmarks/ is sys.path[0] when a script runs

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "audit_gradient.json"

DATASETS: dict[str, dict[str, Any]] = {
    "heart-disease": {},
    "breast-cancer": {"data.dataset": "breast-cancer", "data.partition": "iid",
                      "data.sites": 4},
}
BASE: dict[str, Any] = {"federation.rounds": 1, "model.name": "mlp", "model.hidden": [32],
                        "privacy.secure": True, "privacy.delta": 1e-5}
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "clip only (C 0.01)": {"privacy.level": "site", "privacy.noise": "central",
                           "privacy.epsilon": 1.0, "privacy.clip_norm": 0.01},
    "site DP eps 1": {"privacy.level": "site", "privacy.noise": "distributed",
                      "privacy.epsilon": 1.0, "privacy.clip_norm": 0.1},
    "site DP eps 8": {"privacy.level": "site", "privacy.noise": "distributed",
                      "privacy.epsilon": 8.0, "privacy.clip_norm": 0.1},
    "record DP eps 1": {"privacy.level": "record", "privacy.epsilon": 1.0,
                        "privacy.clip_norm": 1.0},
    "sum of 4 (secagg)": {"protection.scheme": "secagg"},
    "sum of 4 (secagg), logreg": {"protection.scheme": "secagg", "model.name": "logreg"},
}


def make_config(dataset: str, configuration: str) -> RunConfig:
    config = RunConfig()
    for key, value in {**BASE, **DATASETS[dataset], **CONFIGURATIONS[configuration]}.items():
        config.set_value(key, value)
    return config


def row(dataset: str, configuration: str, n_records: int, seed: int) -> dict[str, Any]:
    config = make_config(dataset, configuration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit_gradient_leakage(config, n_records=n_records, method="all", seed=seed)
    out = result.to_dict()
    out.pop("config")
    out["configuration"] = configuration
    out["settings"] = {**DATASETS[dataset], **CONFIGURATIONS[configuration]}
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per dataset, configuration and attack (prior last)."""
    lines = ["| dataset | configuration | attack | records | round | features | label | s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    # ``round`` differs from ``records`` only for sums (records of any site in the sum)
    for r in rows:
        for name, m in [*r["attacks"].items(), ("prior", r["prior"])]:
            lines.append(f"| {r['dataset']} | {r['configuration']} | {name} | "
                         f"{m['records_recovered']:.2f} | {m['round_records_recovered']:.2f} | "
                         f"{m['mean_feature_accuracy']:.2f} | {m['label_accuracy']:.2f} | "
                         f"{m['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 30 records per configuration; no file unless --out")
    parser.add_argument("--records", type=int, default=0,
                        help="target records per configuration (default 100; --quick 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma list (default: both)")
    parser.add_argument("--configurations", default="",
                        help=f"comma list of {list(CONFIGURATIONS)} (default: all)")
    parser.add_argument("--out", type=Path, help=f"JSON to write (default: {RESULTS})")
    args = parser.parse_args(argv)
    n_records = args.records or (30 if args.quick else 100)
    datasets = [d for d in args.datasets.split(",") if d]
    configurations = ([c for c in args.configurations.split(",") if c]
                      or list(CONFIGURATIONS))
    for name in configurations:
        if name not in CONFIGURATIONS:
            parser.error(f"unknown configuration {name!r}; expected {list(CONFIGURATIONS)}")
    out: Path | None = args.out or (None if args.quick else RESULTS)
    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), loadavg()

    rows = []
    for dataset in datasets:
        for configuration in configurations:
            began = time.perf_counter()
            rows.append(row(dataset, configuration, n_records, args.seed))
            best = rows[-1]["best"]
            m = rows[-1]["attacks"][best]
            print(f"{dataset:14s} {configuration:26s} best {best:8s} records "
                  f"{m['records_recovered']:.2f} round {m['round_records_recovered']:.2f} "
                  f"(prior {rows[-1]['prior']['records_recovered']:.2f}); sigma "
                  f"{rows[-1]['noise_multiplier']:.2f}, median update norm "
                  f"{rows[-1]['median_update_norm']:.3f}; "
                  f"{time.perf_counter() - began:5.1f} s", flush=True)
    print()
    table = markdown(rows)
    print(table)

    result = {
        "benchmark": ("gradient inversion against what the aggregator reads of one site, "
                      "batch size 1, one local step: records recovered vs the prior baseline"),
        "command": "python benchmarks/bench_audit_gradient.py"
                   + (" --quick" if args.quick else "")
                   + (f" --records {args.records}" if args.records else ""),
        "fedcare_version": fedcare.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git_state(),
        "seconds": time.perf_counter() - started,
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "protocol": __doc__.split("Protocol\n--------\n")[1].strip(),
        "base": BASE, "datasets": DATASETS, "attacks": list(ATTACKS),
        "n_records": n_records, "seed": args.seed,
        "rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {out}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
