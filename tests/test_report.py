"""report.html and model_card.md of real runs; rendered in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fedcare.cli.main import main
from fedcare.config import RunConfig
from fedcare.errors import ProtocolError, QuorumError
from fedcare.experiment import run_experiment
from fedcare.federation.site import FitInstructions, FitResult, Site
from fedcare.report.html import MODEL_CARD_FILE, REPORT_FILE

pytestmark = pytest.mark.filterwarnings("ignore::fedcare.privacy.noise.InsecureNoiseWarning")


@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = RunConfig()
    config.federation.rounds = 4
    config.privacy.level = "record"
    config.privacy.epsilon = 1.0  # secure noise: the report states a real guarantee
    return run_experiment(config, out=tmp_path_factory.mktemp("report") / "run").run_dir


def summary_of(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_the_report_holds_the_plots_and_headline_numbers(private_run: Path) -> None:
    page = (private_run / REPORT_FILE).read_text(encoding="utf-8")
    summary = summary_of(private_run)
    pooled = summary["federated"]["pooled"]  # type: ignore[index]
    assert f"accuracy <b>{pooled['accuracy']:.3f}</b>" in page
    assert f"ROC AUC <b>{pooled['roc_auc']:.3f}</b>" in page
    titles = re.findall(r'<svg [^>]*aria-label="([^"]+)"', page)
    assert titles == ["Privacy budget spent (epsilon, delta = 1e-05)",
                      "Accuracy of the global model", "ROC AUC of the global model",
                      "ROC curve", "Calibration (10 risk bins)"]
    lines = [chart.count("<polyline") for chart in page.split("<svg ")[1:]]
    # a line per hospital in the budget chart, per hospital and pooled in the others (the
    # private run's keyed split leaves switzerland's 10 test patients with both classes)
    assert lines == [4, 5, 5, 5, 5]
    assert html.escape(summary["privacy"]["sentence"]) in page  # type: ignore[index]
    assert "Protection of the updates: <code>plain</code>" in page
    assert "is intact: " in page  # the audit log, checked when the report was written
    # self-contained: nothing to fetch, nothing to run
    assert "<script" not in page and not re.search(r"(src|href)=['\"]?https?:", page)


def test_the_model_card_has_sites_schema_subgroups_and_privacy(private_run: Path) -> None:
    card = (private_run / MODEL_CARD_FILE).read_text(encoding="utf-8")
    summary = summary_of(private_run)
    for site in ("cleveland", "hungarian", "switzerland", "va"):
        assert f"| {site} |" in card
    assert "| chol | numeric | 0, 600 |" in card  # the public bounds
    subgroups = summary["subgroups"]
    assert set(subgroups) == {"sex = 0", "sex = 1", "age < 50", "age 50-64",  # type: ignore[arg-type]
                              "age >= 65"}
    n = sum(v["n"] for k, v in subgroups.items() if k.startswith("age"))  # type: ignore[attr-defined]
    assert n == summary["federated"]["pooled"]["n"]  # type: ignore[index]
    assert "| sex = 1 |" in card and "## Limitations" in card
    assert "switzerland" in card.split("## Limitations")[1]  # 15 test patients: flagged
    assert "<h5>By subgroup (pooled test set)</h5>" in (private_run / REPORT_FILE).read_text(
        encoding="utf-8")


def test_fedcare_report_regenerates_the_same_page(private_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(private_run, copy)
    before = (copy / REPORT_FILE).read_text(encoding="utf-8")
    (copy / REPORT_FILE).unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / REPORT_FILE).read_text(encoding="utf-8") == before
    assert "Wrote " in capsys.readouterr().out
    assert main(["runs", str(tmp_path)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["run", "status", "dataset", "strategy", "protection",
                                  "privacy", "rounds", "accuracy", "ROC", "AUC"]
    accuracy = summary_of(copy)["federated"]["pooled"]["accuracy"]  # type: ignore[index]
    assert listing[1].split()[:2] == ["copy", "completed"]
    assert listing[1].split()[-2] == f"{accuracy:.3f}"
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_a_failed_run_still_gets_a_report_saying_why(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = RunConfig()
    config.federation.rounds = 2
    config.federation.min_sites = 4
    config.baselines.enabled = False
    original = Site.fit

    def fit(self: Site, params: torch.Tensor, instructions: FitInstructions) -> FitResult:
        if self.name == "va":
            raise ProtocolError("va: connection lost")
        return original(self, params, instructions)

    monkeypatch.setattr(Site, "fit", fit)
    with pytest.raises(QuorumError):
        run_experiment(config, out=tmp_path / "run")
    page = (tmp_path / "run" / REPORT_FILE).read_text(encoding="utf-8")
    assert "The run stopped early" in page and "federation.min_sites = 4" in page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(private_run: Path, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        if os.environ.get("FEDCARE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed, and FEDCARE_REQUIRE_BROWSER is set (CI)")
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium)")
    url = (private_run / REPORT_FILE).resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    shot = tmp_path / "report.png"
    rendered = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
                              capture_output=True, text=True, timeout=120, check=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000  # a page of tables and charts, not a blank one
    console = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    accuracy = summary_of(private_run)["federated"]["pooled"]["accuracy"]  # type: ignore[index]
    assert f"accuracy <b>{accuracy:.3f}</b>" in dom
    assert dom.count("<svg") == 5
