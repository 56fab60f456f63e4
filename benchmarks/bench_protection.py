"""Protection: what ``plain``, ``secagg`` and ``ckks`` cost (issue 4, section 7).

Four comparisons, all in one process, every scheme against the others in the
same run (rounds of the three schemes interleaved, the order rotated each
round, so that load drift hits all of them alike):

1. **Default heart-disease job**: ``RunConfig()`` (what ``fedcare run`` trains
   without a config: bundled UCI heart disease, 4 hospitals, logistic
   regression, 20 rounds) with ``protection.scheme`` set to each scheme.
   Per-round wall time (``Aggregator.run_round``, as ``LocalRuntime.run``
   calls it), bytes each site sends per round (``wire_size`` of every reply
   to ``Site.exchange`` and of every ``FitResult.payload``), the absolute
   extra milliseconds per site per round against ``plain``, and the final
   pooled test accuracy (also from ``run_experiment`` itself, baselines and
   report included, as ``fedcare run`` would give it).
2. **Training-dominated**: the generated ``synthetic`` cohort, 20,000
   patients split IID over 10 sites (2,000 each, 80/20 stratified, so 1,600
   training rows per site), MLP 30-300-300-1 (99,901 parameters), 5 local
   epochs, batch 32, 3 rounds. Ratios ckks/plain and secagg/plain.
3. **1M parameters**: the same cohort, MLP 30-1000-1000-1 (1,033,001
   parameters), 1 local epoch, 3 rounds; round time and bytes per site.
4. **Micro**: 100,000 and 1,000,000 float64 values, 10 sites: fedcare's
   ``ckks.encrypt`` / ``ckks.add`` / ``ckks.decrypt`` against raw TenSEAL
   doing the same work with the same parameters (`CkksParameters`): per
   chunk ``ts.ckks_vector(ctx, chunk).serialize()``; for the sum of 10
   payloads ``ckks_vector_from`` + ``add_`` + ``serialize`` (two baselines:
   *in memory*, each payload parsed once and the sum serialized once, and
   *streaming*, the running total parsed and re-serialized at every
   payload as fedcare's ``add`` does); ``ckks_vector_from`` + ``decrypt``.
   The flooding noise draw is timed on its own (``SecureNoise``); fedcare's
   ``decrypt`` is timed with zero noise and with ``SecureNoise``. Payload
   bytes per value; ``wire_digest`` (the audit hash the aggregator takes of
   every payload); secagg's mask (one site) and unmask (aggregator).

One torch thread (``torch.set_num_threads(1)``, as ``fedcare run`` uses);
medians of repeats for micro timings; the 1-minute load average is recorded
around every part and every round, and process CPU time next to wall time.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_protection.py          # -> results/protection.json
    /work/venv/bin/python benchmarks/bench_protection.py --quick  # tiny sizes, no file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import tenseal as ts
import torch
from _env import git_state, loadavg  # benchmarks/ is sys.path[0] when a script runs

import fedcare
from fedcare.config import RunConfig
from fedcare.data.datasets import build_federation
from fedcare.data.site_data import FederatedData
from fedcare.experiment import evaluate, run_experiment
from fedcare.federation.site import FitResult
from fedcare.privacy.noise import NoiseSource, SecureNoise
from fedcare.protection import ckks
from fedcare.protection.base import wire_digest, wire_size
from fedcare.protection.secagg import RoundSetup, SecAggAggregator, SecAggSite
from fedcare.runtime.local import LocalRuntime

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = ("plain", "secagg", "ckks")
TARGETS = {"accuracy_abs_diff_max": 0.002, "ckks_over_plain_max": 1.3,
           "secagg_over_plain_max": 1.2, "ours_over_raw_tenseal_max": 1.10,
           "ckks_bytes_per_value_max": 40.0}


@dataclass(frozen=True)
class Workload:
    """One federated job, run once per scheme."""

    label: str
    dataset: str  # "" = the default RunConfig (heart disease)
    patients: int = 0
    sites: int = 0
    hidden: tuple[int, ...] = ()
    epochs: int = 1
    rounds: int = 20

    def config(self, scheme: str, seed: int) -> RunConfig:
        config = RunConfig()
        config.seed = seed
        config.threads = 1
        if self.dataset:
            config.data.dataset = self.dataset
            config.data.n_patients = self.patients
            config.data.partition = "iid"
            config.data.sites = self.sites
            config.model.name = "mlp"
            config.model.hidden = list(self.hidden)
            config.federation.local_epochs = self.epochs
            config.federation.rounds = self.rounds
            config.baselines.enabled = False
        config.protection.scheme = scheme
        return config

    def describe(self) -> dict[str, Any]:
        c = self.config("plain", 0)
        return {"dataset": c.data.dataset_name, "n_patients": self.patients or None,
                "partition": c.data.partition, "sites": self.sites or None,
                "model": c.model.name, "hidden": c.model.hidden if c.model.name == "mlp" else None,
                "strategy": c.federation.strategy, "local_epochs": c.federation.local_epochs,
                "batch_size": c.federation.batch_size, "lr": c.federation.lr,
                "rounds": c.federation.rounds, "fraction": c.federation.fraction}


def load1() -> float:
    return loadavg()[0]


def ms(seconds: float) -> float:
    return 1e3 * seconds


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values))


# ------------------------------------------------------------------ instrumenting a runtime
@dataclass
class Probe:
    """Counts what each site of one runtime sends and times the protection steps.

    Wraps, on the instances only (nothing in fedcare is changed): each site's
    ``exchange`` and ``fit`` (bytes of their return values, by `wire_size`),
    and the scheme's site and aggregator sessions (``protect``, ``setup``,
    ``add``, ``reveal``).
    """

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payload: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def reset(self) -> None:
        self.sent.clear()
        self.payload.clear()
        self.received.clear()
        self.seconds.clear()

    def timed(self, key: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return wrapper

    def attach(self, runtime: LocalRuntime) -> None:
        for site in runtime.sites:
            self._wrap_site(site)
        scheme: Any = runtime.aggregator.protection
        site_session, aggregator_session = scheme.site_session, scheme.aggregator_session

        def new_site_session(round_number: int, site: int) -> Any:
            session = site_session(round_number, site)
            session.protect = self.timed("protect", session.protect)
            return session

        def new_aggregator_session(round_number: int, cohort: Sequence[int], length: int) -> Any:
            session = aggregator_session(round_number, cohort, length)
            for step in ("setup", "add", "reveal"):
                setattr(session, step, self.timed(step, getattr(session, step)))
            return session

        scheme.site_session = new_site_session
        scheme.aggregator_session = new_aggregator_session

    def _wrap_site(self, site: Any) -> None:
        name, exchange, fit = site.name, site.exchange, site.fit
        timed_fit = self.timed("fit", fit)

        def counted_exchange(round_number: int, message: object) -> object:
            self.received[name] += wire_size(message)
            reply = exchange(round_number, message)
            self.sent[name] += wire_size(reply)
            return reply

        def counted_fit(*args: Any, **kwargs: Any) -> FitResult:
            result: FitResult = timed_fit(*args, **kwargs)
            size = wire_size(result.payload)
            self.sent[name] += size
            self.payload[name] += size
            return result

        site.exchange = counted_exchange
        site.fit = counted_fit


# ------------------------------------------------------------------ federated workloads
def run_workload(workload: Workload, data: FederatedData, seed: int, reps: int = 1,
                 warmup: bool = True) -> dict[str, Any]:
    """Every scheme on `workload`, rounds interleaved; `reps` fresh runs of the whole job."""
    rows: dict[str, dict[str, Any]] = {s: defaultdict(list) for s in SCHEMES}
    n_sites = len(data.sites)
    load_start = loadavg()
    started = time.perf_counter()
    if warmup:  # untimed: one short plain round, so no scheme pays for torch's first calls
        config = workload.config("plain", seed)
        config.federation.local_epochs = 1
        runtime = LocalRuntime(data, config)
        runtime.aggregator.run_round(1, runtime.sites, runtime.initial_params())
    for _ in range(reps):
        runtimes, probes, params = {}, {}, {}
        for scheme in SCHEMES:
            runtime = LocalRuntime(data, workload.config(scheme, seed))
            probes[scheme] = Probe()
            probes[scheme].attach(runtime)
            runtimes[scheme], params[scheme] = runtime, runtime.initial_params()
        rounds = runtimes["plain"].config.federation.rounds
        for r in range(1, rounds + 1):
            k = r % len(SCHEMES)
            for scheme in SCHEMES[k:] + SCHEMES[:k]:
                runtime, probe, row = runtimes[scheme], probes[scheme], rows[scheme]
                probe.reset()
                load = load1()
                wall, cpu = time.perf_counter(), time.process_time()
                params[scheme], report = runtime.aggregator.run_round(r, runtime.sites,
                                                                      params[scheme])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if report.failures or len(report.participants) != n_sites:
                    raise SystemExit(f"{workload.label}/{scheme} round {r}: {report.failures}")
                s = probe.seconds
                row["round_s"].append(wall)
                row["round_cpu_s"].append(cpu)
                row["load1"].append(load)
                row["train_s"].append(s["fit"] - s["protect"])
                row["protect_s"].append(s["protect"])
                row["setup_s"].append(s["setup"])
                row["add_s"].append(s["add"])
                row["reveal_s"].append(s["reveal"])
                row["other_s"].append(wall - s["fit"] - s["setup"] - s["add"] - s["reveal"])
                row["sent_B_per_site"].append(sum(probe.sent.values()) / n_sites)
                row["sent_B_max_site"].append(max(probe.sent.values()))
                row["payload_B_per_site"].append(sum(probe.payload.values()) / n_sites)
                row["received_B_per_site"].append(sum(probe.received.values()) / n_sites)
        for scheme in SCHEMES:
            metrics = evaluate(runtimes[scheme].model, params[scheme], data, per_site=False)
            rows[scheme]["accuracy"].append(metrics.pooled["accuracy"])
            rows[scheme]["roc_auc"].append(metrics.pooled["roc_auc"])
        n_parameters = runtimes["plain"].model.spec.size
    out: dict[str, Any] = {"workload": workload.describe(), "sites": n_sites,
                           "n_parameters": n_parameters, "payload_values": n_parameters + 1,
                           "train_rows_per_site": [s.n_train for s in data.sites],
                           "reps": reps, "rounds_timed_per_scheme": len(rows["plain"]["round_s"]),
                           "loadavg_at_start": load_start, "loadavg_at_end": loadavg(),
                           "wall_s": time.perf_counter() - started, "schemes": {}}
    plain_mean = mean(rows["plain"]["round_s"])
    plain_median = median(rows["plain"]["round_s"])
    plain_cpu = mean(rows["plain"]["round_cpu_s"])
    for scheme in SCHEMES:
        row = rows[scheme]
        summary = {key: mean(values) for key, values in row.items()
                   if key not in ("round_s", "accuracy", "roc_auc", "load1")}
        summary.update(
            mean_round_s=mean(row["round_s"]), median_round_s=median(row["round_s"]),
            min_round_s=min(row["round_s"]), max_round_s=max(row["round_s"]),
            ratio_mean_to_plain=mean(row["round_s"]) / plain_mean,
            ratio_median_to_plain=median(row["round_s"]) / plain_median,
            ratio_cpu_to_plain=mean(row["round_cpu_s"]) / plain_cpu,
            paired_ratio_median=median([a / b for a, b in zip(row["round_s"],
                                                               rows["plain"]["round_s"],
                                                               strict=True)]),
            extra_ms_per_site_round=ms(mean(row["round_s"]) - plain_mean) / n_sites,
            extra_ms_per_site_round_median=ms(median(row["round_s"]) - plain_median) / n_sites,
            accuracy=row["accuracy"], roc_auc=row["roc_auc"],
            accuracy_abs_diff_to_plain=max(abs(a - b) for a, b in zip(
                row["accuracy"], rows["plain"]["accuracy"], strict=True)),
            round_s_all=row["round_s"], load1_per_round=row["load1"])
        out["schemes"][scheme] = summary
    return out


def heart_via_run_experiment(seed: int) -> dict[str, Any]:
    """Each scheme through `run_experiment` (what `fedcare run` does): final accuracy."""
    out = {}
    workload = Workload("heart", "")
    for scheme in SCHEMES:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = run_experiment(workload.config(scheme, seed), out=Path(tmp) / "run")
            pooled = result.summary["federated"]["pooled"]
            out[scheme] = {"accuracy": pooled["accuracy"], "roc_auc": pooled["roc_auc"],
                           "n_test": pooled["n"], "elapsed_s": time.perf_counter() - start,
                           "protection": result.summary["protection"]["scheme"]}
    torch.set_num_threads(1)  # run_experiment sets config.threads (1) anyway
    return out


# ------------------------------------------------------------------ micro benchmarks
class ZeroNoise:
    """Times `ckks.decrypt` without the flooding draw (timed on its own)."""

    secure = False

    def gaussian(self, n: int, std: float) -> torch.Tensor:
        return torch.zeros(n)


def raw_context(params: ckks.CkksParameters) -> tuple[ts.Context, ts.Context]:
    """A symmetric TenSEAL CKKS context with `params` (as fedcare's) and its keyless copy."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = 2.0**params.global_scale_bits
    public = ts.context_from(context.serialize(save_public_key=False, save_secret_key=False,
                                               save_galois_keys=False, save_relin_keys=False))
    return context, public


def raw_encrypt(context: ts.Context, vector: np.ndarray, slots: int) -> list[bytes]:
    return [ts.ckks_vector(context, vector[i:i + slots]).serialize()
            for i in range(0, vector.size, slots)]


def raw_sum_in_memory(public: ts.Context, payloads: Sequence[list[bytes]]) -> list[bytes]:
    """Parse each payload once, add in memory, serialize the sum once."""
    total: list[Any] = []
    for chunks in payloads:
        vectors = [ts.ckks_vector_from(public, c) for c in chunks]
        if not total:
            total = vectors
            continue
        for partial, addend in zip(total, vectors, strict=True):
            partial.add_(addend)
    return [v.serialize() for v in total]


def raw_sum_streaming(public: ts.Context, payloads: Sequence[list[bytes]]) -> list[bytes]:
    """As fedcare's `add`: the running total is parsed and re-serialized at every payload."""
    total: list[bytes] | None = None
    for chunks in payloads:
        if total is None:
            total = list(chunks)
            continue
        running = [ts.ckks_vector_from(public, c) for c in total]
        for partial, chunk in zip(running, chunks, strict=True):
            partial.add_(ts.ckks_vector_from(public, chunk))
        total = [v.serialize() for v in running]
    assert total is not None
    return total


def raw_decrypt(context: ts.Context, chunks: Sequence[bytes]) -> list[list[float]]:
    return [ts.ckks_vector_from(context, c).decrypt() for c in chunks]


class Samples:
    """Wall and process CPU time of repeated calls, by key; medians in milliseconds."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)

    def run(self, key: str, call: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        value = call()
        self.wall[key].append(time.perf_counter() - wall)
        self.cpu[key].append(time.process_time() - cpu)
        return value

    def ms(self, key: str, cpu: bool = False) -> float:
        return ms(median((self.cpu if cpu else self.wall)[key]))

    def ratio(self, ours: str, raw: str) -> dict[str, float]:
        return {"wall": self.ms(ours) / self.ms(raw),
                "cpu": self.ms(ours, cpu=True) / self.ms(raw, cpu=True)}


def rotated(calls: list[tuple[str, Callable[[], Any]]], turn: int) -> list[tuple[str, Any]]:
    """Run `calls` starting at position `turn` (so no variant always goes first)."""
    k = turn % len(calls)
    return [(key, call()) for key, call in calls[k:] + calls[:k]]


def micro_ckks(size: int, sites: int, reps: dict[str, int], seed: int) -> dict[str, Any]:
    params = ckks.DEFAULT_PARAMETERS
    slots = params.slots
    site_ctx = ckks.create_site_context(params)
    public_ctx = site_ctx.public()
    raw_ctx, raw_public = raw_context(params)
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, 1.0, size) for _ in range(sites)]
    expected = np.sum(updates, axis=0)
    ckks.encrypt(site_ctx, updates[0][:slots], site="warm-up")  # untimed
    raw_encrypt(raw_ctx, updates[0][:slots], slots)
    load_start = load1()
    t = Samples()

    payloads: list[ckks.CkksPayload] = []
    raw_payloads: list[list[bytes]] = []
    for rep in range(reps["encrypt"]):
        payloads, raw_payloads = [], []
        for i, update in enumerate(updates):
            done = dict(rotated([
                ("ours", lambda u=update, i=i: t.run(
                    "encrypt_ours", lambda: ckks.encrypt(site_ctx, u, site=str(i)))),
                ("raw", lambda u=update: t.run(
                    "encrypt_raw", lambda: raw_encrypt(raw_ctx, u, slots)))], rep + i))
            payloads.append(done["ours"])
            raw_payloads.append(done["raw"])

    def session_sum() -> ckks.CkksPayload:
        """What the runtime's aggregator does: `add` each payload, then `total` (serialized)."""
        session = ckks.CkksAggregatorSession(public_ctx, 1, range(sites), size)
        for i, p in enumerate(payloads):
            t.run("add_session_each", lambda p=p, i=i: session.add(i, p))
        total = t.run("add_session_serialize", lambda: session.total)
        assert total is not None
        return total

    def function_sum() -> ckks.CkksPayload:
        """The functional API, `ckks.add`: the running total travels as bytes."""
        total: ckks.CkksPayload | None = None
        for i, p in enumerate(payloads):
            total = ckks.add(public_ctx, total, p, site=str(i))
        assert total is not None
        return total

    for rep in range(reps["add"]):
        done = dict(rotated([
            ("ours", lambda: t.run("add_ours", session_sum)),
            ("function", lambda: t.run("add_function", function_sum)),
            ("in_memory", lambda: t.run("add_raw_in_memory",
                                        lambda: raw_sum_in_memory(raw_public, raw_payloads))),
            ("streaming", lambda: t.run("add_raw_streaming",
                                        lambda: raw_sum_streaming(raw_public, raw_payloads)))],
            rep))
    aggregate: ckks.CkksPayload = done["ours"]
    raw_total: list[bytes] = done["in_memory"]

    noise = SecureNoise()
    zero = cast(NoiseSource, ZeroNoise())
    for rep in range(reps["decrypt"]):
        done = dict(rotated([
            ("ours", lambda: t.run("decrypt_ours",
                                   lambda: ckks.decrypt(site_ctx, aggregate, noise=zero))),
            ("secure", lambda: t.run("decrypt_ours_secure_noise",
                                     lambda: ckks.decrypt(site_ctx, aggregate, noise=noise))),
            ("raw", lambda: t.run("decrypt_raw", lambda: raw_decrypt(raw_ctx, raw_total))),
            ("flood", lambda: t.run("flood_draw", lambda: noise.gaussian(
                size, ckks.DEFAULT_FLOODING_STD)))], rep))
    decrypted = done["secure"]
    raw_values = np.concatenate(done["raw"])[:size]

    payload = payloads[0]
    plain_tensor = torch.from_numpy(updates[0]).float()
    for _ in range(3):
        t.run("wire_digest_ckks", lambda: wire_digest(payload))
        t.run("wire_digest_plain", lambda: wire_digest(plain_tensor))

    def compare(ours: str, raws: dict[str, str]) -> dict[str, Any]:
        row: dict[str, Any] = {"ours_ms": t.ms(ours), "ours_cpu_ms": t.ms(ours, cpu=True)}
        for label, raw in raws.items():
            row[f"{label}_ms"] = t.ms(raw)
            row[f"{label}_cpu_ms"] = t.ms(raw, cpu=True)
            row[f"ratio_to_{label}"] = t.ratio(ours, raw)
        return row

    encrypted = compare("encrypt_ours", {"raw": "encrypt_raw"})
    summed = compare("add_ours", {"raw_in_memory": "add_raw_in_memory",
                                  "raw_streaming": "add_raw_streaming"})
    summed["what"] = ("CkksAggregatorSession.add per payload + .total (the runtime's path, "
                      f"{sites} payloads)")
    summed["ours_per_add_ms"] = t.ms("add_session_each")
    summed["ours_serialize_total_ms"] = t.ms("add_session_serialize")
    add_function = compare("add_function", {"raw_streaming": "add_raw_streaming",
                                            "raw_in_memory": "add_raw_in_memory"})
    add_function["what"] = f"ckks.add chained over {sites} payloads (functional API)"
    opened = compare("decrypt_ours", {"raw": "decrypt_raw"})
    opened["ours_with_secure_noise_ms"] = t.ms("decrypt_ours_secure_noise")
    opened["flood_draw_ms"] = t.ms("flood_draw")
    opened["flood_draw_cpu_ms"] = t.ms("flood_draw", cpu=True)
    pipeline: dict[str, Any] = {
        "what": f"{sites} x encrypt + sum of {sites} + decrypt (zero noise); raw sum in memory"}
    for clock, cpu in (("wall", False), ("cpu", True)):
        ours = (sites * t.ms("encrypt_ours", cpu) + t.ms("add_ours", cpu)
                + t.ms("decrypt_ours", cpu))
        raw = (sites * t.ms("encrypt_raw", cpu) + t.ms("add_raw_in_memory", cpu)
               + t.ms("decrypt_raw", cpu))
        pipeline[f"ours_{clock}_ms"], pipeline[f"raw_{clock}_ms"] = ours, raw
        pipeline[f"ratio_{clock}"] = ours / raw
    return {
        "values": size, "sites": sites, "chunks": len(payload.chunks), "slots": slots,
        "parameters": {"poly_modulus_degree": params.poly_modulus_degree,
                       "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
                       "global_scale_bits": params.global_scale_bits},
        "reps": reps, "samples": {k: len(v) for k, v in t.wall.items()},
        "encrypt_per_payload": encrypted, "sum": summed, "sum_ckks_add_function": add_function,
        "decrypt": opened,
        "pipeline": pipeline,
        "bytes": {"payload": payload.nbytes, "wire_size": wire_size(payload),
                  "per_value": payload.nbytes / size,
                  "wire_size_per_value": wire_size(payload) / size,
                  "per_slot": payload.nbytes / (len(payload.chunks) * slots),
                  "raw_payload": sum(len(c) for c in raw_payloads[0]),
                  "chunk": len(payload.chunks[0])},
        "wire_digest_ms": {"ckks_payload": t.ms("wire_digest_ckks"),
                           "plain_float32_tensor": t.ms("wire_digest_plain")},
        "max_abs_error": {"ours_flooded": float(np.max(np.abs(decrypted - expected))),
                          "raw_exact": float(np.max(np.abs(raw_values - expected)))},
        "load1_start": load_start, "load1_end": load1(),
    }


def micro_secagg(size: int, sites: int, reps: int, seed: int) -> dict[str, Any]:
    setup = RoundSetup(round_number=1, site_ids=tuple(range(1, sites + 1)),
                       threshold=sites // 2 + 1, vector_length=size)
    rng = np.random.default_rng(seed)
    updates = {i: rng.normal(0.0, 1.0, size) for i in setup.site_ids}
    tensors = [torch.from_numpy(u) for u in updates.values()]
    t = Samples()
    masked_bytes, error = 0, float("nan")
    for _ in range(reps):
        parties = {i: SecAggSite(i, setup) for i in setup.site_ids}
        aggregator = SecAggAggregator(setup)
        roster = aggregator.collect_keys([s.advertise_keys() for s in parties.values()])
        inboxes = aggregator.collect_shares([s.share_keys(roster) for s in parties.values()])
        inputs = [t.run("mask", lambda p=parties[v], m=inbox, u=updates[v]: p.mask_input(m, u))
                  for v, inbox in inboxes.items()]
        masked_bytes = wire_size(inputs[0])

        def unmask(aggregator: SecAggAggregator = aggregator,
                   parties: dict[int, SecAggSite] = parties,
                   inputs: list[Any] = inputs) -> Any:
            request = aggregator.collect_masked_inputs(inputs)
            return aggregator.collect_unmask_responses(
                [parties[v].unmask(request) for v in request.survivors])

        result = t.run("unmask", unmask)

        def plain_sum() -> torch.Tensor:
            total = tensors[0].clone()
            for tensor in tensors[1:]:
                total.add_(tensor)
            return total

        error = float(np.max(np.abs(result.values - t.run("plain_sum", plain_sum).numpy())))
    return {"values": size, "sites": sites, "reps": reps,
            "mask_ms_per_site": t.ms("mask"), "mask_cpu_ms_per_site": t.ms("mask", cpu=True),
            "sum_and_unmask_ms": t.ms("unmask"),
            "sum_and_unmask_cpu_ms": t.ms("unmask", cpu=True),
            "plain_sum_float64_ms": t.ms("plain_sum"),
            "masked_input_bytes": masked_bytes, "bytes_per_value": masked_bytes / size,
            "max_abs_error": error}


# ------------------------------------------------------------------ report
def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "tenseal": ts.__version__,
            "numpy": np.__version__, "fedcare": fedcare.__version__,
            "loadavg_at_start": loadavg(), "git": git_state()}


def print_workload(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}: {result['sites']} sites, {result['n_parameters']:,} parameters, "
          f"{result['rounds_timed_per_scheme']} rounds timed per scheme, "
          f"load {result['loadavg_at_start'][0]:.2f} -> {result['loadavg_at_end'][0]:.2f}")
    head = (f"{'scheme':>7} {'mean s':>8} {'median s':>8} {'x plain':>7} {'x cpu':>6} "
            f"{'+ms/site':>9} {'train s':>8} {'protect':>8} {'setup':>7} {'add':>7} "
            f"{'reveal':>7} {'other':>7} {'sent B/site':>12} {'acc':>7}")
    print(head)
    print("-" * len(head))
    for scheme, r in result["schemes"].items():
        print(f"{scheme:>7} {r['mean_round_s']:>8.4f} {r['median_round_s']:>8.4f} "
              f"{r['ratio_mean_to_plain']:>7.3f} {r['ratio_cpu_to_plain']:>6.3f} "
              f"{r['extra_ms_per_site_round']:>9.2f} {r['train_s']:>8.3f} "
              f"{r['protect_s']:>8.3f} {r['setup_s']:>7.3f} {r['add_s']:>7.3f} "
              f"{r['reveal_s']:>7.3f} {r['other_s']:>7.3f} {r['sent_B_per_site']:>12,.0f} "
              f"{r['accuracy'][0]:>7.4f}")


def print_micro(rows: list[dict[str, Any]], secagg_rows: list[dict[str, Any]]) -> None:
    print("\nmicro, ckks: median ms (x = ours / raw TenSEAL, wall; cpu in brackets)")
    head = (f"{'values':>9} {'chunks':>6} {'enc ours':>9} {'enc raw':>9} {'x':>11} "
            f"{'sum ours':>9} {'sum mem':>9} {'x':>11} {'add() fn':>9} {'sum strm':>9} "
            f"{'x':>11} "
            f"{'dec ours':>9} {'dec raw':>8} {'x':>11} {'flood':>7} {'B/value':>7}")
    print(head)
    print("-" * len(head))

    def x(ratio: dict[str, float]) -> str:
        return f"{ratio['wall']:.2f} ({ratio['cpu']:.2f})"

    for r in rows:
        e, a, d = r["encrypt_per_payload"], r["sum"], r["decrypt"]
        fn = r["sum_ckks_add_function"]
        print(f"{r['values']:>9,} {r['chunks']:>6} {e['ours_ms']:>9.1f} {e['raw_ms']:>9.1f} "
              f"{x(e['ratio_to_raw']):>11} {a['ours_ms']:>9.1f} {a['raw_in_memory_ms']:>9.1f} "
              f"{x(a['ratio_to_raw_in_memory']):>11} {fn['ours_ms']:>9.1f} "
              f"{fn['raw_streaming_ms']:>9.1f} {x(fn['ratio_to_raw_streaming']):>11} "
              f"{d['ours_ms']:>9.1f} {d['raw_ms']:>8.1f} "
              f"{x(d['ratio_to_raw']):>11} {d['flood_draw_ms']:>7.1f} "
              f"{r['bytes']['per_value']:>7.2f}")
    print("\nmicro, secagg (median ms)")
    for r in secagg_rows:
        print(f"{r['values']:>9,} values, {r['sites']} sites: mask {r['mask_ms_per_site']:.1f} "
              f"per site, sum+unmask {r['sum_and_unmask_ms']:.1f}, plain float64 sum "
              f"{r['plain_sum_float64_ms']:.1f}, {r['bytes_per_value']:.0f} B/value")


def check_targets(out: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}

    def record(name: str, value: float, target: float, cpu: float | None = None) -> None:
        targets[name] = {"value": value, "target": target, "met": value <= target}
        if cpu is not None:
            targets[name].update(value_cpu=cpu, met_cpu=cpu <= target)

    heart = out.get("heart")
    if heart:
        for scheme in ("secagg", "ckks"):
            diff = max(heart["schemes"][scheme]["accuracy_abs_diff_to_plain"],
                       abs(heart["run_experiment"][scheme]["accuracy"]
                           - heart["run_experiment"]["plain"]["accuracy"]))
            record(f"heart_accuracy_{scheme}_abs_diff", diff, TARGETS["accuracy_abs_diff_max"])
    training = out.get("training")
    if training:
        for scheme in ("ckks", "secagg"):
            r = training["schemes"][scheme]
            record(f"training_{scheme}_over_plain", r["ratio_mean_to_plain"],
                   TARGETS[f"{scheme}_over_plain_max"], r["ratio_cpu_to_plain"])
    limit = TARGETS["ours_over_raw_tenseal_max"]
    for r in out.get("micro", {}).get("ckks", []):
        for step, ratio in (("encrypt", r["encrypt_per_payload"]["ratio_to_raw"]),
                            ("sum", r["sum"]["ratio_to_raw_in_memory"]),
                            ("add_function_vs_raw_streaming",
                             r["sum_ckks_add_function"]["ratio_to_raw_streaming"]),
                            ("decrypt", r["decrypt"]["ratio_to_raw"]),
                            ("pipeline", {"wall": r["pipeline"]["ratio_wall"],
                                          "cpu": r["pipeline"]["ratio_cpu"]})):
            record(f"micro_{r['values']}_{step}_ours_over_raw", ratio["wall"], limit,
                   ratio["cpu"])
        record(f"micro_{r['values']}_bytes_per_value", r["bytes"]["per_value"],
               TARGETS["ckks_bytes_per_value_max"])
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny sizes, 1 repetition, no file written")
    parser.add_argument("--parts", default="heart,training,large,micro",
                        help="comma list of heart, training, large, micro")
    parser.add_argument("--heart-reps", type=int, default=5,
                        help="fresh runs of the 20-round heart job per scheme")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "protection.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    if args.quick:
        args.heart_reps = 1
        training = Workload("training", "synthetic", 2_000, 4, (32, 32), 1, 2)
        large = Workload("large", "synthetic", 2_000, 4, (100, 100), 1, 1)
        micro_sizes, micro_sites = (10_000, 20_000), 3
        micro_reps = {s: {"encrypt": 1, "add": 2, "decrypt": 2} for s in micro_sizes}
    else:
        training = Workload("training", "synthetic", 20_000, 10, (300, 300), 5, 3)
        large = Workload("large", "synthetic", 20_000, 10, (1000, 1000), 1, 3)
        micro_sizes, micro_sites = (100_000, 1_000_000), 10
        micro_reps = {100_000: {"encrypt": 3, "add": 5, "decrypt": 7},
                      1_000_000: {"encrypt": 1, "add": 3, "decrypt": 3}}

    info = machine()
    print(f"machine: nproc={info['nproc']} torch={info['torch']} threads={info['torch_threads']} "
          f"tenseal={info['tenseal']} load={info['loadavg_at_start']}")
    started = time.perf_counter()
    out: dict[str, Any] = {
        "benchmark": "protection",
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info, "targets_asked": TARGETS,
    }
    if "heart" in parts:
        heart = Workload("heart", "")
        config = heart.config("plain", args.seed)
        data = build_federation(config.data, private=config.privacy.level != "none")
        out["heart"] = run_workload(heart, data, args.seed, reps=args.heart_reps)
        out["heart"]["run_experiment"] = heart_via_run_experiment(args.seed)
        print_workload("default heart-disease job (RunConfig())", out["heart"])
        print("run_experiment accuracy: " + ", ".join(
            f"{s} {r['accuracy']:.4f}" for s, r in out["heart"]["run_experiment"].items()))
    for key, workload in (("training", training), ("large", large)):
        if key not in parts:
            continue
        config = workload.config("plain", args.seed)
        data = build_federation(config.data)
        out[key] = run_workload(workload, data, args.seed)
        print_workload(f"{key}: {workload.describe()}", out[key])
        del data
    if "micro" in parts:
        ckks_rows = []
        for size in micro_sizes:
            ckks_rows.append(micro_ckks(size, micro_sites, micro_reps[size], args.seed))
            print(f"  micro ckks {size:,} done", flush=True)
        secagg_rows = [micro_secagg(size, micro_sites, 3, args.seed) for size in micro_sizes]
        out["micro"] = {"ckks": ckks_rows, "secagg": secagg_rows}
        print_micro(ckks_rows, secagg_rows)
    out["targets"] = check_targets(out)
    out["wall_seconds"] = time.perf_counter() - started
    out["loadavg_at_end"] = loadavg()
    print("\ntargets:")
    for name, t in out["targets"].items():
        cpu = "" if "value_cpu" not in t else f", cpu {t['value_cpu']:.4g}"
        print(f"  {name}: {t['value']:.4g}{cpu} (target {t['target']}) "
              f"{'met' if t['met'] else 'NOT met'}"
              + ("" if "met_cpu" not in t else f" / cpu {'met' if t['met_cpu'] else 'NOT met'}"))
    print(f"\nwall {out['wall_seconds']:.0f} s, load at end {out['loadavg_at_end']}")
    if args.quick:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
