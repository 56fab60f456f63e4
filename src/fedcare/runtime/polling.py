"""How often fedcare's Flower processes look for work: quickly while a federation
is exchanging messages, slowly while it is idle.

Flower 1.42 moves every message by polling: the aggregator looks for replies,
each SuperNode looks for messages at the SuperLink, each SuperExec looks for a
task at its own node, and a party that finds a message whose content is not
yet uploaded retries after a 1 s backoff. A fedcare round is several
exchanges (secagg: keys, shares, fit, unmask, and the same again to evaluate),
each paying every one of those waits, so fixed intervals make most of a
deployed round waiting.

A party's next message usually follows its last one within a second (the
next step of the same protocol), so each looker here starts at `FIRST_LOOK`
after activity and doubles its wait up to its idle interval: fast exchanges
cost a few quick looks, an idle federation costs what it did.
"""

from __future__ import annotations

import time
from typing import Any

FIRST_LOOK = 0.02
"""Seconds before the first look after activity."""

OBJECT_RETRY = 0.05
"""Seconds before a party asks again for a message content not yet uploaded
(Flower 1.42: 1 s, ``PULL_INITIAL_BACKOFF``); doubled at each retry up to Flower's cap."""


class Looks:
    """Waits between looks: `FIRST_LOOK` after `activity`, doubling up to `idle`."""

    def __init__(self, idle: float, first: float = FIRST_LOOK) -> None:
        self.idle = idle
        self.first = min(first, idle)
        self.wait = self.first

    def activity(self) -> None:
        """Something happened: look again soon."""
        self.wait = self.first

    def sleep(self) -> None:
        """Wait before the next look; each quiet look waits twice as long, up to `idle`."""
        time.sleep(self.wait)
        self.wait = min(2 * self.wait, self.idle)


class LookingTime:
    """The `time` module as seen by a Flower loop that sleeps `idle_sleep` seconds
    when it found nothing: that sleep follows `looks`, any other sleep (a wait on
    the process's own state) lasts at most `FIRST_LOOK`."""

    def __init__(self, looks: Looks, idle_sleep: float) -> None:
        self.looks = looks
        self.idle_sleep = idle_sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds >= self.idle_sleep:
            self.looks.sleep()
        else:
            time.sleep(min(seconds, FIRST_LOOK))


def quick_object_retries() -> None:
    """Make Flower's object pulls in this process retry a content not yet uploaded after
    `OBJECT_RETRY` seconds instead of 1 s (the default of every caller: a SuperNode
    pulling a message, a ClientApp pulling it from its node, the ServerApp pulling replies).
    """
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects,
                     inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        if defaults is None or "initial_backoff" not in defaults:
            raise RuntimeError(f"{function.__qualname__} takes no initial_backoff: this is not "
                               "the Flower 1.42 fedcare was built on.")
        defaults["initial_backoff"] = OBJECT_RETRY
