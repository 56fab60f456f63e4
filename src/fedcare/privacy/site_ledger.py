"""The site ledger: every DP release that left a hospital, over all its jobs, never overspent.

The coordinator's ledger (`fedcare.privacy.ledger`) is the run's record; this
one lives at the hospital and is the one that refuses. Each release (one
training round of one job; later, an analytics answer) is appended as a JSON
line *before* the computation it pays for runs, under an exclusive lock, after
checking that the job's releases and the site's lifetime releases, composed at
the policy's delta, stay within the policy's caps (`SitePolicy.epsilon`,
`SitePolicy.lifetime_epsilon`). A crash after the charge over-counts (the
safe side); nothing is ever removed, so a round the coordinator asks again
after its own restart is charged again: the coordinator saw it twice.

What a release costs is what the party that receives it learns:

- record level: the site's DP-SGD steps of the round (a subsampled Gaussian
  protecting each record, whoever sees the update);
- client level, distributed noise: the site's update with its share of the
  noise, against the coordinator. Under ``plain`` the coordinator reads the
  update itself: multiplier ``sigma / sqrt(needed)``. Under ``secagg`` and
  ``ckks`` it reads only the sum, which carries the full ``sigma`` if the
  cohort it announced is real (`fedcare.privacy.site_level`). Either way with
  sample rate 1: the coordinator knows who it asked.
- client level, central noise (only if the policy trusts the coordinator): the
  federation's subsampled Gaussian, as the coordinator promises to add it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fedcare.errors import BudgetExceeded, DataError
from fedcare.privacy.accounting import GaussianEvent, epsilon
from fedcare.privacy.dpsgd import RecordPrivacy
from fedcare.privacy.policy import SitePolicy
from fedcare.privacy.site_level import SitePrivacy


@dataclass(frozen=True)
class Release:
    """One DP release that left the site.

    Attributes
    ----------
    job : str
        The job's identity (a digest of the coordinator's configuration: the same
        job resumed keeps it).
    round : int
    what : str
        In words: "training round 3".
    noise_multiplier, sample_rate : float
    steps : int
        Compositions of the subsampled Gaussian.
    time : str
        When it was charged (UTC, ISO 8601).
    """

    job: str
    round: int
    what: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: str = ""

    @property
    def event(self) -> GaussianEvent:
        return GaussianEvent(noise_multiplier=self.noise_multiplier,
                             sample_rate=self.sample_rate, steps=self.steps)


def training_release(job: str, round_number: int, *, record: RecordPrivacy | None,
                     site: SitePrivacy | None, local_epochs: int, cohort: int,
                     protection: str) -> Release | None:
    """What one training round releases from this site (None: no DP, nothing charged).

    Parameters
    ----------
    record : RecordPrivacy, optional
        The site's DP-SGD (record level).
    site : SitePrivacy, optional
        Client-level DP (site level).
    local_epochs : int
        Epochs the coordinator asked for this round (record level).
    cohort : int
        Sites the coordinator says it selected this round (client level, distributed).
    protection : str
        ``protection.scheme``.
    """
    what = f"training round {round_number}"
    if record is not None:
        return Release(job, round_number, what, record.noise_multiplier, record.sample_rate,
                       local_epochs * record.steps_per_epoch)
    if site is None:
        return None
    if site.noise == "central":
        return Release(job, round_number, what, site.noise_multiplier, site.sample_rate, 1)
    sigma = site.noise_multiplier
    if protection == "plain":
        sigma /= math.sqrt(site.needed(cohort))
    return Release(job, round_number, what, sigma, 1.0, 1)


class SiteLedger:
    """The site's releases (a JSON-lines file, or memory) checked against its policy.

    Parameters
    ----------
    path : Path or None
        The ledger file, created if missing; None: in memory (Flower's
        simulation engine, where there is no hospital).
    policy : SitePolicy
        Caps, delta and accountant.
    """

    def __init__(self, path: Path | None, policy: SitePolicy) -> None:
        self.path = path
        self.policy = policy
        self._memory: list[Release] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ reading
    def releases(self) -> list[Release]:
        if self.path is None:
            return list(self._memory)
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            return _parse(f, self.path)

    def spent(self, job: str | None = None, extra: Sequence[Release] = ()) -> float:
        """Epsilon at the policy's delta: of one job (or of everything), with `extra`."""
        return self._spent(self.releases(), job, extra)

    def _spent(self, history: Sequence[Release], job: str | None,
               extra: Sequence[Release]) -> float:
        events = [r.event for r in [*history, *extra] if job is None or r.job == job]
        if not events:
            return 0.0
        return epsilon(events, delta=self.policy.delta, accountant=self.policy.accountant)

    # ------------------------------------------------------------ checking, charging
    def check_job(self, job: str, planned: Sequence[Release]) -> None:
        """Refuse a job whose whole plan would pass a cap, before anything is computed.

        The job's own earlier releases (a resumed job) are replaced by its plan:
        what counts is other jobs' releases plus this job's whole plan.
        """
        others = [r for r in self.releases() if r.job != job]
        self._check(others, job, planned, job_history=[], when="the whole job")

    def charge(self, releases: Sequence[Release]) -> None:
        """Check and append `releases`, flushed to disk, under the ledger's lock.

        Raises `BudgetExceeded` (nothing appended) if the job's or the site's
        lifetime epsilon would pass its cap.
        """
        if not releases:
            return
        stamped = [Release(**{**asdict(r), "time": r.time or _now()}) for r in releases]
        with self._locked() as f:
            history = self._memory if f is None else _parse(f, self.path)
            jobs = {r.job for r in stamped}
            assert len(jobs) == 1, "one job's releases at a time"
            job = jobs.pop()
            self._check(history, job, stamped,
                        job_history=[r for r in history if r.job == job],
                        when=", ".join(r.what for r in stamped))
            if f is None:
                self._memory.extend(stamped)
                return
            f.seek(0, os.SEEK_END)
            for release in stamped:
                f.write(json.dumps({"type": "release", **asdict(release)}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _check(self, history: Sequence[Release], job: str, planned: Sequence[Release], *,
               job_history: Sequence[Release], when: str) -> None:
        policy = self.policy
        if not math.isinf(policy.epsilon):
            after = self._spent(job_history, None, planned)
            if after > policy.epsilon * (1 + 1e-9):
                before = self._spent(job_history, None, ())
                raise BudgetExceeded(
                    f"this site's policy caps one job at epsilon {policy.epsilon:g} (delta "
                    f"{policy.delta:g}); this job has spent {before:.4g} here and {when} would "
                    f"bring it to {after:.4g}. Refused before anything was computed.")
        if not math.isinf(policy.lifetime_epsilon):
            after = self._spent(history, None, planned)
            if after > policy.lifetime_epsilon * (1 + 1e-9):
                before = self._spent(history, None, ())
                raise BudgetExceeded(
                    f"this site's lifetime budget is epsilon {policy.lifetime_epsilon:g} "
                    f"(delta {policy.delta:g}) over every job and query; {before:.4g} is "
                    f"spent and {when} would bring it to {after:.4g}. Refused before "
                    "anything was computed.")

    @contextmanager
    def _locked(self) -> Iterator[IO[str] | None]:
        if self.path is None:
            yield None
            return
        with self.path.open("a+", encoding="utf-8") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                f.seek(0)
                yield f
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """Spent and left, per job and over the site's lifetime (for ``fedcare site --budget``)."""
        history = self.releases()
        jobs: dict[str, list[Release]] = {}
        for release in history:
            jobs.setdefault(release.job, []).append(release)
        lifetime = self._spent(history, None, ())
        cap = self.policy.lifetime_epsilon
        return {
            "delta": self.policy.delta, "accountant": self.policy.accountant,
            "lifetime_epsilon": lifetime, "lifetime_cap": cap,
            "left": None if math.isinf(cap) else max(0.0, cap - lifetime),
            "job_cap": self.policy.epsilon,
            "jobs": [{"job": job, "releases": len(items), "first": items[0].time,
                      "last": items[-1].time, "epsilon": self._spent(items, None, ())}
                     for job, items in jobs.items()],
        }


def _parse(f: IO[str], path: Path | None) -> list[Release]:
    releases = []
    for number, text in enumerate(f, start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            if line.pop("type") != "release":
                raise ValueError("not a release")
            releases.append(Release(**line))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"site ledger {path}, line {number}: not a release ({exc}). The "
                            "ledger cannot be trusted; this site refuses every private job "
                            "until it is repaired.") from None
    return releases


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
