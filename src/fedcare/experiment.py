"""One run, end to end: data, federated training, baselines, evaluation, run directory.

This is what `fedcare run` calls; it is a library function so notebooks and
sweeps get the same behaviour without the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcare import __version__
from fedcare.config import RunConfig
from fedcare.data.site_data import FederatedData
from fedcare.errors import ConfigError, FedcareError
from fedcare.evaluation import (
    RESAMPLES,
    Evaluation,
    Metrics,
    binary_metrics,
    calibration_curve,
    logistic_covariance,
    pooled_details,
    roc_curve,
    subgroups,
)
from fedcare.federation.aggregator import RoundReport
from fedcare.federation.training import LocalTrainer
from fedcare.models import FlatModel
from fedcare.privacy.ledger import LEDGER_FILE
from fedcare.privacy.plan import BASELINES_NOT_PRIVATE
from fedcare.protection import who_sees_what
from fedcare.report.auditlog import AUDIT_LOG_FILE, AuditLog, audit_key, payload_digests_keyed
from fedcare.report.data_loss import loss_summary
from fedcare.report.events import close_audit_log, log_round_events, log_run_started
from fedcare.report.html import write_report
from fedcare.report.rundir import (
    CURVES_FILE,
    RunWriter,
    cohorts_public,
    load_checkpoint,
    make_run_dir,
    round_facts,
    site_facts,
)
from fedcare.runtime.local import LocalRuntime, load_federation, training_plan
from fedcare.seeding import BASELINE, INIT, torch_generator

# Per-round per-site evaluation costs one forward pass per site; past this many
# sites only the pooled test set is evaluated every round (sites at the end).
PER_SITE_EVAL_MAX_SITES = 50
# Single-site baselines get bootstrap intervals up to this many sites (the console table
# shows each of them up to 8); beyond, their chance verdict goes without the AUC interval.
LOCAL_BASELINE_INTERVALS_MAX_SITES = 8

LOCAL_BASELINES_SKIPPED = (
    "Each-site-alone baselines skipped: {n} sites is more than {most}, and each would be "
    "trained and then evaluated on every site's test set (minutes to hours); the pooled "
    "baseline is kept.")
"""``summary.json`` ``baselines.local_note`` of a federation too large for single-site baselines."""


@dataclass
class RunResult:
    run_dir: Path
    data: FederatedData
    federated: Evaluation
    pooled_baseline: Evaluation | None
    local_baselines: dict[str, Evaluation]
    summary: dict[str, Any]


def evaluate(model: FlatModel, params: torch.Tensor, data: FederatedData,
             per_site: bool = True, details_seed: int | None = None,
             resamples: int = RESAMPLES) -> Evaluation:
    """A model's metrics on the pooled and each site's test set.

    With `details_seed` (a final model), also the pooled test set's confusion matrix,
    bootstrap intervals (`resamples` of them, seeded by it; 0: none) and chance verdict
    (`pooled_details`).
    """
    model.load(params)
    x, y = data.pooled_test()
    logits = model.predict_logits(x)
    pooled = binary_metrics(logits, y)
    sites = {}
    if per_site:
        sites = {s.name: binary_metrics(model.predict_logits(s.x_test), s.y_test)
                 for s in data.sites}
    details = None if details_seed is None else pooled_details(logits, y, seed=details_seed,
                                                               resamples=resamples)
    return Evaluation(pooled, sites, details)


def model_curves(model: FlatModel, params: torch.Tensor, data: FederatedData,
                 per_site: bool = True) -> dict[str, Any]:
    """ROC and calibration curves of a model, pooled and (if `per_site`) on each site's test set."""
    model.load(params)
    x, y = data.pooled_test()
    sets = [("pooled", x, y)]
    if per_site:
        sets += [(s.name, s.x_test, s.y_test) for s in data.sites]
    curves = {}
    for name, xs, ys in sets:
        logits = model.predict_logits(xs)
        curves[name] = {"roc": roc_curve(logits, ys), "calibration": calibration_curve(logits, ys)}
    return curves


def subgroup_metrics(model: FlatModel, params: torch.Tensor,
                     data: FederatedData) -> dict[str, Metrics]:
    """Metrics on the pooled test set by sex and age band (where the schema has them)."""
    model.load(params)
    x, y = data.pooled_test()
    logits = model.predict_logits(x)
    return {label: binary_metrics(logits[mask], y[mask])
            for label, mask in subgroups(data).items()}


def train_centrally(model: FlatModel, x: torch.Tensor, y: torch.Tensor, config: RunConfig,
                    stream: int) -> torch.Tensor:
    """A baseline on one data set with the federated run's budget: rounds x local epochs."""
    plan = training_plan(config)
    epochs = config.federation.rounds * plan.epochs
    plan = type(plan)(epochs, plan.batch_size, plan.lr, plan.momentum)
    start = model.init_params(torch_generator(config.seed, INIT))
    params, _ = LocalTrainer(model).train(x, y, start, plan,
                                          torch_generator(config.seed, BASELINE, stream))
    return params


def run_experiment(config: RunConfig, out: str | Path | None = None,
                   on_round: Callable[[RoundReport, Evaluation], None] | None = None,
                   resume: str | Path | None = None,
                   on_baseline: Callable[[int, int], None] | None = None) -> RunResult:
    """Run the configured federation and its baselines; write the run directory.

    Parameters
    ----------
    config : RunConfig
    out : path, optional
        Exact run directory (must be new or empty); default a fresh one under ``config.out``.
    on_round : callable, optional
        Called after each round with its report and the global model's evaluation
        (the CLI draws its progress bar with it).
    resume : path, optional
        An interrupted run's directory: continue after its last checkpointed
        round, with its ledger (`config` should be that run's ``config.toml``).
    on_baseline : callable, optional
        Called as ``(done, total)`` before each baseline (pooled, then each site
        alone) and once they are all trained, so that a federation of many sites
        can show progress instead of sitting silent.

    If a round fails (for example the quorum is not met, or the privacy budget
    would be overspent), everything computed so far stays on disk: the metrics
    of earlier rounds, the last global model, the checkpoint, the privacy
    ledger and a summary with ``status = "failed"`` and the error; then the
    error is raised.
    """
    started = time.perf_counter()
    if config.threads < 1:
        raise ConfigError(f"threads must be >= 1; got {config.threads}.")
    torch.set_num_threads(config.threads)
    private = config.privacy.level != "none"
    baselines = config.baselines.wanted(private=private)
    data = load_federation(config)
    runtime = LocalRuntime(data, config)  # validates the rest of the config before any write
    model = runtime.model
    params = runtime.initial_params()
    first_round = 1
    if resume is None:
        run_dir = make_run_dir(config, out)
        writer = RunWriter(run_dir, config)
        if runtime.ledger is not None:
            runtime.ledger.persist_to(run_dir / LEDGER_FILE)
    else:
        run_dir = Path(resume)
        checkpoint = load_checkpoint(run_dir)
        first_round = int(checkpoint["round"]) + 1
        params = checkpoint["params"]
        runtime.aggregator.strategy.load_state_dict(checkpoint["strategy"])
        runtime.aggregator.clip_norm = float(checkpoint["clip_norm"])
        writer = RunWriter(run_dir, config, resume_round=first_round - 1)
        if runtime.ledger is not None:
            runtime.ledger.resume_from(run_dir / LEDGER_FILE, first_round - 1)
    per_site = len(data.sites) <= PER_SITE_EVAL_MAX_SITES
    public = cohorts_public(config)
    summary: dict[str, Any] = {
        "fedcare_version": __version__,
        "status": "running",
        "dataset": config.data.dataset_name,
        "description": data.description,
        "strategy": config.federation.strategy,
        "model": config.model.name,
        "n_parameters": model.spec.size,
        "seed": config.seed,
        "sites": [site_facts(s.name, s.n_train, s.n_test, public=public)
                  for s in data.sites],
        "data_loss": loss_summary(data.row_accounts, [s.name for s in data.sites],
                                  private=private),
        "rounds_completed": first_round - 1,
        "protection": {"scheme": config.protection.scheme,
                       "sentence": who_sees_what(config.protection)},
    }
    audit = AuditLog(run_dir / AUDIT_LOG_FILE, resume=resume is not None)
    payload_key = audit_key(run_dir) if payload_digests_keyed(config) else None
    if resume is None:
        log_run_started(audit, config, [s.name for s in data.sites], payload_key)
    else:
        audit.append("run_resumed", after_round=first_round - 1)
    meta = {"spec": model.spec.to_dict(), "model": config.to_dict()["model"],
            "schema": data.schema.to_dict(), "feature_names": data.feature_names,
            "standardization": data.standardization}

    def after_round(new_params: torch.Tensor, report: RoundReport) -> None:
        nonlocal params
        params = new_params
        evaluation = evaluate(model, new_params, data, per_site)
        writer.log_round({**round_facts(report, public=public), **evaluation.to_dict()})
        # Logged before the checkpoint: a checkpointed round is always in the log (a round
        # logged but not checkpointed runs again after --resume, and is logged again).
        log_round_events(audit, report, new_params, runtime.ledger, payload_key)
        writer.save_checkpoint(report.round, new_params,
                               runtime.aggregator.strategy.state_dict(),
                               runtime.aggregator.clip_norm)
        summary["rounds_completed"] = report.round
        if on_round is not None:
            on_round(report, evaluation)

    def privacy_summary() -> None:
        if runtime.privacy is not None and runtime.ledger is not None:
            summary["privacy"] = runtime.privacy.guarantee(runtime.ledger)

    try:
        params = runtime.run(after_round, params, first_round)
    except FedcareError as exc:
        privacy_summary()
        audit.append("run_failed", error=str(exc))
        summary.update(status="failed", error=str(exc),
                       elapsed_seconds=time.perf_counter() - started,
                       audit_log=close_audit_log(audit))
        writer.save_model(params, meta)
        writer.write_summary(summary)
        writer.close()
        write_report(run_dir)
        raise
    writer.save_model(params, meta)
    privacy_summary()
    federated = evaluate(model, params, data, details_seed=config.seed)
    writer.write_json(CURVES_FILE, model_curves(model, params, data, per_site))
    summary["subgroups"] = subgroup_metrics(model, params, data)
    if config.model.name == "logreg" and not private:
        # Odds ratios' Wald intervals; never in a private run (exact in each training row).
        summary["coefficient_covariance"] = logistic_covariance(
            params, [s.x_train for s in data.sites]).tolist()

    pooled_baseline = None
    local_baselines: dict[str, Evaluation] = {}
    if baselines:
        local_sites = data.sites if per_site else []
        total = len(local_sites) + 1
        if on_baseline is not None:
            on_baseline(0, total)
        x, y = data.pooled_train()
        pooled_baseline = evaluate(model, train_centrally(model, x, y, config, 0), data,
                                   details_seed=config.seed)
        # Intervals for a few single-site models only: 3.4 s each at 20,000 test patients.
        resamples = RESAMPLES if len(data.sites) <= LOCAL_BASELINE_INTERVALS_MAX_SITES else 0
        for i, site in enumerate(local_sites):
            if on_baseline is not None:
                on_baseline(i + 1, total)
            local = train_centrally(model, site.x_train, site.y_train, config, i + 1)
            local_baselines[site.name] = evaluate(model, local, data,
                                                  details_seed=config.seed,
                                                  resamples=resamples)
        if on_baseline is not None:
            on_baseline(total, total)
    summary.update(
        status="completed",
        elapsed_seconds=time.perf_counter() - started,
        federated=federated.to_dict(),
        baselines=None if pooled_baseline is None else {
            # In a private run the baselines are outside every guarantee: said where they are.
            **({"private": False, "note": BASELINES_NOT_PRIVATE} if private else {}),
            "pooled": pooled_baseline.to_dict(),
            "local": {k: v.to_dict() for k, v in local_baselines.items()},
            **({} if per_site else {"local_note": LOCAL_BASELINES_SKIPPED.format(
                n=len(data.sites), most=PER_SITE_EVAL_MAX_SITES)}),
        },
        config=config.to_dict(),
    )
    audit.append("run_completed", rounds=summary["rounds_completed"])
    summary["audit_log"] = close_audit_log(audit)
    writer.write_summary(summary)
    writer.close()
    write_report(run_dir)
    return RunResult(run_dir, data, federated, pooled_baseline, local_baselines, summary)


__all__ = ["Evaluation", "RunResult", "evaluate", "model_curves", "run_experiment",
           "subgroup_metrics", "train_centrally"]
