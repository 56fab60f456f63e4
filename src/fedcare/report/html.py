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
from fedcare.privacy.accounting import GaussianEvent, epsilon, epsilon_for_plot
from fedcare.privacy.ledger import LEDGER_FILE
from fedcare.protection import WHO_SEES_WHAT
from fedcare.report.auditlog import AUDIT_LOG_FILE, verify
from fedcare.report.data_loss import loss_section
from fedcare.report.rundir import CURVES_FILE
from fedcare.report.svg import line_chart

REPORT_FILE = "report.html"
MODEL_CARD_FILE = "model_card.md"
AUDIT_FILE = "audit.json"
PER_SITE_NOT_COVERED = ("Per-site metrics (each site's own test patients, and how many there "
                        "are) are exact measurements, not covered by the site-level "
                        "differential privacy guarantee.")
MAX_SITE_LINES = 10
"""Per-site lines drawn in one chart; beyond, only the pooled line."""
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
        table.append([label] + [_fmt(_metric(pooled, m)) for m in
                                ("accuracy", "roc_auc", "balanced_accuracy", "brier")]
                     + [_fmt(_metric(per_site.get(s), "accuracy")) for s in sites])
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
    per_site = federated.get("sites") or {}
    metrics = [("accuracy", "accuracy"), ("roc_auc", "ROC AUC"), ("brier", "Brier")]
    parts += ["## Performance (federated model, test sets)",
              _markdown_table(["test set", "patients"] + [m[1] for m in metrics],
                              [["all sites (pooled)", str((federated.get("pooled") or {})
                                                          .get("n", "-"))]
                               + [_fmt(_metric(federated.get("pooled"), m[0])) for m in metrics]]
                              + [[name, str(v.get("n", "-"))]
                                 + [_fmt(_metric(v, m[0])) for m in metrics]
                                 for name, v in per_site.items()])]
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
                                  [[name, str(v.get("n", "-"))]
                                   + [_fmt(_metric(v, m[0])) for m in metrics]
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
    accuracy_text, auc_text = _fmt(_metric(pooled, "accuracy")), _fmt(_metric(pooled, "roc_auc"))
    mean_auc = site_mean_auc(pooled)
    body.append(f"<p class='headline' id='headline'>Federated model on the pooled test set "
                f"({pooled.get('n', '-')} patients): accuracy <b>{accuracy_text}</b>, "
                f"ROC AUC <b>{auc_text}</b>{f' ({escape(mean_auc)})' if mean_auc else ''}.</p>")
    if short_rounds_text(summary):
        body.append(f"<p class='warning' id='short-rounds'>"
                    f"{escape(short_rounds_text(summary))}</p>")
    if summary.get("data"):  # a deployed run: only the sites with metrics of their own
        sites = _metric_sites(summary, sites)
        shown = sites if len(sites) <= MAX_SITE_LINES else []
    header = ["model", "accuracy", "ROC AUC", "bal. acc", "Brier"] + [f"acc@{s}" for s in sites]
    baselines = summary.get("baselines") or {}
    body += ["<h2>Federated vs pooled vs each site alone</h2>" if baselines else
             "<h2>Federated model</h2>",
             _html_table(header, _headline_rows(summary, sites)),
             "<p>Pooled metrics are on all sites' test patients together"
             + ("; acc@site on that site's own test patients." if sites else ".")
             + (" The pooled and single-site models are references trained without privacy "
                "protection." if baselines else "")
             + (" " + PER_SITE_NOT_COVERED
                if (summary.get("privacy") or {}).get("level") == "site" and sites else "")
             + (" " + str((summary.get("federated") or {}).get("note") or "")) + "</p>"]
    if baselines.get("note"):
        body.append(f"<p class='warning'>{escape(str(baselines['note']))}</p>")
    if rows_section := loss_section(summary):
        body.append(rows_section)

    privacy = summary.get("privacy")
    scheme, protection = _protection(summary)
    body.append("<h2 id='privacy'>Privacy</h2>")
    if privacy:
        # A seeded run states no guarantee: its sentence goes in the warning box, and its
        # budget chart says what secure noise would have spent, not what this run spent.
        private = privacy.get("private", True) is not False
        body.append(f"<p class='{'guarantee' if private else 'warning'}'>"
                    f"{escape(privacy['sentence'])}</p>")
        budget = budget_per_round(run_dir, float(privacy["delta"]), str(privacy["accountant"]))
        if budget:
            cap = float(privacy.get("epsilon", math.nan))
            title = (f"Privacy budget spent (epsilon, delta = {privacy['delta']:g})" if private
                     else f"NOT private (seeded noise): epsilon secure noise would have spent "
                          f"(delta = {privacy['delta']:g})")
            body.append(line_chart(budget, title=title, x_label="round",
                                   y_label="epsilon spent",
                                   y_range=(0.0, max(cap, *(max(v[1], default=0.0)
                                                            for v in budget.values())))))
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
                            y_label="accuracy", y_range=(0.0, 1.0)),
                 line_chart(auc, title="ROC AUC of the global model" + (
                     " (mean of the sites' AUCs)" if mean_auc else ""), x_label="round",
                            y_label="ROC AUC", y_range=(0.0, 1.0)),
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
                            y_range=(0.0, 1.0), diagonal=True),
                 line_chart(calibration, title="Calibration (10 risk bins)",
                            x_label="predicted risk", y_label="observed rate",
                            x_range=(0.0, 1.0), y_range=(0.0, 1.0), diagonal=True),
                 "</div>"]
    if (run_dir / AUDIT_FILE).is_file():
        body.append(audit_section(json.loads((run_dir / AUDIT_FILE).read_text(encoding="utf-8"))))
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
