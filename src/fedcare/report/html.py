"""``report.html`` and ``model_card.md``: a run explained to a clinician or an ethics board.

Everything comes from the run directory (`write_report` can run again on any
finished or failed run: ``fedcare report RUN_DIR``). The page is one file:
inline CSS and SVG, no script, nothing fetched, so it opens from disk on an
offline workstation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import torch

from fedcare.data.infer import MAX_VOCABULARY
from fedcare.evaluation import (
    NO_ODDS_RATIO_INTERVALS,
    THRESHOLD,
    WALD_NOTE,
    chance_reason,
    odds_ratios,
)
from fedcare.privacy.accounting import GaussianEvent, epsilon, epsilon_for_plot
from fedcare.privacy.ledger import LEDGER_FILE
from fedcare.protection import WHO_SEES_WHAT
from fedcare.report.auditlog import AUDIT_LOG_FILE, verify
from fedcare.report.data_loss import loss_section
from fedcare.report.rundir import CURVES_FILE
from fedcare.report.svg import bar_chart, colour_map, line_chart

REPORT_FILE = "report.html"
MODEL_CARD_FILE = "model_card.md"
AUDIT_FILE = "audit.json"
PER_SITE_NOT_COVERED = ("Per-site metrics (each site's own test patients, and how many there "
                        "are) are exact measurements, not covered by the site-level "
                        "differential privacy guarantee.")
MAX_SITE_LINES = 10
"""Per-site lines drawn in one chart; beyond, only the pooled line."""
SMALL_SITE = 50
"""Sites with fewer test patients than this are flagged: their metrics are unreliable."""
SMALL_NOTE = "small: metrics unreliable"
ONE_CLASS = "- (one class)"
"""How a metric undefined on its test set shows (ROC AUC or balanced accuracy on one class)."""
ONE_CLASS_NOTE = ("\"- (one class)\": that test set holds patients of one class only, so ROC "
                  "AUC and balanced accuracy (which compare the two) are not defined; "
                  "\"-\" alone: no test patients or not computed.")
CHANCE = "NO BETTER THAN CHANCE"
UNDEFINED_RATE_NOTE = ("\"-\": not defined, no patient in its denominator (PPV when no "
                       "patient is called positive, NPV when none is called negative, "
                       "sensitivity or specificity when the test set lacks that class); an "
                       "interval shows \"-\" when no resample defines it.")
TEST_SET_NOT_COVERED = ("Intervals, like the test metrics, are exact statistics of the "
                        "held-out test patients, not covered by the differential privacy "
                        "guarantee.")
NO_INTERVALS_DEPLOYED = ("No intervals and no confusion matrix: in a deployment only sums "
                         "over the sites' test patients reach the coordinator, and a "
                         "bootstrap needs each test patient's prediction.")
MAX_BUDGET_POINTS = 20
"""Rounds at which the budget chart computes the cumulative epsilon (each point of each
party costs one accountant call: 0.04 s with PLD, 0.15 s with RDP)."""


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float:
    value = (metrics or {}).get(name)
    return math.nan if value is None else float(value)


def _metric_text(metrics: Mapping[str, Any] | None, name: str) -> str:
    """A metric as a table shows it; undefined with both classes missing: `ONE_CLASS`."""
    value = _metric(metrics, name)
    if math.isfinite(value):
        return f"{value:.3f}"
    n = (metrics or {}).get("n")
    return ONE_CLASS if n and name in ("roc_auc", "balanced_accuracy") else "-"


def _interval(intervals: Mapping[str, Any] | None, name: str) -> str:
    pair = (intervals or {}).get(name)
    return f"{pair[0]:.3f}-{pair[1]:.3f}" if pair else "-"


def _chance(evaluation: Mapping[str, Any] | None) -> str:
    """"" or why a summary's evaluation is no better than chance (recorded, else from its
    pooled metrics: a deployed run has no confusion matrix or intervals)."""
    evaluation = evaluation or {}
    if "chance" in evaluation:
        return str(evaluation["chance"] or "")
    return chance_reason(evaluation.get("pooled") or {})


def _subgroup_label(name: str, labels: Mapping[str, Mapping[str, str]]) -> str:
    """``sex = 0`` as ``sex = 0 (female)`` when the schema labels the code."""
    column, _, code = name.partition(" = ")
    meaning = labels.get(column, {}).get(code)
    return f"{name} ({meaning})" if meaning else name


def site_colours(sites: Sequence[str], others: Sequence[str] = ()) -> dict[str, str]:
    """One colour per line across every chart of a report: pooled, then each site, then any
    other ledger party (``federation``, ``aggregator``)."""
    return colour_map(["pooled", *sites, *[o for o in others if o not in sites]])


def budget_per_round(run_dir: Path, delta: float, accountant: str) -> dict[str, Any]:
    """Cumulative epsilon per ledger party after each round, from ``privacy_ledger.jsonl``.

    Spends of rounds the ledger later discarded (never released) are left out.
    """
    spends: list[dict[str, Any]] = []
    for line in _read_json_lines(run_dir / LEDGER_FILE):
        if line.get("type") == "spend":
            spends.append(line)
        elif line.get("type") == "discard":
            spends = [s for s in spends if s["round"] <= line["after_round"]]
    rounds = sorted({s["round"] for s in spends})
    if len(rounds) > MAX_BUDGET_POINTS:
        step = math.ceil(len(rounds) / MAX_BUDGET_POINTS)
        rounds = sorted(set(rounds[::step]) | {rounds[-1]})
    series: dict[str, tuple[list[float], list[float]]] = {}
    known: dict[tuple[tuple[float, float, int], ...], float] = {}  # parties that spent alike
    for party in sorted({s["party"] for s in spends}):
        mine = [s for s in spends if s["party"] == party]
        xs, ys = [], []
        for r in rounds:
            history = tuple(sorted((s["noise_multiplier"], s["sample_rate"], s["steps"])
                                   for s in mine if s["round"] <= r))
            if history and history not in known:
                events = [GaussianEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
                          for sigma, q, steps in history]
                known[history] = (epsilon_for_plot(events, delta=delta) if accountant == "pld"
                                  else epsilon(events, delta=delta, accountant=accountant))
            if history:
                xs.append(float(r))
                ys.append(known[history])
        series[party] = (xs, ys)
    return series


def budget_caps(summary: Mapping[str, Any]) -> dict[str, float]:
    """The epsilon caps a budget chart draws: label -> cap (one line per distinct cap;
    record level: each site's, from ``privacy.caps``; else the run's ``privacy.epsilon``)."""
    privacy = summary.get("privacy") or {}
    caps: Mapping[str, float] = privacy.get("caps") or {}
    if not caps:
        configured = ((summary.get("config") or {}).get("privacy") or {}).get("epsilon")
        return {} if configured is None else {f"cap: epsilon = {configured:g}":
                                              float(configured)}
    by_value: dict[float, list[str]] = {}
    for party, cap in caps.items():
        by_value.setdefault(float(cap), []).append(party)
    if len(by_value) == 1:
        return {f"cap: epsilon = {cap:g}": cap for cap in by_value}
    return {f"cap {cap:g} ({', '.join(parties)})": cap for cap, parties in by_value.items()}


def _protection(summary: Mapping[str, Any]) -> tuple[str, str]:
    """The run's protection scheme and what it let the coordinator see."""
    recorded = summary.get("protection") or {}
    scheme = str(recorded.get("scheme", "plain"))
    return scheme, str(recorded.get("sentence") or WHO_SEES_WHAT[scheme])


def site_mean_auc(metrics: Mapping[str, Any] | None) -> str:
    """"" or, for a deployed run's metrics, what its ROC AUC is: the mean of the sites' own."""
    count = (metrics or {}).get("roc_auc_sites")
    return "" if count is None else f"mean of {count} sites' AUCs, not the pooled AUC"


def short_rounds_text(summary: Mapping[str, Any]) -> str:
    """"" or a sentence naming the rounds that ran short of sites (``short_rounds``)."""
    short = summary.get("short_rounds") or []
    if not short:
        return ""
    rounds = "; ".join(f"round {r['round']}: {r['sites']} of {r['of']} sites"
                       + (f" (missing {', '.join(r['missing'])})" if r.get("missing") else "")
                       for r in short[:20])
    more = f"; and {len(short) - 20} more" if len(short) > 20 else ""
    return (f"{len(short)} of {summary.get('rounds_completed')} rounds ran short of sites: "
            f"{rounds}{more}.")


def _metric_sites(summary: Mapping[str, Any], sites: Sequence[str]) -> list[str]:
    """The sites with metrics of their own in the summary (none for a deployed run)."""
    evaluations = [summary.get("federated") or {}]
    baselines = summary.get("baselines") or {}
    evaluations += [baselines.get("pooled") or {}, *(baselines.get("local") or {}).values()]
    known = {name for ev in evaluations for name in (ev.get("sites") or {})}
    return [s for s in sites if s in known]


def _headline_rows(summary: Mapping[str, Any], sites: Sequence[str]) -> list[list[str]]:
    rows = [("federated (" + str(summary.get("strategy")) + ")", summary.get("federated"))]
    baselines = summary.get("baselines") or {}
    if baselines:
        private = baselines.get("private") is not False
        rows.append(("pooled (centralised, for reference)" if private else
                     "pooled (centralised, NOT private)", baselines.get("pooled")))
        rows += [(f"{name} alone" + ("" if private else " (NOT private)"), ev)
                 for name, ev in (baselines.get("local") or {}).items()]
    table = []
    for label, evaluation in rows:
        pooled = (evaluation or {}).get("pooled")
        per_site = (evaluation or {}).get("sites") or {}
        flag = f" - {CHANCE}" if _chance(evaluation) else ""
        table.append([label + flag] + [_metric_text(pooled, m) for m in
                                       ("accuracy", "roc_auc", "balanced_accuracy", "brier")]
                     + [_metric_text(per_site.get(s), "accuracy") for s in sites])
    return table


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _categories(vocabulary: Sequence[str]) -> str:
    # A vocabulary that long may hold individual patients' values (a hand-written schema:
    # `fedcare schema infer` never writes one); the card names its size only.
    if len(vocabulary) > MAX_VOCABULARY:
        return f"{len(vocabulary)} categories (not listed: more than {MAX_VOCABULARY})"
    return ", ".join(vocabulary)


def model_card(run_dir: Path) -> str:
    """The model card of a run, in Markdown."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    meta = torch.load(run_dir / "model.pt", weights_only=True) \
        if (run_dir / "model.pt").is_file() else {}
    schema = meta.get("schema") or {}
    privacy = summary.get("privacy")
    # A deployed aggregator's summary names its sites only (it never sees their data).
    sites: list[dict[str, Any]] = [{"name": s} if isinstance(s, str) else s
                                   for s in summary.get("sites") or []]
    federated = summary.get("federated") or {}
    target = schema.get("target", "the outcome")
    positive = ", ".join(schema.get("positive", [])) or "1"
    parts = [
        f"# Model card: {summary.get('dataset')} ({summary.get('model')}, "
        f"{summary.get('strategy')})",
        "## Intended use",
        f"Estimates the probability that `{target}` is positive ({positive}) for a patient "
        f"like those of the {len(sites)} contributing sites ({summary.get('description')}). "
        "A research model and a decision aid for clinicians, not a diagnosis: it was checked "
        "only on the held-out patients below, and must be validated locally before any use "
        "in care.",
        "## Sites and data",
    ]
    used = summary.get("data") or {}
    if used:  # a deployed run: the coordinator knows what each site says it used, no sizes
        parts += [_markdown_table(["site", "data"], [[name, str(source)] for name, source in
                                                     (used.get("sites") or {}).items()]),
                  f"Every site encoded its records with the same schema (SHA-256 "
                  f"`{used.get('schema_sha256')}`). The coordinator saw no site's records; "
                  + ("under plain protection it read each site's test counts and metrics as "
                     "they arrived, " if _protection(summary)[0] == "plain" else
                     "it saw only the sums over sites of their test counts and metrics, ")
                  + "and no site's own is in this run directory: each site's own test metrics "
                  "are in its own log."]
    else:
        parts.append(_markdown_table(["site", "training patients", "test patients"],
                                     [[s["name"], str(s.get("n_train", "not released")),
                                       str(s.get("n_test", "-"))] for s in sites]))
    site_level = (privacy or {}).get("level") == "site"
    if site_level:
        parts.append("Each site's number of training patients is not released: site-level "
                     "differential privacy protects each site's whole dataset, its size "
                     "included.")
    if schema:
        numeric = (schema.get("numeric") or {}).get("columns", [])
        categorical = schema.get("categorical") or {}
        bounds = schema.get("bounds") or {}
        rows = [[c, "numeric", ", ".join(f"{b:g}" for b in bounds[c]) if c in bounds else "-"]
                for c in numeric]
        rows += [[c, "categorical", _categories(v)] for c, v in categorical.items()]
        rows += [[c, "not used (schema's ignore list)", "-"] for c in schema.get("ignore", [])]
        parts += ["## Schema", f"Outcome: `{target}` (positive: {positive}).",
                  _markdown_table(["column", "type", "public bounds / categories"], rows)]
    labels: Mapping[str, Mapping[str, str]] = schema.get("labels") or {}
    if labels:
        parts += ["### What the codes mean",
                  _markdown_table(["column", "code", "meaning"],
                                  [[c, code, meaning] for c, codes in labels.items()
                                   for code, meaning in codes.items()])]
    per_site = federated.get("sites") or {}
    metrics = [("accuracy", "accuracy"), ("roc_auc", "ROC AUC"), ("brier", "Brier")]
    performance = [["all sites (pooled)", str((federated.get("pooled") or {}).get("n", "-"))]
                   + [_metric_text(federated.get("pooled"), m[0]) for m in metrics]]
    performance += [[name + (f" ({SMALL_NOTE})" if (v.get("n") or 0) < SMALL_SITE else ""),
                     str(v.get("n", "-"))] + [_metric_text(v, m[0]) for m in metrics]
                    for name, v in per_site.items()]
    parts += ["## Performance (federated model, test sets)",
              _markdown_table(["test set", "patients"] + [m[1] for m in metrics], performance)]
    if any(ONE_CLASS in row for row in performance):
        parts.append(ONE_CLASS_NOTE)
    if _chance(federated):
        parts.append(f"{CHANCE}: {_chance(federated)}. Do not use this model.")
    intervals = federated.get("intervals")
    if intervals:
        parts.append(f"95% intervals on the pooled test set ({intervals['resamples']} "
                     f"bootstrap resamples of its patients): accuracy "
                     f"{_interval(intervals, 'accuracy')}, ROC AUC "
                     f"{_interval(intervals, 'roc_auc')}."
                     + (" " + TEST_SET_NOT_COVERED if privacy else ""))
    if site_level and per_site:
        parts.append(PER_SITE_NOT_COVERED)
    if federated.get("note"):
        parts.append(str(federated["note"]))
    if short_rounds_text(summary):
        parts.append(short_rounds_text(summary))
    subgroups = summary.get("subgroups") or {}
    if subgroups:
        parts += ["### By subgroup (pooled test set)",
                  _markdown_table(["subgroup", "patients"] + [m[1] for m in metrics],
                                  [[_subgroup_label(name, labels), str(v.get("n", "-"))]
                                   + [_metric_text(v, m[0]) for m in metrics]
                                   for name, v in subgroups.items()])]
    scheme, protection = _protection(summary)
    parts += ["## Privacy",
              privacy["sentence"] if privacy else
              "Trained without differential privacy: the model and the updates may reveal "
              "whether a patient took part, and details of their record (see the audit, if "
              "one was run).",
              f"Protection of the updates in transit: `{scheme}`, {protection}"]
    baselines = summary.get("baselines") or {}
    if baselines.get("note"):
        parts.append(f"Baselines: {baselines['note']}")
    limits = ["Test sets are small: an accuracy on n patients has a standard error of about "
              "sqrt(p(1-p)/n) (0.03 at n = 250, 0.1 at n = 25)."]
    small = [s["name"] for s in sites if "n_test" in s and s["n_test"] < 50]
    if small:
        limits.append(f"Sites with fewer than 50 test patients ({', '.join(small)}): their "
                      "metrics are too noisy to compare.")
    limits.append("Patients and sites that differ from these (other countries, ages, "
                  "eras, measurement practice) may see a different performance.")
    if summary.get("status") != "completed":
        limits.append(f"The run did not complete: {summary.get('error')}")
    parts += ["## Limitations", "\n".join(f"- {item}" for item in limits)]
    return "\n\n".join(parts) + "\n"


def _markdown_to_html(markdown: str) -> str:
    """The subset `model_card` writes: headings, tables, bullet lists, paragraphs, `code`."""
    def inline(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))

    html = []
    for block in markdown.strip().split("\n\n"):
        lines = block.splitlines()
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            html.append(f"<h{level + 2}>{inline(block[level:].strip())}</h{level + 2}>")
        elif block.startswith("|"):
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>"
                           for row in cells[2:])
            html.append(f"<table><tr>{head}</tr>{body}</table>")
        elif block.startswith("- "):
            html.append("<ul>" + "".join(f"<li>{inline(line[2:])}</li>" for line in lines)
                        + "</ul>")
        else:
            html.append(f"<p>{inline(block)}</p>")
    return "\n".join(html)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def audit_section(audit: Mapping[str, Any]) -> str:
    """Whatever ``fedcare audit`` wrote: its findings in words, then its table."""
    parts = ["<h2 id='audit'>What an attacker could learn (privacy audit)</h2>"]
    parts += [f"<p>{escape(str(line))}</p>" for line in audit.get("findings", [])]
    rows = audit.get("table") or []
    if rows:
        header = list(rows[0])
        parts.append(_html_table(header, [[_fmt(r.get(h)) for h in header] for r in rows]))
    return "\n".join(parts)


def headline(summary: Mapping[str, Any]) -> str:
    """The report's headline: the federated model's pooled metrics with their 95% intervals,
    or, for a model no better than chance, that first."""
    federated = summary.get("federated") or {}
    pooled = federated.get("pooled") or {}
    intervals = federated.get("intervals") or {}

    def shown(name: str, label: str) -> str:
        pair = intervals.get(name)
        return (f"{label} <b>{_metric_text(pooled, name)}</b>"
                + (f" (95% interval {pair[0]:.3f}-{pair[1]:.3f})" if pair else ""))

    mean_auc = site_mean_auc(pooled)
    text = (f"Federated model on the pooled test set ({pooled.get('n', '-')} patients): "
            f"{shown('accuracy', 'accuracy')}, {shown('roc_auc', 'ROC AUC')}"
            f"{f' ({escape(mean_auc)})' if mean_auc else ''}, "
            f"{shown('balanced_accuracy', 'balanced accuracy')}.")
    chance = _chance(federated)
    if chance:
        return (f"<p class='headline warning' id='headline'><b>{CHANCE}</b>: "
                f"{escape(chance)}. Do not use this model. {text}</p>")
    return f"<p class='headline' id='headline'>{text}</p>"


def small_sites(summary: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Sites with fewer than `SMALL_SITE` test patients (the summary publishes each site's
    test size already), as (name, test patients)."""
    return [(s["name"], int(s["n_test"])) for s in summary.get("sites") or []
            if isinstance(s, Mapping) and s.get("n_test") is not None
            and s["n_test"] < SMALL_SITE]


def threshold_section(summary: Mapping[str, Any]) -> str:
    """Sensitivity, specificity, PPV, NPV and the confusion matrix at `THRESHOLD`, with
    intervals (or, for a deployed run, why there are none)."""
    federated = summary.get("federated") or {}
    counts = federated.get("threshold")
    parts = [f"<h2 id='threshold'>At the threshold: predicted risk >= {THRESHOLD:g} counts "
             "as positive</h2>"]
    if not counts:
        why = NO_INTERVALS_DEPLOYED if summary.get("data") else "Not computed for this run."
        return "\n".join([*parts, f"<p>{escape(why)}</p>"])
    intervals = federated.get("intervals") or {}
    rows = [[name, _fmt(_metric(counts, key)), _interval(intervals, key), meaning]
            for key, name, meaning in (
                ("sensitivity", "sensitivity", "of patients with the outcome, share called "
                 "positive"),
                ("specificity", "specificity", "of patients without it, share called "
                 "negative"),
                ("ppv", "PPV", "of patients called positive, share with the outcome"),
                ("npv", "NPV", "of patients called negative, share without it"))]
    tp, fp = counts["true_positives"], counts["false_positives"]
    fn, tn = counts["false_negatives"], counts["true_negatives"]
    parts.append(_html_table(["", "value", "95% interval", "meaning"], rows))
    if any("-" in (row[1], row[2]) for row in rows):
        parts.append(f"<p>{escape(UNDEFINED_RATE_NOTE)}</p>")
    parts += ["<h3>Confusion matrix (pooled test set)</h3>",
              _html_table(["", "predicted positive", "predicted negative", "total"],
                          [["outcome positive", str(tp), str(fn), str(tp + fn)],
                           ["outcome negative", str(fp), str(tn), str(fp + tn)],
                           ["total", str(tp + fp), str(fn + tn), str(tp + fp + fn + tn)]]),
              f"<p>Intervals: {escape(str(intervals.get('method', 'bootstrap')))}, "
              f"{intervals.get('resamples', '-')} resamples, seeded by the run's seed "
              "(reproducible)."
              + (" " + escape(TEST_SET_NOT_COVERED) if summary.get("privacy") else "")
              + "</p>"]
    return "\n".join(parts)


def odds_ratio_section(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Odds ratios of a logistic regression (`odds_ratios`), without intervals and why."""
    config = summary.get("config") or {}
    standardize = str((config.get("data") or {}).get("standardize", "auto"))
    if standardize == "auto":
        standardize = "bounds" if summary.get("privacy") else "federated"
    covariance = summary.get("coefficient_covariance")
    rows = odds_ratios(meta["params"], meta.get("feature_names") or [],
                       meta.get("schema") or {}, meta.get("standardization") or {},
                       standardize, covariance)
    return "\n".join([
        "<h2 id='odds-ratios'>Odds ratios (logistic regression)</h2>",
        "<p>exp(coefficient): how the odds of the outcome multiply per unit of each input, "
        "the others held fixed. Numeric inputs were standardised, so their unit is "
        f"{escape(STANDARDIZED_UNITS_TEXT.get(standardize, 'that of the model input'))}.</p>",
        _html_table(["input", "odds ratio"] + (["95% interval"] if covariance else []) + ["per"],
                    [[r["feature"], f"{r['odds_ratio']:.3g}"]
                     + ([f"{r['low']:.3g}-{r['high']:.3g}"] if covariance else []) + [r["per"]]
                     for r in rows]),
        f"<p>{escape(WALD_NOTE if covariance else NO_ODDS_RATIO_INTERVALS)}</p>"])


STANDARDIZED_UNITS_TEXT = {"federated": "1 standard deviation (SD) of the pooled training "
                                        "data (its value in brackets)",
                           "bounds": "half the public range of the schema's bounds (its "
                                     "value in brackets)",
                           "site": "1 SD of each site's own training data",
                           "none": "1 unit as recorded"}


def audit_chart(audit: Mapping[str, Any]) -> str:
    """The audit's results as a bar chart: per configuration, the attacks' success (share
    of records recovered; AUCs, where 0.5 is chance)."""
    keys = (("records recovered", "records recovered"), ("records recovered by prior",
                                                          "records (prior)"),
            ("membership AUC", "membership AUC"), ("canary AUC", "canary AUC"))
    groups = {str(row.get("configuration", i + 1)): {
        label: float(row[key]) for key, label in keys if row.get(key) is not None}
        for i, row in enumerate(audit.get("table") or [])}
    if not any(groups.values()):
        return ""
    return ("<div class='charts'>" + bar_chart(
        groups, title="Attack success per configuration", y_label="share / AUC",
        levels={"AUC 0.5: chance": 0.5}) + "</div>")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1120px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:4px}.headline{font-size:1.25em;background:#f3f7fb;padding:12px 16px;
border-left:4px solid #1f77b4}.guarantee{background:#f6fbf3;padding:10px 14px;
border-left:4px solid #2ca02c}.warning{background:#fdf4f2;padding:10px 14px;
border-left:4px solid #d62728}table{border-collapse:collapse;margin:8px 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}td:first-child,th:first-child
{text-align:left}th{background:#f5f5f5}.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart .title{font-weight:600;font-size:13px}.chart .tick,.chart .legend{font-size:11px;fill:#444}
.chart .label{font-size:12px;fill:#222}.chart .frame{fill:none;stroke:#999}
.chart .grid{stroke:#eee}.chart .diagonal{stroke:#aaa;stroke-dasharray:4 4}
.chart .level{stroke:#d62728;stroke-width:1.5;stroke-dasharray:6 3}
.chart .level-label{font-size:11px;fill:#d62728}
code{background:#f3f3f3;padding:0 3px}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` and ``model_card.md`` into `run_dir` from its files; return the page.

    Raises
    ------
    FileNotFoundError
        If `run_dir` holds no ``summary.json`` (not a fedcare run directory).
    """
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{run_dir} holds no summary.json; is it a fedcare run "
                                "directory?")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    rounds = _read_json_lines(run_dir / "metrics.jsonl")
    curves = json.loads((run_dir / CURVES_FILE).read_text(encoding="utf-8")) \
        if (run_dir / CURVES_FILE).is_file() else {}
    card = model_card(run_dir)
    (run_dir / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
    sites = [s if isinstance(s, str) else s["name"] for s in summary.get("sites", [])]
    shown = sites if len(sites) <= MAX_SITE_LINES else []
    pooled = (summary.get("federated") or {}).get("pooled") or {}
    body = [f"<h1>{escape(str(summary.get('description')))}</h1>",
            f"<p class='sub'>fedcare {escape(str(summary.get('fedcare_version')))} · "
            f"{escape(str(summary.get('strategy')))} · {escape(str(summary.get('model')))} "
            f"({summary.get('n_parameters')} parameters) · {len(sites)} sites · "
            f"{summary.get('rounds_completed')} rounds · status "
            f"<b>{escape(str(summary.get('status')))}</b> · seed {summary.get('seed')}</p>"]
    if summary.get("status") != "completed":
        body.append(f"<p class='warning'>The run stopped early: "
                    f"{escape(str(summary.get('error')))}</p>")
    body.append(headline(summary))
    if short_rounds_text(summary):
        body.append(f"<p class='warning' id='short-rounds'>"
                    f"{escape(short_rounds_text(summary))}</p>")
    if summary.get("data"):  # a deployed run: only the sites with metrics of their own
        sites = _metric_sites(summary, sites)
        shown = sites if len(sites) <= MAX_SITE_LINES else []
    mean_auc = site_mean_auc(pooled)
    header = ["model", "accuracy", "ROC AUC", "bal. acc", "Brier"] + [f"acc@{s}" for s in sites]
    baselines = summary.get("baselines") or {}
    headline_rows = _headline_rows(summary, sites)
    body += ["<h2>Federated vs pooled vs each site alone</h2>" if baselines else
             "<h2>Federated model</h2>",
             _html_table(header, headline_rows),
             "<p>Pooled metrics are on all sites' test patients together"
             + ("; acc@site on that site's own test patients." if sites else ".")
             + (" The pooled and single-site models are references trained without privacy "
                "protection." if baselines else "")
             + (" " + PER_SITE_NOT_COVERED
                if (summary.get("privacy") or {}).get("level") == "site" and sites else "")
             + (" " + str((summary.get("federated") or {}).get("note") or "")) + "</p>"]
    if any(ONE_CLASS in row for row in headline_rows):
        body.append(f"<p>{escape(ONE_CLASS_NOTE)}</p>")
    small = small_sites(summary)
    if small:
        body.append("<p class='warning' id='small-sites'>Small test sets ("
                    + escape(", ".join(f"{name}: {n} patients" for name, n in small))
                    + f"): {SMALL_NOTE}. An accuracy on n patients has a standard error of "
                    "about sqrt(p(1-p)/n): 0.1 at n = 25.</p>")
    if baselines.get("note"):
        body.append(f"<p class='warning'>{escape(str(baselines['note']))}</p>")
    if rows_section := loss_section(summary):
        body.append(rows_section)
    body.append(threshold_section(summary))
    meta = torch.load(run_dir / "model.pt", weights_only=True) \
        if (run_dir / "model.pt").is_file() else {}
    if summary.get("model") == "logreg" and meta:
        body.append(odds_ratio_section(summary, meta))

    privacy = summary.get("privacy")
    scheme, protection = _protection(summary)
    budget = budget_per_round(run_dir, float(privacy["delta"]), str(privacy["accountant"])) \
        if privacy else {}
    colours = site_colours(sites, list(budget))
    body.append("<h2 id='privacy'>Privacy</h2>")
    if privacy:
        # A seeded run states no guarantee: its sentence goes in the warning box, and its
        # budget chart says what secure noise would have spent, not what this run spent.
        private = privacy.get("private", True) is not False
        body.append(f"<p class='{'guarantee' if private else 'warning'}'>"
                    f"{escape(privacy['sentence'])}</p>")
        if budget:
            caps = budget_caps(summary)
            title = (f"Privacy budget spent (epsilon, delta = {privacy['delta']:g})" if private
                     else f"NOT private (seeded noise): epsilon secure noise would have spent "
                          f"(delta = {privacy['delta']:g})")
            top = max(*caps.values(), *(max(v[1], default=0.0) for v in budget.values()), 0.0)
            body.append(line_chart(budget, title=title, x_label="round",
                                   y_label="cumulative epsilon", colours=colours,
                                   levels=caps, y_range=(0.0, 1.1 * top if top > 0 else 1.0)))
    else:
        body.append("<p class='warning'>Trained without differential privacy: the model and "
                    "the updates may reveal whether a patient took part.</p>")
    body.append(f"<h3>Protection of the updates: <code>{escape(scheme)}</code></h3>"
                f"<p>{escape(protection[0].upper() + protection[1:])}</p>")

    if rounds:
        x = [float(r["round"]) for r in rounds]
        accuracy = {"pooled": (x, [_metric(r.get("pooled"), "accuracy") for r in rounds])}
        auc = {"pooled": (x, [_metric(r.get("pooled"), "roc_auc") for r in rounds])}
        for s in shown:
            accuracy[s] = (x, [_metric((r.get("sites") or {}).get(s), "accuracy") for r in rounds])
            auc[s] = (x, [_metric((r.get("sites") or {}).get(s), "roc_auc") for r in rounds])
        body += ["<h2 id='training'>Training, round by round</h2><div class='charts'>",
                 line_chart(accuracy, title="Accuracy of the global model", x_label="round",
                            y_label="accuracy", y_range=(0.0, 1.0), colours=colours),
                 line_chart(auc, title="ROC AUC of the global model" + (
                     " (mean of the sites' AUCs)" if mean_auc else ""), x_label="round",
                            y_label="ROC AUC", y_range=(0.0, 1.0), colours=colours),
                 "</div>"]
        failed = [(r["round"], s, why) for r in rounds for s, why in r.get("failures", {}).items()]
        if failed:
            body += ["<p>Sites left out of a round:</p>",
                     _html_table(["round", "site", "reason"],
                                 [[str(r), s, w] for r, s, w in failed[:50]])]
    if curves:
        names = ["pooled"] + [s for s in shown if s in curves]
        roc = {n: (curves[n]["roc"]["fpr"], curves[n]["roc"]["tpr"]) for n in names}
        calibration = {n: (curves[n]["calibration"]["predicted"],
                           curves[n]["calibration"]["observed"]) for n in names}
        body += ["<h2 id='curves'>Discrimination and calibration (final model)</h2>"
                 "<div class='charts'>",
                 line_chart(roc, title="ROC curve", x_label="false positive rate",
                            y_label="true positive rate", x_range=(0.0, 1.0),
                            y_range=(0.0, 1.0), diagonal=True, colours=colours),
                 line_chart(calibration, title="Calibration (10 risk bins)",
                            x_label="predicted risk", y_label="observed rate",
                            x_range=(0.0, 1.0), y_range=(0.0, 1.0), diagonal=True,
                            colours=colours),
                 "</div>"]
    if (run_dir / AUDIT_FILE).is_file():
        audit = json.loads((run_dir / AUDIT_FILE).read_text(encoding="utf-8"))
        body += [audit_section(audit), audit_chart(audit)]
    body += ["<h2 id='model-card'>Model card</h2>", _markdown_to_html(card)]
    if (run_dir / AUDIT_LOG_FILE).is_file():
        recorded = summary.get("audit_log") or {}
        check = verify(run_dir / AUDIT_LOG_FILE, expected_entries=recorded.get("entries"),
                       expected_head=recorded.get("head"))
        words = (f"intact: {check.entries} entries, head hash <code>{check.head}</code>"
                 if check.ok else f"BROKEN: {escape(check.problem)}")
        body.append(f"<h2 id='audit-log'>Audit log</h2><p>{AUDIT_LOG_FILE} is {words} "
                    "(checked when this report was written; <code>fedcare verify</code> "
                    "checks it again).</p>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>fedcare report: {escape(str(summary.get('dataset')))}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    out = run_dir / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out
