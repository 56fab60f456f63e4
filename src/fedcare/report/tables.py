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


def results_table(result: RunResult) -> str:
    """The headline table of a run, one model per row, pooled and per-site test metrics."""
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
    n_test = int(result.federated.pooled["n"])
    title = (f"{result.data.description}: metrics on the pooled test set ({n_test} patients)"
             " and accuracy on each site's test set")
    return title + "\n" + _grid(header, body)


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
