"""Results a consortium can read from a deployed run (issue 15, points 4 and 7).

Fast tests run the deployment's ServerApp and ClientApps in Flower's simulation
engine (`fedcare.runtime.flower.run_simulation`); the dead-site test starts real
processes on loopback.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedcare

SRC = Path(fedcare.__file__).parent


# ----------------------------------------------------------------------------- 7. structure
def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_runtime_or_report_module_imports_the_experiment() -> None:
    modules = sorted([*(SRC / "runtime").glob("*.py"), *(SRC / "report").glob("*.py")])
    assert len(modules) >= 10  # the search sees the packages
    upward = {str(path.relative_to(SRC)) for path in modules
              if any(name == "fedcare.experiment" or name.startswith("fedcare.experiment.")
                     for name in imported_modules(path))}
    assert upward == set()
    # The detector finds such an import where there is one (the CLI runs experiments).
    assert "fedcare.experiment" in imported_modules(SRC / "cli" / "main.py")
