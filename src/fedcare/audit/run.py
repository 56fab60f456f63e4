"""``fedcare audit``: run the attacks against configurations and say what leaks, in words.

`run_audit` takes one or more named configurations (with no config file:
the default heart-disease job without DP and with record-level DP at
epsilon 1), runs the chosen attacks against each and writes into one
directory

* ``audit.json``: ``findings`` (one sentence per configuration and attack),
  ``table`` (one row per configuration: the headline number of each attack
  next to its baseline) and every attack's full result under ``results``;
* ``audit.md``: the findings and the table;
* ``audit.html``: the same with a chart, self-contained.

Into a run directory (``fedcare audit --run RUN_DIR``) the run's
``report.html`` then shows the findings too.

The attacks (registry `AUDITS`): ``gradient`` (inversion of what the
aggregator reads of one site, `audit_gradient_leakage`), ``membership``
(loss, margin and LiRA against the released model, `audit_membership`) and
``canary`` (one-run empirical epsilon, `audit_canaries`). A canary lower
bound above the accountant's epsilon is a failure: it is written first,
in capitals, and `run_audit` reports it in ``failed``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from fedcare.audit.canary import CanaryAuditResult, audit_canaries
from fedcare.audit.gradient import GradientAuditResult, audit_gradient_leakage
from fedcare.audit.membership import MembershipAuditResult, audit_membership
from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.report.html import AUDIT_FILE, CSS, audit_section
from fedcare.report.rundir import jsonable
from fedcare.report.svg import line_chart


@dataclass(frozen=True)
class AuditSettings:
    """How hard each attack tries (defaults sized for minutes on 2 cores, not hours).

    Attributes
    ----------
    gradient_records : int
        Target records of the gradient inversion (one round each).
    membership_references : int
        Reference models per target for LiRA.
    canaries : int
        Canaries planted for the one-run bound.
    confidence : float
        Confidence of the canary lower bound.
    seed : int
    """

    gradient_records: int = 20
    membership_references: int = 8
    canaries: int = 100
    confidence: float = 0.95
    seed: int = 0


Result = GradientAuditResult | MembershipAuditResult | CanaryAuditResult
AUDITS: dict[str, Callable[[RunConfig, AuditSettings], Result]] = {
    "gradient": lambda c, s: audit_gradient_leakage(c, n_records=s.gradient_records,
                                                    seed=s.seed),
    "membership": lambda c, s: audit_membership(c, n_reference=s.membership_references,
                                                seed=s.seed),
    "canary": lambda c, s: audit_canaries(c, n_canaries=s.canaries, confidence=s.confidence,
                                          seed=s.seed),
}
"""Attack name -> the audit that runs it on a configuration."""


def default_configurations() -> dict[str, RunConfig]:
    """The default heart-disease job without DP and with record-level DP at epsilon 1."""
    plain = RunConfig()
    private = RunConfig()
    private.privacy.level = "record"
    private.privacy.epsilon = 1.0
    return {"no DP": plain, "record-level DP, epsilon 1": private}


def describe(config: RunConfig) -> str:
    """A configuration in a few words: privacy and protection."""
    p = config.privacy
    privacy = "no DP" if p.level == "none" else (
        f"{p.level}-level DP (epsilon {p.epsilon:g}"
        + (f", {p.noise} noise" if p.level == "site" else "") + ")")
    return f"{privacy}, protection {config.protection.scheme}"


def finding(name: str, result: Result) -> str:
    """One sentence: what this attack achieved against this configuration."""
    if isinstance(result, GradientAuditResult):
        best = result.attacks[result.best].metrics
        prior = result.prior.metrics
        verdict = ("more than" if best.records_recovered > prior.records_recovered + 0.05
                   else "no more than")
        return (f"{name}: a curious coordinator reading {result.view} reconstructed "
                f"{best.records_recovered:.0%} of {best.n_records} patients' records exactly "
                f"({result.best}; {best.mean_feature_accuracy:.0%} of features, outcome "
                f"{best.label_accuracy:.0%}), {verdict} guessing from other hospitals' data "
                f"({prior.records_recovered:.0%} of records, {prior.mean_feature_accuracy:.0%} "
                "of features).")
    if isinstance(result, MembershipAuditResult):
        best_name = max(result.attacks, key=lambda k: result.attacks[k].roc_auc)
        best_m = result.attacks[best_name]
        low = min(best_m.tpr_at_fpr)
        return (f"{name}: someone holding the model tells patients who were in the training "
                f"data from those who were not with ROC AUC {best_m.roc_auc:.2f} ({best_name}; "
                f"0.5 is chance), and finds {best_m.tpr_at_fpr[low]:.1%} of members at a "
                f"{low:.1%} false-alarm rate ({best_m.n_members} members, "
                f"{best_m.n_non_members} non-members).")
    prefix = "PRIVACY CLAIM FAILED. " if result.failed else ""
    return f"{prefix}{name}: canary audit: {result.verdict}"


def _row(name: str, results: Mapping[str, Result]) -> dict[str, Any]:
    row: dict[str, Any] = {"configuration": name}
    for result in results.values():
        if isinstance(result, GradientAuditResult):
            row["records recovered"] = result.attacks[result.best].metrics.records_recovered
            row["records recovered by prior"] = result.prior.metrics.records_recovered
        elif isinstance(result, MembershipAuditResult):
            row["membership AUC"] = max(m.roc_auc for m in result.attacks.values())
        else:
            row["canary AUC"] = result.canary_auc
            row["epsilon lower bound"] = result.epsilon_lower_bound
            row["accountant epsilon"] = result.accountant_epsilon
    return row


def run_audit(configurations: Mapping[str, RunConfig], out: str | Path, *,
              attacks: Sequence[str] = tuple(AUDITS),
              settings: AuditSettings | None = None,
              on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `attacks` against every configuration; write audit.json, audit.md, audit.html.

    Returns what ``audit.json`` holds, plus ``failed``: True if a canary lower
    bound exceeded its accountant's epsilon.
    """
    unknown = [a for a in attacks if a not in AUDITS]
    if unknown or not attacks:
        raise ConfigError(f"attacks must be among {list(AUDITS)}; got {list(attacks)}.")
    settings = settings or AuditSettings()
    out = Path(out)
    if (out / AUDIT_FILE).exists():
        raise ConfigError(f"{out / AUDIT_FILE} exists; audit into a new directory.")
    started = time.perf_counter()
    findings, table, raw, failed = [], [], {}, False
    for name, config in configurations.items():
        config.baselines.enabled = False
        results: dict[str, Result] = {}
        for attack in attacks:
            if on_step is not None:
                on_step(f"{name}: {attack}")
            results[attack] = AUDITS[attack](config, settings)
            findings.append(finding(name, results[attack]))
            failed |= isinstance(results[attack], CanaryAuditResult) and \
                results[attack].failed  # type: ignore[union-attr]
        table.append(_row(name, results))
        raw[name] = {"description": describe(config),
                     **{a: r.to_dict() for a, r in results.items()}}
    findings.sort(key=lambda text: not text.startswith("PRIVACY CLAIM FAILED"))
    audit = {"findings": findings, "table": table, "results": raw, "failed": failed,
             "settings": settings.__dict__, "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / AUDIT_FILE).write_text(json.dumps(jsonable(audit), indent=1, allow_nan=False),
                                  encoding="utf-8")
    (out / "audit.md").write_text(_markdown(audit), encoding="utf-8")
    (out / "audit.html").write_text(_html(audit), encoding="utf-8")
    return audit


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def _markdown(audit: Mapping[str, Any]) -> str:
    lines = ["# What an attacker could learn", ""]
    lines += [f"- {text}" for text in audit["findings"]]
    if audit["table"]:
        header = list(dict.fromkeys(k for row in audit["table"] for k in row))
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(row.get(k, "-")) for k in header) + " |"
                  for row in audit["table"]]
    return "\n".join(lines) + "\n"


def _html(audit: Mapping[str, Any]) -> str:
    table = audit["table"]
    header = list(dict.fromkeys(k for row in table for k in row))
    normalised = [{k: row.get(k, math.nan) for k in header} for row in table]
    xs = [float(i + 1) for i in range(len(table))]
    series = {label: (xs, [float(row.get(key, math.nan)) for row in table])
              for key, label in (("records recovered", "records recovered"),
                                 ("records recovered by prior", "records (prior)"),
                                 ("membership AUC", "membership AUC"),
                                 ("canary AUC", "canary AUC"))
              if any(key in row for row in table)}
    chart = line_chart(series, title="Attack success per configuration (x: table row)",
                       x_label="configuration (row of the table)", y_label="share / AUC",
                       y_range=(0.0, 1.0)) if series else ""
    section = audit_section({"findings": audit["findings"], "table": normalised})
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fedcare "
            f"audit</title><style>{CSS}</style></head><body>{section}"
            f"<div class='charts'>{chart}</div><p class='sub'>{escape(AUDIT_FILE)} holds every "
            "attack's full result.</p></body></html>\n")
