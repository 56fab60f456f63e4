"""report.html and model_card.md of real runs; rendered in headless Chromium.

Issue 22 (a report a clinician can use): intervals, the confusion matrix, the chance
flag, labelled codes, notes on "-", small sites, colours, the budget cap, audit bars.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.cli.main import main
from fedcare.config import RunConfig
from fedcare.errors import ProtocolError, QuorumError
from fedcare.experiment import run_experiment
from fedcare.federation.site import FitInstructions, FitResult, Site
from fedcare.models import FlatModel
from fedcare.report.html import (
    CHANCE,
    MODEL_CARD_FILE,
    NO_INTERVALS_DEPLOYED,
    ONE_CLASS,
    ONE_CLASS_NOTE,
    REPORT_FILE,
    TEST_SET_NOT_COVERED,
    UNDEFINED_RATE_NOTE,
    write_report,
)
from fedcare.report.tables import results_table

pytestmark = pytest.mark.filterwarnings("ignore::fedcare.privacy.noise.InsecureNoiseWarning")


@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = RunConfig()
    config.federation.rounds = 4
    config.privacy.level = "record"
    config.privacy.epsilon = 1.0  # secure noise: the report states a real guarantee
    return run_experiment(config, out=tmp_path_factory.mktemp("report") / "run").run_dir


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default job (no DP), short: its stratified split leaves switzerland's 15 test
    patients with one class."""
    config = RunConfig()
    config.federation.rounds = 3
    config.baselines.enabled = False
    return run_experiment(config, out=tmp_path_factory.mktemp("report") / "run").run_dir


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def page_of(run_dir: Path) -> str:
    return (run_dir / REPORT_FILE).read_text(encoding="utf-8")


def charts_of(page: str) -> dict[str, str]:
    """Each chart's SVG by its title."""
    return {re.search(r'aria-label="([^"]+)"', chart).group(1): chart  # type: ignore[union-attr]
            for chart in page.split("<svg ")[1:]}


def legend_colours(chart: str) -> dict[str, str]:
    """Series label -> colour, read off a line chart's legend."""
    return {label: colour for colour, label in re.findall(
        r'stroke="(#[0-9a-f]{6})" stroke-width="3"/><text [^>]*class="legend">([^<]+)</text>',
        chart)}


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
    assert "| sex = 1 (male) |" in card and "## Limitations" in card
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


# ----------------------------------------------------------------- issue 22, point 5
def test_the_headline_gives_intervals_that_contain_the_estimates(plain_run: Path) -> None:
    federated = summary_of(plain_run)["federated"]
    pooled, intervals = federated["pooled"], federated["intervals"]
    assert intervals["resamples"] == 1000 and intervals["level"] == 0.95
    for metric in ("accuracy", "roc_auc", "balanced_accuracy", "brier"):
        low, high = intervals[metric]
        assert low < pooled[metric] < high, metric
    low, high = intervals["roc_auc"]
    assert (f"ROC AUC <b>{pooled['roc_auc']:.3f}</b> (95% interval {low:.3f}-{high:.3f})"
            in page_of(plain_run))
    threshold = federated["threshold"]
    for metric in ("sensitivity", "specificity", "ppv", "npv"):
        low, high = intervals[metric]
        assert low <= threshold[metric] <= high, metric
    # seeded: the same run gives the same intervals (the page is regenerated identically)
    assert main(["report", str(plain_run)]) == 0
    assert summary_of(plain_run)["federated"]["intervals"] == intervals


def test_the_confusion_matrix_counts_sum_to_the_test_size(plain_run: Path) -> None:
    federated = summary_of(plain_run)["federated"]
    counts, n = federated["threshold"], federated["pooled"]["n"]
    tp, fp = counts["true_positives"], counts["false_positives"]
    tn, fn = counts["true_negatives"], counts["false_negatives"]
    assert tp + fp + tn + fn == n == sum(s["n_test"] for s in summary_of(plain_run)["sites"])
    assert (tp + tn) / n == pytest.approx(federated["pooled"]["accuracy"])
    assert counts["sensitivity"] == pytest.approx(tp / (tp + fn))
    page = page_of(plain_run)
    assert "predicted risk >= 0.5 counts as positive" in page  # the threshold, stated
    assert (f"<tr><td>total</td><td>{tp + fp}</td><td>{fn + tn}</td><td>{n}</td></tr>"
            in page)
    assert f"<td>sensitivity</td><td>{counts['sensitivity']:.3f}</td>" in page


def test_a_constant_model_is_flagged_no_better_than_chance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A model that calls every patient negative, whatever the record.
    monkeypatch.setattr(FlatModel, "predict_logits",
                        lambda self, x: torch.full((len(x),), -3.0))
    config = RunConfig()
    config.federation.rounds = 1
    config.baselines.enabled = False
    result = run_experiment(config, out=tmp_path / "run")
    headline = re.search(r"<p class='headline[^>]*>(.*?)</p>", page_of(result.run_dir)).group(1)  # type: ignore[union-attr]
    assert headline.startswith(f"<b>{CHANCE}</b>: every patient is predicted negative")
    assert "includes 0.5" in headline  # the AUC interval of a constant model is [0.5, 0.5]
    table = results_table(result)
    federated_row = next(line for line in table.splitlines() if line.startswith("federated"))
    assert federated_row.endswith(CHANCE)
    assert f"federated (fedavg): {CHANCE}: every patient is predicted negative" in table
    assert CHANCE in (result.run_dir / MODEL_CARD_FILE).read_text(encoding="utf-8")
    # nobody is called positive: PPV has no denominator, and the page says so next to its "-"
    assert "<td>PPV</td><td>-</td><td>-</td>" in page_of(result.run_dir)
    assert html.escape(UNDEFINED_RATE_NOTE) in page_of(result.run_dir)


def test_the_default_run_is_not_flagged(plain_run: Path) -> None:
    assert summary_of(plain_run)["federated"]["chance"] is None
    assert CHANCE not in page_of(plain_run)
    assert "<p class='headline' id='headline'>" in page_of(plain_run)


def test_codes_are_labelled_from_the_schema(plain_run: Path) -> None:
    card = (plain_run / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert "| sex = 0 (female) |" in card and "| sex = 1 (male) |" in card  # subgroups
    assert "| cp | 4 | asymptomatic |" in card  # what the codes mean
    page = page_of(plain_run)
    # odds ratios name the category and its reference, and the unit of a numeric input
    assert "<td>cp = 4 (asymptomatic)</td>" in page and "<td>vs cp = 1 (typical angina)</td>" \
        in page
    assert "<td>1 (male) vs 0 (female)</td>" in page
    assert re.search(r"<td>age</td><td>[0-9.]+</td><td>[0-9.]+-[0-9.]+</td><td>1 SD of the "
                     r"pooled training data \([0-9.]+\)</td>", page)


def test_odds_ratios_have_wald_intervals_only_without_dp(plain_run: Path,
                                                         private_run: Path) -> None:
    page = page_of(plain_run)
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([0-9.e+-]+)</td><td>([0-9.e+-]+)-([0-9.e+-]+)"
                      r"</td><td>([^<]+)</td></tr>", page.split("id='odds-ratios'")[1])
    assert len(rows) == 16  # 8 numeric, 3 of them coded 0/1, 5 categories past a reference
    for _, ratio, low, high, _ in rows:
        assert float(low) <= float(ratio) <= float(high)
    assert "95% Wald intervals from the Fisher information" in page
    private = page_of(private_run)
    assert "No confidence intervals" in private and "Wald intervals" not in private
    assert "coefficient_covariance" not in summary_of(private_run)


def test_a_metric_shown_as_dash_carries_its_note(plain_run: Path) -> None:
    summary = summary_of(plain_run)
    assert summary["federated"]["sites"]["switzerland"]["roc_auc"] is None  # one class
    card = (plain_run / MODEL_CARD_FILE).read_text(encoding="utf-8")
    row = next(line for line in card.splitlines() if line.startswith("| switzerland ("))
    assert f"| {ONE_CLASS} |" in row
    assert ONE_CLASS_NOTE in card
    assert html.escape(ONE_CLASS_NOTE) in page_of(plain_run)


def test_small_sites_are_flagged(plain_run: Path) -> None:
    small = re.search(r"<p class='warning' id='small-sites'>(.*?)</p>", page_of(plain_run))
    assert small is not None
    assert "switzerland: 15 patients" in small.group(1) and "cleveland" not in small.group(1)
    assert "| switzerland (small: metrics unreliable) | 15 |" in (
        plain_run / MODEL_CARD_FILE).read_text(encoding="utf-8")


def test_a_site_keeps_its_colour_in_every_chart(private_run: Path) -> None:
    charts = charts_of(page_of(private_run))
    budget = legend_colours(charts["Privacy budget spent (epsilon, delta = 1e-05)"])
    roc = legend_colours(charts["ROC curve"])
    assert set(budget) == {"cleveland", "hungarian", "switzerland", "va"}
    assert all(budget[site] == roc[site] for site in budget)
    for chart in charts.values():
        colours = legend_colours(chart)
        assert all(colours[site] == roc[site] for site in colours)
    assert len(set(roc.values())) == len(roc)  # and different sites, different colours


def test_the_budget_chart_draws_the_cap(private_run: Path) -> None:
    budget = charts_of(page_of(private_run))["Privacy budget spent (epsilon, delta = 1e-05)"]
    assert 'class="level"' in budget and "cap: epsilon = 1" in budget
    assert "cumulative epsilon" in budget
    cap_y = float(re.search(r'y1="([0-9.]+)" y2="[0-9.]+" class="level"', budget).group(1))  # type: ignore[union-attr]
    top = float(re.search(r'<rect x="\d+" y="(\d+)"', budget).group(1))  # type: ignore[union-attr]
    assert cap_y > top  # inside the plot, not on its frame: the axis goes past the cap


def test_intervals_of_a_private_run_say_they_are_not_covered(private_run: Path) -> None:
    assert html.escape(TEST_SET_NOT_COVERED) in page_of(private_run)


def test_the_audit_results_are_a_bar_chart(plain_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(plain_run, copy)
    table = [{"configuration": "no DP", "records recovered": 0.75, "membership AUC": 0.62},
             {"configuration": "record-level DP", "records recovered": 0.0,
              "membership AUC": 0.51}]
    (copy / "audit.json").write_text(json.dumps({"findings": ["an attack did this"],
                                                 "table": table}), encoding="utf-8")
    chart = charts_of(page_of(write_report(copy).parent))["Attack success per configuration"]
    bars = re.findall(r"<title>([^<]+)</title>", chart)
    assert bars == ["no DP: records recovered 0.75", "no DP: membership AUC 0.62",
                    "record-level DP: records recovered 0", "record-level DP: membership AUC 0.51"]
    assert "AUC 0.5: chance" in chart


def test_a_deployed_run_says_why_it_has_no_intervals(plain_run: Path, tmp_path: Path) -> None:
    # What a deployed aggregator's summary holds: sums only, so no per-patient predictions.
    copy = tmp_path / "deployed"
    shutil.copytree(plain_run, copy)
    summary = summary_of(copy)
    summary["sites"] = [s["name"] for s in summary["sites"]]
    del summary["coefficient_covariance"]  # fedcare run's only
    summary["data"] = {"sites": {s: "its own data file" for s in summary["sites"]},
                       "schema_sha256": "0" * 64}
    summary["federated"] = {"pooled": {**summary["federated"]["pooled"], "roc_auc_sites": 3,
                                       "sites": 4}, "sites": {}}
    (copy / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    page = page_of(write_report(copy).parent)
    assert html.escape(NO_INTERVALS_DEPLOYED) in page
    assert "95% interval" not in page and CHANCE not in page
