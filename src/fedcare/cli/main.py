"""``fedcare``: the command line.

``fedcare run`` trains a federation (default: the bundled heart-disease data
across its 4 hospitals) and prints federated vs pooled vs each site alone;
``fedcare schema infer`` proposes a schema for a user's own files;
``fedcare privacy`` does the DP arithmetic, ``fedcare keys`` makes CKKS keys and
``fedcare verify`` checks a run's audit log; ``fedcare report`` and ``fedcare runs``
show runs; ``fedcare sweep`` runs a grid of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcare import __version__
from fedcare.cli.keys import add_keys_parser
from fedcare.cli.privacy import add_privacy_parser
from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.report.auditlog import AUDIT_LOG_FILE
from fedcare.report.auditlog import verify as verify_audit_log
from fedcare.report.html import MODEL_CARD_FILE, write_report
from fedcare.sweep import ALIASES, GridAxis, run_sweep, sweep_markdown

# Shorthand flags: flag -> (config key, type, help).
SHORTHANDS: dict[str, tuple[str, type, str]] = {
    "--dataset": ("data.dataset", str, "heart-disease | breast-cancer | synthetic | files"),
    "--protocol": ("data.protocol", str, "preprocessing protocol, e.g. flamby (heart-disease)"),
    "--sites": ("data.sites", int, "number of simulated sites (with --partition)"),
    "--partition": ("data.partition", str, "natural | iid | dirichlet | quantity"),
    "--alpha": ("data.alpha", float, "Dirichlet concentration for dirichlet/quantity partitions"),
    "--data-dir": ("data.data_dir", str, "directory with one CSV/Parquet file per site"),
    "--schema": ("data.schema", str, "schema TOML for --data-dir (see `fedcare schema infer`)"),
    "--missing": ("data.missing", str, "drop | impute | fail: policy for missing values"),
    "--strategy": ("federation.strategy", str, "fedavg | fedprox | fedadam | fedyogi | fedadagrad"),
    "--model": ("model.name", str, "logreg | mlp"),
    "--rounds": ("federation.rounds", int, "federated rounds"),
    "--local-epochs": ("federation.local_epochs", int, "local epochs per round"),
    "--batch-size": ("federation.batch_size", int, "local batch size"),
    "--lr": ("federation.lr", float, "local SGD learning rate"),
    "--fraction": ("federation.fraction", float, "share of sites sampled per round"),
    "--min-sites": ("federation.min_sites", int, "quorum: fewest sites a round may aggregate"),
    "--seed": ("seed", int, "training seed (initialisation, shuffling, site sampling)"),
    "--privacy": ("privacy.level", str, "none | record (DP-SGD per patient) | site (per hospital)"),
    "--epsilon": ("privacy.epsilon", float, "target epsilon of the whole run"),
    "--delta": ("privacy.delta", float, "target delta"),
    "--clip-norm": ("privacy.clip_norm", float, "L2 bound per record (record) or update (site)"),
    "--noise": ("privacy.noise", str, "site level: central | distributed"),
    "--protection": ("protection.scheme", str, "plain | secagg | ckks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcare",
        description="Train one clinical model across hospitals without pooling their records.")
    parser.add_argument("--version", action="version", version=f"fedcare {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="train a federation and its baselines",
        description="Train a federation. With no arguments: the bundled heart-disease data "
                    "across its 4 hospitals, federated vs pooled vs each hospital alone.")
    run.add_argument("config", nargs="?", help="TOML config file (every key optional)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override any config key, e.g. federation.mu=0.1")
    run.add_argument("--out", help="run directory to create (default: under runs/)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run after its last completed round, with "
                          "its config and privacy ledger (other options are not allowed)")
    for flag, (key, kind, text) in SHORTHANDS.items():
        run.add_argument(flag, dest=key.replace(".", "__"), type=kind, help=f"{text} [{key}]")
    run.add_argument("--no-baselines", action="store_true",
                     help="skip the pooled and single-site baselines [baselines.enabled=false]")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    schema = commands.add_parser("schema", help="work with data schemas")
    schema_commands = schema.add_subparsers(dest="schema_command", required=True)
    infer = schema_commands.add_parser(
        "infer", help="propose a schema from data files, to review",
        description="Read the files and write a schema TOML: numeric and categorical columns "
                    "with their vocabularies, the target and its positive values.")
    infer.add_argument("data", nargs="+", help="CSV/Parquet files (one per site) or a directory")
    infer.add_argument("--target", required=True, help="the binary outcome column")
    infer.add_argument("--site-column", help="column naming each row's site (one-file data)")
    infer.add_argument("--out", required=True, help="schema file to write")
    add_privacy_parser(commands)
    add_keys_parser(commands)
    verify = commands.add_parser(
        "verify", help="check a run's audit log has not been changed",
        description="Check the hash chain of RUN_DIR/audit_log.jsonl and, for a finished run, "
                    "its length and head hash against summary.json. Exit 0 if intact, 1 if "
                    "an entry was changed, removed or reordered (naming the first).")
    verify.add_argument("run_dir", metavar="RUN_DIR")
    report = commands.add_parser(
        "report", help="(re)write a run's report.html and model_card.md",
        description="Write RUN_DIR/report.html (self-contained: opens from disk) and "
                    "RUN_DIR/model_card.md from the run directory's files.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    runs = commands.add_parser(
        "runs", help="list runs with their headline numbers",
        description="One line per run directory under DIR (default: runs): status, dataset, "
                    "strategy, protection, privacy, rounds, pooled accuracy and ROC AUC.")
    runs.add_argument("directory", nargs="?", default="runs", metavar="DIR")
    sweep = commands.add_parser(
        "sweep", help="run a grid of settings and seeds; one table, one privacy-utility plot",
        description="Every combination of the --grid values, with every seed, as ordinary "
                    "runs under OUT, plus OUT/sweep.json, sweep.md and sweep.html (accuracy "
                    "and ROC AUC against the first numeric grid key, error bars over seeds).")
    sweep.add_argument("config", nargs="?", help="TOML config file for everything not on the grid")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a config key and its values, e.g. privacy.epsilon=0.5,1,3,8 or "
                            f"strategy=fedavg,fedadam (short keys: {', '.join(ALIASES)})")
    sweep.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config key for every run")
    sweep.add_argument("--out", required=True, help="sweep directory to create")
    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    if not args.grid:
        raise FedcareError("fedcare sweep needs at least one --grid KEY=V1,V2,...")
    config = RunConfig.load(args.config) if args.config else RunConfig()
    for assignment in args.overrides:
        config.set(assignment)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise FedcareError(f"--seeds expects integers separated by commas; got "
                           f"{args.seeds!r}.") from None
    grid = [GridAxis.parse(text) for text in args.grid]
    result = run_sweep(config, grid, seeds, args.out,
                       on_run=lambda i, n, name: print(f"[{i + 1}/{n}] {name}", flush=True))
    print()
    print(sweep_markdown(result))
    print(f"Sweep directory: {args.out}  (sweep.json, sweep.md, sweep.html, one run "
          "directory per run)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    try:
        page = write_report(args.run_dir)
    except FileNotFoundError as exc:
        raise FedcareError(str(exc)) from exc
    print(f"Wrote {page} and {page.with_name(MODEL_CARD_FILE)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    parent = Path(args.directory)
    if not parent.is_dir():
        raise FedcareError(f"{parent} is not a directory of runs.")
    rows = []
    for summary_file in sorted(parent.glob("*/summary.json")):
        s = json.loads(summary_file.read_text(encoding="utf-8"))
        pooled = (s.get("federated") or {}).get("pooled") or {}
        privacy = s.get("privacy")
        rows.append((summary_file.parent.name, s.get("status", "?"), s.get("dataset", "?"),
                     s.get("strategy", "?"), (s.get("protection") or {}).get("scheme", "plain"),
                     f"{privacy['level']} eps {privacy['epsilon']:.2f}" if privacy else "none",
                     str(s.get("rounds_completed", "?")),
                     *(f"{pooled[m]:.3f}" if pooled.get(m) is not None else "-"
                       for m in ("accuracy", "roc_auc"))))
    if not rows:
        print(f"No runs under {parent}.")
        return 0
    header = ("run", "status", "dataset", "strategy", "protection", "privacy", "rounds",
              "accuracy", "ROC AUC")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    log = run_dir / AUDIT_LOG_FILE
    if not log.is_file():
        raise FedcareError(f"{run_dir} holds no {AUDIT_LOG_FILE}; is it a fedcare run directory?")
    recorded: dict[str, Any] = {}
    summary = run_dir / "summary.json"
    if summary.is_file():
        recorded = json.loads(summary.read_text(encoding="utf-8")).get("audit_log") or {}
    check = verify_audit_log(log, expected_entries=recorded.get("entries"),
                             expected_head=recorded.get("head"))
    if not check.ok:
        print(f"{log}: BROKEN: {check.problem}")
        return 1
    print(f"{log}: intact, {check.entries} entries, head {check.head}")
    if not recorded:
        print("The run has not finished (summary.json records no head), so entries removed "
              "from the end cannot be detected yet.")
    return 0


def resolve_config(args: argparse.Namespace) -> RunConfig:
    if args.resume:
        given = [flag for flag, (key, _, _) in SHORTHANDS.items()
                 if getattr(args, key.replace(".", "__")) is not None]
        if args.config or args.overrides or args.out or args.no_baselines or given:
            raise FedcareError("--resume continues a run exactly as it was configured; it takes "
                               "no config file, --set, --out or other options.")
        return RunConfig.load(Path(args.resume) / "config.toml")
    config = RunConfig.load(args.config) if args.config else RunConfig()
    for assignment in args.overrides:
        config.set(assignment)
    for key, _, _ in SHORTHANDS.values():
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            config.set_value(key, value, source="command line")
    if args.no_baselines:
        config.baselines.enabled = False
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedcare.experiment import Evaluation, run_experiment
    from fedcare.federation.aggregator import RoundReport
    from fedcare.report.tables import results_table

    config = resolve_config(args)
    bars: list[tqdm] = []  # created at the first round, so a bad config prints no bar

    def progress(report: RoundReport, evaluation: Evaluation) -> None:
        if not bars:
            bars.append(tqdm(total=config.federation.rounds, desc="rounds", unit="round",
                             disable=args.quiet, file=sys.stderr, leave=False))
        bars[0].set_postfix(acc=f"{evaluation.pooled['accuracy']:.3f}",
                            auc=f"{evaluation.pooled['roc_auc']:.3f}")
        bars[0].update(1)

    try:
        result = run_experiment(config, out=args.out, on_round=progress, resume=args.resume)
    finally:
        for bar in bars:
            bar.close()
    print(results_table(result))
    print("\nProtection: " + result.summary["protection"]["sentence"])
    privacy = result.summary.get("privacy")
    if privacy:
        print("\nPrivacy: " + privacy["sentence"])
        if config.baselines.enabled:
            print("The pooled and single-site baselines are trained without DP, for reference.")
    files = sorted(p.name for p in result.run_dir.iterdir() if not p.name.endswith(".tmp"))
    print(f"\nRun directory: {result.run_dir}  ({', '.join(files)})")
    return 0


def cmd_schema_infer(args: argparse.Namespace) -> int:
    from fedcare.data.infer import infer_schema
    from fedcare.data.loaders import find_site_files

    paths: list[Path] = []
    for item in args.data:
        p = Path(item)
        paths.extend(find_site_files(p) if p.is_dir() else [p])
    schema, notes = infer_schema(paths, args.target, args.site_column)
    schema.save(args.out, comments=notes)
    print(f"Wrote {args.out}: {len(schema.numeric)} numeric and {len(schema.categorical)} "
          f"categorical columns, target {schema.target!r} (positive: {list(schema.positive)}).")
    for note in notes[1:]:
        print(f"  - {note}")
    print("Review it, then: fedcare run --data-dir DIR --schema " + str(args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "schema" and args.schema_command == "infer":
            return cmd_schema_infer(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "runs":
            return cmd_runs(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command in ("privacy", "keys"):
            return int(args.handler(args))
    except FedcareError as exc:
        print(f"fedcare: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
