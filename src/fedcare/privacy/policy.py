"""A hospital's own privacy policy: what its site node accepts, whatever the coordinator asks.

In a deployment the federation's configuration comes from the coordinator,
and one key of it could weaken every site: ``privacy.secure = false`` makes
the noise a function of the public seed (the coordinator regenerates it and
subtracts it), ``privacy.noise_multiplier`` overrides a calibration,
``privacy.level = "none"`` turns DP off. So the hospital writes its policy
(a TOML file, `SitePolicy.load`, or ``fedcare site`` flags), the site checks
every job against it before it computes anything (`SitePolicy.admit`), and
the site calibrates its own noise from its own cap. What the site actually
releases is charged to its own ledger (`fedcare.privacy.site_ledger`), which
refuses a release that would pass the policy's caps.

Example policy::

    min_level = "record"       # none | record | site: the weakest job this site runs
    epsilon = 1.0              # the most one job may spend at this site
    lifetime_epsilon = 4.0     # the most every job and query together may spend, ever
    delta = 1e-5               # the largest delta the site accepts (its ledger's delta)
    central_noise = false      # client-level DP with the coordinator adding the noise
    max_rounds = 100           # 0: no limit
    max_local_epochs = 5       # 0: no limit
    ledger = "ledger.jsonl"    # relative to the policy file's folder
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, FedcareError
from fedcare.privacy.accounting import ACCOUNTANTS

STRENGTH = {"none": 0, "record": 1, "site": 2}
"""Privacy levels from weakest to strongest: client-level DP at epsilon protects every
record of a site at that epsilon too (a record is part of the site's data)."""


class PolicyRefused(FedcareError):
    """A job or a release would break a site's own privacy policy; nothing was computed."""

    public = True


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts. Every field is the hospital's, never the coordinator's.

    Attributes
    ----------
    min_level : str
        The weakest ``privacy.level`` the site runs: ``none`` (any job), ``record``
        (DP-SGD or client-level DP) or ``site`` (client-level DP only).
    epsilon : float
        The most one job may spend at this site (> 0; ``inf``: no per-job cap).
        At record level the site calibrates its DP-SGD to the smaller of this and
        the job's ``privacy.epsilon``; at site level a job whose epsilon against
        the coordinator exceeds it is refused.
    lifetime_epsilon : float
        The most everything the site ever releases may spend together, over every
        job and query (``inf``: no cap), composed at `delta` in the site ledger.
    delta : float
        The largest delta the site accepts, in (0, 1); a job asking more is refused.
    accountant : str
        ``pld`` or ``rdp``, for the site's own composition.
    central_noise : bool
        Accept client-level DP with ``privacy.noise = "central"``, where the
        coordinator sees each clipped update without noise and must be trusted to
        add it. False (default): only distributed noise, added at the site.
    seeded_noise : bool
        Accept ``privacy.secure = false``: noise the coordinator can regenerate.
        For loopback tests only; ``fedcare site`` refuses it outside ``--insecure``.
    max_rounds, max_local_epochs : int
        Limits on the job's plan (0: none).
    ledger : str
        The site ledger's file (relative paths: to the policy file's folder).
    """

    min_level: str = "none"
    epsilon: float = math.inf
    lifetime_epsilon: float = math.inf
    delta: float = 1e-5
    accountant: str = "pld"
    central_noise: bool = False
    seeded_noise: bool = False
    max_rounds: int = 0
    max_local_epochs: int = 0
    ledger: str = ""

    def __post_init__(self) -> None:
        if self.min_level not in STRENGTH:
            raise ConfigError(f"site policy: min_level must be one of {list(STRENGTH)}; got "
                              f"{self.min_level!r}.")
        for key in ("epsilon", "lifetime_epsilon"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"site policy: {key} must be a number > 0 (inf: no cap); "
                                  f"got {value!r}.")
        if not 0 < self.delta < 1:
            raise ConfigError(f"site policy: delta must be in (0, 1); got {self.delta!r}.")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"site policy: accountant must be one of {list(ACCOUNTANTS)}; "
                              f"got {self.accountant!r}.")
        for key in ("max_rounds", "max_local_epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"site policy: {key} must be an integer >= 0 (0: no limit); "
                                  f"got {value!r}.")

    # ------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "site policy") -> SitePolicy:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of "
                              f"{sorted(known)}.")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            default = known[key].default
            if isinstance(default, float) and isinstance(value, int) \
                    and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise ConfigError(f"{source}: {key} must be {type(default).__name__}; found "
                                  f"{value!r}.")
            values[key] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("site policy", source, 1)) from None

    @classmethod
    def load(cls, path: str | Path) -> SitePolicy:
        """Read a policy file; a relative ``ledger`` is resolved against its folder."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"site policy {path} does not exist.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"site policy {path} is not valid TOML: {exc}.") from None
        policy = cls.from_dict(raw, source=f"site policy {path}")
        if policy.ledger and not Path(policy.ledger).is_absolute():
            policy = dataclasses.replace(
                policy, ledger=str(path.resolve().parent / policy.ledger))
        return policy

    def to_toml(self) -> str:
        lines = []
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, float) and math.isinf(value):
                text = "inf"
            elif isinstance(value, str):
                text = f'"{value}"' if '"' not in value and "\\" not in value else repr(value)
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """The policy in one line, for the site operator's console."""
        cap = "no per-job cap" if math.isinf(self.epsilon) else f"epsilon <= {self.epsilon:g} a job"
        life = ("no lifetime cap" if math.isinf(self.lifetime_epsilon)
                else f"<= {self.lifetime_epsilon:g} over its lifetime")
        level = {"none": "jobs with or without DP", "record": "only jobs with DP (record or "
                 "site level)", "site": "only client-level DP jobs"}[self.min_level]
        noise = "CSPRNG noise only" if not self.seeded_noise else "SEEDED NOISE ALLOWED (tests)"
        central = ", coordinator-added noise accepted" if self.central_noise else ""
        return (f"runs {level}; {cap}, {life}, delta <= {self.delta:g}; {noise}{central}")

    # ------------------------------------------------------------ checking a job
    def admit(self, config: RunConfig) -> RunConfig:
        """The job as this site will run it, or `PolicyRefused` saying which rule refused.

        Record level: the epsilon the site calibrates to is lowered to the policy's
        cap, and the job's ``privacy.noise_multiplier`` is kept only if it is larger
        than what the site calibrates (`fedcare.runtime.flower_site.SiteNode`).
        Everything else that would weaken the policy refuses the job.
        """
        p, f = config.privacy, config.federation
        if STRENGTH.get(p.level, -1) < STRENGTH[self.min_level]:
            raise PolicyRefused(
                f"this site's policy requires privacy.level {self.min_level!r} or stronger; "
                f"the job asks for privacy.level = {p.level!r}.")
        if self.max_rounds and f.rounds > self.max_rounds:
            raise PolicyRefused(f"the job plans {f.rounds} rounds; this site's policy allows "
                                f"at most {self.max_rounds} (max_rounds).")
        if self.max_local_epochs and f.local_epochs > self.max_local_epochs:
            raise PolicyRefused(f"the job plans {f.local_epochs} local epochs a round; this "
                                f"site's policy allows at most {self.max_local_epochs} "
                                "(max_local_epochs).")
        local = RunConfig.from_dict(config.to_dict())
        if p.level == "none":
            return local
        if not p.secure and not self.seeded_noise:
            raise PolicyRefused(
                "the job asks for seeded noise (privacy.secure = false): noise drawn from the "
                "job's public seed can be regenerated and subtracted by the coordinator, so "
                "it protects no one. This site draws its noise from its CSPRNG only.")
        if p.delta > self.delta:
            raise PolicyRefused(f"the job asks for privacy.delta = {p.delta:g}; this site's "
                                f"policy allows at most {self.delta:g}.")
        if p.level == "site" and p.noise == "central" and not self.central_noise:
            raise PolicyRefused(
                "the job asks for client-level DP with central noise (privacy.noise = "
                "'central'): the coordinator would see this site's clipped update without "
                "noise and would have to be trusted to add it. This site's policy accepts "
                "only distributed noise (set central_noise = true in the policy to trust "
                "the coordinator).")
        if p.level == "record":
            # The site's own ledger composes with its own accountant: calibrate with it,
            # or the last round could pass the cap by the accountants' difference.
            local.privacy.epsilon = min(p.epsilon, self.epsilon)
            local.privacy.accountant = self.accountant
        return local
