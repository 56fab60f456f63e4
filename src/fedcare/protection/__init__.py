"""How a site's update is protected on its way to the aggregator.

One interface (`fedcare.protection.base`), three schemes selected by
``protection.scheme``: ``plain`` (no protection, for baselines), ``secagg``
(Bonawitz et al. 2017 masking with dropout recovery) and ``ckks``
(homomorphic encryption). Each module states its threat model; the README
has the table.
"""

from __future__ import annotations

import math

from fedcare.config import ProtectionConfig
from fedcare.errors import ConfigError
from fedcare.protection.base import Scheme
from fedcare.protection.identity import SiteIdentity
from fedcare.protection.plain import PlainSum

SCHEMES = ("plain", "secagg", "ckks")

WHO_SEES_WHAT = {
    "plain": "none: the coordinator read every hospital's update.",
    "secagg": "secure aggregation (masks that cancel in the sum): a coordinator that follows "
              "the protocol saw only the sum of the hospitals' updates, unless more than half "
              "of a round's hospitals colluded with it.",
    "ckks": "homomorphic encryption: the coordinator added encrypted updates and saw only "
            "their sum; every hospital holds the decryption key, so one colluding hospital "
            "would show it every update.",
}
"""What the coordinator saw under each scheme's defaults (see `who_sees_what`)."""


def who_sees_what(config: ProtectionConfig) -> str:
    """One sentence for the run summary and report: what the coordinator saw."""
    if config.scheme == "secagg" and config.neighbours:
        k = config.neighbours
        needed = max(k // 2 + 1, math.ceil(round(config.threshold * (k + 1), 9)))
        return (f"secure aggregation with SecAgg+ neighbourhoods of {k} hospitals: a "
                f"coordinator that follows the protocol saw only the sum of the hospitals' "
                f"updates, unless {needed} of one hospital's neighbours colluded with it; a "
                "coordinator that lies about which hospitals dropped out could read one "
                "hospital's update.")
    return WHO_SEES_WHAT[config.scheme]


def build_scheme(config: ProtectionConfig, identity: SiteIdentity | None = None) -> Scheme:
    """The scheme ``[protection]`` names, validated.

    `identity`: a deployed site's certified identity, with which ``secagg`` signs its
    keys and checks the other sites' (`fedcare.protection.identity`).
    """
    if config.scheme == "plain":
        return PlainSum()
    if config.scheme == "secagg":
        from fedcare.protection.secagg import SecAggScheme

        return SecAggScheme(threshold=config.threshold, neighbours=config.neighbours,
                            identity=identity)
    if config.scheme == "ckks":
        from fedcare.protection.ckks import CkksScheme  # TenSEAL takes 0.3 s to import

        return CkksScheme.from_keys(config.keys)
    raise ConfigError(f"protection.scheme must be one of {list(SCHEMES)}; "
                      f"got {config.scheme!r}.")


__all__ = ["SCHEMES", "WHO_SEES_WHAT", "PlainSum", "Scheme", "build_scheme", "who_sees_what"]
