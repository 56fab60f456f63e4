"""From ``[privacy]`` in the config to calibrated mechanisms, caps and a guarantee in words.

Calibration assumes the worst case for each party: a site takes part in every
round. With ``federation.fraction < 1`` at record level a site usually takes
part in fewer, and its ledger then shows less spent than its cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedcare.config import RunConfig
from fedcare.data.site_data import FederatedData
from fedcare.errors import ConfigError, check_positive
from fedcare.privacy.accounting import ACCOUNTANTS, GaussianEvent, epsilon, noise_multiplier
from fedcare.privacy.dpsgd import CLIPPING_METHODS, RecordPrivacy
from fedcare.privacy.ledger import LedgerEntry, PrivacyLedger
from fedcare.privacy.noise import NoiseSource, noise_source
from fedcare.privacy.site_level import SitePrivacy
from fedcare.seeding import NOISE, derive_seed

LEVELS = ("none", "record", "site")
RECORD_CAVEATS = ("Each hospital's number of training records is treated as public, as in "
                  "standard DP-SGD (it sets the sampling rate and the averaging weight); "
                  "accuracy measured on a hospital's held-out test records is reported exactly "
                  "and not covered.")
SITE_CAVEATS = ("Accuracy and the other metrics measured on each hospital's held-out test "
                "records, and the number of those records (which tells roughly how large the "
                "hospital is), are reported exactly and not covered.")
"""What a private run still reveals. Preprocessing is not on the list: a private run
standardises with the schema's public ranges (`fedcare.data.preprocess`)."""
SITE_PUBLIC = ("the number of hospitals", "the number of rounds", "the sampling rate")
"""What a site-level run publishes about its sites beyond the model (`PrivacyPlan.guarantee`)."""
SITE_NOT_RELEASED = ("which hospitals took part in each round",
                     "each hospital's number of training records")
"""What the site-level guarantee protects and no artefact for users of the model holds: the
cohorts (publishing them would forfeit the amplification by sampling the epsilon counts on)
and the sites' sizes. The coordinator's own audit log keeps the cohorts."""
SITE_RELEASE_WORDS = (
    "Public: " + ", ".join(SITE_PUBLIC) + ". Not released to users of the model: "
    + " and ".join(SITE_NOT_RELEASED) + "; the coordinator knows the cohorts (its audit "
    "log, audit_log.jsonl, records them and is not for users of the model), which is why any "
    "epsilon against it is computed without sampling amplification.")
"""How the site-level sentence says what is public and what is not released."""
BASELINES_NOT_PRIVATE = (
    "NOT private: the pooled and single-site baselines were trained without differential "
    "privacy on the same training records as the federated model and their metrics are exact "
    "(epsilon is infinite for them); they were asked for explicitly (baselines.enabled = "
    "true) and must be shown only to those who may see the hospitals' data.")
"""What every artefact of a private run says next to its baselines."""
FEDERATION = "federation"
"""Ledger party of client-level DP: the guarantee covers every site alike."""
AGGREGATOR = "aggregator"
"""Ledger party of what the aggregator saw of one site under client-level distributed noise:
one entry per round it read payloads or a sum, unsampled (it knows the cohort)."""


@dataclass
class PrivacyPlan:
    """Everything the runtime needs to run a private federation.

    Attributes
    ----------
    level : str
        ``record`` or ``site``.
    delta, accountant :
        As configured.
    record : dict
        Site name -> its DP-SGD settings (record level).
    site : SitePrivacy or None
        Client-level settings (site level).
    caps : dict
        Ledger party -> epsilon cap.
    rounds : int
        Rounds the calibration planned for.
    protection : str
        ``protection.scheme``: under ``secagg`` and ``ckks`` the aggregator
        sees only the sum of the site payloads, which changes what site-level
        distributed noise guarantees against it.
    secure : bool
        ``privacy.secure``: False when the noise and the sampling are seeded
        streams that anyone holding the configuration regenerates; then
        `guarantee` states no guarantee at all.
    """

    level: str
    delta: float
    accountant: str
    rounds: int
    protection: str = "plain"
    secure: bool = True
    record: dict[str, RecordPrivacy] = field(default_factory=dict)
    site: SitePrivacy | None = None
    caps: dict[str, float] = field(default_factory=dict)

    def guarantee(self, ledger: PrivacyLedger) -> dict[str, Any]:
        """The guarantee as numbers and as one sentence a clinician can read.

        With seeded noise (``secure = False``) there is none: the sentence says
        the run is NOT private, ``private`` is False, and the numbers stay as
        what the same mechanism would give with secure noise (`seeded_label`).
        """
        return self._stated(self._mechanism_guarantee(ledger))

    def _stated(self, claim: dict[str, Any]) -> dict[str, Any]:
        if self.secure:
            return {**claim, "private": True, "noise_source": "secure"}
        return seeded_label(claim)

    def _mechanism_guarantee(self, ledger: PrivacyLedger) -> dict[str, Any]:
        """What the mechanism guarantees when its noise and sampling are secure."""
        spent = {party: ledger.spent(party) for party in ledger.parties()}
        if self.level == "record":
            worst = max(spent.values(), default=0.0)
            sentence = (
                f"Each patient's record at each hospital is protected by differential privacy "
                f"with epsilon = {worst:.2f} and delta = {self.delta:g} (the largest over the "
                f"{len(spent)} hospitals): the released model and every update a hospital sent "
                f"reveal almost nothing more about any one patient than they would without "
                f"that patient, to anyone: the coordinator, the other hospitals and every user "
                f"of the model. {RECORD_CAVEATS}")
            seen = {party: ledger.seen(party) for party in spent}
            sentence += _resubmitted_words(ledger, max(seen.values(), default=0.0), "record")
            return {"level": "record", "protects": "each patient at each site",
                    "against": "anyone who sees the updates or the model",
                    "epsilon": worst, "delta": self.delta, "accountant": self.accountant,
                    "epsilon_per_site": spent, "caps": self.caps,
                    "epsilon_against_aggregator": max(seen.values(), default=0.0),
                    "epsilon_against_aggregator_per_site": seen,
                    "discarded_rounds": ledger.discarded_rounds(),
                    "mechanism": {name: _record_dict(p) for name, p in self.record.items()},
                    "sentence": sentence}
        assert self.site is not None
        eps = spent.get(FEDERATION, 0.0)
        against_aggregator = self._against_aggregator(ledger)
        if against_aggregator is None:
            aggregator_words = ("The coordinator itself sees each hospital's clipped update "
                                "without noise and must be trusted to add the noise.")
        elif math.isinf(against_aggregator):
            aggregator_words = "The coordinator sees each hospital's update unprotected."
        elif self.protection == "plain":
            aggregator_words = (f"The coordinator, which sees each hospital's own noised "
                                f"update, is held to epsilon = {against_aggregator:.2f} per "
                                f"hospital.")
        else:
            aggregator_words = (f"The coordinator sees only the sum of the hospitals' noised "
                                f"updates ({self.protection}) and is held to epsilon = "
                                f"{against_aggregator:.2f} per hospital"
                                + (", unless it colludes with a hospital, which holds the "
                                   "decryption key" if self.protection == "ckks" else "")
                                + ".")
        sentence = (
            f"Each hospital's whole contribution (all of its patients together) is protected by "
            f"differential privacy with epsilon = {eps:.2f} and delta = {self.delta:g} against "
            f"anyone who sees the released model: it reveals almost nothing more about any one "
            f"hospital's data than a model trained without that hospital. {aggregator_words} "
            f"{SITE_RELEASE_WORDS} {SITE_CAVEATS}")
        sentence += _resubmitted_words(ledger, against_aggregator, "site")
        return {"level": "site", "protects": "each site's whole dataset",
                "against": "anyone who sees the model", "epsilon": eps, "delta": self.delta,
                "accountant": self.accountant,
                "epsilon_against_aggregator": against_aggregator,
                "discarded_rounds": ledger.discarded_rounds(),
                "noise": self.site.noise, "clip_norm": self.site.clip_norm,
                "adaptive_clipping_quantile": self.site.target_quantile or None,
                "noise_multiplier": self.site.noise_multiplier,
                "sample_rate": self.site.sample_rate,
                "public": list(SITE_PUBLIC), "not_released": list(SITE_NOT_RELEASED),
                "not_covered": "metrics on each site's test records, and their number",
                "sentence": sentence}

    def _against_aggregator(self, ledger: PrivacyLedger) -> float | None:
        """Epsilon per site against the aggregator, from what it actually saw.

        Central noise: None (no guarantee; the aggregator adds the noise).
        Distributed: the composition of the ledger's `AGGREGATOR` entries, one
        per round in which it read payloads (plain: each with the noise of
        that round's actual cohort, ``sigma / sqrt(n - t)``) or a revealed sum
        (secagg, ckks: ``sigma``), the count slot of adaptive clipping included
        (`SitePrivacy.aggregator_view`), rounds discarded on resume included
        (`PrivacyLedger.seen`). Unsampled: the aggregator knows who was
        selected. A site in every such round is the worst case, which this is.
        """
        assert self.site is not None
        if self.site.noise == "central":
            return None
        return ledger.seen(AGGREGATOR)


def _resubmitted_words(ledger: PrivacyLedger, against_aggregator: float | None,
                       level: str) -> str:
    """What the guarantee sentence adds when a resume ran rounds again (else nothing)."""
    rounds = ledger.discarded_rounds()
    if not rounds or against_aggregator is None:
        return ""
    which = ", ".join(map(str, rounds))
    if level == "record":
        return (f" A resumed run discarded and ran again round(s) {which}: the model never "
                f"contained those attempts, but the coordinator saw their updates; counting "
                f"them, the epsilon against the coordinator is {against_aggregator:.2f} (the "
                f"largest over the hospitals).")
    return (f" The coordinator's epsilon counts the attempts of round(s) {which} that a "
            f"resumed run discarded and ran again: the model never contained them, but the "
            f"coordinator saw them.")


NOT_PRIVATE = "NOT private (seeded noise, for testing)"
"""How every artefact of a run with ``privacy.secure = false`` begins its privacy statement."""


def seeded_label(claim: dict[str, Any]) -> dict[str, Any]:
    """A mechanism's guarantee restated for a run whose noise was seeded: no guarantee.

    Seeded noise and sampling (`noise_factory` with ``secure = false``) are a
    function of the seed in the run's configuration: whoever reads
    ``config.toml`` regenerates every draw and subtracts it, so the released
    model is as revealing as one trained without noise. The numbers are kept,
    for tests and for comparing settings, under the statement that they are not
    a guarantee of this run; ``protects`` and ``against`` say nobody.

    Parameters
    ----------
    claim : dict
        `PrivacyPlan.guarantee`'s dictionary as it would read with secure noise.
    """
    would = (f"epsilon = {claim['epsilon']:.2f} and delta = {claim['delta']:g}"
             + (" (the largest over the hospitals)" if claim["level"] == "record" else ""))
    sentence = (f"{NOT_PRIVATE}: the noise and the sampling of this run were generated from the "
                f"seed in its configuration (privacy.secure = false), so anyone who reads the "
                f"configuration regenerates them bit for bit and subtracts them; the model and "
                f"the updates reveal as much as without noise. With secure noise the same "
                f"mechanism would give {would}; that is not a guarantee of this run.")
    return {**claim, "private": False, "noise_source": "seeded",
            "protects": "nobody (seeded noise)", "against": "nobody",
            "would_protect": claim["protects"],
            "not_a_guarantee": "epsilon and delta are what the mechanism would give with "
                               "secure noise; this run's noise is seeded and gives no privacy",
            "sentence": sentence}


def _record_dict(p: RecordPrivacy) -> dict[str, float]:
    return {"clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier,
            "sample_rate": p.sample_rate, "steps_per_epoch": p.steps_per_epoch}


Calibration = tuple[float, float, float, int, str]
"""What a noise multiplier is calibrated for: (epsilon, delta, sample rate, steps, accountant)."""

_CALIBRATED: dict[Calibration, float] = {}
"""Noise multipliers calibrated in this process (each costs the accountant 1-5 s)."""


def _calibrate(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    key = (target, delta, q, steps, accountant)
    if key not in _CALIBRATED:
        _CALIBRATED[key] = noise_multiplier(epsilon=target, delta=delta, sample_rate=q,
                                            steps=steps, accountant=accountant)
    return _CALIBRATED[key]


def calibrations() -> dict[Calibration, float]:
    """The noise multipliers calibrated so far in this process, to be kept elsewhere.

    A Flower SuperNode answers every message in a new process; it keeps these in
    its node state (`fedcare.runtime.flower_client`) so that a site calibrates
    each mechanism once per run, not once per message.
    """
    return dict(_CALIBRATED)


def remember_calibrations(known: dict[Calibration, float]) -> None:
    """Take noise multipliers calibrated earlier (`calibrations`) as already computed.

    Only a node's own earlier results belong here: a wrong value would set the
    noise of a mechanism, so each must be a finite number > 0.
    """
    for key, sigma in known.items():
        if not (isinstance(sigma, float) and math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"a remembered noise multiplier for {key} is {sigma!r}; "
                              "expected a finite number > 0.")
        _CALIBRATED[key] = sigma


def build_privacy_plan(config: RunConfig, data: FederatedData) -> PrivacyPlan | None:
    """Validate ``[privacy]`` and calibrate every mechanism; None when level = "none"."""
    plan = _validated_plan(config, [s.name for s in data.sites])
    if plan is None or plan.level == "site":
        return plan
    p, f = config.privacy, config.federation
    if p.clipping not in CLIPPING_METHODS:
        raise ConfigError(f"privacy.clipping must be one of {list(CLIPPING_METHODS)}; got "
                          f"{p.clipping!r}.")
    for site in data.sites:
        cap = min(p.epsilon, p.site_epsilon.get(site.name, math.inf))
        if not cap > 0:
            raise ConfigError(f"privacy.site_epsilon.{site.name} must be > 0; got {cap}.")
        q, per_epoch = RecordPrivacy.sampling(site.n_train, f.batch_size)
        steps = f.rounds * f.local_epochs * per_epoch
        sigma = p.noise_multiplier or _calibrate(cap, p.delta, q, steps, p.accountant)
        plan.record[site.name] = RecordPrivacy(p.clip_norm, sigma, q, per_epoch)
        plan.caps[site.name] = cap
    return plan


def build_site_level_plan(config: RunConfig, sites: Sequence[str]) -> PrivacyPlan:
    """The client-level plan of ``privacy.level = "site"`` from the sites' names alone.

    What an aggregator that never holds the sites' data can calibrate: client-level
    DP needs only the number of sites K (no site's size, which the guarantee
    protects). Same validation and calibration as `build_privacy_plan`.

    Parameters
    ----------
    config : RunConfig
        With ``privacy.level = "site"``.
    sites : sequence of str
        Every site of the federation, selected or not (K is its length).
    """
    if config.privacy.level != "site":
        raise ConfigError(f"a client-level plan needs privacy.level = 'site'; got "
                          f"{config.privacy.level!r}.")
    plan = _validated_plan(config, list(sites))
    assert plan is not None and plan.site is not None
    return plan


def _validated_plan(config: RunConfig, names: list[str]) -> PrivacyPlan | None:
    """The checks every level shares; the whole plan at site level, an empty one at record
    level (its mechanisms need each site's size), None at level "none"."""
    p, f = config.privacy, config.federation
    if p.level not in LEVELS:
        raise ConfigError(f"privacy.level must be one of {list(LEVELS)}; got {p.level!r}.")
    if p.level == "none":
        return None
    check_positive("privacy.epsilon", p.epsilon)
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1); got {p.delta}.")
    if p.accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant must be one of {list(ACCOUNTANTS)}; got "
                          f"{p.accountant!r}.")
    if p.noise_multiplier < 0:
        raise ConfigError(f"privacy.noise_multiplier must be >= 0 (0: calibrate from epsilon); "
                          f"got {p.noise_multiplier}.")
    unknown = sorted(set(p.site_epsilon) - set(names))
    if unknown:
        raise ConfigError(f"privacy.site_epsilon names unknown site(s) {unknown}; the sites are "
                          f"{names}.")
    plan = PrivacyPlan(p.level, p.delta, p.accountant, f.rounds, config.protection.scheme,
                       secure=p.secure)
    if p.target_quantile and p.level != "site":
        raise ConfigError("privacy.target_quantile (adaptive clipping) applies to "
                          "privacy.level = 'site' only.")
    if p.level == "record":
        return plan
    if p.site_epsilon:
        raise ConfigError("privacy.site_epsilon caps a site's record-level budget; with "
                          "privacy.level = 'site' there is one budget for the federation.")
    if p.noise == "central" and config.protection.scheme == "ckks":
        raise ConfigError(
            "privacy.noise = 'central' cannot be combined with protection.scheme = 'ckks': "
            "the hospital that decrypts the sum sees it before the aggregator adds the noise, "
            "so it reads the other hospitals' clipped updates without noise (with 2 hospitals, "
            "the other's exact update). Choose privacy.noise = 'distributed' (each hospital "
            "noises its own update, so the decrypted sum carries the full noise), or "
            "protection.scheme = 'secagg' (no hospital sees the sum; the aggregator, trusted "
            "with central noise, does).")
    sigma = p.noise_multiplier or _calibrate(p.epsilon, p.delta, f.fraction, f.rounds,
                                             p.accountant)
    plan.site = SitePrivacy(p.clip_norm, sigma, f.fraction, len(names), p.noise,
                            p.dropout_tolerance, p.target_quantile, p.clip_lr, p.count_noise)
    plan.caps[FEDERATION] = p.epsilon
    return plan


def noise_factory(config: RunConfig) -> Callable[[int, int], NoiseSource]:
    """Noise for (round, party): one CSPRNG stream, or seeded streams when ``secure = false``.

    Seeded streams are keyed by round and party so a resumed run draws what
    an uninterrupted one would have; they are predictable, hence not private.
    """
    if config.privacy.secure:
        shared = noise_source(secure=True)
        return lambda round_number, party: shared
    return lambda round_number, party: noise_source(
        secure=False, seed=derive_seed(config.seed, NOISE, round_number, party))


def record_entry(round_number: int, site: str, privacy: RecordPrivacy,
                 local_epochs: int) -> LedgerEntry:
    return LedgerEntry(round_number, site, f"each patient at {site}", privacy.noise_multiplier,
                       privacy.sample_rate, local_epochs * privacy.steps_per_epoch)


def site_entry(round_number: int, privacy: SitePrivacy) -> LedgerEntry:
    return LedgerEntry(round_number, FEDERATION, "each site's whole dataset",
                       privacy.noise_multiplier, privacy.sample_rate, 1)


def aggregator_cap(plan: PrivacyPlan) -> float | None:
    """The cap on the `AGGREGATOR` party: the most an uninterrupted run can show it.

    Every site in every one of the planned rounds, each round's cohort all K
    sites (plain: the least noise per payload). An honest run never meets it;
    rounds a crash made the aggregator see twice count against it, so a
    crash loop stops there. None without client-level distributed noise. An
    accountant call: made where the aggregator's ledger is built, not in every
    site's process that builds the plan.
    """
    if plan.site is None:
        return None
    worst = plan.site.aggregator_view(plan.site.n_sites, protection=plan.protection)
    if worst is None:
        return None
    return epsilon([GaussianEvent(noise_multiplier=worst, sample_rate=1.0, steps=plan.rounds)],
                   delta=plan.delta, accountant=plan.accountant)


def aggregator_entry(round_number: int, privacy: SitePrivacy, *, cohort: int,
                     protection: str) -> list[LedgerEntry]:
    """What the aggregator sees of one site in a round of `cohort` sites (none: central
    noise, where it is trusted, or an empty cohort)."""
    view = privacy.aggregator_view(cohort, protection=protection) if cohort else None
    if view is None:
        return []
    return [LedgerEntry(round_number, AGGREGATOR, "each site's whole dataset, against the "
                        "aggregator", view, 1.0, 1)]
