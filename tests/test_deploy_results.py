"""Results a consortium can read from a deployed run (issue 15, points 4 and 7).

Fast tests run the deployment's ServerApp and ClientApps in Flower's simulation
engine (`fedcare.runtime.flower.run_simulation`); the dead-site test starts real
processes on loopback.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from loopback import small_config

import fedcare
from fedcare.cli.main import main
from fedcare.experiment import run_experiment
from fedcare.report.html import MODEL_CARD_FILE, REPORT_FILE
from fedcare.report.rundir import result_line

pytest.importorskip("flwr")

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


# ----------------------------------------------------------------------------- 4. results
SITES = ["cleveland", "hungarian", "switzerland", "va"]


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def summary_of(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text(encoding="utf-8")))


def site_mean(metrics: dict[str, dict[str, float]]) -> float:
    aucs = [m["roc_auc"] for m in metrics.values() if m["roc_auc"] is not None]
    return sum(aucs) / len(aucs)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A plain deployed run (Flower simulation) and `fedcare run` of the same config."""
    from fedcare.runtime.flower import run_simulation

    root = tmp_path_factory.mktemp("deployed")
    config = small_config("plain", rounds=2)
    run_simulation(config, n_sites=4, run_dir=root / "deployed")
    run_experiment(config, out=root / "local")
    return root / "deployed", root / "local"


@pytest.mark.slow
def test_a_deployed_run_reports_each_rounds_metrics_as_fedcare_run_does(
        deployed: tuple[Path, Path]) -> None:
    run_dir, local_dir = deployed
    ours, theirs = rows(run_dir), rows(local_dir)
    assert [r["round"] for r in ours] == [1, 2]
    for mine, local in zip(ours, theirs, strict=True):
        pooled, expected = mine["pooled"], local["pooled"]
        # Counts summed over the sites give the pooled test set's metrics exactly ...
        for key in ("accuracy", "balanced_accuracy", "n"):
            assert pooled[key] == expected[key]
        for key in ("brier", "log_loss"):
            assert pooled[key] == pytest.approx(expected[key], rel=1e-9)
        # ... and the AUC is the mean of the sites' own: switzerland's 15 test patients
        # hold one class only, so 3 sites count.
        assert pooled["roc_auc"] == pytest.approx(site_mean(local["sites"]), rel=1e-9)
        assert pooled["roc_auc"] != pytest.approx(expected["roc_auc"], abs=1e-3)
        assert (pooled["roc_auc_sites"], pooled["sites"]) == (3, 4)
    summary = summary_of(run_dir)
    assert summary["federated"]["pooled"] == ours[-1]["pooled"]
    assert "not the AUC of the pooled test set" in summary["federated"]["note"]
    # model.pt carries what `fedcare run`'s does, to use the model on new patients.
    meta = torch.load(run_dir / "model.pt", weights_only=True)
    reference = torch.load(local_dir / "model.pt", weights_only=True)
    for key in ("spec", "model", "schema", "feature_names", "standardization"):
        assert meta[key] == reference[key], key
    assert torch.allclose(meta["params"], reference["params"], atol=1e-6, rtol=0)
    # The data each site used, in words that name no path.
    assert set(summary["data"]["sites"]) == set(SITES)
    assert all("UCI Heart Disease" in text for text in summary["data"]["sites"].values())
    assert len(summary["data"]["schema_sha256"]) == 64
    assert summary["short_rounds"] == []


@pytest.mark.slow
def test_fedcare_report_runs_and_serve_show_a_deployed_run(
        deployed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "deployed"
    shutil.copytree(deployed[0], run_dir)
    (run_dir / REPORT_FILE).unlink()
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    accuracy = summary_of(run_dir)["federated"]["pooled"]["accuracy"]
    assert f"accuracy <b>{accuracy:.3f}</b>" in page
    assert "mean of 3 sites&#x27; AUCs, not the pooled AUC" in page
    assert "Training, round by round" in page and "acc@" not in page  # no per-site metrics
    card = (run_dir / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert "| all sites (pooled) | 250 |" in card
    assert "not the AUC of the pooled test set" in card
    assert "| cleveland | its part of UCI Heart Disease" in card
    capsys.readouterr()
    assert main(["runs", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert f"{accuracy:.3f}" in listing and "(site mean)" in listing
    assert "not the AUC of the pooled test set" in listing
    line = result_line(run_dir)
    assert line.startswith("run completed, 2 of 2 rounds; accuracy ")
    assert "(mean of 3 sites' AUCs) on 250 test patients" in line
    assert str(run_dir.resolve()) in line and "report.html" in line
