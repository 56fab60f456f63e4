"""Model quality on Fed-Heart-Disease (FLamby protocol): federated vs pooled vs each hospital.

Usage (from the repository root)::

    python benchmarks/bench_quality.py            # test evaluation, 0.5-2.5 min on 2 cores
    python benchmarks/bench_quality.py --quick    # smoke run: 2 seeds, 3 strategies, no file
    python benchmarks/bench_quality.py --tune     # validation sweep first (~45 min on 2 cores)

Protocol
--------
The data are the bundled UCI Heart Disease files with ``data.protocol = "flamby"``
and the default ``data.split_seed = 0``: per hospital a stratified 66/34
train/test split; every number reported below is on the pooled test set
(250 patients), as mean and std over training seeds 0-4.

Hyper-parameters are chosen without the test set. ``--tune`` writes each
hospital's *training* rows (those of split_seed 0) to a temporary directory
and runs the library on them as ``dataset = "files"``: each of those sites
splits its rows again 66/34 into inner-train / validation (``data.split_seed``
100-104, training seed = split seed). The selection criterion is the mean
validation accuracy over these 5 splits on the pooled validation set; the
cheapest configuration within one paired standard error of the best is kept
(see `select`). Test rows are never read during tuning.

Every federated number comes from `fedcare.experiment.run_experiment`; the
pooled / single-hospital baselines of the test tables are the ones
`run_experiment` trains (``baselines.enabled = true``). The baseline *tuning*
re-runs `run_experiment`'s baseline training epoch by epoch (same library
trainer, seeds and streams; `check_baseline_equivalence` asserts that it
matches) so that every epoch budget costs one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedcare
from fedcare.config import DataConfig, RunConfig
from fedcare.data.datasets import (
    HEART_COLUMNS,
    HEART_SCHEMA,
    build_federation,
    bundled_path,
    heart_disease,
)
from fedcare.data.preprocess import split_rows
from fedcare.errors import FedcareError
from fedcare.experiment import evaluate, run_experiment
from fedcare.federation.training import LocalTrainer
from fedcare.models import FlatModel, build_model
from fedcare.runtime.local import training_plan
from fedcare.seeding import BASELINE, INIT, torch_generator

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "quality.json"

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
TEST_SEEDS = (0, 1, 2, 3, 4)
TUNE_SPLITS = (100, 101, 102, 103, 104)  # inner split seed, also the training seed
VAL_FRACTION = 0.34  # inner validation share of each hospital's training rows
METRICS = ("accuracy", "roc_auc")

# FLamby (du Terrail et al., NeurIPS 2022 datasets track), Fed-Heart-Disease,
# pooled test accuracy, mean of 5 seeds (see /work/shared/datasets/README.md).
FLAMBY = {"pooled": 0.795, "best single hospital": 0.784, "fedavg": 0.748, "fedadam": 0.779,
          "fedyogi": 0.779, "cyclic": 0.785}

# Settings are flat {dotted config key: value}; anything absent keeps RunConfig's default.
Settings = dict[str, Any]
Metrics = dict[str, float]

# The tuning grid (the rounds axis is read from one run at rounds 20, 50, 100).
ROUNDS = (20, 50, 100)
LOCAL_EPOCHS = (1, 5)
LRS = (0.01, 0.05, 0.1)
BATCH_SIZES = (4, 16, 32)
SERVER_LRS = (0.01, 0.03, 0.1)
MUS = (0.01, 0.1, 1.0)
MODELS: dict[str, Settings] = {"logreg": {"model.name": "logreg"},
                               "mlp16": {"model.name": "mlp", "model.hidden": [16]}}
BASELINE_EPOCHS = (20, 50, 100)  # epoch budgets of the pooled / single-hospital models

# The choice of `--tune` (run of 2026-11-28, recorded in results/quality.json and
# BENCHMARKS.md, Quality); used by a plain run. `--tune` recomputes it and uses its own.
_LOCAL_32 = {"model.name": "logreg", "federation.local_epochs": 1, "federation.batch_size": 32}
TUNED: dict[str, Settings] = {
    "fedavg": {**_LOCAL_32, "federation.strategy": "fedavg", "federation.lr": 0.1,
               "federation.rounds": 20},
    "fedprox": {**_LOCAL_32, "federation.strategy": "fedprox", "federation.lr": 0.1,
                "federation.mu": 0.01, "federation.rounds": 20},
    "fedadam": {**_LOCAL_32, "federation.strategy": "fedadam", "federation.lr": 0.05,
                "federation.server_lr": 0.03, "federation.rounds": 20},
    "fedyogi": {**_LOCAL_32, "federation.strategy": "fedyogi", "federation.lr": 0.05,
                "federation.server_lr": 0.03, "federation.rounds": 20},
    "fedadagrad": {**_LOCAL_32, "federation.strategy": "fedadagrad", "federation.lr": 0.01,
                   "federation.server_lr": 0.1, "federation.rounds": 50},
    # baselines: rounds = training epochs
    "pooled": {"model.name": "logreg", "federation.lr": 0.1, "federation.batch_size": 16,
               "federation.rounds": 20, "federation.local_epochs": 1},
    "cleveland": {**_LOCAL_32, "federation.lr": 0.1, "federation.rounds": 20},
    "hungarian": {**_LOCAL_32, "federation.lr": 0.1, "federation.rounds": 20},
    "switzerland": {**_LOCAL_32, "federation.lr": 0.1, "federation.rounds": 100},
    "va": {"model.name": "logreg", "federation.lr": 0.1, "federation.batch_size": 16,
           "federation.rounds": 20, "federation.local_epochs": 1},
}
RECOMMENDED = "fedavg"


# --------------------------------------------------------------------------- configs
def make_config(settings: Mapping[str, Any]) -> RunConfig:
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return RunConfig.from_dict(nested, source="bench_quality")


def sgd_steps(settings: Mapping[str, Any], n_train: Sequence[int]) -> int:
    """Local SGD steps of a federated run (all sites): the cost of a configuration."""
    config = make_config(settings)
    f = config.federation
    per_epoch = sum(math.ceil(n / f.batch_size) for n in n_train)
    return f.rounds * f.local_epochs * per_epoch


def label(settings: Mapping[str, Any]) -> str:
    short = {"model.name": "model", "model.hidden": "hidden", "federation.strategy": "",
             "federation.rounds": "R", "federation.local_epochs": "E",
             "federation.batch_size": "B", "federation.lr": "lr",
             "federation.server_lr": "slr", "federation.mu": "mu",
             "data.standardize": "std", "baselines.enabled": None}
    parts = []
    for key, value in settings.items():
        name = short.get(key, key)
        if name is None or (key == "model.hidden" and settings.get("model.name") != "mlp"):
            continue
        parts.append(f"{name}={value}" if name else str(value))
    return " ".join(parts)


# --------------------------------------------------------------------------- dev data
def write_dev_data(directory: Path) -> Path:
    """Each hospital's training rows of the official split, as user files; returns the schema.

    The rows are selected exactly as `build_federation` does for the default
    heart-disease config (same generator, same order of hospitals), and the
    lines are copied verbatim from the bundled files.
    """
    data = DataConfig()
    source = heart_disease(data)
    rng = np.random.default_rng(data.split_seed)
    for name, table in zip(HOSPITALS, source.tables, strict=True):
        train, _ = split_rows(table.target, source.default_test_fraction, rng)
        raw = bundled_path("heart_disease", f"processed.{name}.data")
        lines = [line for line in raw.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [lines[int(i)] for i in table.rows[train]]
        (directory / f"{name}.csv").write_text(
            ",".join(HEART_COLUMNS) + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    schema = directory / "schema.toml"
    HEART_SCHEMA.save(schema, ["Fed-Heart-Disease (FLamby), training rows of split_seed 0"])
    check_dev_data(directory, schema)
    return schema


def check_dev_data(directory: Path, schema: Path) -> None:
    """The dev files hold exactly the official training rows, encoded identically."""
    official = build_federation(DataConfig())
    dev = build_federation(DataConfig(dataset="files", data_dir=str(directory),
                                      schema=str(schema), test_fraction=0.0))
    for a, b in zip(official.sites, dev.sites, strict=True):
        if a.name != b.name or not torch.equal(a.x_train, b.x_train) \
                or not torch.equal(a.y_train, b.y_train) or b.n_test != 0:
            raise AssertionError(f"dev data of {a.name} differ from its official training rows")


def dev_settings(dev_dir: str, split: int) -> Settings:
    return {"data.dataset": "files", "data.data_dir": dev_dir,
            "data.schema": str(Path(dev_dir) / "schema.toml"),
            "data.test_fraction": VAL_FRACTION, "data.split_seed": split, "seed": split}


# --------------------------------------------------------------------------- jobs
def _init_worker() -> None:
    torch.set_num_threads(1)


def _pick(metrics: Mapping[str, float]) -> Metrics:
    return {k: float(metrics[k]) for k in ("accuracy", "roc_auc", "log_loss")}


def tune_fed_job(settings: Settings, dev_dir: str, split: int,
                 checkpoints: Sequence[int]) -> dict[int, Metrics] | str:
    """Validation metrics of one federated config at several rounds (one run to the last)."""
    run = {**settings, **dev_settings(dev_dir, split), "baselines.enabled": False,
           "federation.rounds": max(checkpoints)}
    seen: dict[int, Metrics] = {}

    def on_round(report: Any, evaluation: Any) -> None:
        if report.round in checkpoints:
            seen[report.round] = _pick(evaluation.pooled)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_experiment(make_config(run), out=Path(tmp) / "run", on_round=on_round)
        except FedcareError as exc:  # e.g. local training diverged
            return f"{type(exc).__name__}: {exc}"
    return seen


def tune_baseline_job(settings: Settings, dev_dir: str, split: int,
                      checkpoints: Sequence[int]) -> dict[str, dict[int, Metrics]]:
    """Validation metrics of the pooled and single-hospital baselines after each budget.

    Same computation as `fedcare.experiment.train_centrally`, epoch by epoch.
    """
    config = make_config({**settings, **dev_settings(dev_dir, split)})
    return _baselines_by_epoch(config, checkpoints)


def _baselines_by_epoch(config: RunConfig,
                        checkpoints: Sequence[int]) -> dict[str, dict[int, Metrics]]:
    data = build_federation(config.data)
    model = FlatModel(build_model(config.model, data.n_features))
    trainer = LocalTrainer(model)
    one_epoch = training_plan(config)
    one_epoch = type(one_epoch)(1, one_epoch.batch_size, one_epoch.lr, one_epoch.momentum)
    out: dict[str, dict[int, Metrics]] = {}
    targets = [("pooled", *data.pooled_train())]
    targets += [(s.name, s.x_train, s.y_train) for s in data.sites]
    for stream, (name, x, y) in enumerate(targets):
        params = model.init_params(torch_generator(config.seed, INIT))
        generator = torch_generator(config.seed, BASELINE, stream)
        out[name] = {}
        for epoch in range(1, max(checkpoints) + 1):
            params, _ = trainer.train(x, y, params, one_epoch, generator)
            if epoch in checkpoints:
                out[name][epoch] = _pick(evaluate(model, params, data, per_site=False).pooled)
    return out


def check_baseline_equivalence(dev_dir: str) -> None:
    """The epoch-by-epoch baselines equal those `run_experiment` trains."""
    settings = {**dev_settings(dev_dir, TUNE_SPLITS[0]), "federation.rounds": 3,
                "federation.local_epochs": 2, "federation.batch_size": 16}
    ours = _baselines_by_epoch(make_config(settings), [6])
    with tempfile.TemporaryDirectory() as tmp:
        result = run_experiment(make_config(settings), out=Path(tmp) / "run")
    assert result.pooled_baseline is not None
    theirs = {"pooled": result.pooled_baseline.pooled}
    theirs |= {k: v.pooled for k, v in result.local_baselines.items()}
    for name, metrics in theirs.items():
        if abs(ours[name][6]["log_loss"] - metrics["log_loss"]) > 1e-9:
            raise AssertionError(f"epoch-by-epoch baseline {name} differs from run_experiment")


def test_job(settings: Settings, seed: int, baselines: bool) -> dict[str, Any]:
    """One run on the official split: pooled test metrics of every model it trains."""
    run = {**settings, "seed": seed, "baselines.enabled": baselines}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_experiment(make_config(run), out=Path(tmp) / "run")
        elapsed = time.perf_counter() - started
    out: dict[str, Any] = {"federated": _pick(result.federated.pooled), "seconds": elapsed}
    if result.pooled_baseline is not None:
        out["pooled"] = _pick(result.pooled_baseline.pooled)
        out["local"] = {k: _pick(v.pooled) for k, v in result.local_baselines.items()}
    return out


def run_jobs(jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]], workers: int,
             what: str) -> list[Any]:
    started = time.perf_counter()
    if not jobs:
        return []
    print(f"  {what}: {len(jobs)} runs on {workers} worker(s) ...", end="", flush=True)
    if workers <= 1:
        _init_worker()
        results = [fn(*args) for fn, args in jobs]
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            futures = [pool.submit(fn, *args) for fn, args in jobs]
            results = [f.result() for f in futures]
    print(f" {time.perf_counter() - started:.0f} s", flush=True)
    return results


# --------------------------------------------------------------------------- tuning
def grid(base: Settings, axes: Mapping[str, Sequence[Any]]) -> list[Settings]:
    keys = list(axes)
    return [{**base, **dict(zip(keys, values, strict=True))}
            for values in itertools.product(*(axes[k] for k in keys))]


def tune_federated(candidates: Sequence[Settings], dev_dir: str, workers: int,
                   what: str) -> list[dict[str, Any]]:
    """Validation records of each candidate at each of ROUNDS (mean over TUNE_SPLITS)."""
    jobs = [(tune_fed_job, (c, dev_dir, s, ROUNDS)) for c in candidates for s in TUNE_SPLITS]
    results = iter(run_jobs(jobs, workers, what))
    records = []
    for candidate in candidates:
        per_split = [next(results) for _ in TUNE_SPLITS]
        for rounds in ROUNDS:
            settings = {**candidate, "federation.rounds": rounds}
            vals = [r[rounds] if isinstance(r, dict) and rounds in r else None
                    for r in per_split]
            records.append(_record(settings, vals,
                                   [r for r in per_split if isinstance(r, str)]))
    return records


def _record(settings: Settings, vals: Sequence[Metrics | None],
            errors: Sequence[str] = ()) -> dict[str, Any]:
    nan = math.nan
    return {"settings": settings,
            "val": {m: [nan if v is None else v[m] for v in vals]
                    for m in ("accuracy", "roc_auc", "log_loss")},
            "errors": sorted(set(errors))}


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else statistics.fmean(values)


def select(records: Sequence[dict[str, Any]], cost: Callable[[Settings], float]) -> dict[str, Any]:
    """The cheapest record whose mean validation accuracy is within one SE of the best one.

    SE is the standard error of the best record's mean over the validation
    splits ("one-standard-error rule"); ties in cost go to the higher mean
    accuracy, then the lower validation log loss.
    """
    usable = [r for r in records if not math.isnan(mean(r["val"]["accuracy"]))]
    best = max(usable, key=lambda r: (mean(r["val"]["accuracy"]), -mean(r["val"]["log_loss"])))
    acc = best["val"]["accuracy"]
    se = statistics.stdev(acc) / math.sqrt(len(acc))
    threshold = mean(acc) - se
    eligible = [r for r in usable if mean(r["val"]["accuracy"]) >= threshold - 1e-12]
    chosen = min(eligible, key=lambda r: (cost(r["settings"]), -mean(r["val"]["accuracy"]),
                                          mean(r["val"]["log_loss"])))
    return {"best": best, "chosen": chosen, "threshold": threshold, "se": se,
            "n_eligible": len(eligible), "n_candidates": len(usable)}


FULL_LOCAL: dict[str, Sequence[Any]] = {"federation.local_epochs": LOCAL_EPOCHS,
                                        "federation.lr": LRS,
                                        "federation.batch_size": BATCH_SIZES}
# Batch 4 costs 70% of a full grid's compute and improved on no batch-16/32
# configuration in the two full grids (logreg FedAvg and FedAdam: their best
# validation accuracy is reached, within 0.1 point, with batch 32), so the
# remaining grids use batch 16 and 32 only.
SMALL_LOCAL: dict[str, Sequence[Any]] = {**FULL_LOCAL, "federation.batch_size": (16, 32)}


def tuning_stages(quick: bool) -> dict[str, list[Settings]]:
    """Candidate federated settings per stage "model/strategy" (rounds are added later)."""
    def base(model: str, strategy: str) -> Settings:
        return {**MODELS[model], "federation.strategy": strategy}

    if quick:
        small = {"federation.lr": (0.05, 0.1), "federation.batch_size": (32,)}
        return {"logreg/fedavg": grid(base("logreg", "fedavg"), small),
                "logreg/fedadam": grid(base("logreg", "fedadam"),
                                       {**small, "federation.server_lr": (0.03, 0.1)})}
    server = {"federation.server_lr": SERVER_LRS}
    return {
        "logreg/fedavg": grid(base("logreg", "fedavg"), FULL_LOCAL),
        "logreg/fedadam": grid(base("logreg", "fedadam"), {**FULL_LOCAL, **server}),
        "logreg/fedprox": grid(base("logreg", "fedprox"),
                               {**SMALL_LOCAL, "federation.mu": MUS}),
        "logreg/fedyogi": grid(base("logreg", "fedyogi"), {**SMALL_LOCAL, **server}),
        "logreg/fedadagrad": grid(base("logreg", "fedadagrad"), {**SMALL_LOCAL, **server}),
        "mlp16/fedavg": grid(base("mlp16", "fedavg"), SMALL_LOCAL),
        "mlp16/fedadam": grid(base("mlp16", "fedadam"), {**SMALL_LOCAL, **server}),
    }


def baseline_candidates(quick: bool) -> list[Settings]:
    models = ("logreg",) if quick else tuple(MODELS)
    lrs, batches = ((0.05, 0.1), (32,)) if quick else (LRS, BATCH_SIZES)
    return [{**MODELS[m], "federation.lr": lr, "federation.batch_size": b}
            for m in models for lr in lrs for b in batches]


def cached(path: Path | None, what: str, compute: Callable[[], Any],
           seconds: dict[str, float]) -> Any:
    """`compute()`, or its stored result; records the compute time of the stage."""
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        print(f"  {what}: from {path} (computed in {stored['seconds']:.0f} s)")
        seconds[what] = stored["seconds"]
        return stored["result"]
    started = time.perf_counter()
    result = compute()
    seconds[what] = time.perf_counter() - started
    if path is not None:
        path.write_text(json.dumps({"seconds": seconds[what], "result": result}))
    return result


def tune(workers: int, quick: bool, cache: Path | None) -> dict[str, Any]:
    """The whole validation study; returns records, the choice per model row, and timings."""
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dev_dir = Path(tmp)
        write_dev_data(dev_dir)
        check_baseline_equivalence(str(dev_dir))
        dev = build_federation(make_config(dev_settings(str(dev_dir), TUNE_SPLITS[0])).data)
        n_train = [s.n_train for s in build_federation(DataConfig()).sites]
        stages: dict[str, list[dict[str, Any]]] = {}
        for name, candidates in tuning_stages(quick).items():
            path = None if cache is None else cache / f"{name.replace('/', '_')}.json"
            stages[name] = cached(path, name, lambda c=candidates, n=name: tune_federated(
                c, str(dev_dir), workers, n), seconds)
        epochs = BASELINE_EPOCHS[:2] if quick else BASELINE_EPOCHS
        baselines = cached(None if cache is None else cache / "baselines.json", "baselines",
                           lambda: tune_baselines(baseline_candidates(quick), str(dev_dir),
                                                  workers, epochs), seconds)

    def fed_cost(settings: Settings) -> tuple[int, int]:
        return sgd_steps(settings, n_train), settings.get("model.name") == "mlp"

    def base_cost(settings: Settings, rows: int) -> tuple[int, int]:
        steps = settings["federation.rounds"] * math.ceil(rows / settings["federation.batch_size"])
        return steps, settings.get("model.name") == "mlp"

    choices: dict[str, Any] = {}
    for strategy in STRATEGIES:
        records = [r for name, rs in stages.items() if name.endswith("/" + strategy) for r in rs]
        if records:
            choices[strategy] = select(records, fed_cost)
    sizes = {"pooled": sum(n_train), **dict(zip(HOSPITALS, n_train, strict=True))}
    for target, records in baselines.items():
        choices[target] = select(records, lambda s, t=target: base_cost(s, sizes[t]))
    return {"stages": stages, "baselines": baselines, "choices": choices,
            "validation_rows": sum(s.n_test for s in dev.sites), "seconds": seconds}


def tune_baselines(candidates: Sequence[Settings], dev_dir: str, workers: int,
                   epochs: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Validation records of the pooled and single-hospital models (budget = epochs)."""
    jobs = [(tune_baseline_job, (c, dev_dir, s, epochs)) for c in candidates for s in TUNE_SPLITS]
    results = iter(run_jobs(jobs, workers, "baselines (pooled, each hospital)"))
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in ("pooled", *HOSPITALS)}
    for candidate in candidates:
        per_split = [next(results) for _ in TUNE_SPLITS]
        for target, records in out.items():
            for epoch in epochs:
                settings = {**candidate, "federation.rounds": epoch,
                            "federation.local_epochs": 1}
                records.append(_record(settings, [r[target][epoch] for r in per_split]))
    return out


# --------------------------------------------------------------------------- test tables
Row = tuple[str, Settings, str]  # (row name, run settings, "federated" | "pooled" | hospital)


def table_rows(fed: Mapping[str, Settings], baselines: Mapping[str, Settings],
               extra: Mapping[str, Any] | None = None) -> list[Row]:
    extra = dict(extra or {})
    rows: list[Row] = [(s, {**fed[s], **extra}, "federated") for s in fed]
    rows += [("pooled" if t == "pooled" else f"{t} alone", {**baselines[t], **extra}, t)
             for t in ("pooled", *HOSPITALS)]
    return rows


def run_table(rows: Sequence[Row], seeds: Sequence[int], workers: int,
              what: str) -> dict[str, dict[str, Any]]:
    """Mean, std and per-seed pooled test metrics of each row (runs shared between rows)."""
    runs: dict[str, tuple[Settings, bool]] = {}
    for _, settings, source in rows:
        key = json.dumps(settings, sort_keys=True)
        needs = source != "federated"
        runs[key] = (settings, runs.get(key, (settings, False))[1] or needs)
    keys = list(runs)
    jobs = [(test_job, (runs[k][0], seed, runs[k][1])) for k in keys for seed in seeds]
    results = iter(run_jobs(jobs, workers, what))
    by_key = {k: [next(results) for _ in seeds] for k in keys}
    table = {}
    for name, settings, source in rows:
        outs = by_key[json.dumps(settings, sort_keys=True)]
        values = [o["federated"] if source == "federated" else
                  o["pooled"] if source == "pooled" else o["local"][source] for o in outs]
        table[name] = {"settings": settings, "source": source,
                       "seconds_per_run": statistics.fmean(o["seconds"] for o in outs)}
        for metric in METRICS:
            xs = [v[metric] for v in values]
            table[name][metric] = {"mean": statistics.fmean(xs),
                                   "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                                   "values": [round(x, 4) for x in xs]}
    return table


# --------------------------------------------------------------------------- report
def pm(cell: Mapping[str, Any] | None, metric: str) -> str:
    if cell is None:
        return "-"
    return f"{cell[metric]['mean']:.3f} ± {cell[metric]['std']:.3f}"


def markdown_table(tables: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """One line per model: each table's accuracy and AUC next to FLamby's accuracy."""
    header = ["model"]
    for t in tables:
        header += [f"{t} accuracy", f"{t} ROC AUC"]
    header.append("FLamby accuracy")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for table in tables.values():
            cells += [pm(table.get(name), "accuracy"), pm(table.get(name), "roc_auc")]
        flamby = FLAMBY.get(name)
        cells.append("-" if flamby is None else f"{flamby:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize_tuning(study: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON record of a tuning study: every candidate's validation scores and the choices."""
    def compact(record: Mapping[str, Any]) -> dict[str, Any]:
        val = record["val"]
        out = {"settings": record["settings"], "val_accuracy": round(mean(val["accuracy"]), 5),
               "val_accuracy_splits": [round(x, 4) for x in val["accuracy"]],
               "val_roc_auc": round(mean(val["roc_auc"]), 4),
               "val_log_loss": round(mean(val["log_loss"]), 4)}
        return {**out, "errors": record["errors"]} if record["errors"] else out

    choices = {}
    for name, choice in study["choices"].items():
        choices[name] = {"chosen": compact(choice["chosen"]), "best": compact(choice["best"]),
                         "threshold": choice["threshold"], "se": choice["se"],
                         "n_eligible": choice["n_eligible"],
                         "n_candidates": choice["n_candidates"]}
    return {
        "protocol": (f"each hospital's training rows (split_seed 0) split again "
                     f"{1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} (stratified) into inner-train "
                     f"and validation with data.split_seed in {list(TUNE_SPLITS)}, training "
                     "seed = split seed; criterion: pooled validation accuracy, mean over the "
                     "splits; one-standard-error rule towards the cheapest run (fewest SGD steps)"),
        "validation_rows_per_split": study["validation_rows"],
        "seconds": sum(study["seconds"].values()),
        "stage_seconds": study["seconds"],
        "choices": choices,
        "stages": {name: [compact(r) for r in records]
                   for name, records in study["stages"].items()},
        "baselines": {name: [compact(r) for r in records]
                      for name, records in study["baselines"].items()},
    }


def code_fingerprint() -> str:
    """Hash of the installed fedcare sources (tuning caches are valid for one version)."""
    import hashlib

    digest = hashlib.sha256()
    package = Path(fedcare.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seeds 0-1, FedAvg/FedProx/FedAdam, tiny tuning grid; "
                             "writes no file unless --out is given")
    parser.add_argument("--tune", action="store_true",
                        help="run the validation sweep first and use its choice (~45 min)")
    parser.add_argument("--cache", type=Path,
                        help="directory for per-stage tuning results (reused if the fedcare "
                             "sources are unchanged)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (default: 2)")
    parser.add_argument("--out", type=Path, help=f"JSON to write (default: {RESULTS})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seeds = TEST_SEEDS[:2] if args.quick else TEST_SEEDS
    strategies = ("fedavg", "fedprox", "fedadam") if args.quick else STRATEGIES
    out: Path | None = args.out or (None if args.quick else RESULTS)
    previous = json.loads(out.read_text()) if out is not None and out.exists() else {}
    fingerprint = code_fingerprint()

    if args.tune:
        print("Tuning on validation splits of the training rows (no test row is read):")
        cache = None
        if args.cache is not None:
            cache = args.cache / fingerprint
            cache.mkdir(parents=True, exist_ok=True)
        study = tune(args.jobs, args.quick, cache)
        tuning: dict[str, Any] | None = summarize_tuning(study)
        chosen = {s: c["chosen"]["settings"] for s, c in study["choices"].items()}
        print_choices(study["choices"])
    else:
        if not TUNED:
            parser.error("no tuned settings recorded in TUNED; run with --tune first")
        tuning = previous.get("tuning")
        chosen = TUNED
        choices = (tuning or {}).get("choices", {})
        recorded = {k: c["chosen"]["settings"] for k, c in choices.items()}
        if recorded and recorded != {k: TUNED[k] for k in recorded}:
            print(f"warning: TUNED differs from the tuning study recorded in {out}")
    # A strategy without its own choice (--quick --tune) takes FedAvg's local settings.
    fed_chosen = {s: chosen.get(s, {**chosen["fedavg"], "federation.strategy": s})
                  for s in strategies}
    base_chosen = {t: chosen[t] for t in ("pooled", *HOSPITALS)}
    recommended = recommend(tuning, strategies) if tuning else RECOMMENDED

    print(f"Test evaluation: pooled test set of the official split, seeds {list(seeds)}:")
    default_rows = [(s, {"federation.strategy": s}, "federated") for s in strategies]
    # Baselines do not depend on the strategy: they come from the FedAvg runs.
    default_rows += table_rows({}, {t: {"federation.strategy": "fedavg"}
                                    for t in ("pooled", *HOSPITALS)})
    tuned_rows = table_rows(fed_chosen, base_chosen)
    # The pooled model as `fedcare run` trains it: same settings as the federated run.
    same = list(dict.fromkeys(("fedavg", recommended)))
    tuned_rows += [(f"pooled, {s}'s settings", fed_chosen[s], "pooled") for s in same]
    site_rows = table_rows(fed_chosen, base_chosen, {"data.standardize": "site"})
    tables = {
        "default": run_table(default_rows, seeds, args.jobs, "default settings"),
        "tuned": run_table(tuned_rows, seeds, args.jobs, "tuned settings"),
        "tuned, site std": run_table(site_rows, seeds, args.jobs,
                                     "tuned settings, standardize = site"),
    }
    names = [*strategies, "pooled", *(f"pooled, {s}'s settings" for s in same),
             *(f"{h} alone" for h in HOSPITALS)]
    print()
    print(markdown_table(tables, names))
    verdict = target_verdict(tables["tuned"], strategies, recommended)
    print()
    print(verdict["text"])

    result = {
        "benchmark": "Fed-Heart-Disease (FLamby protocol): pooled test accuracy and ROC AUC",
        "command": "python benchmarks/bench_quality.py" + (" --quick" if args.quick else "")
                   + (" --tune" if args.tune else ""),
        "fedcare_version": fedcare.__version__,
        "fedcare_sources": fingerprint,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": time.perf_counter() - started,
        "test_protocol": ("bundled UCI Heart Disease, data.protocol = flamby, data.split_seed = 0 "
                          "(per-hospital stratified 66/34 split), metrics on the pooled test set, "
                          f"training seeds {list(seeds)}"),
        "flamby_published_accuracy": FLAMBY,
        "recommended_strategy": recommended,
        "settings": {"default": {}, "tuned": {**fed_chosen, **base_chosen}},
        "tables": tables,
        "target": verdict,
        "tuning": tuning,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dump(result) + "\n", encoding="utf-8")
        print(f"\nwrote {out}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def dump(result: Mapping[str, Any]) -> str:
    """JSON, indented except the tuning records (one line each, to keep the file small)."""
    text = json.dumps(result, indent=1)
    tuning = result.get("tuning")
    if not tuning:
        return text
    head, _, _ = text.rpartition('"tuning":')
    lines = []
    for key, value in tuning.items():
        if key in ("stages", "baselines"):
            groups = [f'  {json.dumps(name)}: [\n' + ",\n".join(
                f"   {json.dumps(r, separators=(',', ':'))}" for r in records) + "\n  ]"
                for name, records in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(groups) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return head + '"tuning": {\n' + ",\n".join(lines) + "\n}\n}"


def recommend(tuning: Mapping[str, Any], strategies: Sequence[str]) -> str:
    """The default strategy (FedAvg) unless another one is better by more than one SE.

    Decided on validation (never on test): FedAvg has no server optimiser to
    tune, so another strategy must beat FedAvg's chosen validation accuracy
    by more than the standard error of FedAvg's mean over the splits.
    """
    choices = tuning["choices"]
    fedavg = choices["fedavg"]
    best = max((s for s in strategies if s in choices),
               key=lambda s: choices[s]["chosen"]["val_accuracy"])
    margin = choices[best]["chosen"]["val_accuracy"] - fedavg["chosen"]["val_accuracy"]
    return best if margin > fedavg["se"] else "fedavg"


def target_verdict(table: Mapping[str, Any], strategies: Sequence[str],
                   recommended: str) -> dict[str, Any]:
    """Target: best federated >= 0.80 accuracy and >= pooled (tuned), on test."""
    acc = {s: table[s]["accuracy"]["mean"] for s in strategies}
    best = max(acc, key=lambda s: acc[s])
    pooled = table["pooled"]["accuracy"]["mean"]
    met = acc[best] >= 0.80 and acc[best] >= pooled
    rec_met = acc[recommended] >= 0.80 and acc[recommended] >= pooled
    same = table[f"pooled, {recommended}'s settings"]["accuracy"]["mean"]
    same_met = acc[recommended] >= 0.80 and acc[recommended] >= same
    text = (f"Target (best federated >= 0.80 and >= pooled tuned on its own, {pooled:.3f}): "
            f"best on test {best} {acc[best]:.3f} -> {'met' if met else 'NOT met'}; "
            f"validation-chosen strategy {recommended} {acc[recommended]:.3f} -> "
            f"{'met' if rec_met else 'NOT met'}.\nAgainst the pooled model trained with the same "
            f"settings (what `fedcare run` shows): {recommended} {acc[recommended]:.3f} vs "
            f"{same:.3f} -> {'met' if same_met else 'NOT met'}.")
    return {"best_on_test": best, "best_accuracy": acc[best], "pooled_accuracy": pooled,
            "met": met, "recommended": recommended, "recommended_accuracy": acc[recommended],
            "recommended_met": rec_met, "pooled_same_settings_accuracy": same,
            "recommended_met_vs_pooled_same_settings": same_met, "text": text}


def print_choices(choices: Mapping[str, Any]) -> None:
    for name, c in choices.items():
        chosen, best = c["chosen"], c["best"]
        print(f"  {name:12s} chosen {label(chosen['settings']):55s} val acc "
              f"{mean(chosen['val']['accuracy']):.3f} (best {mean(best['val']['accuracy']):.3f}: "
              f"{label(best['settings'])}; {c['n_eligible']}/{c['n_candidates']} within 1 SE)")


if __name__ == "__main__":
    sys.exit(main())
