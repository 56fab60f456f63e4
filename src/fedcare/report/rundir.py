"""The run directory: everything a run produced, written as it happens.

Layout (documented in the README)::

    RUN_DIR/
      config.toml      the resolved configuration (re-runnable with `fedcare run`)
      metrics.jsonl    one JSON object per round, appended when the round ends
      model.pt         final global model: flat parameters, layout, schema, preprocessing
      summary.json     final metrics of the federated model and the baselines
      checkpoint.pt    the last completed round: model, strategy state (for --resume)
      privacy_ledger.jsonl  every DP spend, appended as it happens (private runs)
"""

from __future__ import annotations

import json
import math
import os
import pickle
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError
from fedcare.federation.aggregator import RoundReport


def make_run_dir(config: RunConfig, out: str | Path | None = None) -> Path:
    """Create a fresh run directory: `out` exactly, else ``config.out / config.name``.

    `out` (``fedcare run --out``) must be new or empty, so no earlier run is
    overwritten; under ``config.out`` a taken name gets a ``-2``, ``-3``... suffix
    instead (default name: ``<dataset>-<strategy>-<time>``).
    """
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"--out {path} exists and is not empty; choose a new directory so "
                              "no earlier run is overwritten.")
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        base = config.name or f"{config.data.dataset_name}-{config.federation.strategy}-{stamp}"
        path = Path(config.out) / base
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(config.out) / f"{base}-{suffix}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``summary.json``, or None if it has none yet (a run stopped or still running).

    Raises
    ------
    DataError
        The file exists but is not a JSON object (damaged, or not fedcare's).
    """
    path = Path(run_dir) / "summary.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                        f"column {exc.colno}).") from None
    if not isinstance(summary, dict):
        raise DataError(f"{path} holds a JSON {type(summary).__name__}, not a run summary.")
    return summary


def jsonable(value: Any) -> Any:
    """NaN and inf become null: JSON has no such numbers, and consumers choke on them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write atomically: a reader never sees half a file, a crash never leaves one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def cohorts_public(config: RunConfig) -> bool:
    """Whether the run's artefacts may name each round's sites and each site's size.

    Not under site-level DP: the guarantee covers a site's whole dataset, its
    size included, and its epsilon counts on amplification by Poisson sampling,
    which holds only while nobody but the aggregator knows who was sampled.
    """
    return config.privacy.level != "site"


def site_facts(name: str, n_train: int, n_test: int, *, public: bool) -> dict[str, Any]:
    """A site in ``summary.json``: its name and test size, and its training size if public."""
    return {"name": name, "n_train": n_train, "n_test": n_test} if public else \
        {"name": name, "n_test": n_test}


def round_facts(report: RoundReport, *, public: bool) -> dict[str, Any]:
    """What ``metrics.jsonl`` says of a round's federation, as both runtimes log it.

    With `public` False (`cohorts_public`) nothing names the round's sites:
    neither who took part nor who was left out, nor the rows they trained on.
    """
    facts: dict[str, Any] = {"round": report.round}
    if public:
        # Whether a round was released from noise alone says whether its cohort was empty
        # or short: cohort information, kept to the coordinator's audit log when private.
        facts.update(participants=report.participants, failures=report.failures,
                     train_loss=report.train_loss, n_examples=report.n_examples,
                     empty_round=report.empty)
    facts["clip_norm"] = report.clip_norm
    return facts


def evaluation_facts(evaluation: dict[str, Any], *, public: bool) -> dict[str, Any]:
    """What ``metrics.jsonl`` says of a deployed round's evaluation (`round_facts`' sibling).

    With `public` False the pooled counts (``n``, ``sites``, ``roc_auc_sites``) are
    left out: from one round to the next they would change by the test size of a site
    that left or came back. ``summary.json`` keeps the final evaluation's, as `fedcare
    run` publishes its pooled test size.
    """
    pooled = evaluation.get("pooled")
    if public or pooled is None:
        return evaluation
    counts = ("n", "sites", "roc_auc_sites")
    return {**evaluation, "pooled": {k: v for k, v in pooled.items() if k not in counts}}


CHECKPOINT_FILE = "checkpoint.pt"
CURVES_FILE = "curves.json"


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The last checkpoint of a run: ``round``, ``params``, ``strategy``, ``clip_norm``."""
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        raise ConfigError(f"{run_dir} has no {CHECKPOINT_FILE}: no round of it completed, so "
                          "there is nothing to resume; start a new run.")
    try:
        checkpoint: dict[str, Any] = torch.load(path, weights_only=True)
        int(checkpoint["round"])
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError,
            ValueError) as exc:
        raise DataError(f"{path} cannot be read (damaged or not a fedcare checkpoint: "
                        f"{type(exc).__name__}); the run cannot be resumed from it.") from None
    return checkpoint


class RunWriter:
    """Appends round metrics and writes the final artefacts of one run.

    With `resume_round`, the run directory already exists: its config is kept
    and metrics of rounds after `resume_round` (never checkpointed) are dropped.
    """

    def __init__(self, path: Path, config: RunConfig, resume_round: int | None = None) -> None:
        self.path = path
        metrics = path / "metrics.jsonl"
        if resume_round is None:
            (path / "config.toml").write_text(config.anchored(Path.cwd()).to_toml(),
                                              encoding="utf-8")
        elif metrics.exists():
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("round", 0) <= resume_round]
            tmp = metrics.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, metrics)
        self._metrics = metrics.open("a", encoding="utf-8")

    def save_checkpoint(self, round_number: int, params: torch.Tensor,
                        strategy_state: dict[str, torch.Tensor], clip_norm: float) -> None:
        """Atomically record a completed round (what `--resume` restarts from).

        `clip_norm` is client-level DP's current bound (it moves under adaptive clipping).
        """
        tmp = self.path / (CHECKPOINT_FILE + ".tmp")
        torch.save({"round": round_number, "params": params.detach().clone(),
                    "strategy": strategy_state, "clip_norm": clip_norm}, tmp)
        os.replace(tmp, self.path / CHECKPOINT_FILE)

    def log_round(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        self._metrics.flush()

    def save_model(self, params: torch.Tensor, meta: dict[str, Any]) -> None:
        tmp = self.path / "model.pt.tmp"
        torch.save({"params": params.detach().clone(), **meta}, tmp)
        os.replace(tmp, self.path / "model.pt")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        write_json(self.path / name, content)

    def close(self) -> None:
        self._metrics.close()


def shortfall_summary(short: list[dict[str, Any]], *, public: bool) -> dict[str, Any]:
    """``summary.json``'s ``short_rounds``: each round in which a selected site sent no update
    (``round``, ``sites`` that did, ``of`` selected, ``missing``), so that a federation
    running on fewer sites than it has is seen. None when the rounds' cohorts are not
    public (`cohorts_public`): the coordinator's audit log keeps them."""
    return {"short_rounds": short if public else None}


def result_line(run_dir: Path) -> str:
    """One line saying how a run ended, its headline metric and where it wrote.

    For the end of ``fedcare serve`` (and anyone reading a run directory).
    """
    summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    rounds = (summary.get("config") or {}).get("federation", {}).get("rounds", "?")
    done = summary.get("rounds_completed", 0)
    status = summary.get("status", "?")
    text = f"run {status}, {done} of {rounds} rounds"
    pooled = (summary.get("federated") or {}).get("pooled") or {}
    if pooled.get("accuracy") is not None:
        text += f"; accuracy {pooled['accuracy']:.3f}"
        if pooled.get("roc_auc") is not None:
            mean = pooled.get("roc_auc_sites")
            text += f", ROC AUC {pooled['roc_auc']:.3f}" + (
                f" (mean of {mean} sites' AUCs)" if mean is not None else "")
        text += f" on {pooled.get('n', '?')} test patients"
    short = summary.get("short_rounds")
    if short:
        text += (f"; {len(short)} round(s) short of sites (round "
                 + ", ".join(f"{r['round']}: {r['sites']} of {r['of']}" for r in short[:5])
                 + (", ..." if len(short) > 5 else "") + ")")
    if summary.get("error"):
        text += f"; error: {summary['error']}"
    files = sorted(p.name for p in Path(run_dir).iterdir()
                   if p.suffix in (".json", ".html", ".pt", ".md") and p.name != CHECKPOINT_FILE)
    return text + f"; wrote {Path(run_dir).resolve()} ({', '.join(files)})"
