"""A grid of runs (settings x seeds): one table and the privacy-utility plot.

``fedcare sweep CONFIG --grid privacy.epsilon=0.5,1,3,8 --grid strategy=fedavg,fedadam
--seeds 0,1,2`` calls `run_sweep`: every combination of the grid values, each
with every seed, as ordinary runs (each gets its own run directory, report and
audit log) under one sweep directory, which also receives

* ``sweep.json``: every run's settings, seed, status and headline metrics, and
  the cells (mean and standard deviation over seeds);
* ``sweep.md``: the cells as a table;
* ``sweep.html``: the table and a plot of accuracy and ROC AUC against the
  first numeric grid key (``privacy.epsilon`` if it is one), one line per
  combination of the other keys, error bars one standard deviation over seeds
  (a cell with one completed run shows "(1 seed)" and no bar: no spread is known).

A run that fails (for example a budget that cannot fit) is recorded with its
error and the sweep goes on.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, FedcareError
from fedcare.experiment import run_experiment
from fedcare.report.html import CSS
from fedcare.report.svg import line_chart

SWEEP_FILE = "sweep.json"
METRICS = ("accuracy", "roc_auc")

ALIASES = {"strategy": "federation.strategy", "rounds": "federation.rounds",
           "lr": "federation.lr", "epsilon": "privacy.epsilon", "privacy": "privacy.level",
           "protection": "protection.scheme", "model": "model.name",
           "dataset": "data.dataset", "sites": "data.sites"}
"""Short grid keys (as the `fedcare run` flags name them) and the config keys they set."""


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid key=v1,v2,...``: a config key and its values (read as TOML, else text)."""

    key: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> GridAxis:
        key, sep, values = text.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise ConfigError(f"--grid expects key=value1,value2,... (e.g. "
                              f"privacy.epsilon=0.5,1,3,8); got {text!r}.")
        parsed = []
        for item in items:
            try:
                parsed.append(tomllib.loads(f"v = {item}")["v"])
            except tomllib.TOMLDecodeError:
                parsed.append(item)
        if len(set(map(str, parsed))) != len(parsed):
            raise ConfigError(f"--grid {key}: a value is repeated in {items}.")
        return cls(key, tuple(parsed))


def _label(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in settings.items()) or "all"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def run_sweep(base: RunConfig, grid: Sequence[GridAxis], seeds: Sequence[int],
              out: str | Path, *,
              on_run: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run every grid cell with every seed under `out`; write the sweep files; return sweep.json.

    Parameters
    ----------
    base : RunConfig
        Settings not on the grid (baselines are turned off: a sweep compares
        federated settings).
    grid : sequence of GridAxis
    seeds : sequence of int
    out : path
        A new or empty directory.
    on_run : callable, optional
        ``(index, total, run_name)`` before each run (progress).

    Raises
    ------
    ConfigError
        A grid value the config refuses (checked for every cell before any run),
        a privacy setting on the grid or in `base` for a cell without
        ``privacy.level`` (`RunConfig.check_settings`), or `out` not empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"sweep directory {out} exists and is not empty.")
    if not seeds:
        raise ConfigError("a sweep needs at least one seed.")
    keys = [axis.key for axis in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid names a key twice: {keys}.")
    cells = [dict(zip(keys, values, strict=True))
             for values in itertools.product(*(axis.values for axis in grid))]
    configs = []
    for cell in cells:
        for seed in seeds:
            config = base.copy()
            config.baselines.enabled = False
            for key, value in cell.items():
                config.set_value(key, value, source="--grid")
            config.seed = seed
            config.check_settings()
            configs.append((cell, seed, config))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for index, (cell, seed, config) in enumerate(configs):
        name = f"run-{index:03d}"
        if on_run is not None:
            on_run(index, len(configs), f"{name}: {_label(cell)}, seed={seed}")
        record: dict[str, Any] = {"run": name, "settings": cell, "seed": seed}
        try:
            result = run_experiment(config, out=out / name)
        except FedcareError as exc:
            record.update(status="failed", error=str(exc))
        else:
            pooled = result.federated.pooled
            privacy = result.summary.get("privacy") or {}
            # A seeded run keeps the epsilon secure noise would give, labelled: not private.
            record.update(status="completed", epsilon=privacy.get("epsilon"),
                          private=privacy.get("private") if privacy else None,
                          **{m: pooled.get(m) for m in METRICS})
        runs.append(record)
    table = []
    for cell in cells:
        mine = [r for r in runs if r["settings"] == cell and r["status"] == "completed"]
        row: dict[str, Any] = {"settings": cell, "runs": len(mine),
                               "failed": sum(r["settings"] == cell for r in runs) - len(mine)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[metric] for r in mine])
        table.append(row)
    sweep = {"grid": {axis.key: list(axis.values) for axis in grid}, "seeds": list(seeds),
             "runs": runs, "table": table}
    (out / SWEEP_FILE).write_text(json.dumps(sweep, indent=1, default=str,
                                             allow_nan=True), encoding="utf-8")
    markdown = sweep_markdown(sweep)
    (out / "sweep.md").write_text(markdown, encoding="utf-8")
    (out / "sweep.html").write_text(sweep_html(sweep), encoding="utf-8")
    return sweep


def _cell_text(mean: float, std: float, runs: int) -> str:
    """Mean ± standard deviation over seeds; one run has no spread to show: "(1 seed)"."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f} (1 seed)" if runs < 2 else f"{mean:.3f} ± {std:.3f}"


def sweep_markdown(sweep: Mapping[str, Any]) -> str:
    keys = list(sweep["grid"])
    lines = ["| " + " | ".join([*keys, "runs", "failed", "accuracy", "ROC AUC"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for row in sweep["table"]:
        lines.append("| " + " | ".join(
            [*(str(row["settings"][k]) for k in keys), str(row["runs"]), str(row["failed"]),
             _cell_text(row["accuracy_mean"], row["accuracy_std"], row["runs"]),
             _cell_text(row["roc_auc_mean"], row["roc_auc_std"], row["runs"])]) + " |")
    notes = [f"Mean ± standard deviation over seeds {sweep['seeds']}; a cell with one "
             "completed run shows its value and \"(1 seed)\": one seed has no spread."
             if len(sweep["seeds"]) > 1 else
             f"One seed ({sweep['seeds'][0]}): no spread over seeds is shown; give more "
             "(--seeds 0,1,2) to see how much the results move with the seed."]
    warning = seeded_warning(sweep)
    if warning:
        notes.append(warning)
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def seeded_warning(sweep: Mapping[str, Any]) -> str:
    """What to say when some runs drew seeded noise (empty if none did)."""
    seeded = [r["run"] for r in sweep["runs"] if r.get("private") is False]
    if not seeded:
        return ""
    return (f"NOT private (seeded noise, for testing): {len(seeded)} of {len(sweep['runs'])} "
            "runs drew their noise and sampling from the seed in their configuration "
            "(privacy.secure = false); anyone with the configuration regenerates and "
            "subtracts it, so their privacy.epsilon is a setting, not a guarantee.")


def _x_key(grid: Mapping[str, Sequence[Any]]) -> str | None:
    numeric = [k for k, values in grid.items()
               if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)]
    if "privacy.epsilon" in numeric:
        return "privacy.epsilon"
    return numeric[0] if numeric else None


def sweep_html(sweep: Mapping[str, Any]) -> str:
    """The sweep table and its plots, as one self-contained page."""
    grid = sweep["grid"]
    x_key = _x_key(grid)
    charts = []
    if x_key is not None:
        for metric, title in (("accuracy", "Accuracy"), ("roc_auc", "ROC AUC")):
            series: dict[str, tuple[list[float], list[float]]] = {}
            errors: dict[str, list[float]] = {}
            for row in sweep["table"]:
                others = {k: v for k, v in row["settings"].items() if k != x_key}
                label = _label(others)
                xs, ys = series.setdefault(label, ([], []))
                xs.append(float(row["settings"][x_key]))
                ys.append(row[f"{metric}_mean"])
                # One seed has no spread: no error bar (a bar of 0 would claim one).
                errors.setdefault(label, []).append(row[f"{metric}_std"] if row["runs"] > 1
                                                    else 0.0)
            spread = ("mean ± 1 sd over seeds" if any(r["runs"] > 1 for r in sweep["table"])
                      else "1 seed: no spread shown")
            charts.append(line_chart(series, errors=errors, title=f"{title} vs {x_key} "
                                     f"({spread})", x_label=x_key, y_label=title))
    table = sweep_markdown(sweep)
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    html_rows = "".join("<tr>" + "".join(f"<td>{escape(c.strip())}</td>" for c in row)
                        + "</tr>" for row in rows[1:])
    head = "".join(f"<th>{escape(c.strip())}</th>" for c in rows[0])
    warning = seeded_warning(sweep)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fedcare "
            f"sweep</title><style>{CSS}</style></head><body><h1>Sweep</h1>"
            f"<p class='sub'>grid {escape(json.dumps(grid))}, seeds {sweep['seeds']}</p>"
            + (f"<p class='warning'>{escape(warning)}</p>" if warning else "")
            + f"<div class='charts'>{''.join(charts)}</div><table><tr>{head}</tr>{html_rows}"
            "</table></body></html>\n")
