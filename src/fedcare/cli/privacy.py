"""``fedcare privacy``: epsilon of a DP plan, or the noise a target epsilon needs.

``fedcare privacy epsilon`` composes ``--steps`` steps of the Poisson-sampled
Gaussian mechanism; ``fedcare privacy noise`` calibrates the smallest noise
multiplier for a target epsilon. Both use `fedcare.privacy.accounting`, imported
only when they run (dp-accounting takes over a second to import).
"""

from __future__ import annotations

import argparse
import json
import math


def add_privacy_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``privacy epsilon`` and ``privacy noise`` under `commands`.

    Each sets ``handler`` (``Namespace -> int``, the exit code) on the parsed arguments.
    """
    privacy = commands.add_parser(
        "privacy", help="privacy accounting: epsilon of a plan, or the noise it needs",
        description="Differential privacy accounting for steps of the Poisson-sampled Gaussian "
                    "mechanism (add/remove-one neighbouring).")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)

    spent = privacy_commands.add_parser(
        "epsilon", help="epsilon of STEPS sampled Gaussian steps",
        description="Epsilon spent by --steps steps of the Gaussian mechanism with this noise "
                    "multiplier, each on a Poisson sample of rate --sample-rate.")
    spent.add_argument("--noise-multiplier", type=float, required=True, metavar="SIGMA",
                       help="noise standard deviation / L2 sensitivity (> 0)")
    _add_plan_arguments(spent)
    spent.set_defaults(handler=cmd_epsilon)

    noise = privacy_commands.add_parser(
        "noise", help="smallest noise multiplier for a target epsilon",
        description="The smallest noise multiplier (to 0.1%, rounded up) that keeps --steps "
                    "sampled Gaussian steps within --epsilon at --delta.")
    noise.add_argument("--epsilon", type=float, required=True, help="target epsilon (> 0)")
    _add_plan_arguments(noise)
    noise.set_defaults(handler=cmd_noise)


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                        help="Poisson sampling rate of each step, in (0, 1] (1: no sampling)")
    parser.add_argument("--steps", type=int, required=True, help="number of steps")
    parser.add_argument("--delta", type=float, required=True, help="target delta, in (0, 1)")
    # Not `choices=`: the accountant registry checks the name, without importing it here.
    parser.add_argument("--accountant", default="pld", help="pld (tight, default) | rdp")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_epsilon(args: argparse.Namespace) -> int:
    """Print the epsilon of the plan in `args`."""
    from fedcare.privacy.accounting import GaussianEvent, epsilon

    event = GaussianEvent(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate,
                          steps=args.steps)
    spent = epsilon([event], delta=args.delta, accountant=args.accountant)
    if args.json:
        print(json.dumps({"accountant": args.accountant, "sample_rate": args.sample_rate,
                          "noise_multiplier": args.noise_multiplier, "steps": args.steps,
                          "delta": args.delta, "epsilon": spent}))
    else:
        print(f"epsilon = {spent:.4g} at delta = {args.delta:g} ({_plan(args)})")
    return 0


def cmd_noise(args: argparse.Namespace) -> int:
    """Print the smallest noise multiplier for the target in `args`, and the epsilon it gives.

    The human form shows sigma rounded *up* to 4 significant digits (and the
    epsilon of that value), so copying it never overspends; --json gives it in full.
    """
    from fedcare.privacy.accounting import GaussianEvent, epsilon, noise_multiplier

    sigma = noise_multiplier(epsilon=args.epsilon, delta=args.delta,
                             sample_rate=args.sample_rate, steps=args.steps,
                             accountant=args.accountant)
    if not args.json:
        sigma = _round_up(sigma, digits=4)
    event = GaussianEvent(noise_multiplier=sigma, sample_rate=args.sample_rate, steps=args.steps)
    achieved = epsilon([event], delta=args.delta, accountant=args.accountant)
    if args.json:
        print(json.dumps({"accountant": args.accountant, "sample_rate": args.sample_rate,
                          "steps": args.steps, "delta": args.delta,
                          "target_epsilon": args.epsilon, "noise_multiplier": sigma,
                          "epsilon": achieved}))
    else:
        print(f"noise multiplier = {sigma:g} for epsilon <= {args.epsilon:g} at delta = "
              f"{args.delta:g} ({_plan(args)}); it achieves epsilon = {achieved:.4g}")
    return 0


def _round_up(value: float, *, digits: int) -> float:
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def _plan(args: argparse.Namespace) -> str:
    sigma = "" if args.privacy_command == "noise" else f", sigma = {args.noise_multiplier:g}"
    return f"{args.accountant} accountant; q = {args.sample_rate:g}{sigma}, {args.steps} steps"
