"""Speed of DP-SGD: fedcare's step vs non-private training vs Opacus, same process.

Workload (from the issue): MLP 30-64-64-1 (one logit, BCE-with-logits), batch
256, SGD. Data: 60,000 x 30 standard Gaussian features with a logistic label
(fixed seed), shuffled once and cut into contiguous batches of exactly 256 rows
that every implementation consumes in the same order. Fixed-size batches for
all implementations compare the cost of one step; Poisson sampling (what
fedcare's `LocalTrainer` and Opacus' ``make_private`` do) changes only which
rows are in a step, plus one Bernoulli draw per site row per step, which is
timed separately (``poisson_draw``).

Implementations, each running ``--steps`` consecutive steps per repetition:

``plain``             nn.Sequential, torch.optim.SGD, nn.BCEWithLogitsLoss (non-private).
``fedcare-linear``    `PerRecordClipper(method="linear")` + `noisy_gradient` + SGD step
                      on the flat vector, noise from `SecureNoise` (the real CSPRNG).
``fedcare-vmap``      the same with ``method="vmap"``.
``fedcare-*-seeded``  the same with `SeededNoise`, to show what secure noise costs.
``opacus-hooks``      GradSampleModule + DPOptimizer (``grad_sample_mode="hooks"``),
                      ``loss_reduction="mean"``, default (non-secure) noise.
``opacus-ghost``      ghost clipping (GradSampleModuleFastGradientClipping +
                      DPOptimizerFastGradientClipping + DPLossFastGradientClipping).

Repetitions are interleaved (every implementation once, then again, ...) after
one untimed warm-up each; medians of samples/second are reported with the
ratio ``samples/s plain / samples/s implementation`` (the slowdown), under
``torch.set_num_threads(1)`` and 2 threads.

Run from the repository root::

    /work/venv/bin/python benchmarks/bench_dp_speed.py           # full run, ~2 minutes
    /work/venv/bin/python benchmarks/bench_dp_speed.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fedcare
from fedcare.models.params import FlatModel
from fedcare.models.tabular import mlp
from fedcare.privacy.dpsgd import PerRecordClipper, RecordPrivacy, noisy_gradient
from fedcare.privacy.noise import NoiseSource, SecureNoise, SeededNoise

RESULTS = Path(__file__).resolve().parent / "results"
N_ROWS, N_FEATURES, HIDDEN, BATCH = 60_000, 30, (64, 64), 256
LR, CLIP_NORM, NOISE_MULTIPLIER = 0.05, 1.0, 1.0
SAMPLE_RATE = BATCH / N_ROWS

Step = Callable[[torch.Tensor, torch.Tensor], None]


def synthetic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """60,000 x 30 Gaussian features, label ~ Bernoulli(sigmoid(x w)), in 256-row batch order."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N_ROWS, N_FEATURES, generator=generator)
    w = torch.randn(N_FEATURES, generator=generator) / N_FEATURES ** 0.5
    y = (torch.rand(N_ROWS, generator=generator) < torch.sigmoid(x @ w)).float()
    order = torch.randperm(N_ROWS, generator=generator)
    return x[order].contiguous(), y[order].contiguous()


def fresh_module(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(N_FEATURES, HIDDEN)


def plain_step() -> Step:
    module = fresh_module()
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    criterion = nn.BCEWithLogitsLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        criterion(module(x).squeeze(-1), y).backward()
        optimizer.step()

    return step


def fedcare_step(method: str, noise: NoiseSource) -> Step:
    """What `LocalTrainer.train` does per DP-SGD step, minus the Poisson draw."""
    model = FlatModel(fresh_module())
    clipper = PerRecordClipper(model, CLIP_NORM, method)
    privacy = RecordPrivacy(clip_norm=CLIP_NORM, noise_multiplier=NOISE_MULTIPLIER,
                            sample_rate=SAMPLE_RATE, steps_per_epoch=-(-N_ROWS // BATCH))
    params, grads = model.params, model.grads

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        noisy_gradient(clipper, x, y, privacy=privacy, n_records=N_ROWS, noise=noise)
        params.add_(grads, alpha=-LR)

    return step


def opacus_step(mode: str) -> Step:
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    settings: dict[str, Any] = {"noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": CLIP_NORM,
                                "expected_batch_size": BATCH, "loss_reduction": "mean"}
    if mode == "hooks":
        module = GradSampleModule(fresh_module(), loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=LR), **settings)
        criterion: Callable[..., Any] = nn.BCEWithLogitsLoss()
    else:
        module = GradSampleModuleFastGradientClipping(
            fresh_module(), max_grad_norm=CLIP_NORM, use_ghost_clipping=True,
            loss_reduction="mean")
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(module.parameters(), lr=LR), **settings)
        criterion = DPLossFastGradientClipping(module, optimizer, nn.BCEWithLogitsLoss(),
                                               loss_reduction="mean")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        criterion(module(x).squeeze(-1), y).backward()
        optimizer.step()

    return step


def poisson_draw(noise: NoiseSource) -> Step:
    """The per-step Poisson sample of `LocalTrainer` on a 60,000-row site (no training)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        noise.bernoulli(N_ROWS, SAMPLE_RATE).nonzero()

    return step


def implementations(with_ghost: bool) -> dict[str, Step]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SeededNoise and Opacus' non-secure mode warn
        steps = {
            "plain": plain_step(),
            "fedcare-linear": fedcare_step("linear", SecureNoise()),
            "fedcare-vmap": fedcare_step("vmap", SecureNoise()),
            "fedcare-linear-seeded": fedcare_step("linear", SeededNoise(0)),
            "fedcare-vmap-seeded": fedcare_step("vmap", SeededNoise(0)),
            "opacus-hooks": opacus_step("hooks"),
        }
        if with_ghost:
            steps["opacus-ghost"] = opacus_step("ghost")
        steps["poisson-draw-secure"] = poisson_draw(SecureNoise())
        steps["poisson-draw-seeded"] = poisson_draw(SeededNoise(0))
    return steps


def ghost_works() -> str | None:
    """None if Opacus' ghost clipping runs on this model, else the error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = opacus_step("ghost")
            step(torch.randn(8, N_FEATURES), torch.ones(8))
    except Exception as error:  # any failure means: report it and leave ghost out
        return repr(error)
    return None


def run(batches: list[tuple[torch.Tensor, torch.Tensor]], threads: int, repeats: int,
        with_ghost: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    steps = implementations(with_ghost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in steps.values():  # untimed warm-up
            for x, y in batches[:20]:
                step(x, y)
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        load: list[float] = []
        for _ in range(repeats):
            load.append(os.getloadavg()[0])
            for name, step in steps.items():
                start = time.perf_counter()
                for x, y in batches:
                    step(x, y)
                seconds[name].append(time.perf_counter() - start)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"thread count changed to {torch.get_num_threads()} during the run")
    samples = len(batches) * BATCH
    median = {name: statistics.median(s) for name, s in seconds.items()}
    rows = {}
    for name, s in seconds.items():
        rows[name] = {
            "median_s": median[name],
            "us_per_step": median[name] / len(batches) * 1e6,
            "seconds": s,
        }
        if not name.startswith("poisson"):
            rows[name]["samples_per_s"] = samples / median[name]
            rows[name]["ratio_to_plain"] = median[name] / median["plain"]
    return {"threads": threads, "steps": len(batches), "samples": samples,
            "loadavg_1min_during": load, "implementations": rows}


def git_state() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import opacus
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "fedcare": fedcare.__version__,
        "loadavg_at_start": list(os.getloadavg()),
        "git": git_state(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 2 repeats")
    parser.add_argument("--steps", type=int, default=200, help="steps per repetition")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_speed.json")
    args = parser.parse_args(argv)
    steps, repeats = (20, 2) if args.quick else (args.steps, args.repeats)

    x, y = synthetic()
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, steps * BATCH, BATCH)]
    ghost_error = ghost_works()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "workload": {"rows": N_ROWS, "features": N_FEATURES, "hidden": list(HIDDEN),
                     "batch": BATCH, "lr": LR, "clip_norm": CLIP_NORM,
                     "noise_multiplier": NOISE_MULTIPLIER, "sample_rate": SAMPLE_RATE,
                     "batches": "fixed-size, same order for every implementation"},
        "opacus_ghost_error": ghost_error,
        "runs": [run(batches, threads, repeats, ghost_error is None) for threads in args.threads],
    }
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    for result in report["runs"]:
        print(f"\n{result['threads']} thread(s), {result['steps']} steps of {BATCH}, "
              f"load {result['loadavg_1min_during']}")
        for name, row in result["implementations"].items():
            speed = (f"{row['samples_per_s']:>10,.0f} samples/s  x{row['ratio_to_plain']:.2f}"
                     if "samples_per_s" in row else " " * 30)
            print(f"  {name:<24}{speed}  {row['us_per_step']:>8.0f} us/step")
    if not args.quick or args.out != RESULTS / "dp_speed.json":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
