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
import errno
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcare import __version__
from fedcare.cli.audit import add_audit_parser
from fedcare.cli.deploy import add_deploy_parser
from fedcare.cli.keys import add_keys_parser
from fedcare.cli.privacy import add_privacy_parser
from fedcare.cli.runs import add_runs_parser
from fedcare.cli.schema import add_schema_parser
from fedcare.config import RunConfig
from fedcare.errors import FedcareError

# Shorthand flags: flag -> (config key, type, metavar, help).
SHORTHANDS: dict[str, tuple[str, type, str, str]] = {
    "--dataset": ("data.dataset", str, "NAME",
                  "heart-disease | breast-cancer | synthetic | files"),
    "--protocol": ("data.protocol", str, "NAME",
                   "preprocessing protocol, e.g. flamby (heart-disease)"),
    "--sites": ("data.sites", int, "N", "number of simulated sites (with --partition)"),
    "--partition": ("data.partition", str, "SCHEME", "natural | iid | dirichlet | quantity"),
    "--alpha": ("data.alpha", float, "A",
                "Dirichlet concentration for dirichlet/quantity partitions"),
    "--data-dir": ("data.data_dir", str, "DIR", "directory with one CSV/Parquet file per site"),
    "--schema": ("data.schema", str, "FILE",
                 "schema TOML for --data-dir (see `fedcare schema infer`)"),
    "--missing": ("data.missing", str, "POLICY", "drop | impute | fail: policy for missing values"),
    "--strategy": ("federation.strategy", str, "NAME",
                   "fedavg | fedprox | fedadam | fedyogi | fedadagrad"),
    "--model": ("model.name", str, "NAME", "logreg | mlp"),
    "--rounds": ("federation.rounds", int, "N", "federated rounds"),
    "--local-epochs": ("federation.local_epochs", int, "N", "local epochs per round"),
    "--batch-size": ("federation.batch_size", int, "N", "local batch size"),
    "--lr": ("federation.lr", float, "RATE", "local SGD learning rate"),
    "--fraction": ("federation.fraction", float, "SHARE", "share of sites sampled per round"),
    "--min-sites": ("federation.min_sites", int, "N",
                    "quorum: fewest sites a round may aggregate"),
    "--seed": ("seed", int, "N", "training seed (initialisation, shuffling, site sampling)"),
    "--privacy": ("privacy.level", str, "LEVEL",
                  "none | record (DP-SGD per patient) | site (per hospital)"),
    "--epsilon": ("privacy.epsilon", float, "EPS",
                  "target epsilon of the whole run (needs --privacy)"),
    "--delta": ("privacy.delta", float, "DELTA", "target delta (needs --privacy)"),
    "--clip-norm": ("privacy.clip_norm", float, "C",
                    "L2 bound per record (record) or update (site) (needs --privacy)"),
    "--noise": ("privacy.noise", str, "WHERE", "--privacy site only: central | distributed"),
    "--protection": ("protection.scheme", str, "SCHEME", "plain | secagg | ckks"),
}

EXAMPLES: dict[str, str] = {
    "fedcare": """examples:
  fedcare run                                  # the default job: 4 heart-disease hospitals
  fedcare run --privacy record --epsilon 1     # DP-SGD: each patient protected
  fedcare runs                                 # every run under runs/
  fedcare COMMAND --help                       # a command's options and examples""",
    "fedcare run": """examples:
  fedcare run
  fedcare run CONFIG.toml --rounds 50 --out runs/my-run --seed 3
  fedcare run --data-dir exports/ --schema schema.toml
  fedcare run --privacy site --epsilon 8 --noise distributed --dataset synthetic --sites 100
  fedcare run --resume runs/my-run             # continue after Ctrl-C or a failure

--out DIR is the run directory itself, which must be new or empty: the same as
out = "PARENT" and name = "NAME" in the config file (run directory PARENT/NAME, with
a -2, -3... suffix if taken). Default: runs/<dataset>-<strategy>-<time>.""",
    "fedcare schema": """examples:
  fedcare schema infer exports/ --target outcome --out schema.toml""",
    "fedcare schema infer": """examples:
  fedcare schema infer exports/ --target outcome --out schema.toml
  fedcare schema infer trial.csv --site-column hospital --target outcome --out schema.toml""",
    "fedcare privacy": """examples:
  fedcare privacy epsilon --sample-rate 0.01 --noise-multiplier 1.1 --steps 1000 --delta 1e-5
  fedcare privacy noise --epsilon 1 --delta 1e-5 --sample-rate 0.01 --steps 1000""",
    "fedcare privacy epsilon": """example:
  fedcare privacy epsilon --sample-rate 0.01 --noise-multiplier 1.1 --steps 1000 --delta 1e-5""",
    "fedcare privacy noise": """example:
  fedcare privacy noise --epsilon 1 --delta 1e-5 --sample-rate 0.01 --steps 1000""",
    "fedcare keys": """examples:
  fedcare keys init keys/ && fedcare run --protection ckks --set protection.keys=keys/
  fedcare keys fingerprint keys/aggregator.ckks""",
    "fedcare keys init": """example (keep keys/ out of version control):
  fedcare keys init keys/ && fedcare run --protection ckks --set protection.keys=keys/""",
    "fedcare keys fingerprint": """example:
  fedcare keys fingerprint keys/aggregator.ckks""",
    "fedcare verify": """example:
  fedcare verify runs/heart-disease-fedavg-20261128-104500""",
    "fedcare report": """example:
  fedcare report runs/heart-disease-fedavg-20261128-104500""",
    "fedcare runs": """examples:
  fedcare runs                  # every run under runs/
  fedcare runs runs/sweep-eps   # the runs of a sweep""",
    "fedcare sweep": """example:
  fedcare sweep --grid privacy.epsilon=0.5,1,3,8 --grid strategy=fedavg,fedadam \\
      --seeds 0,1,2 --set privacy.level=record --out runs/sweep-eps""",
    "fedcare audit": """examples:
  fedcare audit                                # what an attacker learns, without and with DP
  fedcare audit --run runs/my-run""",
    "fedcare certs": """examples (keep pki/ out of version control):
  fedcare certs pki/ --sites cleveland,hungarian,va --host coordinator.example.org
  fedcare certs add-site zurich --certs pki/""",
    "fedcare serve": """example:
  fedcare serve job.toml --certs pki/ --sites cleveland,hungarian,va --run-dir runs/deployed""",
    "fedcare site": """example:
  fedcare site --name va --aggregator coordinator.example.org:9092 --certs pki/ --data va.csv""",
}
"""An example epilog per command, by the parser's ``prog``; printed as written."""


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose ``--help`` ends with the command's `EXAMPLES`.

    The description is wrapped as usual; the epilog is printed as written, so the
    example commands keep their lines. Subcommand parsers are of this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.epilog is None:
            self.epilog = EXAMPLES.get(self.prog)

    def format_help(self) -> str:
        epilog, self.epilog = self.epilog, None
        try:
            text = super().format_help()
        finally:
            self.epilog = epilog
        return text + ("\n" + epilog + "\n" if epilog else "")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fedcare",
        description="Train one clinical model across hospitals without pooling their records.")
    parser.add_argument("--version", action="version", version=f"fedcare {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    run.add_argument("--out", metavar="DIR",
                     help="run directory to create, new or empty (default: a new folder under "
                          "runs/); the same as the config's out = parent, name = folder")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run after its last completed round, with "
                          "its config and privacy ledger (other options are not allowed)")
    for flag, (key, kind, metavar, text) in SHORTHANDS.items():
        run.add_argument(flag, dest=key.replace(".", "__"), type=kind, metavar=metavar,
                         help=f"{text} [{key}]")
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
        given = [flag for flag, (key, _, _, _) in SHORTHANDS.items()
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
    for flag, (key, _, _, _) in SHORTHANDS.items():
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            config.set_value(key, value, source=flag)
    if args.out:
        # --out DIR is the run directory: the config's out (its parent) and name (its own).
        out = Path(args.out)
        config.set_value("out", str(out.parent), source="--out")
        config.set_value("name", out.name, source="--out")
    if args.no_baselines:
        config.baselines.enabled = False
    config.check_settings()
    return config


RESUME_HINT = "fedcare run --resume {run_dir}"
"""How to continue a stopped run (printed on Ctrl-C and by `fedcare runs`)."""


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedcare.experiment import Evaluation, run_experiment
    from fedcare.federation.aggregator import RoundReport
    from fedcare.report.data_loss import loss_lines
    from fedcare.report.rundir import load_checkpoint, make_run_dir, read_summary
    from fedcare.report.tables import results_table

    config = resolve_config(args)
    done = 0
    if args.resume:
        run_dir = Path(args.resume)
        summary = read_summary(run_dir)
        if summary is not None and summary.get("status") == "completed":
            print(f"{run_dir} is already complete ({summary.get('rounds_completed', '?')} of "
                  f"{config.federation.rounds} rounds); nothing to resume.")
            return 0
        done = int(load_checkpoint(run_dir)["round"])
        print(f"Resuming {run_dir} after round {done} of {config.federation.rounds}.",
              flush=True)
    else:
        # Made here, not in run_experiment, so that Ctrl-C can say which directory to resume.
        run_dir = make_run_dir(config, args.out)
    bars: list[tqdm] = []  # created at the first round, so a bad config prints no bar

    def progress(report: RoundReport, evaluation: Evaluation) -> None:
        if not bars:
            bars.append(tqdm(total=config.federation.rounds, initial=done, desc="rounds",
                             unit="round", disable=args.quiet, file=sys.stderr, leave=False))
        bars[0].set_postfix(acc=f"{evaluation.pooled['accuracy']:.3f}",
                            auc=f"{evaluation.pooled['roc_auc']:.3f}")
        bars[0].update(1)

    def baseline_progress(trained: int, total: int) -> None:
        if trained == 0:
            for bar in bars:
                bar.close()  # the rounds are over
            # Baselines train for as many epochs as the federation did, one site after
            # another: minutes with many sites, so they get a bar of their own.
            bars.insert(0, tqdm(total=total, desc="baselines (pooled, each site alone)",
                                unit="model", disable=args.quiet, file=sys.stderr,
                                leave=False))
        else:
            bars[0].update(1)

    try:
        result = run_experiment(config, out=None if args.resume else run_dir,
                                on_round=progress, resume=args.resume,
                                on_baseline=baseline_progress)
    except KeyboardInterrupt:
        for bar in bars:
            bar.close()
        print(stopped_note(run_dir), file=sys.stderr)
        return 130
    except BaseException as exc:
        _forget_empty(run_dir)
        if isinstance(exc, FedcareError) and (run_dir / "checkpoint.pt").exists():
            exc.add_note(f"What was computed is in {run_dir}; after fixing the cause, continue "
                         f"with: {RESUME_HINT.format(run_dir=run_dir)}")
        raise
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
    notes = [baselines[key] for key in ("note", "local_note") if baselines.get(key)]
    if notes:
        print("\nBaselines: " + " ".join(notes))
    files = sorted(p.name for p in result.run_dir.iterdir() if not p.name.endswith(".tmp"))
    print(f"\nRun directory: {result.run_dir}  ({', '.join(files)})")
    return 0


def stopped_note(run_dir: Path) -> str:
    """What Ctrl-C during `fedcare run` leaves, and how to go on from it."""
    from fedcare.report.rundir import CHECKPOINT_FILE, load_checkpoint

    if not (run_dir / CHECKPOINT_FILE).exists():
        _forget_empty(run_dir)
        left = f" (remove {run_dir} and start again)" if run_dir.exists() else ""
        return f"fedcare: interrupted before the first round completed; nothing to resume{left}."
    done = int(load_checkpoint(run_dir)["round"])
    saved = "round 1 is" if done == 1 else f"rounds 1-{done} are"
    return (f"fedcare: interrupted after round {done}; {saved} saved in {run_dir}. "
            f"Continue with: {RESUME_HINT.format(run_dir=run_dir)}")


def _forget_empty(run_dir: Path) -> None:
    """Remove a run directory the CLI made if the run wrote nothing into it."""
    try:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        pass  # a directory that cannot be removed is only left empty


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``fedcare`` command; return its exit code.

    0: done; 1: a check failed (``fedcare verify``); 2: a usage or input error,
    printed as one line naming what and where (never a traceback); 130: Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        if args.command == "run":
            return cmd_run(args)
        if hasattr(args, "handler"):  # every other subcommand
            return int(args.handler(args))
    except FedcareError as exc:
        print(f"fedcare: error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"fedcare: {note}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedcare: error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedcare: interrupted.", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    raise AssertionError(f"unhandled command {args.command!r}")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    """A warning as the command line prints it: one line, no source location."""
    return f"fedcare: warning: {message}\n"


def os_error_text(exc: OSError) -> str:
    """An `OSError` as one line naming the path and what went wrong."""
    reason = exc.strerror or str(exc)
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return reason
    where = " -> ".join(str(p) for p in paths)
    hints = {errno.ENOENT: "; create the folder first, or check the path",
             errno.EACCES: "; choose a folder you may write to",
             errno.EISDIR: "; give a file, not a folder",
             errno.ENOTDIR: "; a part of the path is a file, not a folder"}
    return f"{where}: {reason}{hints.get(exc.errno or 0, '')}."


if __name__ == "__main__":
    sys.exit(main())
