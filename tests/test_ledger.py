"""The privacy ledger: persisted spends, refusal before an overspend, resume counted once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcare.errors import BudgetExceeded, DataError
from fedcare.privacy.accounting import GaussianEvent, epsilon
from fedcare.privacy.ledger import LedgerEntry, PrivacyLedger

SIGMA, Q, STEPS = 1.1, 0.1, 10


def entry(round_number: int, party: str = "cleveland", sigma: float = SIGMA) -> LedgerEntry:
    return LedgerEntry(round_number, party, f"each patient at {party}", sigma, Q, STEPS)


def ledger(path: Path | None = None, cap: float = 10.0) -> PrivacyLedger:
    return PrivacyLedger(path, delta=1e-5, accountant="pld", caps={"cleveland": cap})


def test_spent_is_the_accountant_epsilon_of_all_entries() -> None:
    book = ledger()
    book.record([entry(1), entry(2), entry(3, sigma=2.0)])
    expected = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=2 * STEPS),
                        GaussianEvent(noise_multiplier=2.0, sample_rate=Q, steps=STEPS)],
                       delta=1e-5)
    assert book.spent("cleveland") == pytest.approx(expected, rel=1e-9)
    assert book.spent("hungarian") == 0.0


def test_check_refuses_an_overspend_and_names_spent_requested_and_cap() -> None:
    one_round = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)],
                        delta=1e-5)
    two_rounds = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q,
                                        steps=2 * STEPS)], delta=1e-5)
    cap = (one_round + two_rounds) / 2  # room for one round, not two
    book = ledger(cap=cap)
    book.check([entry(1)])
    book.record([entry(1)])
    with pytest.raises(BudgetExceeded) as info:
        book.check([entry(2)])
    message = str(info.value)
    assert "'cleveland'" in message and "round 2" in message
    assert f"spent epsilon {one_round:.4g}" in message
    assert f"would bring it to {two_rounds:.4g}" in message
    assert f"cap {cap:.4g}" in message
    assert book.spent("cleveland") == pytest.approx(one_round)  # the refused round cost nothing


def test_uncapped_parties_are_not_checked() -> None:
    book = ledger(cap=1e-9)
    book.check([entry(1, party="hungarian")])


def test_the_fast_path_agrees_with_the_accountant() -> None:
    # fits() skips the accountant when fewer steps of the same mechanism already fit
    full = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=5 * STEPS)],
                   delta=1e-5)
    book = ledger(cap=full)
    assert book.fits("cleveland", [entry(r) for r in range(1, 6)])
    for r in range(1, 6):
        book.check([entry(r)])
        book.record([entry(r)])
    assert not book.fits("cleveland", [entry(6)])
    with pytest.raises(BudgetExceeded):
        book.check([entry(6)])


def test_entries_reach_the_file_as_they_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    book = ledger(path)
    book.record([entry(1)])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [{"type": "spend", "round": 1, "party": "cleveland",
                      "protects": "each patient at cleveland", "noise_multiplier": SIGMA,
                      "sample_rate": Q, "steps": STEPS, "mechanism": "subsampled-gaussian"}]


def test_resume_discards_unreleased_rounds_and_keeps_released_ones(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    book = ledger(path)
    for r in (1, 2, 3):
        book.record([entry(r), entry(r, party="va")])
    # the process died after recording round 3 but before checkpointing it
    resumed = ledger()
    resumed.resume_from(path, checkpoint_round=2)
    assert [e.round for e in resumed.entries("cleveland")] == [1, 2]
    assert [e.round for e in resumed.entries("va")] == [1, 2]
    resumed.record([entry(3), entry(3, party="va")])  # round 3 run again
    # a second resume replays the discard line: round 3 is counted exactly once
    again = ledger()
    again.resume_from(path, checkpoint_round=3)
    assert [e.round for e in again.entries("cleveland")] == [1, 2, 3]
    assert again.spent("cleveland") == pytest.approx(book.spent("cleveland"))
    kinds = [json.loads(x)["type"] for x in path.read_text().splitlines()]
    # written without `persist_to`, the file had no format line: resume adds one
    assert kinds == ["spend"] * 6 + ["format", "discard"] + ["spend"] * 2


def test_a_corrupt_ledger_refuses_to_resume(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger(path).record([entry(1)])
    with path.open("a") as f:
        f.write('{"type": "spend", "round": 2}\n')
    with pytest.raises(DataError, match="line 2"):
        ledger().resume_from(path, checkpoint_round=2)


def test_discarded_spends_are_kept_and_counted_as_seen(tmp_path: Path) -> None:
    # Issue 14.3.3: a discarded round never reached the model, but the aggregator saw it.
    path = tmp_path / "ledger.jsonl"
    book = ledger(path)
    for r in (1, 2, 3):
        book.record([entry(r)])
    resumed = ledger()
    resumed.resume_from(path, checkpoint_round=2)
    resumed.record([entry(3)])  # round 3 run again
    three = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=3 * STEPS)],
                    delta=1e-5)
    four = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=4 * STEPS)],
                   delta=1e-5)
    assert resumed.spent("cleveland") == pytest.approx(three)  # the released model
    assert resumed.seen("cleveland") == pytest.approx(four)  # what the aggregator saw
    assert [e.round for e in resumed.discarded("cleveland")] == [3]
    assert resumed.discarded_rounds() == [3]
    # reloading the file gives the same: the discard line marks the same entries
    again = ledger()
    again.resume_from(path, checkpoint_round=3)
    assert again.seen("cleveland") == pytest.approx(four)
    assert again.spent("cleveland") == pytest.approx(three)


def test_a_crash_loop_cannot_show_the_aggregator_more_than_the_cap(tmp_path: Path) -> None:
    # Room for three rounds. Before, each crash forgot its round, so a run that crashed
    # after every round's spend could show the aggregator any number of rounds.
    three = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=3 * STEPS)],
                    delta=1e-5)
    path = tmp_path / "ledger.jsonl"
    book = ledger(path, cap=three)
    book.check([entry(1)])
    book.record([entry(1)])  # crash before checkpoint 1
    attempts = 1
    for _ in range(5):
        resumed = ledger(cap=three)
        resumed.resume_from(path, checkpoint_round=0)
        try:
            resumed.check([entry(1)])
        except BudgetExceeded as exc:
            assert "discarded on resume" in str(exc)
            break
        resumed.record([entry(1)])  # and crash again
        attempts += 1
    assert attempts == 3
    final = ledger(cap=three)
    final.resume_from(path, checkpoint_round=0)
    assert final.seen("cleveland") == pytest.approx(three)
    assert final.spent("cleveland") == 0.0


def test_a_ledger_file_of_the_old_format_loads(tmp_path: Path) -> None:
    # Written before discarded spends were kept: spend and discard lines as they were.
    path = tmp_path / "ledger.jsonl"
    old = [{"type": "spend", "round": r, "party": "cleveland",
            "protects": "each patient at cleveland", "noise_multiplier": SIGMA,
            "sample_rate": Q, "steps": STEPS, "mechanism": "subsampled-gaussian"}
           for r in (1, 2)]
    old.append({"type": "discard", "after_round": 1, "entries": 1,
                "reason": "resumed from the checkpoint of round 1"})
    path.write_text("".join(json.dumps(line) + "\n" for line in old))
    book = ledger()
    book.resume_from(path, checkpoint_round=1)
    assert [e.round for e in book.entries("cleveland")] == [1]
    assert [e.round for e in book.discarded("cleveland")] == [2]
    assert book.seen("cleveland") > book.spent("cleveland")


def test_unsampled_steps_are_checked_by_their_precision_without_the_accountant(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What the aggregator sees (q = 1, varying sigma) composes to one Gaussian of precision
    # sum(1 / sigma^2): once a precision fits, any smaller one does, with no accountant call.
    sigmas = [1.0, 2.0, 1.5, 3.0]
    cap = epsilon([GaussianEvent(noise_multiplier=s, sample_rate=1.0, steps=1)
                   for s in sigmas], delta=1e-5)
    book = PrivacyLedger(None, delta=1e-5, accountant="pld", caps={"aggregator": cap})

    def seen(r: int, sigma: float) -> LedgerEntry:
        return LedgerEntry(r, "aggregator", "each site", sigma, 1.0, 1)

    assert book.fits("aggregator", [seen(r, s) for r, s in enumerate(sigmas, start=1)])
    calls = []
    original = PrivacyLedger.seen
    monkeypatch.setattr(PrivacyLedger, "seen",
                        lambda self, *a: calls.append(a) or original(self, *a))
    for r, s in enumerate(sorted(sigmas, reverse=True), start=1):
        book.check([seen(r, s)])
        book.record([seen(r, s)])
    assert calls == []
    with pytest.raises(BudgetExceeded, match="'aggregator'"):
        book.check([seen(5, 10.0)])


def test_a_released_only_party_keeps_its_discards_out_of_its_cap(tmp_path: Path) -> None:
    # Client-level DP's 'federation' entry stands for the released model; what the aggregator
    # saw of a discarded round is the 'aggregator' party's. Counting the discard against the
    # model's cap too would stop every resumed run one round short for nothing.
    path = tmp_path / "ledger.jsonl"
    one = epsilon([GaussianEvent(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)],
                  delta=1e-5)
    first = PrivacyLedger(path, delta=1e-5, accountant="pld", caps={})
    first.record([entry(1, party="federation")])
    book = PrivacyLedger(None, delta=1e-5, accountant="pld", caps={"federation": one * 1.01},
                         released_only=["federation"])
    book.resume_from(path, checkpoint_round=0)
    assert [e.round for e in book.discarded("federation")] == [1]
    assert book.seen("federation") == book.spent("federation") == 0.0
    book.check([entry(1, party="federation")])  # the redo fits the one-round cap


def test_a_version_1_client_level_ledger_counts_its_rounds_against_the_aggregator(
        tmp_path: Path) -> None:
    # Written before the aggregator's view had entries: each old 'federation' spend stands in
    # for a view at the worst case, so a resumed old run is not under-counted; the file gets
    # a format line, after which only real views count.
    path = tmp_path / "ledger.jsonl"
    old = PrivacyLedger(path, delta=1e-5, accountant="pld", caps={})
    old.record([LedgerEntry(r, "federation", "each site's whole dataset", 1.0, 0.5, 1)
                for r in (1, 2, 3)])

    def resumed(checkpoint: int) -> PrivacyLedger:
        book = PrivacyLedger(None, delta=1e-5, accountant="pld", caps={},
                             released_only=["federation"],
                             stand_in=("federation", "aggregator", 0.8))
        book.resume_from(path, checkpoint_round=checkpoint)
        return book

    book = resumed(2)
    worst = [GaussianEvent(noise_multiplier=0.8, sample_rate=1.0, steps=3)]
    assert book.seen("aggregator") == pytest.approx(epsilon(worst, delta=1e-5))
    assert [e.round for e in book.discarded("aggregator")] == [3]
    book.record([LedgerEntry(3, "aggregator", "each site", 2.0, 1.0, 1),
                 LedgerEntry(3, "federation", "each site's whole dataset", 1.0, 0.5, 1)])
    again = resumed(3)
    with_new = [*worst, GaussianEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1)]
    assert again.seen("aggregator") == pytest.approx(epsilon(with_new, delta=1e-5))
    kinds = [json.loads(x)["type"] for x in path.read_text().splitlines()]
    assert kinds == ["spend"] * 3 + ["format", "discard"] + ["spend"] * 2


def test_a_new_ledger_file_starts_with_its_format(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    book = ledger()
    book.persist_to(path)
    book.record([entry(1)])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"type": "format", "version": 2}
    again = PrivacyLedger(None, delta=1e-5, accountant="pld", caps={},
                          stand_in=("cleveland", "aggregator", 1.0))
    again.resume_from(path, checkpoint_round=1)
    assert again.entries("aggregator") == []  # version 2: no stand-ins
