"""`fedcare` on the command line: `main([...])` end to end, and the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare import __version__
from fedcare.cli.main import main

HOSPITALS = ["cleveland", "hungarian", "switzerland", "va"]
SCHEMA_TOML = """\
target = "outcome"
positive = ["1"]
negative = ["0"]

[numeric]
columns = ["age", "chol"]

[categorical]
smoker = ["no", "yes"]
"""


def summary_of(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return summary


def table_rows(stdout: str) -> list[str]:
    """Labels of the result table's rows (the first column)."""
    lines = stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) == {"-"})
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        rows.append(line.split("  ")[0].strip())
    return rows


def write_site_csvs(directory: Path, sites: dict[str, int], seed: int = 0) -> None:
    """One CSV per site: two numeric columns, one categorical, a 0/1 outcome with signal."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in sites.items():
        age = rng.normal(60, 10, n)
        chol = rng.normal(220, 40, n)
        smoker = rng.random(n) < 0.4
        risk = 0.08 * (age - 60) + 0.02 * (chol - 220) + 1.2 * smoker - 0.3
        outcome = rng.random(n) < 1 / (1 + np.exp(-risk))
        lines = ["age,chol,smoker,outcome"]
        lines += [f"{a:.1f},{c:.0f},{'yes' if s else 'no'},{int(o)}"
                  for a, c, s, o in zip(age, chol, smoker, outcome, strict=True)]
        (directory / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------- fedcare run
def test_default_run_prints_federated_pooled_and_each_hospital_alone(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"

    code = main(["run", "--rounds", "3", "--quiet", "--out", str(out)])

    captured = capsys.readouterr()
    assert code == 0
    assert table_rows(captured.out) == ["federated (fedavg)", "pooled (centralised)",
                                        *(f"{h} alone" for h in HOSPITALS)]
    header = captured.out.splitlines()[1]
    for column in ("accuracy", "ROC AUC", *(f"acc@{h}" for h in HOSPITALS)):
        assert column in header
    assert "UCI Heart Disease" in captured.out
    assert f"Run directory: {out}" in captured.out
    assert captured.err == ""  # --quiet: no progress bar
    summary = summary_of(out)
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 3


def test_breast_cancer_iid_mlp_without_baselines(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    out = tmp_path / "bc"

    code = main(["run", "--dataset", "breast-cancer", "--sites", "10", "--partition", "iid",
                 "--model", "mlp", "--rounds", "2", "--no-baselines", "--quiet",
                 "--out", str(out)])

    captured = capsys.readouterr()
    assert code == 0
    assert table_rows(captured.out) == ["federated (fedavg)"]
    assert "site acc min" in captured.out  # 10 sites: a range instead of 10 columns
    summary = summary_of(out)
    assert (summary["dataset"], summary["model"]) == ("breast-cancer", "mlp")
    assert len(summary["sites"]) == 10
    assert summary["n_parameters"] == 30 * 64 + 64 + 64 * 64 + 64 + 64 + 1
    assert summary["baselines"] is None
    assert summary["config"]["baselines"]["enabled"] is False


def test_config_file_with_set_override(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('seed = 4\n[federation]\nstrategy = "fedadam"\nrounds = 7\n'
                      "[baselines]\nenabled = false\n", encoding="utf-8")
    out = tmp_path / "run"

    code = main(["run", str(config), "--set", "federation.rounds=2", "--quiet",
                 "--out", str(out)])

    assert code == 0
    assert "federated (fedadam)" in capsys.readouterr().out
    summary = summary_of(out)
    assert summary["rounds_completed"] == 2
    assert (summary["strategy"], summary["seed"]) == ("fedadam", 4)
    assert len((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert "rounds = 2" in (out / "config.toml").read_text(encoding="utf-8")


def test_shorthand_flags_and_set_reach_the_config(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "run"

    code = main(["run", "--strategy", "fedprox", "--set", "federation.mu=0.2", "--lr", "0.1",
                 "--batch-size", "16", "--local-epochs", "2", "--fraction", "0.5",
                 "--min-sites", "2", "--seed", "3", "--rounds", "2", "--no-baselines",
                 "--quiet", "--out", str(out)])

    assert code == 0
    capsys.readouterr()
    federation = summary_of(out)["config"]["federation"]
    assert federation["rounds"] == 2
    assert (federation["strategy"], federation["mu"], federation["lr"]) == ("fedprox", 0.2, 0.1)
    assert (federation["batch_size"], federation["local_epochs"]) == (16, 2)
    assert (federation["fraction"], federation["min_sites"]) == (0.5, 2)
    assert summary_of(out)["seed"] == 3


def test_progress_bar_goes_to_stderr_without_quiet(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    code = main(["run", "--rounds", "2", "--no-baselines", "--out", str(tmp_path / "run")])

    captured = capsys.readouterr()
    assert code == 0
    assert "rounds" in captured.err
    assert "rounds:" not in captured.out


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(("argv", "key"), [
    (["--strategy", "fedsgd"], "federation.strategy"),
    (["--model", "tree"], "model.name"),
    (["--fraction", "1.5"], "federation.fraction"),
    (["--min-sites", "0"], "federation.min_sites"),
    (["--rounds", "0"], "federation.rounds"),
    (["--dataset", "mimic"], "data.dataset"),
    (["--partition", "random"], "data.partition"),
    (["--protocol", "raw"], "data.protocol"),
    (["--sites", "3"], "data.sites"),
    (["--dataset", "breast-cancer", "--partition", "dirichlet", "--alpha", "0"], "data.alpha"),
    (["--set", "federation.rounds=abc"], "federation.rounds"),
    (["--set", "federation.round=3"], "federation.round"),
    (["--set", "federation.server_lr=-1"], "federation.server_lr"),
    (["--set", "threads=0"], "threads"),
    (["--lr", "-1"], "federation.lr"),
    (["--local-epochs", "0"], "federation.local_epochs"),
    (["--batch-size", "0"], "federation.batch_size"),
    (["--set", "federation.momentum=1"], "federation.momentum"),
])
def test_bad_values_exit_2_with_one_error_line_naming_the_key(
        argv: list[str], key: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["run", *argv, "--quiet", "--out", str(tmp_path / "run")])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1
    assert errors[0].startswith("fedcare: error: ")
    assert key in errors[0]


def test_missing_config_file_is_an_error_naming_it(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    code = main(["run", str(tmp_path / "absent.toml"), "--quiet"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedcare: error: Config file ")
    assert "absent.toml does not exist" in err


def test_non_numeric_flag_is_an_argparse_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["run", "--rounds", "many"])

    assert excinfo.value.code == 2
    assert "--rounds: invalid int value: 'many'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])

    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedcare {__version__}"


# ----------------------------------------------------------------- user files
def test_data_dir_and_schema_end_to_end(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    data = tmp_path / "sites"
    write_site_csvs(data, {"north": 60, "south": 45, "east": 70})
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA_TOML, encoding="utf-8")
    out = tmp_path / "run"

    code = main(["run", "--data-dir", str(data), "--schema", str(schema), "--rounds", "2",
                 "--quiet", "--out", str(out)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = table_rows(captured.out)
    assert rows[:2] == ["federated (fedavg)", "pooled (centralised)"]
    assert rows[2:] == ["east alone", "north alone", "south alone"]  # sorted file order
    summary = summary_of(out)
    assert summary["dataset"] == "files"
    assert [s["name"] for s in summary["sites"]] == ["east", "north", "south"]
    assert sum(s["n_train"] + s["n_test"] for s in summary["sites"]) == 175
    assert summary["n_parameters"] == 2 + 2 + 1  # age, chol, smoker=no, smoker=yes + bias


def test_schema_infer_then_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "sites"
    write_site_csvs(data, {"a": 50, "b": 50})
    schema = tmp_path / "inferred.toml"

    assert main(["schema", "infer", str(data), "--target", "outcome",
                 "--out", str(schema)]) == 0
    assert f"Wrote {schema}" in capsys.readouterr().out

    code = main(["run", "--data-dir", str(data), "--schema", str(schema), "--rounds", "2",
                 "--no-baselines", "--quiet", "--out", str(tmp_path / "run")])

    assert code == 0, capsys.readouterr().err
    assert summary_of(tmp_path / "run")["status"] == "completed"


def test_data_dir_with_a_bad_cell_names_file_row_and_column(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    data = tmp_path / "sites"
    write_site_csvs(data, {"north": 20})
    path = data / "north.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = "sixty,200,no,1"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA_TOML, encoding="utf-8")

    code = main(["run", "--data-dir", str(data), "--schema", str(schema), "--quiet",
                 "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 2
    assert "north.csv, row 3 (line 4), column 'age'" in err
    assert "'sixty'" in err
    assert not (tmp_path / "run").exists()


def test_data_dir_path_with_a_backslash(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    data = tmp_path / "exports\\2024"
    write_site_csvs(data, {"north": 40, "south": 40})
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA_TOML, encoding="utf-8")

    code = main(["run", "--data-dir", str(data), "--schema", str(schema), "--rounds", "1",
                 "--no-baselines", "--quiet", "--out", str(tmp_path / "run")])

    assert code == 0, capsys.readouterr().err


# ----------------------------------------------------------------- console script
@pytest.mark.slow
def test_console_script_runs(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "fedcare"
    assert script.exists(), f"console script not installed next to {sys.executable}"
    out = tmp_path / "run"

    completed = subprocess.run([str(script), "run", "--rounds", "2", "--quiet", "--out", str(out)],
                               capture_output=True, text=True, timeout=300, check=False)

    assert completed.returncode == 0, completed.stderr
    assert (out / "summary.json").exists()
    assert summary_of(out)["status"] == "completed"
    assert "federated (fedavg)" in completed.stdout


# ----------------------------------------------------------------- privacy and resume
def test_a_private_run_prints_its_guarantee_and_can_be_resumed(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--dataset", "breast-cancer", "--sites", "10", "--partition", "iid",
            "--rounds", "2", "--privacy", "site", "--epsilon", "8", "--noise", "distributed",
            "--set", "privacy.secure=false", "--no-baselines", "--quiet", "--out", str(out)]
    with pytest.warns(UserWarning, match="NOT differentially private"):
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Privacy: NOT private (seeded noise, for testing)" in printed
    assert "privacy_ledger.jsonl" in printed and "checkpoint.pt" in printed

    # a completed run resumes to the same place: nothing left to train, nothing re-spent
    ledger_before = (out / "privacy_ledger.jsonl").read_text()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # draws no noise: no warning
    assert (out / "privacy_ledger.jsonl").read_text() == ledger_before
    assert summary_of(out)["rounds_completed"] == 2


def test_resume_takes_no_other_options(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    assert main(["run", "--resume", str(tmp_path), "--rounds", "5"]) == 2
    assert "--resume continues a run exactly as it was configured" in capsys.readouterr().err


# ----------------------------------------------------------------- protection
def test_keys_init_then_a_ckks_run_from_the_command_line(capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "init", str(keys)]) == 0
    printed = capsys.readouterr().out
    fingerprint = printed.split("Fingerprint (SHA-256 of aggregator.ckks): ")[1][:64]
    out = tmp_path / "run"
    assert main(["run", "--protection", "ckks", "--set", f"protection.keys={keys}",
                 "--rounds", "2", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    protection = summary_of(out)["config"]["protection"]
    assert (protection["scheme"], protection["keys"]) == ("ckks", str(keys))
    assert "Protection: homomorphic encryption" in capsys.readouterr().out
    assert main(["keys", "fingerprint", str(keys / "aggregator.ckks")]) == 0
    assert fingerprint in capsys.readouterr().out
    # a second init into the same directory would replace the keys the sites hold
    assert main(["keys", "init", str(keys)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_deployment_commands_are_reachable_from_main(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    assert main(["certs", str(tmp_path / "certs"), "--sites", "a,b"]) == 0
    assert "site a's identity" in capsys.readouterr().out
    assert (tmp_path / "certs" / "a.key").stat().st_mode & 0o077 == 0  # the site's key: private
    assert main(["site", "--name", "c", "--aggregator", "127.0.0.1:9092", "--state",
                 str(tmp_path / "state"), "--certs", str(tmp_path / "certs")]) == 2  # no c.crt
    assert "c.crt does not exist" in capsys.readouterr().err
