"""The hash-chained audit log: what a run writes, and that any edit to it is found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedcare.cli.main import main
from fedcare.config import RunConfig
from fedcare.experiment import run_experiment
from fedcare.protection.base import wire_digest
from fedcare.report.auditlog import AUDIT_LOG_FILE, AuditLog, AuditLogError, verify


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = RunConfig()
    config.federation.rounds = 3
    config.baselines.enabled = False
    return run_experiment(config, out=tmp_path_factory.mktemp("audit") / "run").run_dir


def lines(run_dir: Path) -> list[str]:
    return (run_dir / AUDIT_LOG_FILE).read_text(encoding="utf-8").splitlines()


def recorded(run_dir: Path) -> dict[str, object]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"expected_entries": summary["audit_log"]["entries"],
            "expected_head": summary["audit_log"]["head"]}


def check(run_dir: Path, tmp_path: Path, edited: list[str]) -> str:
    """Verify an edited copy of the run's log against the run's summary."""
    copy = tmp_path / AUDIT_LOG_FILE
    copy.write_text("".join(line + "\n" for line in edited), encoding="utf-8")
    result = verify(copy, **recorded(run_dir))  # type: ignore[arg-type]
    assert not result.ok
    return result.problem


def test_a_run_logs_every_round_payload_and_released_model(run_dir: Path) -> None:
    entries = [json.loads(line) for line in lines(run_dir)]
    events = [e["event"] for e in entries]
    assert events[0] == "run_started" and events[-1] == "run_completed"
    assert events.count("round") == 3 and events.count("model_released") == 3
    received = [e for e in entries if e["event"] == "payload_received"]
    assert [(e["round"], e["site"]) for e in received] == [
        (r, s) for r in (1, 2, 3) for s in ("cleveland", "hungarian", "switzerland", "va")]
    # plain payloads without DP: keyed digests (tests/test_honest_artifacts.py plays the oracle)
    assert all(e["bytes"] > 0 and len(e["hmac_sha256"]) == 64 for e in received)
    final = torch.load(run_dir / "model.pt")["params"]
    assert [e for e in entries if e["event"] == "model_released"][-1]["sha256"] == \
        wire_digest(final)
    assert verify(run_dir / AUDIT_LOG_FILE, **recorded(run_dir)).ok  # type: ignore[arg-type]


def test_changing_any_entry_is_found_and_named(run_dir: Path, tmp_path: Path) -> None:
    original = lines(run_dir)
    for index in range(len(original)):
        edited = list(original)
        entry = json.loads(edited[index])
        entry["time"] = "2020-01-01T00:00:00+00:00"
        edited[index] = json.dumps(entry, sort_keys=True)
        assert check(run_dir, tmp_path, edited).startswith(f"line {index + 1}: its content")


def test_removing_any_entry_is_found(run_dir: Path, tmp_path: Path) -> None:
    original = lines(run_dir)
    for index in range(len(original)):
        problem = check(run_dir, tmp_path, original[:index] + original[index + 1:])
        if index < len(original) - 1:
            assert problem.startswith(f"line {index + 1}: entry {index + 1} where entry "
                                      f"{index} belongs")
        else:  # the chain is intact but shorter than the run recorded
            assert "entries were removed" in problem


def test_reordering_entries_is_found(run_dir: Path, tmp_path: Path) -> None:
    original = lines(run_dir)
    for index in range(len(original) - 1):
        edited = list(original)
        edited[index], edited[index + 1] = edited[index + 1], edited[index]
        assert check(run_dir, tmp_path, edited).startswith(f"line {index + 1}:")


def test_rehashing_an_edited_entry_still_breaks_the_chain(run_dir: Path,
                                                           tmp_path: Path) -> None:
    from fedcare.report.auditlog import entry_hash

    edited = lines(run_dir)
    entry = json.loads(edited[2])
    entry["site"] = "somewhere-else"
    entry["hash"] = entry_hash(entry)  # a forger recomputes this entry's hash ...
    edited[2] = json.dumps(entry, sort_keys=True)
    # ... and the next entry no longer follows it
    assert check(run_dir, tmp_path, edited).startswith("line 4: entry 3 does not follow")


def test_fedcare_verify_exit_codes(run_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(run_dir)]) == 0
    assert "intact, " in capsys.readouterr().out
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "summary.json").write_bytes((run_dir / "summary.json").read_bytes())
    (copy / AUDIT_LOG_FILE).write_text("".join(line + "\n" for line in lines(run_dir)[:-1]),
                                       encoding="utf-8")
    assert main(["verify", str(copy)]) == 1
    assert "BROKEN" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "holds no audit_log.jsonl" in capsys.readouterr().err


def test_resume_continues_the_chain_and_refuses_a_broken_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / AUDIT_LOG_FILE)
    log.append("run_started")
    log.append("round", round=1)
    log.close()
    resumed = AuditLog(tmp_path / AUDIT_LOG_FILE, resume=True)
    resumed.append("run_resumed", after_round=1)
    resumed.close()
    result = verify(tmp_path / AUDIT_LOG_FILE)
    assert result.ok and result.entries == 3
    with pytest.raises(AuditLogError, match="already exists"):
        AuditLog(tmp_path / AUDIT_LOG_FILE)
    text = (tmp_path / AUDIT_LOG_FILE).read_text(encoding="utf-8")
    (tmp_path / AUDIT_LOG_FILE).write_text(text.replace('"round": 1', '"round": 2'),
                                           encoding="utf-8")
    with pytest.raises(AuditLogError, match="line 2: its content does not match"):
        AuditLog(tmp_path / AUDIT_LOG_FILE, resume=True)
