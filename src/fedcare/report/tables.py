"""Plain-text tables for the terminal: federated vs pooled vs each site alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from fedcare.data.site_data import FederatedData
from fedcare.evaluation import Evaluation


class RunResult(Protocol):
    """What a results table reads of a finished run (`fedcare.experiment.RunResult`)."""

    data: FederatedData
    federated: Evaluation
    pooled_baseline: Evaluation | None
    local_baselines: dict[str, Evaluation]
    summary: dict[str, Any]

# Per-site accuracy columns are shown up to this many sites; beyond, their range.
MAX_SITE_COLUMNS = 8


def _fmt(value: float) -> str:
    return "   -" if math.isnan(value) else f"{value:.3f}"


CHANCE = "NO BETTER THAN CHANCE"
UNDEFINED = ("-: not defined on that test set (ROC AUC and balanced accuracy need patients "
             "of both classes; every metric needs at least one patient).")
TEST_SET_NOT_COVERED = ("Like the test metrics, they are exact statistics of the held-out "
                        "test patients, not covered by the differential privacy guarantee.")
"""The flag of a model no better than chance (`fedcare.evaluation.chance_reason`)."""


def results_table(result: RunResult) -> str:
    """The headline table of a run, one model per row, pooled and per-site test metrics.

    A model no better than chance gets `CHANCE` in a last column and a line below
    the table saying why; the federated model's 95% intervals follow.
    """
    sites = [s.name for s in result.data.sites]
    rows: list[tuple[str, Evaluation]] = [
        (f"federated ({result.summary['strategy']})", result.federated)]
    # A private run's baselines (asked for explicitly) are outside its guarantee: each row says so.
    tag = ", NOT private" if (result.summary.get("baselines") or {}).get("private") is False \
        else ""
    if result.pooled_baseline is not None:
        rows.append((f"pooled (centralised{tag})", result.pooled_baseline))
    rows += [(f"{label}{' (NOT private)' if tag else ''}", ev)
             for label, ev in _local_rows(result.local_baselines)]
    header = ["model", "accuracy", "ROC AUC", "bal. acc", "Brier"]
    if len(sites) <= MAX_SITE_COLUMNS:
        header += [f"acc@{s}" for s in sites]
    else:
        header += ["site acc min", "site acc mean"]
    body = []
    for label, ev in rows:
        p = ev.pooled
        cells = [label, _fmt(p["accuracy"]), _fmt(p["roc_auc"]),
                 _fmt(p["balanced_accuracy"]), _fmt(p["brier"])]
        site_acc = [ev.sites[s]["accuracy"] for s in sites]
        if len(sites) <= MAX_SITE_COLUMNS:
            cells += [_fmt(a) for a in site_acc]
        else:
            known = [a for a in site_acc if not math.isnan(a)]
            cells += [_fmt(min(known)) if known else "   -",
                      _fmt(sum(known) / len(known)) if known else "   -"]
        body.append(cells)
    flagged = [(label, ev.chance) for label, ev in rows if ev.chance]
    if flagged:
        header.append("flag")
        for cells, (_, ev) in zip(body, rows, strict=True):
            cells.append(CHANCE if ev.chance else "")
    n_test = int(result.federated.pooled["n"])
    title = (f"{result.data.description}: metrics on the pooled test set ({n_test} patients)"
             " and accuracy on each site's test set")
    notes = [f"{label}: {CHANCE}: {why}." for label, why in flagged]
    if any(cell.strip() == "-" for cells in body for cell in cells[1:]):
        notes.append(UNDEFINED)
    intervals = interval_line(result.federated)
    if intervals:
        notes.append(intervals + (" " + TEST_SET_NOT_COVERED if result.summary.get("privacy")
                                  else ""))
    return title + "\n" + _grid(header, body) + ("\n\n" + "\n".join(notes) if notes else "")


def interval_line(evaluation: Evaluation) -> str:
    """"" or the federated model's 95% bootstrap intervals on the pooled test set, one line."""
    intervals = (evaluation.details or {}).get("intervals") or {}
    shown = [(name, intervals.get(key)) for key, name in
             (("accuracy", "accuracy"), ("roc_auc", "ROC AUC"),
              ("balanced_accuracy", "bal. acc"))]
    parts = [f"{name} {low:.3f}-{high:.3f}" for name, pair in shown if pair
             for low, high in [pair]]
    if not parts:
        return ""
    return (f"95% intervals of the federated model ({intervals['resamples']} bootstrap "
            f"resamples of the test patients): {', '.join(parts)}.")


def _local_rows(local: dict[str, Evaluation]) -> list[tuple[str, Evaluation]]:
    """One row per site alone; with many sites, the best, median and worst by pooled accuracy."""
    if len(local) <= MAX_SITE_COLUMNS:
        return [(f"{name} alone", ev) for name, ev in local.items()]
    ranked = sorted(local.items(), key=lambda kv: -kv[1].pooled["accuracy"])
    picks = {"best": ranked[0], "median": ranked[len(ranked) // 2], "worst": ranked[-1]}
    return [(f"{name} alone ({which} of {len(local)})", ev)
            for which, (name, ev) in picks.items()]


def _grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in body)])
