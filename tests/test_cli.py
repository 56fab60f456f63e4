"""`fedcare` on the command line: `main([...])` end to end, and the installed console script."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare import __version__
from fedcare.cli.keys import warn_if_in_git_work_tree
from fedcare.cli.main import build_parser, main

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


# ----------------------------------------------------------------- settings that do nothing
@pytest.mark.parametrize("given", [
    ["--epsilon", "2"], ["--delta", "1e-6"], ["--clip-norm", "0.5"], ["--noise", "central"],
    ["--set", "privacy.epsilon=2"], ["CONFIG"],
], ids=["epsilon", "delta", "clip-norm", "noise", "set", "config-file"])
def test_a_privacy_setting_without_privacy_is_refused(
        given: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if given == ["CONFIG"]:
        config = tmp_path / "job.toml"
        config.write_text("[privacy]\nepsilon = 3.0\n", encoding="utf-8")
        given = [str(config)]
    out = tmp_path / "run"

    code = main(["run", *given, "--rounds", "1", "--quiet", "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "would not be private" in err and "--privacy record" in err
    key = {"--delta": "privacy.delta", "--clip-norm": "privacy.clip_norm",
           "--noise": "privacy.noise"}.get(given[0], "privacy.epsilon")
    assert key in err
    assert not out.exists()  # refused before anything was written


def test_distributed_noise_with_record_level_privacy_is_refused(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["run", "--privacy", "record", "--noise", "distributed", "--quiet",
                 "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 2
    assert 'privacy.noise = "distributed" applies to site-level privacy only' in err


def test_missing_bounds_in_a_private_run_say_what_to_add(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_site_csvs(tmp_path / "data", {"a": 80, "b": 80})
    (tmp_path / "schema.toml").write_text(SCHEMA_TOML, encoding="utf-8")

    code = main(["run", "--data-dir", str(tmp_path / "data"), "--schema",
                 str(tmp_path / "schema.toml"), "--privacy", "record", "--quiet",
                 "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 2
    assert 'A private run (privacy.level = "record" or "site") needs public bounds' in err
    assert "[bounds] age = [low, high]" in err
    assert "imput" not in err.lower()  # the user asked for no imputation


# ----------------------------------------------------------------- no raw tracebacks
def test_out_below_a_file_is_one_error_line_naming_the_path(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    out = tmp_path / "file" / "run"

    code = main(["run", "--rounds", "1", "--quiet", "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedcare: error: ") and len(err.strip().splitlines()) == 1
    assert str(out) in err and "Traceback" not in err


def test_out_into_a_forbidden_folder_is_one_error_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    forbidden = tmp_path / "locked" / "run"

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # as root, chmod would not stop the write

    code = main(["run", "--rounds", "1", "--quiet", "--out", str(forbidden)])

    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"fedcare: error: {forbidden}: Permission denied; choose a folder you may "
                   "write to.\n")


def test_schema_pointing_at_a_folder_is_one_error_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_site_csvs(tmp_path / "data", {"a": 40, "b": 40})

    code = main(["run", "--data-dir", str(tmp_path / "data"), "--schema", str(tmp_path),
                 "--quiet", "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedcare: error: ") and len(err.strip().splitlines()) == 1
    assert str(tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # the empty run directory is not left behind


def test_a_value_of_1e308_is_an_error_naming_file_row_and_column(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_site_csvs(tmp_path / "data", {"a": 40, "b": 40})
    site = tmp_path / "data" / "a.csv"
    lines = site.read_text(encoding="utf-8").splitlines()
    lines[3] = "1e308," + lines[3].split(",", 1)[1]
    site.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "schema.toml").write_text(SCHEMA_TOML, encoding="utf-8")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning on the way
        code = main(["run", "--data-dir", str(tmp_path / "data"), "--schema",
                     str(tmp_path / "schema.toml"), "--quiet", "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 2
    assert f"{site}, row 3 (line 4), column 'age'" in err
    assert "'1e308'" in err and "magnitude at most 1e+15" in err


def test_files_a_data_directory_cannot_read_are_named(tmp_path: Path) -> None:
    write_site_csvs(tmp_path / "data", {"a": 40, "b": 40})
    (tmp_path / "data" / "c.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "data" / "notes.txt").write_text("site d follows", encoding="utf-8")
    (tmp_path / "schema.toml").write_text(SCHEMA_TOML, encoding="utf-8")

    with pytest.warns(UserWarning, match=r"not read.*: c\.xlsx, notes\.txt\."):
        code = main(["run", "--data-dir", str(tmp_path / "data"), "--schema",
                     str(tmp_path / "schema.toml"), "--rounds", "1", "--no-baselines",
                     "--quiet", "--out", str(tmp_path / "run")])

    assert code == 0
    assert [s["name"] for s in summary_of(tmp_path / "run")["sites"]] == ["a", "b"]


# ----------------------------------------------------------------- Ctrl-C and --resume
def interrupt_after_round(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Make the next `fedcare run` receive Ctrl-C once round `after` is saved."""
    import fedcare.experiment

    real = fedcare.experiment.run_experiment

    def run_experiment(config: Any, *, on_round: Any, **kwargs: Any) -> Any:
        def on_round_then_ctrl_c(report: Any, evaluation: Any) -> None:
            on_round(report, evaluation)
            if report.round == after:
                raise KeyboardInterrupt

        return real(config, on_round=on_round_then_ctrl_c, **kwargs)

    monkeypatch.setattr(fedcare.experiment, "run_experiment", run_experiment)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    interrupt_after_round(monkeypatch, 1)

    code = main(["run", "--rounds", "3", "--no-baselines", "--quiet", "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 130
    assert err == (f"fedcare: interrupted after round 1; round 1 is saved in {out}. "
                   f"Continue with: fedcare run --resume {out}\n")
    metrics = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["round"] for line in metrics] == [1]  # nothing computed lost
    assert (out / "checkpoint.pt").exists()


def test_resume_says_where_it_starts_and_starts_the_bar_there(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    interrupt_after_round(monkeypatch, 1)
    assert main(["run", "--rounds", "3", "--no-baselines", "--quiet", "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()

    code = main(["run", "--resume", str(out)])

    captured = capsys.readouterr()
    assert code == 0
    assert f"Resuming {out} after round 1 of 3." in captured.out
    assert "1/3" in captured.err and "0/3" not in captured.err  # the bar starts at round 1
    assert summary_of(out)["rounds_completed"] == 3


def test_resuming_a_complete_run_says_so_and_redoes_nothing(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--rounds", "2", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    code = main(["run", "--resume", str(out)])

    assert code == 0
    assert capsys.readouterr().out == (f"{out} is already complete (2 of 2 rounds); nothing "
                                       "to resume.\n")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_runs_lists_a_stopped_run_with_the_resume_command(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "runs" / "stopped-one"
    interrupt_after_round(monkeypatch, 1)
    assert main(["run", "--rounds", "3", "--no-baselines", "--quiet", "--out", str(out)]) == 130
    capsys.readouterr()

    assert main(["runs", str(tmp_path / "runs")]) == 0

    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("stopped-one"))
    assert row.split()[1:4] == ["stopped", "heart-disease", "fedavg"]
    assert "1 of 3" in row
    assert f"resume: fedcare run --resume {out}" in printed


def test_runs_lists_a_failed_run_with_the_resume_command(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "runs" / "failed-one"
    assert main(["run", "--rounds", "1", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    summary = summary_of(out)
    summary.update(status="failed", error="quorum not met")
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    capsys.readouterr()

    assert main(["runs", str(tmp_path / "runs")]) == 0

    printed = capsys.readouterr().out
    assert "failed-one  failed" in printed
    assert f"resume: fedcare run --resume {out}" in printed


def test_runs_skips_a_corrupt_summary_with_a_note(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    for run_dir in (good, bad):
        run_dir.mkdir()
        (run_dir / "config.toml").write_text("", encoding="utf-8")
    (good / "summary.json").write_text(json.dumps(
        {"status": "completed", "dataset": "heart-disease", "strategy": "fedavg",
         "rounds_completed": 2, "federated": {"pooled": {"accuracy": 0.8, "roc_auc": 0.9}}}),
        encoding="utf-8")
    (bad / "summary.json").write_text('{"status": "comp', encoding="utf-8")

    code = main(["runs", str(tmp_path)])

    captured = capsys.readouterr()
    assert code == 0
    assert "good  completed" in captured.out and "bad" not in captured.out
    assert captured.err.startswith(f"note: {bad / 'summary.json'} is not valid JSON")
    assert captured.err.rstrip().endswith("Skipped.")


# ----------------------------------------------------------------- --out and the config's out
def test_out_is_the_configs_out_and_name(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    out = tmp_path / "parent" / "my-run"
    assert main(["run", "--rounds", "1", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    recorded = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert (recorded["out"], recorded["name"]) == (str(tmp_path / "parent"), "my-run")

    # The same settings from the file name the same place (taken: the next free name).
    assert main(["run", str(out / "config.toml"), "--quiet"]) == 0
    assert f"Run directory: {tmp_path / 'parent' / 'my-run-2'}" in capsys.readouterr().out


# ----------------------------------------------------------------- help
def all_parsers() -> list[argparse.ArgumentParser]:
    """The top-level parser and every (sub)command's parser."""
    found = [build_parser()]
    for parser in found:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend(p for p in action.choices.values() if p not in found)
    return found


def test_help_names_values_by_what_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])

    text = capsys.readouterr().out
    assert exited.value.code == 0
    for flag in ("--rounds N", "--epsilon EPS", "--data-dir DIR", "--privacy LEVEL",
                 "--out DIR"):
        assert flag in text
    assert "__" not in text  # no FEDERATION__ROUNDS


def test_every_command_has_an_example_epilog() -> None:
    parsers = all_parsers()
    assert len(parsers) > 15
    for parser in parsers:
        text = parser.format_help()
        assert "example" in text.split("options:")[-1], parser.prog
        assert f"  {parser.prog}" in text, parser.prog  # an example of this very command


def test_bare_fedcare_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([])

    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith("usage: fedcare")
    assert "fedcare run --privacy record --epsilon 1" in captured.out
    assert captured.err == ""


# ----------------------------------------------------------------- secrets and git
def git_init(folder: Path) -> None:
    subprocess.run(["git", "init", "-q", str(folder)], check=True)


def test_certs_inside_a_git_work_tree_warn(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    git_init(tmp_path)
    pki = tmp_path / "pki"

    assert main(["certs", str(pki), "--sites", "a,b"]) == 0

    err = capsys.readouterr().err
    assert f"warning: {pki} holds private keys" in err
    assert f"inside the git work tree {tmp_path.resolve()}" in err


def test_keys_ignored_by_git_do_not_warn(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    git_init(tmp_path)
    (tmp_path / ".gitignore").write_text("keys/\npki/\n", encoding="utf-8")
    (tmp_path / "keys").mkdir()
    (tmp_path / "pki").mkdir()

    warn_if_in_git_work_tree(tmp_path / "keys", "the secret key")
    warn_if_in_git_work_tree(tmp_path / "pki", "private keys")

    assert capsys.readouterr().err == ""


def test_the_repository_ignores_keys_and_pki() -> None:
    ignored = (Path(__file__).parents[1] / ".gitignore").read_text(encoding="utf-8").split()
    assert {"keys/", "pki/"} <= set(ignored)


def test_baselines_show_progress(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["run", "--dataset", "breast-cancer", "--sites", "6", "--partition", "iid",
                 "--rounds", "1", "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 0
    assert "baselines (pooled, each site alone)" in err
    assert "0/7 " in err  # the pooled model and each of the 6 sites alone


def test_resume_from_a_damaged_checkpoint_is_one_error_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--rounds", "1", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    (out / "summary.json").unlink()  # as if stopped
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()

    code = main(["run", "--resume", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"fedcare: error: {out / 'checkpoint.pt'} cannot be read")
    assert len(err.strip().splitlines()) == 1


def test_many_sites_skip_the_single_site_baselines_with_a_note(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"

    code = main(["run", "--dataset", "synthetic", "--set", "data.n_patients=3000", "--sites",
                 "60", "--partition", "iid", "--rounds", "1", "--quiet", "--out", str(out)])

    printed = capsys.readouterr().out
    assert code == 0
    assert table_rows(printed) == ["federated (fedavg)", "pooled (centralised)"]
    assert "Baselines: Each-site-alone baselines skipped: 60 sites is more than 50" in printed
    baselines = summary_of(out)["baselines"]
    assert baselines["local"] == {} and baselines["pooled"]["pooled"]["accuracy"] > 0.5


def test_serve_refuses_a_privacy_setting_without_privacy(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["serve", "--set", "privacy.clip_norm=0.5", "--sites", "a,b", "--insecure",
                 "--run-dir", str(tmp_path / "run")])

    assert code == 2
    assert "privacy.clip_norm (--set) only applies to a private run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any process started


def test_ctrl_c_before_the_first_round_leaves_no_empty_run_directory(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fedcare.experiment

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # while the data load

    monkeypatch.setattr(fedcare.experiment, "run_experiment", interrupted)
    out = tmp_path / "run"

    code = main(["run", "--quiet", "--out", str(out)])

    assert code == 130
    assert capsys.readouterr().err == ("fedcare: interrupted before the first round completed; "
                                       "nothing to resume.\n")
    assert not out.exists()


@pytest.mark.parametrize("command", ["verify", "report"])
def test_a_corrupt_summary_is_one_error_line_for_verify_and_report(
        command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--rounds", "1", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    (out / "summary.json").write_text("{", encoding="utf-8")
    capsys.readouterr()

    code = main([command, str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"fedcare: error: {out / 'summary.json'} is not valid JSON")
    assert len(err.strip().splitlines()) == 1
