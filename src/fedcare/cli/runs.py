"""``fedcare verify | report | runs | sweep``: what to do with run directories.

``verify`` checks a run's hash-chained audit log, ``report`` rewrites its
report.html and model card, ``runs`` lists runs with their headline numbers,
``sweep`` runs a grid of settings and seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedcare.config import RunConfig
from fedcare.errors import DataError, FedcareError
from fedcare.evaluation import SITE_MEAN_AUC
from fedcare.report.auditlog import AUDIT_LOG_FILE
from fedcare.report.auditlog import verify as verify_audit_log
from fedcare.report.html import MODEL_CARD_FILE, site_mean_auc, write_report
from fedcare.report.rundir import CHECKPOINT_FILE, load_checkpoint, read_summary
from fedcare.sweep import ALIASES, GridAxis, run_sweep, sweep_markdown


def add_runs_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``verify``, ``report``, ``runs`` and ``sweep`` under `commands`.

    Each sets ``handler`` (``Namespace -> int``, the exit code); a handler
    raises `fedcare.errors.FedcareError` for a bad input.
    """
    verify = commands.add_parser(
        "verify", help="check a run's audit log has not been changed",
        description="Check the hash chain of RUN_DIR/audit_log.jsonl and, for a finished run, "
                    "its length and head hash against summary.json. Exit 0 if intact, 1 if "
                    "an entry was changed, removed or reordered (naming the first).")
    verify.add_argument("run_dir", metavar="RUN_DIR")
    verify.set_defaults(handler=cmd_verify)
    report = commands.add_parser(
        "report", help="(re)write a run's report.html and model_card.md",
        description="Write RUN_DIR/report.html (self-contained: opens from disk) and "
                    "RUN_DIR/model_card.md from the run directory's files.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(handler=cmd_report)
    runs = commands.add_parser(
        "runs", help="list runs with their headline numbers",
        description="One line per run directory under DIR (default: runs): status, dataset, "
                    "strategy, protection, privacy, rounds, pooled accuracy and ROC AUC.")
    runs.add_argument("directory", nargs="?", default="runs", metavar="DIR")
    runs.set_defaults(handler=cmd_runs)
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
    sweep.set_defaults(handler=cmd_sweep)


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
    read_summary(Path(args.run_dir))  # a damaged summary.json: one error line naming it
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
    site_means = False
    skipped: list[str] = []
    resumable: list[Path] = []
    found = {p.parent for name in ("summary.json", "config.toml") for p in parent.glob(f"*/{name}")}
    for run_dir in sorted(found):
        try:
            s = read_summary(run_dir)
        except DataError as exc:
            skipped.append(f"{exc} Skipped.")
            continue
        if s is None:
            s = _stopped_run(run_dir)
        pooled = (s.get("federated") or {}).get("pooled") or {}
        privacy = s.get("privacy")
        accuracy, auc = (f"{pooled[m]:.3f}" if pooled.get(m) is not None else "-"
                         for m in ("accuracy", "roc_auc"))
        if site_mean_auc(pooled) and auc != "-":
            auc += " (site mean)"
            site_means = True
        status = str(s.get("status", "?"))
        if status != "completed" and (run_dir / CHECKPOINT_FILE).exists():
            resumable.append(run_dir)
        rows.append((run_dir.name, status, str(s.get("dataset", "?")), str(s.get("strategy", "?")),
                     (s.get("protection") or {}).get("scheme", "plain"),
                     s.get("privacy_cell") or _privacy_cell(privacy),
                     str(s.get("rounds_completed", "?")) + (
                         f" ({len(s['short_rounds'])} short)" if s.get("short_rounds") else ""),
                     accuracy, auc))
    for note in skipped:
        print(f"note: {note}", file=sys.stderr)
    if not rows:
        print(f"No runs under {parent}.")
        return 0
    header = ("run", "status", "dataset", "strategy", "protection", "privacy", "rounds",
              "accuracy", "ROC AUC")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if site_means:
        print(f"site mean: {SITE_MEAN_AUC}")
    if any("short)" in row[6] for row in rows):
        print("short: rounds in which a selected site sent no update (summary.json "
              "short_rounds).")
    if any(row[1] == STOPPED for row in rows):
        print(f"{STOPPED}: no summary.json: stopped (Ctrl-C, a crash) or still running.")
    for run_dir in resumable:
        print(f"resume: fedcare run --resume {run_dir}")
    return 0


STOPPED = "stopped"
"""`fedcare runs`' status of a run directory without summary.json."""


def _stopped_run(run_dir: Path) -> dict[str, Any]:
    """What a run directory without ``summary.json`` says of itself: its config and rounds."""
    facts: dict[str, Any] = {"status": STOPPED, "rounds_completed": 0}
    try:
        config = RunConfig.load(run_dir / "config.toml")
    except FedcareError:
        return facts
    facts.update(dataset=config.data.dataset_name, strategy=config.federation.strategy,
                 protection={"scheme": config.protection.scheme})
    if config.privacy.level != "none":
        facts["privacy_cell"] = f"{config.privacy.level} (target eps {config.privacy.epsilon:g})"
    if (run_dir / CHECKPOINT_FILE).exists():
        try:
            done: int | str = int(load_checkpoint(run_dir)["round"])
        except DataError:
            done = "?"  # a damaged checkpoint: --resume will say so
        facts["rounds_completed"] = f"{done} of {config.federation.rounds}"
    return facts


def _privacy_cell(privacy: dict[str, Any] | None) -> str:
    """A run's privacy in a few words; a seeded run is not private whatever its epsilon."""
    if not privacy:
        return "none"
    if privacy.get("private", True) is False:
        return f"{privacy['level']}: NOT private (seeded noise)"
    return f"{privacy['level']} eps {privacy['epsilon']:.2f}"


def cmd_verify(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    log = run_dir / AUDIT_LOG_FILE
    if not log.is_file():
        raise FedcareError(f"{run_dir} holds no {AUDIT_LOG_FILE}; is it a fedcare run directory?")
    recorded: dict[str, Any] = (read_summary(run_dir) or {}).get("audit_log") or {}
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
