"""A hash-chained audit log of one run: what happened, in an order nobody can rewrite unseen.

``audit_log.jsonl`` in the run directory holds one JSON object per line:
``seq`` (0, 1, 2, ...), ``time`` (UTC, ISO 8601), ``event``, the event's
fields, ``prev`` (the previous entry's ``hash``; 64 zeros for the first) and
``hash``: the SHA-256 of the entry's canonical JSON without ``hash`` (sorted
keys, no spaces, UTF-8). Each entry is flushed as it is written, and the file
fsync-ed at the end of every round (`AuditLog.sync`).

Changing an entry breaks its own hash; removing or reordering entries breaks
the next entry's ``prev`` or the ``seq`` sequence. Removing the *last*
entries leaves a valid shorter chain, so ``summary.json`` also records the
number of entries and the head hash (``audit_log``) at the end of the run,
and `verify` checks the chain against them. Someone who can rewrite both
files and recompute every hash can forge a history: the head hash is what a
site or an ethics board copies elsewhere (or what a later, signed, log
anchors to) to make that detectable.

Events written by both runtimes (`fedcare.report.events`): ``run_started``
(config digest, sites, protection, privacy level, ``payload_digest``: how
payloads are digested), ``round`` (selected sites),
``payload_received`` (site, bytes, and a digest of the protected payload:
``sha256``, or ``hmac_sha256`` when a plain digest would be an oracle, see
`payload_digests_keyed`),
``site_failed`` (site, reason), ``budget_spent`` (the round's ledger entries),
``model_released`` (SHA-256 of the new global parameters), ``run_resumed``,
``run_failed`` (error) and ``run_completed``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fedcare.config import RunConfig
from fedcare.errors import FedcareError

AUDIT_LOG_FILE = "audit_log.jsonl"
AUDIT_KEY_FILE = "audit_log.key"
"""The aggregator's key for keyed payload digests (32 random bytes, mode 0600): never in
the log, and not to be shared with anyone the run directory is given to."""
GENESIS = "0" * 64


class AuditLogError(FedcareError):
    """The audit log cannot be continued (it is broken, or not ours)."""


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of an entry's canonical JSON, ``hash`` left out."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def payload_digests_keyed(config: RunConfig) -> bool:
    """Whether a plain SHA-256 of a site's payload would be an oracle on the site's data.

    A payload that is neither masked (``secagg``) nor encrypted (``ckks``) nor
    noised by the site from a secure source is a deterministic function of
    the site's records and the public configuration: plain protection without
    DP, with record-level DP from seeded noise, or with client-level DP whose
    noise the aggregator adds (``central``) or which is seeded. Whoever reads
    its SHA-256 in the log can guess the records, recompute the payload and
    check the guess exactly. Such payloads get an HMAC-SHA256 under a key the
    aggregator keeps instead (`payload_digest`).
    """
    if config.protection.scheme in ("secagg", "ckks"):
        return False  # masks and ciphertexts are fresh randomness from the CSPRNG
    p = config.privacy
    noised_at_site = p.level == "record" or (p.level == "site" and p.noise == "distributed")
    return not (noised_at_site and p.secure)


def audit_key(run_dir: Path) -> bytes:
    """The run's key for keyed payload digests: read if the run has one, else made.

    A new key is 32 bytes from `secrets`, written to ``AUDIT_KEY_FILE`` with
    mode 0600 (created exclusively, so an existing file is never overwritten).
    """
    path = Path(run_dir) / AUDIT_KEY_FILE
    if path.exists():
        key = path.read_bytes()
        if len(key) != 32:
            raise AuditLogError(f"{path} holds {len(key)} bytes; expected the 32-byte key this "
                                "run's keyed payload digests were made with.")
        return key
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key)
    return key


def payload_digest(sha256_hex: str, key: bytes | None) -> tuple[str, str]:
    """(field name, value) under which ``payload_received`` records a payload.

    Without `key`: ``sha256`` and the payload's SHA-256. With it: ``hmac_sha256``
    and HMAC-SHA256 under `key` of that SHA-256 (hex): only a holder of the key can
    check a payload against it, so the log is no oracle for guesses of a site's data.
    """
    if key is None:
        return "sha256", sha256_hex
    return "hmac_sha256", hmac.new(key, bytes.fromhex(sha256_hex), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Verification:
    """What `verify` found.

    Attributes
    ----------
    ok : bool
    entries : int
        Entries read that form an unbroken chain from the start.
    head : str
        Hash of the last of them (`GENESIS` if none).
    problem : str
        Empty when `ok`; else the first entry that was changed, removed or
        reordered, by line number, and why.
    """

    ok: bool
    entries: int
    head: str
    problem: str = ""


def verify(path: str | os.PathLike[str], *, expected_entries: int | None = None,
           expected_head: str | None = None) -> Verification:
    """Check the chain of an audit log (and, if given, its length and head hash).

    Parameters
    ----------
    path : path
        ``audit_log.jsonl``.
    expected_entries, expected_head : optional
        What the run recorded at its end (``summary.json``, ``audit_log``): a log
        cut short, or continued, no longer matches them.
    """
    head, seq = GENESIS, 0
    lines = Path(path).read_text(encoding="utf-8").splitlines()

    def broken(line: int, why: str) -> Verification:
        return Verification(False, seq, head, f"line {line}: {why}")

    for line, text in enumerate(lines, start=1):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as exc:
            return broken(line, f"not JSON ({exc.msg}): changed or truncated.")
        if not isinstance(entry, dict):
            return broken(line, "not a JSON object: changed.")
        if entry.get("hash") != entry_hash(entry):
            return broken(line, f"its content does not match its hash: entry "
                                f"{entry.get('seq')!r} ({entry.get('event')!r}) was changed.")
        if entry.get("seq") != seq:
            return broken(line, f"entry {entry.get('seq')!r} where entry {seq} belongs: entries "
                                "were removed or reordered before it.")
        if entry.get("prev") != head:
            return broken(line, f"entry {seq} does not follow the entry before it (prev hash "
                                "differs): entries were removed, inserted or reordered.")
        head, seq = entry["hash"], seq + 1
    if expected_entries is not None and seq != expected_entries:
        return Verification(False, seq, head,
                            f"{seq} entries, but the run recorded {expected_entries} at its end: "
                            f"entries were {'removed' if seq < expected_entries else 'added'}.")
    if expected_head is not None and head != expected_head:
        return Verification(False, seq, head, "the last entry's hash differs from the head the "
                                              "run recorded at its end.")
    return Verification(True, seq, head)


class AuditLog:
    """Appends hash-chained entries to ``audit_log.jsonl``.

    Parameters
    ----------
    path : path
    resume : bool
        Continue an existing log (checked first: `AuditLogError` if broken);
        otherwise the file must not exist yet.
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.path = Path(path)
        self.head, self.entries = GENESIS, 0
        if resume and self.path.exists():
            check = verify(self.path)
            if not check.ok:
                raise AuditLogError(f"{self.path}: {check.problem} Refusing to continue a "
                                    "broken audit log.")
            self.head, self.entries = check.head, check.entries
        elif self.path.exists():
            raise AuditLogError(f"{self.path} already exists; a new run starts a new log.")
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry (flushed; `sync` makes it durable) and return it."""
        entry: dict[str, Any] = {"seq": self.entries,
                                 "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                                 "event": event, **fields, "prev": self.head}
        entry["hash"] = entry_hash(entry)
        self._file.write(json.dumps(entry, sort_keys=True, ensure_ascii=False,
                                    allow_nan=False) + "\n")
        self._file.flush()
        self.head, self.entries = entry["hash"], self.entries + 1
        return entry

    def sync(self) -> None:
        """Make every entry written so far durable (one fsync, not one per entry)."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.sync()
        self._file.close()
