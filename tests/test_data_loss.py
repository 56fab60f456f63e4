"""Issue 22, points 1 and 2: no silent wrong target, and no silent loss of rows.

A schema that maps every label to one class, a third class taken for the
negative one, rows dropped without a count: each used to run with rc 0 and a
plausible result. Each case below is now an error naming where, a warning
naming the site, or a count shown wherever the run's results are.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.cli.main import main
from fedcare.config import DataConfig
from fedcare.data.datasets import OneClassSiteWarning, build_federation
from fedcare.data.infer import infer_schema
from fedcare.data.loaders import MissingPolicy, drop_missing, load_sites
from fedcare.data.schema import Schema
from fedcare.errors import DataError, SchemaError
from fedcare.report.data_loss import NOT_RELEASED
from fedcare.report.html import MODEL_CARD_FILE, REPORT_FILE

WriteCsv = Callable[[str, str], Path]

HEADER = "age,chol,y\n"


def write_schema(path: Path, positive: list[str], negative: list[str]) -> Path:
    path.write_text(f'target = "y"\npositive = {json.dumps(positive)}\n'
                    f'negative = {json.dumps(negative)}\n[numeric]\n'
                    'columns = ["age", "chol"]\n[bounds]\nage = [0, 120]\n'
                    'chol = [50, 600]\n', encoding="utf-8")
    return path


def site_rows(n: int, seed: int, labels: Callable[[int], str] = lambda i: str(i % 2)) -> str:
    rng = np.random.default_rng(seed)
    return "".join(f"{rng.normal(55, 8):.1f},{rng.normal(230, 30):.0f},{labels(i)}\n"
                   for i in range(n))


def files_config(tmp_path: Path, schema: Path, missing: str = "drop") -> DataConfig:
    return DataConfig(data_dir=str(tmp_path / "sites"), schema=str(schema), missing=missing)


# ------------------------------------------------------------ 1. no silent wrong target
def test_yes_no_positive_list_on_zero_one_data_names_file_row_and_value(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    path = write_csv("sites/north.csv", HEADER + site_rows(10, 0))
    schema = Schema.load(write_schema(tmp_path / "schema.toml", ["yes"], ["no"]))

    with pytest.raises(SchemaError) as excinfo:
        load_sites([path], schema)

    message = str(excinfo.value)
    # row 1 holds label 0: neither "yes" nor "no", where it used to become a silent negative
    assert f"{path}, row 1 (line 2), column 'y' (target): value '0'" in message
    assert "neither positive ['yes'] nor negative ['no']" in message


def test_three_class_outcome_with_binary_lists_names_the_third_value(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    path = write_csv("sites/north.csv", HEADER + site_rows(9, 0, lambda i: str(i % 3)))
    schema = Schema.load(write_schema(tmp_path / "schema.toml", ["1"], ["0"]))

    with pytest.raises(SchemaError) as excinfo:
        load_sites([path], schema)

    message = str(excinfo.value)
    assert f"{path}, row 3 (line 4), column 'y' (target): value '2'" in message
    assert "a third class must be mapped to one of the two" in message


def test_a_target_value_in_neither_list_names_file_row_and_value(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    # a typo deep in the file, after rows that parse: the message points at it
    text = HEADER + site_rows(6, 0) + "61.0,240,positive\n" + site_rows(3, 1)
    path = write_csv("sites/south.csv", text)
    schema = Schema.load(write_schema(tmp_path / "schema.toml", ["1"], ["0"]))

    with pytest.raises(SchemaError) as excinfo:
        load_sites([path], schema)

    assert str(excinfo.value).startswith(
        f"{path}, row 7 (line 8), column 'y' (target): value 'positive' is neither positive "
        "['1'] nor negative ['0']")


def test_numeric_spellings_of_listed_values_still_match(write_csv: WriteCsv,
                                                        tmp_path: Path) -> None:
    path = write_csv("sites/north.csv", HEADER + "50,200,1.0\n51,210,0.0\n52,220,1\n")
    schema = Schema.load(write_schema(tmp_path / "schema.toml", ["1"], ["0"]))

    (site,) = load_sites([path], schema)

    np.testing.assert_array_equal(site.target, [1.0, 0.0, 1.0])


def test_one_class_overall_is_refused(write_csv: WriteCsv, tmp_path: Path) -> None:
    for i, name in enumerate(("north", "south")):
        write_csv(f"sites/{name}.csv", HEADER + site_rows(10, i, lambda _: "0"))
    schema = write_schema(tmp_path / "schema.toml", ["1"], ["0"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OneClassSiteWarning)  # each site warns, too
        with pytest.raises(DataError) as excinfo:
            build_federation(files_config(tmp_path, schema))

    message = str(excinfo.value)
    assert "one class of the outcome only" in message
    assert "every one of the 20 rows across 2 site(s) has a negative 'y'" in message
    assert "positive = ['1'], negative = ['0']" in message


def test_a_one_class_site_is_warned_about_by_name(write_csv: WriteCsv, tmp_path: Path) -> None:
    write_csv("sites/north.csv", HEADER + site_rows(20, 0))
    write_csv("sites/south.csv", HEADER + site_rows(12, 1, lambda _: "1"))
    schema = write_schema(tmp_path / "schema.toml", ["1"], ["0"])

    with pytest.warns(OneClassSiteWarning) as record:
        data = build_federation(files_config(tmp_path, schema))

    assert [s.name for s in data.sites] == ["north", "south"]  # warned, not refused
    messages = [str(w.message) for w in record if w.category is OneClassSiteWarning]
    assert len(messages) == 1
    assert messages[0].startswith("site 'south' (")
    assert "every one of its 12 rows has a positive 'y'" in messages[0]


def test_infer_writes_the_negative_values(write_csv: WriteCsv, tmp_path: Path) -> None:
    path = write_csv("grades.csv", HEADER + site_rows(10, 0, lambda i: str(i % 4)))

    schema = infer_schema([path], "y").schema
    schema.save(tmp_path / "schema.toml")

    assert (schema.positive, schema.negative) == (("1", "2", "3"), ("0",))
    assert Schema.load(tmp_path / "schema.toml").negative == ("0",)


# ------------------------------------------------------------ 2. visible data loss
@pytest.mark.parametrize("policy", list(MissingPolicy))
def test_missing_outcome_is_dropped_and_counted_under_every_policy(
        write_csv: WriteCsv, tmp_path: Path, policy: MissingPolicy) -> None:
    path = write_csv("sites/north.csv", HEADER + "50,200,1\n51,210,\n52,220,0\n53,?,NA\n")
    schema = Schema.load(write_schema(tmp_path / "schema.toml", ["1"], ["0"]))
    (site,) = load_sites([path], schema)

    kept, account = drop_missing(site, schema, policy)

    # Row 4 misses both chol and the outcome: dropped for the outcome, under every policy
    # (so "fail" does not refuse its missing chol either).
    np.testing.assert_array_equal(kept.rows, [0, 2])
    assert account.to_dict() == {"site": "north", "read": 4, "missing_outcome": 2,
                                 "missing_feature": 0, "used": 2}


def test_impute_drops_a_missing_outcome_then_imputes_features(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    rows = site_rows(20, 0) + "50,,1\n51,210,\n"
    write_csv("sites/north.csv", HEADER + rows)
    write_csv("sites/south.csv", HEADER + site_rows(20, 1))
    schema = write_schema(tmp_path / "schema.toml", ["1"], ["0"])

    data = build_federation(files_config(tmp_path, schema, missing="impute"))

    north = data.row_accounts[0].to_dict()
    assert north == {"site": "north", "read": 22, "missing_outcome": 1, "missing_feature": 0,
                     "used": 21}
    assert data.sites[0].n_train + data.sites[0].n_test == 21
    assert not any(bool(s.x_train.isnan().any()) for s in data.sites)


def test_drop_counts_rows_missing_a_feature_apart_from_a_missing_outcome(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    write_csv("sites/north.csv", HEADER + site_rows(20, 0) + "50,,1\n51,?,0\n52,210,\n")
    write_csv("sites/south.csv", HEADER + site_rows(20, 1))
    schema = write_schema(tmp_path / "schema.toml", ["1"], ["0"])

    data = build_federation(files_config(tmp_path, schema, missing="drop"))

    assert [a.to_dict() for a in data.row_accounts] == [
        {"site": "north", "read": 23, "missing_outcome": 1, "missing_feature": 2, "used": 20},
        {"site": "south", "read": 20, "missing_outcome": 0, "missing_feature": 0, "used": 20}]


def test_drop_emptying_a_site_says_what_was_dropped_and_what_to_do(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    path = write_csv("sites/north.csv", HEADER + "50,,1\n51,?,0\n52,210,\n")
    schema = Schema.load(write_schema(tmp_path / "schema.toml", ["1"], ["0"]))
    (site,) = load_sites([path], schema)

    with pytest.raises(DataError) as excinfo:
        drop_missing(site, schema, MissingPolicy.DROP)

    assert str(excinfo.value) == (
        f"{path}: site 'north' has no row left: all 3 were dropped, 1 with a missing outcome "
        "('y') and 2 with a missing feature under missing = \"drop\" (most often 'chol' in 2 "
        "rows). Use missing = \"impute\" (rows missing a feature are kept and filled from the "
        "site's own training rows), remove the mostly-missing column(s) from the schema, or "
        "fill them.")


def heart_run(tmp_path: Path, name: str, *extra: str) -> Path:
    """A one-round heart-disease run under FLamby's protocol (drops 180 of 920 rows)."""
    out = tmp_path / name
    args = ["run", "--rounds", "1", "--protocol", "flamby", "--no-baselines", "--quiet",
            "--out", str(out), *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded noise of a private run warns
        assert main(args) == 0
    return out


HEART_COUNTS = [("cleveland", 303, 0), ("hungarian", 294, 33), ("switzerland", 123, 77),
                ("va", 200, 70)]
"""FLamby's Fed-Heart-Disease: 740 of 920 rows kept (its paper's numbers)."""


def summary_of(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return summary


def test_counts_are_in_summary_report_and_console_of_a_non_private_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = heart_run(tmp_path, "plain")
    console = capsys.readouterr().out

    loss = summary_of(run_dir)["data_loss"]
    assert loss["released"] is True and loss["per"] == "site"
    assert [(s["site"], s["read"], s["missing_feature"]) for s in loss["sites"]] == HEART_COUNTS
    assert all(s["missing_outcome"] == 0 for s in loss["sites"])
    assert loss["total"] == {"site": "total", "read": 920, "missing_outcome": 0,
                             "missing_feature": 180, "used": 740}
    report = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert "<h2 id='data-loss'>Rows read, dropped and used</h2>" in report
    assert ("<tr><td>switzerland</td><td>123</td><td>0</td><td>77</td><td>46</td></tr>"
            in report)
    assert "180 of 920 rows (20%) were dropped before training" in report
    assert "Data: 180 of 920 rows dropped:" in console
    assert any(line.split() == ["switzerland", "123", "0", "77", "46"]
               for line in console.splitlines())


@pytest.mark.parametrize("level", [
    "site",
    # record level calibrates DP-SGD per hospital: about a minute on a loaded machine
    pytest.param("record", marks=pytest.mark.slow),
])
def test_counts_are_absent_from_every_artefact_of_a_private_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], level: str) -> None:
    run_dir = heart_run(tmp_path, level, "--privacy", level, "--epsilon", "4",
                           "--set", "privacy.secure=false")
    console = capsys.readouterr().out

    assert summary_of(run_dir)["data_loss"] == {"released": False, "note": NOT_RELEASED}
    texts = {p.name: p.read_text(encoding="utf-8") for p in run_dir.iterdir()
             if p.suffix in (".json", ".jsonl", ".html", ".md", ".toml")}
    assert {REPORT_FILE, MODEL_CARD_FILE, "summary.json", "metrics.jsonl"} <= set(texts)
    for name, text in texts.items():
        for site, read, dropped in HEART_COUNTS:
            for pattern in (f'"read": {read}', f"<td>{read}</td><td>0</td><td>{dropped}</td>",
                            f'"missing_feature": {dropped}'):
                assert pattern not in text, f"{name} publishes {site}'s counts ({pattern})"
    assert "not released in a private run" in texts[REPORT_FILE]
    # The local runtime's console belongs to the holder of every site's data.
    assert "Data: 180 of 920 rows dropped (console only" in console
