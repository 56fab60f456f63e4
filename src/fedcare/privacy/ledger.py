"""The privacy ledger: every DP release, persisted as it happens; no budget overspent.

Each entry is one party's spend in one round: the mechanism (the subsampled
Gaussian), its noise multiplier, sample rate and number of steps, and whom it
protects. Entries are frozen data (`LedgerEntry`), appended as JSON lines to
``privacy_ledger.jsonl`` in the run directory and flushed to disk *before*
the round's result is used, so a crash never loses a spend.

Before a round, `PrivacyLedger.check` composes what each party has spent with
what the round would spend and refuses with `BudgetExceeded` (spent,
requested, cap) if any party's epsilon would pass its cap: the budget is
checked before noise is drawn, never after.

Resume. A round's entries are written when its noised result exists; the
checkpoint of the round is written after. If the process dies in between,
that result was never released as a model, so on resume
`PrivacyLedger.resume_from` appends a ``discard`` line for the rounds after
the checkpoint and the round is run again: the released model's epsilon
(`PrivacyLedger.spent`) counts every released step once and no step twice.
The aggregator did see those rounds (record level: each site's DP-SGD
update; client-level distributed noise: each noised update under plain
protection, the noised sum under secagg or ckks), so discarded entries are
kept, marked (`PrivacyLedger.discarded`), and counted in what the aggregator
saw (`PrivacyLedger.seen`) and in every cap check: a crash loop cannot show
the aggregator more than a party's cap allows. A party that stands for
released results only (client-level DP's ``federation``, whose rounds the
aggregator saw are recorded as the ``aggregator`` party) keeps its discarded
entries out of both (``released_only``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedcare.errors import BudgetExceeded, DataError
from fedcare.privacy.accounting import GaussianEvent, epsilon

LEDGER_FILE = "privacy_ledger.jsonl"
FORMAT_VERSION = 2
"""Version 2 files start with a ``format`` line; from then on every round's view of the
aggregator has its own entries. Lines before the first ``format`` line are version 1."""


@dataclass(frozen=True)
class LedgerEntry:
    """One party's DP spend in one round.

    Attributes
    ----------
    round : int
    party : str
        Whose budget this is: a site's name (record level) or ``federation`` (site level).
    protects : str
        Whom the guarantee covers, in words ("each patient at cleveland").
    mechanism : str
        ``subsampled-gaussian``.
    noise_multiplier, sample_rate : float
    steps : int
    """

    round: int
    party: str
    protects: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    mechanism: str = "subsampled-gaussian"

    @property
    def event(self) -> GaussianEvent:
        return GaussianEvent(noise_multiplier=self.noise_multiplier,
                             sample_rate=self.sample_rate, steps=self.steps)


class PrivacyLedger:
    """Spent budget per party, its caps, and the file it is persisted in.

    Parameters
    ----------
    path : Path or None
        The JSON-lines file (None: in memory only).
    delta : float
        The delta every epsilon is stated at.
    accountant : str
        ``pld`` or ``rdp``.
    caps : dict
        Party name -> epsilon cap. A party without one is not capped.
    released_only : iterable of str
        Parties whose entries stand for released results only, what the
        aggregator saw of those rounds being recorded under another party
        (client-level DP: ``federation``, seen as ``aggregator``). Their
        discarded entries are kept in the file but count neither in `seen`
        nor against their cap. Every other party's entries are what the
        aggregator saw (record level: each site's DP-SGD updates).
    stand_in : tuple (str, str, float), optional
        ``(party, seen_as, noise_multiplier)``: for a file written before
        version 2, which recorded no separate view of the aggregator, each
        old spend of ``party`` is counted as a spend of ``seen_as`` with this
        (worst-case) multiplier, unsampled, in memory only. Client-level
        distributed noise: ``("federation", "aggregator", sigma of a round of
        all K sites)``.
    """

    def __init__(self, path: Path | None, *, delta: float, accountant: str,
                 caps: dict[str, float], released_only: Iterable[str] = (),
                 stand_in: tuple[str, str, float] | None = None) -> None:
        self.path = path
        self.delta = delta
        self.accountant = accountant
        self.caps = dict(caps)
        self.released_only = frozenset(released_only)
        self.stand_in = stand_in
        self._entries: dict[str, list[LedgerEntry]] = defaultdict(list)
        # Spends of rounds whose result was never released (discarded on resume): not in
        # the released model's epsilon, but seen by the aggregator.
        self._discarded: dict[str, list[LedgerEntry]] = defaultdict(list)
        # (cap, sigma, q) -> most steps of that one mechanism already shown to fit the
        # cap: epsilon grows with steps, so fewer steps fit too, with no accountant call.
        # Keyed by the mechanism, not the party: sites of equal size share one proof.
        self._fits: dict[tuple[float, float, float], int] = {}
        # cap -> largest precision sum(steps / sigma^2) of unsampled (q = 1) steps shown to
        # fit: they compose to one Gaussian of that precision, whose epsilon grows with it.
        self._fits_unsampled: dict[float, float] = {}

    # ------------------------------------------------------------ queries
    def entries(self, party: str) -> list[LedgerEntry]:
        return list(self._entries.get(party, []))

    def discarded(self, party: str) -> list[LedgerEntry]:
        """The party's entries of rounds discarded on resume (their results never released)."""
        return list(self._discarded.get(party, []))

    def discarded_rounds(self) -> list[int]:
        """Rounds with at least one discarded entry (each attempt that was run again)."""
        return sorted({e.round for entries in self._discarded.values() for e in entries})

    def parties(self) -> list[str]:
        return sorted(set(self._entries) | set(self._discarded) | set(self.caps))

    def spent(self, party: str, extra: Sequence[LedgerEntry] = ()) -> float:
        """The party's epsilon at `delta` over its released entries (and `extra`, if given)."""
        events = [e.event for e in self._entries.get(party, [])]
        events += [e.event for e in extra]
        return epsilon(events, delta=self.delta, accountant=self.accountant)

    def seen(self, party: str, extra: Sequence[LedgerEntry] = ()) -> float:
        """The party's epsilon over everything the aggregator saw: released and discarded
        (released only for a `released_only` party)."""
        return self.spent(party, self._seen_discarded(party) + list(extra))

    def _seen_discarded(self, party: str) -> list[LedgerEntry]:
        if party in self.released_only:
            return []
        return self._discarded.get(party, [])

    def fits(self, party: str, extra: Sequence[LedgerEntry]) -> bool:
        """Whether what the party has spent, discarded rounds included (unless it is
        `released_only`), plus `extra` stays within its cap (True if uncapped)."""
        cap = self.caps.get(party)
        if cap is None:
            return True
        history = (self._entries.get(party, []) + self._seen_discarded(party)
                   + list(extra))
        if history and all(e.sample_rate == 1 for e in history):
            precision = sum(e.steps / e.noise_multiplier ** 2 for e in history)
            if precision <= self._fits_unsampled.get(cap, -1.0):
                return True
            if self.seen(party, extra) > cap * (1 + 1e-9):
                return False
            self._fits_unsampled[cap] = precision
            return True
        mechanisms = {(e.noise_multiplier, e.sample_rate) for e in history}
        key = None
        if len(mechanisms) == 1:
            sigma, q = mechanisms.pop()
            key, steps = (cap, sigma, q), sum(e.steps for e in history)
            if steps <= self._fits.get(key, -1):
                return True
        if self.seen(party, extra) > cap * (1 + 1e-9):
            return False
        if key is not None:
            self._fits[key] = steps
        return True

    def check(self, planned: Iterable[LedgerEntry]) -> None:
        """Refuse with `BudgetExceeded` if any party's planned spend passes its cap."""
        by_party: dict[str, list[LedgerEntry]] = defaultdict(list)
        for entry in planned:
            by_party[entry.party].append(entry)
        for party, extra in sorted(by_party.items()):
            if not self.fits(party, extra):
                cap = self.caps[party]
                before = self.seen(party)
                after = self.seen(party, extra)
                rounds = sorted({e.round for e in extra})
                redone = self.discarded_rounds()
                also = (f" (counting round(s) {redone}, discarded on resume: their results "
                        "were never released, but the aggregator saw them)"
                        if self._seen_discarded(party) else "")
                raise BudgetExceeded(
                    f"Privacy budget of {party!r} would be overspent in round "
                    f"{', '.join(map(str, rounds))}: spent epsilon {before:.4g}{also}, this "
                    f"round would bring it to {after:.4g} (requested {after - before:.4g}), "
                    f"cap {cap:.4g} at delta {self.delta:g}. The round was not run; the model "
                    f"of the previous round is kept.")

    # ------------------------------------------------------------ recording
    def persist_to(self, path: Path) -> None:
        """From now on, append every entry to `path` (a ledger built before its run directory)."""
        if any(self._entries.values()) or any(self._discarded.values()):
            raise ValueError("persist_to must be called before anything is recorded")
        self.path = path
        self._append([{"type": "format", "version": FORMAT_VERSION}])

    def record(self, entries: Sequence[LedgerEntry]) -> None:
        """Add entries and append them to the file, flushed to disk before returning."""
        for entry in entries:
            self._entries[entry.party].append(entry)
        self._append([{"type": "spend", **asdict(e)} for e in entries])

    def discard_after(self, round_number: int, reason: str) -> None:
        """Mark entries of rounds after `round_number` discarded (results never released).

        They leave the released model's epsilon (`spent`) and stay in what the
        aggregator saw (`seen`) and in every cap check (not for a `released_only` party).
        """
        dropped = self._drop_after(round_number)
        if dropped:
            self._append([{"type": "discard", "after_round": round_number, "entries": dropped,
                           "reason": reason}])

    def _drop_after(self, round_number: int) -> int:
        dropped = 0
        for party, entries in self._entries.items():
            kept = [e for e in entries if e.round <= round_number]
            dropped += len(entries) - len(kept)
            self._discarded[party] += [e for e in entries if e.round > round_number]
            self._entries[party] = kept
        return dropped

    def _append(self, lines: list[dict[str, Any]]) -> None:
        if self.path is None or not lines:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------ resuming
    def _stand_in(self, entry: LedgerEntry) -> None:
        """A version 1 spend: also count it, worst case, as what the aggregator saw."""
        if self.stand_in is None or entry.party != self.stand_in[0]:
            return
        _, seen_as, sigma = self.stand_in
        self._entries[seen_as].append(LedgerEntry(
            entry.round, seen_as, f"{entry.protects}, against the aggregator (recorded before "
            "views were; counted at the worst case)", sigma, 1.0, entry.steps))

    def resume_from(self, path: Path, checkpoint_round: int) -> None:
        """Reload the spends in `path` for a run resumed after `checkpoint_round`.

        Spends of later rounds (written, but their result never checkpointed)
        are discarded with a line saying so, and kept as what the aggregator saw
        (`seen`); the file is only ever appended to. Files written before
        discarded spends were kept load the same way: their ``discard`` lines
        mark the same entries. Spends before the file's first ``format`` line
        (version 1, which kept no view of the aggregator) get their `stand_in`;
        a version 1 file gets a ``format`` line before anything more is appended.
        """
        if any(self._entries.values()) or any(self._discarded.values()):
            raise ValueError("resume_from must be called on an empty ledger")
        self.path = path
        version = 1 if path.exists() and path.stat().st_size else FORMAT_VERSION
        if path.exists():
            with path.open(encoding="utf-8") as f:
                for number, text in enumerate(f, start=1):
                    if not text.strip():
                        continue
                    try:
                        line = json.loads(text)
                        kind = line.pop("type")
                        if kind == "spend":
                            entry = LedgerEntry(**line)
                            self._entries[entry.party].append(entry)
                            if version < 2:
                                self._stand_in(entry)
                        elif kind == "discard":
                            self._drop_after(int(line["after_round"]))
                        elif kind == "format":
                            version = max(version, int(line["version"]))
                        else:
                            raise ValueError(f"unknown entry type {kind!r}")
                    except (ValueError, TypeError, KeyError, AttributeError) as exc:
                        raise DataError(f"{path}, line {number}: not a ledger entry ({exc}). "
                                        "The ledger cannot be trusted; refusing to "
                                        "resume.") from None
        if version < FORMAT_VERSION:  # what is appended from now on is version 2
            self._append([{"type": "format", "version": FORMAT_VERSION}])
        self.discard_after(checkpoint_round, f"resumed from the checkpoint of round "
                                             f"{checkpoint_round}; these results were never "
                                             "released")
