"""fedcare audit: the attacks against configurations, in audit.json and in a run's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcare.cli.main import main
from fedcare.report.html import REPORT_FILE


@pytest.mark.slow
def test_the_default_audit_compares_no_dp_with_dp(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "audit"
    code = main(["audit", "--attacks", "gradient,canary", "--records", "5", "--canaries", "40",
                 "--out", str(out)])
    assert code == 0
    audit = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    rows = {row["configuration"]: row for row in audit["table"]}
    assert list(rows) == ["no DP", "record-level DP, epsilon 1"]
    # batch size 1, plain: the update gives the record away; DP-SGD at epsilon 1 does not
    assert rows["no DP"]["records recovered"] == 1.0
    dp = rows["record-level DP, epsilon 1"]
    assert dp["records recovered"] <= dp["records recovered by prior"] + 0.2
    assert dp["accountant epsilon"] == pytest.approx(1.0, abs=0.01)
    assert dp["epsilon lower bound"] <= dp["accountant epsilon"] and not audit["failed"]
    assert len(audit["findings"]) == 4
    printed = capsys.readouterr().out
    assert "reconstructed 100% of 5 patients' records exactly" in printed
    page = (out / "audit.html").read_text(encoding="utf-8")
    assert "What an attacker could learn" in page and "<svg" in page
    assert (out / "audit.md").read_text(encoding="utf-8").startswith("# What an attacker")


@pytest.mark.slow
def test_an_audit_into_a_run_directory_shows_in_its_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["run", "--rounds", "2", "--no-baselines", "--quiet", "--out", str(run)]) == 0
    assert "What an attacker could learn" not in (run / REPORT_FILE).read_text(encoding="utf-8")
    assert main(["audit", "--run", str(run), "--attacks", "canary", "--canaries", "40"]) == 0
    page = (run / REPORT_FILE).read_text(encoding="utf-8")
    assert "What an attacker could learn" in page and "canary audit" in page
    # the same directory is not audited twice over its results
    assert main(["audit", "--run", str(run), "--attacks", "canary"]) == 2
    assert main(["audit", "--attacks", "rot13", "--out", str(tmp_path / "x")]) == 2
