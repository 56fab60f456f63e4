"""Shared fixtures, and hypothesis settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# CI must not fail on a random draw nobody can reproduce: the default profile is
# derandomized (the same examples every run). `HYPOTHESIS_PROFILE=explore` draws new
# examples each run, to hunt for bugs locally; a failure prints its reproducer.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write `text` as UTF-8 to ``tmp_path / name`` (sub-folders allowed) and return the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def loopback_factory(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Make `loopback.Loopback` deployments of the three `loopback.SITES`; all stopped after."""
    from loopback import SITES, Loopback

    made: list[Loopback] = []

    def make(tls: bool, name: str = "deployment") -> Loopback:
        made.append(Loopback(tmp_path / name, SITES, tls=tls))
        return made[-1]

    yield make
    for loopback in made:
        loopback.close()
