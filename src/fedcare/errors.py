"""One error hierarchy for everything fedcare refuses.

Every message says what was expected, what was found, and where (file, row,
column, site, config key), so a user can fix the input without reading code.
"""

from __future__ import annotations

import math


class FedcareError(Exception):
    """Base class of every error fedcare raises on purpose."""

    public = False
    """Whether the message may travel to another party (a site's refusal to the
    coordinator): True only for error types whose messages are built from the job's
    configuration, the protocol and the site's policy, never from records, file
    contents or local paths. Any other error reaches another party as its category only
    (`fedcare.runtime.flower_site.error_reply`)."""


class ConfigError(FedcareError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class SchemaError(FedcareError, ValueError):
    """Data do not match their schema (wrong type, unknown category, missing column...)."""


class DataError(FedcareError, ValueError):
    """Data cannot be used as given (unreadable file, empty site, all-missing column...)."""


class ProtocolError(FedcareError):
    """A site or the aggregator sent something the protocol does not allow."""


class SiteUnreachable(ProtocolError):
    """A site's node did not answer a message: gone (Flower's node state) or too slow.

    Not the site's refusal: the same node may answer the next time it is asked.
    """


class MessageRefused(ProtocolError):
    """A site refuses a message of the coordinator's for its form (a message about it only)."""

    public = True


class QuorumError(FedcareError):
    """Too few sites took part in a round for it to be aggregated."""


class BudgetExceeded(FedcareError):
    """A privacy budget would be overspent; nothing was run."""

    public = True


class JobRefused(ConfigError):
    """A site cannot run the job's configuration as given (a message about the job only)."""

    public = True


def check_positive(key: str, value: float) -> None:
    """Raise `ConfigError` naming `key` unless `value` is a finite number > 0."""
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key} must be > 0; got {value}.")
