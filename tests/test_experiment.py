"""`run_experiment` end to end on the bundled heart-disease data: run directory and rules."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, ProtocolError, QuorumError
from fedcare.experiment import Evaluation, RunResult, evaluate, run_experiment
from fedcare.federation.aggregator import RoundReport
from fedcare.federation.site import FitInstructions, FitResult, Site
from fedcare.models import FlatModel, build_model

HOSPITALS = ["cleveland", "hungarian", "switzerland", "va"]
ARTEFACTS = {"config.toml", "metrics.jsonl", "model.pt", "summary.json", "checkpoint.pt",
             "audit_log.jsonl", "curves.json", "report.html", "model_card.md",
             "audit_log.key"}  # plain payloads without DP: their digests are keyed


def make_config(*assignments: str, rounds: int = 3, baselines: bool = True) -> RunConfig:
    config = RunConfig()
    config.set(f"federation.rounds={rounds}")
    config.baselines.enabled = baselines
    for assignment in assignments:
        config.set(assignment)
    return config


def strict_json(text: str) -> Any:
    """JSON as the standard defines it: NaN and Infinity are not numbers."""
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [strict_json(line) for line in lines]


def read_summary(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = strict_json((run_dir / "summary.json").read_text(encoding="utf-8"))
    return summary


def load_model(run_dir: Path) -> dict[str, Any]:
    saved: dict[str, Any] = torch.load(run_dir / "model.pt", weights_only=False)
    return saved


@dataclass
class CompletedRun:
    config: RunConfig
    result: RunResult
    rounds: list[tuple[RoundReport, Evaluation]]


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> CompletedRun:
    config = make_config(rounds=3)
    rounds: list[tuple[RoundReport, Evaluation]] = []
    out = tmp_path_factory.mktemp("experiment") / "run"
    result = run_experiment(config, out=out, on_round=lambda r, e: rounds.append((r, e)))
    return CompletedRun(config, result, rounds)


# ----------------------------------------------------------------- a completed run
def test_run_directory_holds_exactly_the_artefacts(completed: CompletedRun) -> None:
    run_dir = completed.result.run_dir

    assert {p.name for p in run_dir.iterdir()} == ARTEFACTS


def test_config_toml_is_the_resolved_config(completed: CompletedRun) -> None:
    written = RunConfig.load(completed.result.run_dir / "config.toml")

    # Its relative paths (the default out = "runs") are written absolute, so that it names
    # the same folders wherever it is read from (fedcare run --resume).
    assert written.to_dict() == completed.config.anchored(Path.cwd()).to_dict()
    assert Path(written.out).is_absolute()


def test_metrics_jsonl_has_one_strict_json_line_per_round(completed: CompletedRun) -> None:
    text = (completed.result.run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    records = read_metrics(completed.result.run_dir)

    assert "NaN" not in text and "Infinity" not in text
    assert [r["round"] for r in records] == [1, 2, 3]
    n_train = sum(s.n_train for s in completed.result.data.sites)
    for record in records:
        assert record["participants"] == HOSPITALS
        assert record["failures"] == {}
        assert record["n_examples"] == n_train
        assert record["train_loss"] > 0
        assert set(record["pooled"]) >= {"accuracy", "roc_auc", "brier", "log_loss", "n"}
        assert set(record["sites"]) == set(HOSPITALS)


def test_on_round_sees_every_round_and_its_evaluation(completed: CompletedRun) -> None:
    records = read_metrics(completed.result.run_dir)

    assert [report.round for report, _ in completed.rounds] == [1, 2, 3]
    for (report, evaluation), record in zip(completed.rounds, records, strict=True):
        assert report.participants == record["participants"]
        assert evaluation.pooled["accuracy"] == record["pooled"]["accuracy"]
        assert evaluation.pooled["roc_auc"] == record["pooled"]["roc_auc"]


def test_model_pt_is_the_final_global_model(completed: CompletedRun) -> None:
    saved = load_model(completed.result.run_dir)
    data = completed.result.data

    model = FlatModel(build_model(completed.config.model, data.n_features))
    assert saved["params"].shape == (model.spec.size,) == (14,)
    assert saved["spec"] == model.spec.to_dict()
    assert saved["feature_names"] == data.feature_names
    assert len(saved["feature_names"]) == 13
    assert saved["schema"]["target"] == "num"
    assert set(saved["standardization"]) == set(HOSPITALS)

    reloaded = evaluate(model, saved["params"], data)
    assert reloaded.pooled == completed.result.federated.pooled
    assert reloaded.sites == completed.result.federated.sites


def test_summary_json_describes_the_run(completed: CompletedRun) -> None:
    summary = read_summary(completed.result.run_dir)
    data = completed.result.data

    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 3
    assert summary["dataset"] == "heart-disease"
    assert (summary["strategy"], summary["model"], summary["seed"]) == ("fedavg", "logreg", 0)
    assert summary["n_parameters"] == 14
    assert summary["sites"] == [{"name": s.name, "n_train": s.n_train, "n_test": s.n_test}
                                for s in data.sites]
    assert [s["name"] for s in summary["sites"]] == HOSPITALS
    assert summary["federated"]["pooled"]["accuracy"] == completed.result.federated.pooled[
        "accuracy"]
    assert summary["federated"]["pooled"]["n"] == sum(s.n_test for s in data.sites)
    assert set(summary["federated"]["sites"]) == set(HOSPITALS)
    for name in HOSPITALS:
        assert summary["federated"]["sites"][name]["n"] == next(
            s.n_test for s in data.sites if s.name == name)
    assert set(summary["baselines"]) == {"pooled", "local"}
    assert set(summary["baselines"]["pooled"]) == {"pooled", "sites", "threshold", "intervals",
                                                   "chance"}  # issue 22: final evaluations
    assert set(summary["baselines"]["local"]) == set(HOSPITALS)
    assert summary["config"] == completed.config.to_dict()
    assert summary["elapsed_seconds"] > 0


def test_result_matches_the_summary(completed: CompletedRun) -> None:
    result = completed.result

    assert result.pooled_baseline is not None
    assert list(result.local_baselines) == HOSPITALS
    assert result.summary["status"] == "completed"
    # the baselines are different models from the federated one
    assert result.pooled_baseline.pooled != result.federated.pooled


# ----------------------------------------------------------------- reproducibility
def test_same_seed_gives_the_same_run(completed: CompletedRun, tmp_path: Path) -> None:
    again = run_experiment(make_config(rounds=3), out=tmp_path / "again")

    first, second = read_summary(completed.result.run_dir), read_summary(again.run_dir)
    assert second["federated"] == first["federated"]
    assert second["baselines"] == first["baselines"]
    assert torch.equal(load_model(again.run_dir)["params"],
                       load_model(completed.result.run_dir)["params"])
    assert read_metrics(again.run_dir) == read_metrics(completed.result.run_dir)


def test_other_seed_gives_other_params(completed: CompletedRun, tmp_path: Path) -> None:
    other = run_experiment(make_config("seed=1", rounds=3, baselines=False),
                           out=tmp_path / "other")

    assert not torch.equal(load_model(other.run_dir)["params"],
                           load_model(completed.result.run_dir)["params"])
    assert read_summary(other.run_dir)["baselines"] is None


def test_global_model_improves_over_20_rounds(tmp_path: Path) -> None:
    result = run_experiment(make_config(rounds=20, baselines=False), out=tmp_path / "long")

    records = read_metrics(result.run_dir)
    assert len(records) == 20
    assert result.federated.pooled["accuracy"] > 0.75
    assert result.federated.pooled["roc_auc"] > 0.8
    assert records[-1]["pooled"]["log_loss"] < records[0]["pooled"]["log_loss"]


# ----------------------------------------------------------------- failures
def test_quorum_failure_keeps_what_was_computed(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    one_round = run_experiment(make_config(rounds=1, baselines=False), out=tmp_path / "one")
    fit = Site.fit

    def flaky_fit(self: Site, global_params: torch.Tensor,
                  instructions: FitInstructions) -> FitResult:
        if instructions.round == 2 and self.name == "va":
            raise ProtocolError("site 'va': connection lost")
        return fit(self, global_params, instructions)

    monkeypatch.setattr(Site, "fit", flaky_fit)
    out = tmp_path / "failed"

    with pytest.raises(QuorumError) as excinfo:
        run_experiment(make_config("federation.min_sites=4", rounds=3), out=out)

    assert "Round 2" in str(excinfo.value)
    assert {p.name for p in out.iterdir()} == ARTEFACTS - {"curves.json"}  # no final model
    assert [r["round"] for r in read_metrics(out)] == [1]
    summary = read_summary(out)
    assert summary["status"] == "failed"
    assert summary["rounds_completed"] == 1
    assert summary["error"] == str(excinfo.value)
    for piece in ("Round 2", "va", "connection lost", "federation.min_sites = 4"):
        assert piece in summary["error"]
    assert "federated" not in summary
    # the saved model is round 1's global model
    assert torch.equal(load_model(out)["params"], load_model(one_round.run_dir)["params"])


def test_out_into_a_non_empty_directory_is_refused_and_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run", encoding="utf-8")

    with pytest.raises(ConfigError, match=r"--out .*taken exists and is not empty"):
        run_experiment(make_config(rounds=1), out=out)

    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "an earlier run"


def test_out_may_be_an_existing_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()

    run_experiment(make_config(rounds=1, baselines=False), out=out)

    assert {p.name for p in out.iterdir()} == ARTEFACTS


def test_default_run_dir_goes_under_config_out(tmp_path: Path) -> None:
    config = make_config(f"out={json.dumps(str(tmp_path / 'runs'))}", "name=first", rounds=1,
                         baselines=False)

    first = run_experiment(config)
    second = run_experiment(config)

    assert first.run_dir == tmp_path / "runs" / "first"
    assert second.run_dir == tmp_path / "runs" / "first-2"  # never overwrites
    assert read_summary(first.run_dir)["status"] == "completed"


@pytest.mark.parametrize("assignment", ["federation.strategy=fedsgd", "federation.lr=-1",
                                        "model.name=tree", "federation.fraction=0",
                                        "data.partition=random"])
def test_config_errors_are_raised_before_anything_is_written(assignment: str,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "never"

    with pytest.raises(ConfigError):
        run_experiment(make_config(assignment, rounds=1), out=out)

    assert not out.exists()


def test_zero_rounds_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "never"

    with pytest.raises(ConfigError, match=r"federation.rounds must be >= 1"):
        run_experiment(make_config(rounds=0), out=out)

    assert not out.exists()
