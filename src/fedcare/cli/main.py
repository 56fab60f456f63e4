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
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcare import __version__
from fedcare.cli.audit import add_audit_parser
from fedcare.cli.deploy import add_deploy_parser
from fedcare.cli.keys import add_keys_parser
from fedcare.cli.privacy import add_privacy_parser
from fedcare.cli.runs import add_runs_parser
from fedcare.cli.schema import add_schema_parser
from fedcare.config import RunConfig
from fedcare.errors import FedcareError

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
    run.add_argument("--data", nargs="+", metavar="FILE",
                     help="data files: one per site, or one whose site column the schema "
                          "names [data.files]")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override any config key, e.g. federation.mu=0.1")
    run.add_argument("--out", help="run directory to create (default: under runs/)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run after its last completed round, with "
                          "its config and privacy ledger (other options are not allowed)")
    for flag, (key, kind, text) in SHORTHANDS.items():
        run.add_argument(flag, dest=key.replace(".", "__"), type=kind, help=f"{text} [{key}]")
    run.add_argument("--no-baselines", action="store_true",
                     help="skip the pooled and single-site baselines [baselines.enabled=false]; "
                          "a private run skips them unless baselines.enabled=true")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    add_schema_parser(commands)
    add_privacy_parser(commands)
    add_keys_parser(commands)
    add_runs_parser(commands)
    add_audit_parser(commands)
    add_deploy_parser(commands)
    return parser


def resolve_config(args: argparse.Namespace) -> RunConfig:
    if args.resume and args.data:
        raise FedcareError("--resume continues a run with the data it was configured with; it "
                           "takes no --data.")
    if args.resume:
        given = [flag for flag, (key, _, _) in SHORTHANDS.items()
                 if getattr(args, key.replace(".", "__")) is not None]
        if args.config or args.overrides or args.out or args.no_baselines or given:
            raise FedcareError("--resume continues a run exactly as it was configured; it takes "
                               "no config file, --set, --out or other options.")
        return RunConfig.load(Path(args.resume) / "config.toml")
    config = RunConfig.load(args.config) if args.config else RunConfig()
    if args.data:
        config.set_value("data.files", list(args.data), source="command line")
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
    from fedcare.report.data_loss import loss_lines
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
    # The local runtime holds every site's data: its user may see every site's counts.
    published = (result.summary.get("data_loss") or {}).get("released", False)
    lines = loss_lines(result.data.row_accounts, published=published)
    if lines:
        print("\n" + "\n".join(lines))
    print("\nProtection: " + result.summary["protection"]["sentence"])
    privacy = result.summary.get("privacy")
    if privacy:
        print("\nPrivacy: " + privacy["sentence"])
    baselines = result.summary.get("baselines") or {}
    if baselines.get("note"):
        print("\nBaselines: " + baselines["note"])
    files = sorted(p.name for p in result.run_dir.iterdir() if not p.name.endswith(".tmp"))
    print(f"\nRun directory: {result.run_dir}  ({', '.join(files)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if hasattr(args, "handler"):  # every other subcommand
            return int(args.handler(args))
    except FedcareError as exc:
        print(f"fedcare: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
