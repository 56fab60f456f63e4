"""The audit-log events both runtimes write: a run's start, each round, its end.

`fedcare.experiment.run_experiment` (the local runtime) and
`fedcare.runtime.flower_server.serve` (a deployment) record a run in the same
words, so `fedcare verify` and a reader of ``audit_log.jsonl`` need not know
which runtime wrote it. The log itself (hash chain, keyed digests) is
`fedcare.report.auditlog`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from fedcare.config import RunConfig
from fedcare.federation.aggregator import RoundReport
from fedcare.privacy.ledger import PrivacyLedger
from fedcare.protection.base import wire_digest
from fedcare.report.auditlog import AUDIT_LOG_FILE, AuditLog, payload_digest


def log_run_started(audit: AuditLog, config: RunConfig, sites: Sequence[str],
                    payload_key: bytes | None, **fields: Any) -> None:
    """``run_started``: the config's digest, the sites, protection, privacy level and how
    payloads are digested (`fields`: what the runtime adds, e.g. ``runtime="flower"``)."""
    audit.append("run_started",
                 config_sha256=hashlib.sha256(config.to_toml().encode()).hexdigest(),
                 sites=list(sites), protection=config.protection.scheme,
                 privacy=config.privacy.level, **fields,
                 payload_digest="sha256" if payload_key is None else "hmac-sha256")


def log_round_events(audit: AuditLog, report: RoundReport, params: torch.Tensor,
                     ledger: PrivacyLedger | None, payload_key: bytes | None = None) -> None:
    """One completed round in the audit log: who was asked, what arrived, what was spent.

    `payload_key` (`audit_key`, when `payload_digests_keyed`) keys the payload
    digests, so that the log is no oracle on a site's data.
    """
    audit.append("round", round=report.round, selected=report.selected, empty=report.empty)
    for site, (size, sha256) in report.received.items():
        name, digest = payload_digest(sha256, payload_key)
        audit.append("payload_received", round=report.round, site=site, bytes=size,
                     **{name: digest})
    for site, reason in report.failures.items():
        audit.append("site_failed", round=report.round, site=site, reason=reason)
    if ledger is not None:
        spent = [asdict(e) for party in ledger.parties() for e in ledger.entries(party)
                 if e.round == report.round]
        audit.append("budget_spent", round=report.round, entries=spent)
    audit.append("model_released", round=report.round, sha256=wire_digest(params))
    audit.sync()


def close_audit_log(audit: AuditLog) -> dict[str, Any]:
    """Close the log; what ``summary.json`` records of it (checked by `fedcare verify`)."""
    audit.close()
    return {"file": AUDIT_LOG_FILE, "entries": audit.entries, "head": audit.head}
