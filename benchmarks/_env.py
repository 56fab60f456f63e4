"""What every benchmark records about the code it measured (imported by the bench_*.py scripts)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


def git_state() -> dict[str, Any]:
    """Commit measured, and whether src/ had uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=False, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "src_dirty": bool(git("status", "--porcelain", "--", "src"))}


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: how shared the machine was."""
    return [round(x, 2) for x in os.getloadavg()]
