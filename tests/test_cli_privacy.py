"""`fedcare privacy epsilon | noise`, in process."""

from __future__ import annotations

import json

import pytest

from fedcare.cli.main import main
from fedcare.privacy.accounting import GaussianEvent, epsilon

PLAN = ["--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]


def expected(sigma: float, accountant: str = "pld", q: float = 0.01, steps: int = 1000) -> float:
    return epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)],
                   delta=1e-5, accountant=accountant)


def test_epsilon_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["privacy", "epsilon", "--noise-multiplier", "1.1", *PLAN])

    out = capsys.readouterr().out
    assert code == 0
    assert out == (f"epsilon = {expected(1.1):.4g} at delta = 1e-05 "
                   "(pld accountant; q = 0.01, sigma = 1.1, 1000 steps)\n")


def test_epsilon_json_has_all_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["privacy", "epsilon", "--noise-multiplier", "1.1", *PLAN, "--accountant", "rdp",
                 "--json"])

    assert code == 0
    assert json.loads(capsys.readouterr().out) == {
        "accountant": "rdp", "sample_rate": 0.01, "noise_multiplier": 1.1, "steps": 1000,
        "delta": 1e-5, "epsilon": pytest.approx(expected(1.1, "rdp"))}


def test_noise_prints_the_multiplier_and_what_it_achieves(
        capsys: pytest.CaptureFixture[str]) -> None:
    unsampled = ["--sample-rate", "1", "--steps", "10", "--delta", "1e-5"]  # fast to calibrate
    code = main(["privacy", "noise", "--epsilon", "2", *unsampled, "--json"])

    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["target_epsilon"] == 2.0
    assert result["epsilon"] == pytest.approx(expected(result["noise_multiplier"], q=1, steps=10))
    assert 0.99 * 2 <= result["epsilon"] <= 2

    code = main(["privacy", "noise", "--epsilon", "2", *unsampled])

    line = capsys.readouterr().out
    assert code == 0
    shown = float(line.split("noise multiplier = ")[1].split()[0])
    assert shown >= result["noise_multiplier"]  # rounded up: never overspends
    assert shown == pytest.approx(result["noise_multiplier"], rel=1e-3)
    assert f"achieves epsilon = {expected(shown, q=1, steps=10):.4g}" in line
    assert "epsilon <= 2 at delta = 1e-05 (pld accountant; q = 1, 10 steps)" in line


@pytest.mark.parametrize(("argv", "message"), [
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10",
      "--delta", "1e-5"], "sample_rate must be in (0, 1]; got 1.5."),
    (["epsilon", "--noise-multiplier", "-1", *PLAN], "noise_multiplier must be a finite"),
    (["noise", "--epsilon", "1", *PLAN, "--accountant", "gdp"],
     "accountant must be one of ['pld', 'rdp']; got 'gdp'."),
    (["noise", "--epsilon", "1e-3", "--sample-rate", "1", "--steps", "10000", "--delta", "1e-5"],
     "unreachable"),
])
def test_bad_values_exit_2_with_one_error_line(capsys: pytest.CaptureFixture[str],
                                               argv: list[str], message: str) -> None:
    code = main(["privacy", *argv])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("fedcare: error: ")
    assert message in captured.err
    assert captured.err.count("\n") == 1
