"""``fedcare audit``: what an attacker could learn under a configuration.

With no arguments: the default heart-disease job without DP and with
record-level DP at epsilon 1. With CONFIG: that configuration. With
``--run RUN_DIR``: the configuration of a finished run, written into the run
directory so that its report.html shows the findings. The attacks are
`fedcare.audit.run.AUDITS`; they take minutes, not seconds.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from fedcare.config import RunConfig
from fedcare.errors import FedcareError


def add_audit_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``audit`` under `commands` (sets ``handler``)."""
    from fedcare.audit.run import AUDITS, AuditSettings

    defaults = AuditSettings()
    audit = commands.add_parser(
        "audit", help="run privacy attacks against a configuration: what still leaks",
        description="Gradient inversion of what the coordinator reads, membership inference "
                    "against the released model and a one-run canary audit (empirical epsilon "
                    "next to the accountant's). Writes audit.json, audit.md and audit.html. "
                    "No arguments: the default job without DP and with record-level DP at "
                    "epsilon 1.")
    audit.add_argument("config", nargs="?", help="TOML config file to audit")
    audit.add_argument("--run", metavar="RUN_DIR",
                       help="audit this run's config.toml and write the results into the run "
                            "directory (its report.html then shows them)")
    audit.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config key")
    audit.add_argument("--out", help="directory to write to (default runs/audit-<time>)")
    audit.add_argument("--attacks", default=",".join(AUDITS),
                       help=f"comma-separated, from {', '.join(AUDITS)} (default: all)")
    audit.add_argument("--records", type=int, default=defaults.gradient_records,
                       help="gradient inversion: target records (one round each)")
    audit.add_argument("--references", type=int, default=defaults.membership_references,
                       help="membership inference: LiRA reference models per target")
    audit.add_argument("--canaries", type=int, default=defaults.canaries,
                       help="canary audit: canaries planted")
    audit.add_argument("--seed", type=int, default=defaults.seed)
    audit.set_defaults(handler=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from fedcare.audit.run import AuditSettings, default_configurations, describe, run_audit
    from fedcare.report.html import write_report

    if args.run and (args.config or args.out):
        raise FedcareError("--run audits that run's own config and writes into its directory; "
                           "it takes no CONFIG or --out.")
    if args.run:
        config = RunConfig.load(Path(args.run) / "config.toml")
        configurations = {describe(config): config}
        out = Path(args.run)
    else:
        if args.config or args.overrides:
            config = RunConfig.load(args.config) if args.config else RunConfig()
            configurations = {describe(config): config}
        else:
            configurations = default_configurations()
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else Path("runs") / f"audit-{stamp}"
    for config in configurations.values():
        for assignment in args.overrides:
            config.set(assignment)
    settings = AuditSettings(gradient_records=args.records,
                             membership_references=args.references, canaries=args.canaries,
                             seed=args.seed)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    audit = run_audit(configurations, out, attacks=attacks, settings=settings,
                      on_step=lambda step: print(f"auditing {step} ...", flush=True))
    print()
    for text in audit["findings"]:
        print(f"- {text}")
    if args.run:
        write_report(out)
    print(f"\nAudit written to {out}  (audit.json, audit.md, audit.html"
          + (", and the run's report.html" if args.run else "") + ")")
    return 1 if audit["failed"] else 0
