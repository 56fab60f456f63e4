"""Schema inference from data files, and the `fedcare schema infer` command.

Tests whose point is not the minimum category count pass ``min_category_count=1``,
so a few rows are enough to show them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.cli.main import main
from fedcare.data.infer import (
    MAX_CODE_LEVELS,
    MAX_VOCABULARY,
    MIN_CATEGORY_COUNT,
    MIN_ROWS_FOR_UNIQUE,
    ProposedSchema,
    infer_schema,
)
from fedcare.data.loaders import find_site_files, load_sites
from fedcare.data.schema import Schema
from fedcare.data.tables import read_table
from fedcare.errors import DataError, SchemaError

WriteCsv = Callable[[str, str], Path]


def schema_of(**fields: Any) -> Schema:
    """A hand-written schema (of a 0/1 target): the one place for what every one needs."""
    fields.setdefault("negative", ("0",))
    return Schema(**fields)


def test_fractional_numbers_become_numeric(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "chol,y\n233.5,0\n204.1,1\n250,0\n")

    schema = infer_schema([path], target="y").schema

    assert schema.numeric == ("chol",)
    assert schema.categorical == {}


def test_many_whole_numbers_become_numeric(write_csv: WriteCsv) -> None:
    ages = range(40, 40 + MAX_CODE_LEVELS + 1)
    path = write_csv("a.csv", "age,y\n" + "".join(f"{a},{a % 2}\n" for a in ages))

    schema = infer_schema([path], target="y").schema

    assert schema.numeric == ("age",)


def test_few_whole_number_codes_become_categorical(write_csv: WriteCsv) -> None:
    first = write_csv("a.csv", "cp,chol,y\n3,233.5,0\n1,204.1,1\n")
    second = write_csv("b.csv", "cp,chol,y\n2.0,250,0\n10,199.9,1\n1.0,180.2,0\n")

    proposal = infer_schema([first, second], target="y", min_category_count=1)
    schema, notes = proposal.schema, proposal.notes

    # Ordered by value (10 after 2.0); 1 and 1.0 are one category, kept as first seen.
    assert schema.categorical == {"cp": ("1", "2.0", "3", "10")}
    assert schema.numeric == ("chol",)
    assert any(note.startswith("cp:") and "categorical codes" in note for note in notes)


def test_text_becomes_categorical_with_vocabulary_of_every_file(write_csv: WriteCsv) -> None:
    first = write_csv("a.csv", "ward,y\nnorth,0\nsouth,1\n")
    second = write_csv("b.csv", "ward,y\neast,0\nnorth,1\n?,0\n")

    schema = infer_schema([first, second], target="y", min_category_count=1).schema

    assert schema.categorical == {"ward": ("east", "north", "south")}


def test_site_column_is_not_a_feature(write_csv: WriteCsv) -> None:
    path = write_csv("all.csv", "hospital,age,y\nbern,61.5,0\nbasel,52.5,1\n")

    schema = infer_schema([path], target="y", site_column="hospital").schema

    assert schema.site_column == "hospital"
    assert schema.feature_columns == ("age",)


def test_column_missing_everywhere_is_ignored_with_the_reason(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,ldl,y\n61.5,,0\n52.5,NA,1\n")

    proposal = infer_schema([path], target="y")

    assert "ldl" not in proposal.schema.feature_columns
    assert proposal.schema.ignore == ("ldl",)
    assert "missing in every row" in proposal.ignored["ldl"]


@pytest.mark.parametrize(
    ("values", "positive"),
    [(("0", "1"), ("1",)), (("no", "yes"), ("yes",)), (("2", "10"), ("10",)),
     (("benign", "malignant"), ("malignant",))],
    ids=["zero-one", "no-yes", "numeric-order", "text"],
)
def test_binary_target_takes_larger_value_as_positive(
        write_csv: WriteCsv, values: tuple[str, str], positive: tuple[str, ...]) -> None:
    rows = [f"{age}.5,{values[i % 2]}\n" for i, age in enumerate(range(40, 46))]
    path = write_csv("a.csv", "age,outcome\n" + "".join(rows))

    proposal = infer_schema([path], target="outcome")
    schema, notes = proposal.schema, proposal.notes

    assert schema.target == "outcome"
    assert schema.positive == positive
    assert any("positive class" in note for note in notes)


def test_graded_target_takes_every_nonzero_value_as_positive(write_csv: WriteCsv) -> None:
    rows = [f"{40 + i}.5,{i % 5}\n" for i in range(10)]
    path = write_csv("a.csv", "age,num\n" + "".join(rows))

    schema = infer_schema([path], target="num").schema

    assert schema.positive == ("1", "2", "3", "4")


def test_single_valued_target_refused(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,num\n61.5,0\n52.5,0\n")

    with pytest.raises(SchemaError) as excinfo:
        infer_schema([path], target="num")

    assert "'num'" in str(excinfo.value)
    assert "single value '0'" in str(excinfo.value)


def test_multi_class_target_without_zero_refused(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,stage\n61.5,a\n52.5,b\n40.5,c\n")

    with pytest.raises(SchemaError, match="takes 3 values"):
        infer_schema([path], target="stage")


def test_target_absent_from_files_refused(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,y\n61.5,0\n")

    with pytest.raises(SchemaError) as excinfo:
        infer_schema([path], target="outcome")

    assert str(path) in str(excinfo.value)
    assert "'outcome' not found" in str(excinfo.value)


def test_files_with_different_columns_refused(write_csv: WriteCsv) -> None:
    first = write_csv("a.csv", "age,y\n61.5,0\n")
    second = write_csv("b.csv", "age,bmi,y\n61.5,22,0\n")

    with pytest.raises(SchemaError) as excinfo:
        infer_schema([first, second], target="y")

    assert str(first) in str(excinfo.value)
    assert str(second) in str(excinfo.value)


# ------------------------------------------------------- a review tool (issue 22)
def csv_text(columns: dict[str, list[str]]) -> str:
    """CSV text of equally long `columns`."""
    names = list(columns)
    rows = zip(*columns.values(), strict=True)
    return ",".join(names) + "\n" + "".join(",".join(row) + "\n" for row in rows)


def numbers(n: int, seed: int = 0, loc: float = 60.0, scale: float = 10.0) -> list[str]:
    """`n` fractional values (never a whole number, never repeated)."""
    rng = np.random.default_rng(seed)
    return [f"{v:.2f}3" for v in rng.normal(loc, scale, n)]


def outcomes(n: int) -> list[str]:
    return [str(i % 2) for i in range(n)]


@pytest.mark.parametrize("name", ["id", "rownames", "patient_id", "MRN", "Subject ID"])
def test_a_column_named_like_an_identifier_is_ignored(write_csv: WriteCsv, name: str) -> None:
    n = 8
    path = write_csv("a.csv", csv_text({name: [str(i % 3) for i in range(n)],
                                        "age": numbers(n), "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.feature_columns == ("age",)
    assert proposal.schema.ignore == (name,)
    assert "identifier" in proposal.ignored[name]


@pytest.mark.parametrize("values", [
    [str(1000 + 7 * i) for i in range(MIN_ROWS_FOR_UNIQUE)],  # a different whole number
    [f"P{i:04d}" for i in range(MIN_ROWS_FOR_UNIQUE)],  # a different code in every row
], ids=["whole-numbers", "text"])
def test_a_column_different_in_every_row_is_ignored_as_an_identifier(
        write_csv: WriteCsv, values: list[str]) -> None:
    n = MIN_ROWS_FOR_UNIQUE
    path = write_csv("a.csv", csv_text({"record": values, "chol": numbers(n), "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.ignore == ("record",)
    assert "different value in every row" in proposal.ignored["record"]
    assert proposal.schema.numeric == ("chol",)  # fractional and unique, but a measurement


@pytest.mark.parametrize(("name", "n"), [("crp", MIN_ROWS_FOR_UNIQUE - 1),
                                         ("chol", 2 * MIN_ROWS_FOR_UNIQUE)],
                         ids=["few-rows", "known-measurement"])
def test_a_whole_number_measurement_different_in_every_row_stays_a_feature(
        write_csv: WriteCsv, name: str, n: int) -> None:
    values = [str(150 + 3 * i) for i in range(n)]  # by chance a different value in every row
    path = write_csv("a.csv", csv_text({name: values, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.numeric == (name,)
    assert proposal.schema.ignore == ()


@pytest.mark.parametrize("name", ["death_date", "discharge_status", "followup_months",
                                  "FollowUpDays", "outcome_30d", "los"])
def test_a_column_named_as_recorded_after_the_outcome_is_ignored(
        write_csv: WriteCsv, name: str) -> None:
    n = 10
    path = write_csv("a.csv", csv_text({"age": numbers(n), name: numbers(n, seed=1),
                                        "outcome": outcomes(n)}))

    proposal = infer_schema([path], target="outcome")

    assert proposal.schema.ignore == (name,)
    assert "recorded after the outcome 'outcome'" in proposal.ignored[name]
    assert proposal.schema.target == "outcome"


def test_a_date_column_is_ignored(write_csv: WriteCsv) -> None:
    n = 10
    dates = [f"2021-03-{i % 5 + 1:02d}" for i in range(n)]
    path = write_csv("a.csv", csv_text({"age": numbers(n), "visit": dates, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.ignore == ("visit",)
    assert "dates" in proposal.ignored["visit"]


def test_a_mostly_missing_column_is_ignored_and_a_partly_missing_one_kept(
        write_csv: WriteCsv) -> None:
    n = 10
    mostly = [v if i < 4 else "" for i, v in enumerate(numbers(n))]  # 60% missing
    partly = [v if i < 6 else "NA" for i, v in enumerate(numbers(n, seed=2))]  # 40% missing
    path = write_csv("a.csv", csv_text({"ldl": mostly, "hdl": partly, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.numeric == ("hdl",)
    assert proposal.schema.ignore == ("ldl",)
    assert "missing in 60% of rows" in proposal.ignored["ldl"]


@pytest.mark.parametrize("one_file", [True, False], ids=["site-column", "file-per-site"])
def test_a_column_empty_at_one_site_is_ignored_naming_the_site(
        write_csv: WriteCsv, one_file: bool) -> None:
    n = 6
    north = {"age": numbers(n), "ldl": numbers(n, seed=3), "y": outcomes(n)}
    south = {"age": numbers(n, seed=4), "ldl": [""] * n, "y": outcomes(n)}
    if one_file:
        rows = {k: north[k] + south[k] for k in north}
        paths = [write_csv("all.csv", csv_text({"hospital": ["north"] * n + ["south"] * n,
                                                **rows}))]
    else:
        paths = [write_csv("north.csv", csv_text(north)), write_csv("south.csv", csv_text(south))]

    proposal = infer_schema(paths, target="y", site_column="hospital" if one_file else None)

    assert proposal.schema.ignore == ("ldl",)
    assert "every row at site(s) ['south']" in proposal.ignored["ldl"]


@pytest.mark.parametrize("token", [".", "NA", "n/a", "N/A", "", "-", "?"])
def test_a_missing_value_token_keeps_a_numeric_column_numeric(
        write_csv: WriteCsv, token: str) -> None:
    n = 40
    chol = [token if i % 8 == 0 else v for i, v in enumerate(numbers(n, loc=220, scale=40))]
    path = write_csv("a.csv", csv_text({"chol": chol, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.numeric == ("chol",)
    assert proposal.schema.categorical == {}
    assert token in proposal.schema.missing_values
    site = load_sites([path], proposal.schema)[0]
    assert np.isnan(site.numeric[:, 0]).sum() == 5


def test_a_dash_is_a_category_in_a_text_column(write_csv: WriteCsv) -> None:
    n = 30
    protein = [["-", "+", "++"][i % 3] for i in range(n)]  # a urine dipstick: '-' is negative
    path = write_csv("a.csv", csv_text({"protein": protein, "age": numbers(n), "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.categorical == {"protein": ("+", "++", "-")}
    assert "-" not in proposal.schema.missing_values


def test_a_token_missing_in_a_numeric_column_is_missing_in_a_text_one_too(
        write_csv: WriteCsv) -> None:
    n = 30
    chol = ["-" if i % 6 == 0 else v for i, v in enumerate(numbers(n))]
    smoker = [["-", "no", "yes"][i % 3] for i in range(n)]
    path = write_csv("a.csv", csv_text({"chol": chol, "smoker": smoker, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert "-" in proposal.schema.missing_values
    assert proposal.schema.numeric == ("chol",)
    assert proposal.schema.categorical == {"smoker": ("no", "yes")}
    assert any(note.startswith("smoker: ['-'] will be read as missing")
               for note in proposal.notes)
    load_sites([path], proposal.schema)  # every cell reads


def test_dot_for_missing_stays_numeric_through_the_written_file(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    n = 40
    chol = ["." if i % 4 == 0 else v for i, v in enumerate(numbers(n, loc=220, scale=40))]
    path = write_csv("a.csv", csv_text({"chol": chol, "y": outcomes(n)}))
    out = tmp_path / "schema.toml"

    infer_schema([path], target="y").save(out)

    schema = Schema.load(out)
    assert schema.numeric == ("chol",)
    assert "." in schema.missing_values
    assert np.isnan(load_sites([path], schema)[0].numeric[:, 0]).sum() == 10


def test_a_common_text_code_in_a_numeric_column_is_suggested_as_missing(
        write_csv: WriteCsv) -> None:
    n = 60
    crp = ["pending" if i % 10 == 0 else v for i, v in enumerate(numbers(n))]  # 6 times
    path = write_csv("a.csv", csv_text({"crp": crp, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.numeric == ("crp",)
    assert "pending" in proposal.schema.missing_values
    assert any(n.startswith("crp:") and "'pending'" in n for n in proposal.notes)


def test_rare_text_in_a_numeric_column_is_not_written_and_the_loader_names_it(
        write_csv: WriteCsv) -> None:
    n = 60
    crp = ["<0.3" if i in (7, 31) else v for i, v in enumerate(numbers(n))]
    path = write_csv("a.csv", csv_text({"crp": crp, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.numeric == ("crp",)
    assert "<0.3" not in proposal.to_toml()
    assert any("2 cell(s) hold text seen fewer than" in note for note in proposal.notes)
    with pytest.raises(SchemaError, match=r"a\.csv, row 8 \(line 9\), column 'crp'"):
        load_sites([path], proposal.schema)


def test_a_categorical_with_200_values_is_not_written_as_a_vocabulary(
        write_csv: WriteCsv) -> None:
    n = 400
    lab = [f"L{i % 200:03d}x" for i in range(n)]  # 200 values, each in two rows
    path = write_csv("a.csv", csv_text({"age": numbers(n), "lab": lab, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert "lab" not in proposal.schema.categorical
    assert proposal.schema.ignore == ("lab",)
    assert f"200 distinct values (more than {MAX_VOCABULARY})" in proposal.ignored["lab"]
    assert "L000x" not in proposal.to_toml() and "L199x" not in proposal.to_toml()


def test_a_category_seen_fewer_than_k_times_is_never_written(write_csv: WriteCsv) -> None:
    n = 40
    ward = ["burns" if i == 3 else ("icu" if i % 2 else "er") for i in range(n)]
    path = write_csv("a.csv", csv_text({"age": numbers(n), "ward": ward, "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.categorical == {"ward": ("er", "icu")}
    assert "burns" not in proposal.to_toml()
    assert any(note.startswith("ward: 1 category seen fewer than "
                               f"{MIN_CATEGORY_COUNT} times") for note in proposal.notes)
    # The value is not in the vocabulary: the loader refuses its row, naming it.
    with pytest.raises(SchemaError, match=r"row 4 \(line 5\), column 'ward': unknown category"):
        load_sites([path], proposal.schema)


def test_rare_whole_number_codes_are_left_out_and_too_few_left_ignore_the_column(
        write_csv: WriteCsv) -> None:
    n = 40
    cp = [str(1 + i % 3) if i != 5 else "4" for i in range(n)]  # code 4 seen once
    rare = ["1" if i < 3 else "2" if i < 6 else "3" for i in range(n)]  # only 3 is common
    path = write_csv("a.csv", csv_text({"cp": cp, "grade": rare, "age": numbers(n),
                                        "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    assert proposal.schema.categorical == {"cp": ("1", "2", "3")}
    assert proposal.schema.ignore == ("grade",)
    assert "fewer than two categories" in proposal.ignored["grade"]


def test_bounds_are_suggested_as_comments_from_clinical_defaults_not_the_data(
        write_csv: WriteCsv, tmp_path: Path) -> None:
    n = 30
    rng = np.random.default_rng(5)
    columns = {"age": [f"{v:.1f}" for v in rng.uniform(31, 77, n)],
               "trestbps": [f"{v:.1f}" for v in rng.uniform(101, 179, n)],
               "smoker": [str(i % 2) for i in range(n)],
               "mystery": numbers(n), "y": outcomes(n)}
    path = write_csv("a.csv", csv_text(columns))
    out = tmp_path / "schema.toml"

    proposal = infer_schema([path], target="y")
    proposal.save(out)

    text = out.read_text(encoding="utf-8")
    assert "# age = [0, 120]  # years" in text
    assert "# trestbps = [50, 250]  # systolic blood pressure, mmHg" in text
    assert "# smoker = [0, 1]  # a 0/1 indicator" in text
    assert "# mystery = [low, high]  # no clinical default known" in text
    for column in ("age", "trestbps"):  # the data's own range appears nowhere
        values = [float(v) for v in columns[column]]
        assert f"{min(values):g}" not in text and f"{max(values):g}" not in text
    assert Schema.load(out).bounds == {}  # suggestions only, until the reviewer uncomments
    uncommented = text.replace("# [bounds]", "[bounds]").replace("# age =", "age =")
    out.write_text(uncommented, encoding="utf-8")
    assert Schema.load(out).bounds == {"age": (0.0, 120.0)}


def test_every_problem_is_reported_at_once(write_csv: WriteCsv, tmp_path: Path) -> None:
    first = write_csv("a.csv", "age,y\n61.5,0\n")
    second = write_csv("b.csv", "age,bmi,y\n61.5,22,0\n")
    absent = tmp_path / "c.csv"

    with pytest.raises(SchemaError) as excinfo:
        infer_schema([first, second, absent], target="outcome", site_column="hospital")

    message = str(excinfo.value)
    assert message.startswith("4 problems:")
    assert f"Data file {absent} does not exist" in message
    assert f"{second}: columns differ from {first}: only in this file ['bmi']" in message
    assert "target 'outcome' not found" in message
    assert "site column 'hospital' not found" in message


def test_review_notes_are_all_in_the_written_file(write_csv: WriteCsv) -> None:
    n = 40
    path = write_csv("a.csv", csv_text({
        "id": [str(i) for i in range(n)], "chol": ["." if i % 5 == 0 else v for i, v in
                                                   enumerate(numbers(n))],
        "ward": ["x" if i == 0 else "icu" if i % 2 else "er" for i in range(n)],
        "y": outcomes(n)}))

    proposal = infer_schema([path], target="y")

    text = proposal.to_toml()
    for note in proposal.notes:
        assert f"# {note}\n" in text
    assert '    "id",  # named like an identifier: not a feature\n' in text
    assert len(proposal.notes) >= 3  # ward's vocabulary, its rare category, '.' and the target


# ------------------------------------------------------- the ignore list
def test_ignore_round_trips_and_is_absent_from_a_schema_without_it(tmp_path: Path) -> None:
    schema = schema_of(numeric=("age",), categorical={}, target="y", positive=("1",),
                    ignore=("id", "discharge date"))
    path = tmp_path / "schema.toml"
    path.write_text(schema.to_toml(ignore_reasons={"id": "an identifier\nsecond line"}),
                    encoding="utf-8")

    loaded = Schema.load(path)

    assert loaded == schema
    assert loaded.to_dict()["ignore"] == ["id", "discharge date"]
    assert '"id",  # an identifier second line' in path.read_text(encoding="utf-8")
    assert "ignore" not in schema_of(numeric=("age",), categorical={}, target="y",
                                  positive=("1",)).to_dict()


def test_an_ignored_column_cannot_also_be_a_feature() -> None:
    with pytest.raises(SchemaError, match="names column 'age' twice"):
        schema_of(numeric=("age",), categorical={}, target="y", positive=("1",), ignore=("age",))


def test_loaders_honour_ignore(write_csv: WriteCsv) -> None:
    first = write_csv("north.csv", "id,age,y\n1,61.5,0\n2,52.5,1\n")
    second = write_csv("south.csv", "age,y\n40.5,1\n")  # no id column: not required
    schema = schema_of(numeric=("age",), categorical={}, target="y", positive=("1",),
                    ignore=("id",))

    sites = load_sites([first, second], schema)

    assert [len(s) for s in sites] == [2, 1]
    assert sites[0].numeric.shape == (2, 1)
    without_ignore = schema_of(numeric=("age",), categorical={}, target="y", positive=("1",))
    with pytest.raises(SchemaError, match=r"only in .*north\.csv \['id'\]"):
        load_sites([first, second], without_ignore)


# ------------------------------------------------------------------ CLI
def site_rows(n: int, seed: int) -> dict[str, list[str]]:
    """`n` rows of one site: a numeric column, codes, a text category and a yes/no outcome."""
    rng = np.random.default_rng(seed)
    return {"age": [f"{v:.1f}" if i != 3 else "" for i, v in enumerate(rng.normal(60, 9, n))],
            "cp": [["1", "2", "3", "4.0" if seed else "4"][i % 4] for i in range(n)],
            "ward": [["er", "icu", "ward"][i % 3] for i in range(n)],
            "y": ["yes" if i % 3 else "no" for i in range(n)]}


def write_two_sites(write_csv: WriteCsv) -> list[Path]:
    return [write_csv("sites/north.csv", csv_text(site_rows(24, 0))),
            write_csv("sites/south.csv", csv_text(site_rows(24, 1)))]


def infer_cli(data: list[str], out: Path, *extra: str) -> int:
    return main(["schema", "infer", *data, "--target", "y", "--out", str(out), *extra])


def test_cli_schema_infer_writes_a_schema_load_sites_accepts(
        write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_two_sites(write_csv)
    out = tmp_path / "schema.toml"

    code = infer_cli([str(p) for p in paths], out)

    assert code == 0
    printed = capsys.readouterr().out
    assert f"Wrote {out}" in printed
    assert f"fedcare run --data {paths[0]} {paths[1]} --schema {out}" in printed
    schema = Schema.load(out)
    assert schema == infer_schema(paths, target="y").schema
    assert schema.numeric == ("age",)
    assert schema.categorical == {"cp": ("1", "2", "3", "4"), "ward": ("er", "icu", "ward")}
    assert schema.positive == ("yes",)
    sites = load_sites(paths, schema)
    assert [s.name for s in sites] == ["north", "south"]
    np.testing.assert_array_equal(sites[1].categorical[:4, 0], [0, 1, 2, 3])  # "4.0" is "4"


def test_cli_schema_infer_accepts_a_directory(write_csv: WriteCsv, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_two_sites(write_csv)
    out = tmp_path / "schema.toml"

    code = infer_cli([str(tmp_path / "sites")], out)

    assert code == 0
    assert f"fedcare run --data-dir {tmp_path / 'sites'} --schema {out}" in capsys.readouterr().out
    assert Schema.load(out) == infer_schema(paths, target="y").schema


def test_cli_schema_infer_reports_errors_without_writing(
        write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv("a.csv", "age,y\n61.5,0\n52.5,0\n")
    out = tmp_path / "schema.toml"

    code = infer_cli([str(path)], out)

    assert code == 2
    assert "single value" in capsys.readouterr().err
    assert not out.exists()


def test_cli_schema_infer_does_not_overwrite_without_overwrite(
        write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_two_sites(write_csv)
    out = tmp_path / "schema.toml"
    out.write_text("# reviewed by hand\n", encoding="utf-8")

    code = infer_cli([str(p) for p in paths], out)

    assert code == 2
    err = capsys.readouterr().err
    assert f"--out {out} exists" in err
    assert "pass --overwrite to replace it" in err
    assert out.read_text(encoding="utf-8") == "# reviewed by hand\n"
    assert infer_cli([str(p) for p in paths], out, "--overwrite") == 0
    assert Schema.load(out) == infer_schema(paths, target="y").schema


def test_cli_schema_infer_into_a_missing_folder_is_an_error(
        write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_two_sites(write_csv)

    code = infer_cli([str(paths[0])], tmp_path / "nowhere" / "schema.toml")

    assert code == 2
    assert f"folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_cli_schema_infer_prints_ignored_columns_and_notes(
        write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = site_rows(24, 0)
    path = write_csv("a.csv", csv_text({"patient_id": [str(i) for i in range(24)], **rows}))

    assert infer_cli([str(path)], tmp_path / "schema.toml") == 0

    printed = capsys.readouterr().out
    assert "Ignored (listed in `ignore`, with the reason):\n  - patient_id: named like" in printed
    assert "To review:\n" in printed
    assert "  - cp: 4 whole-number values, proposed as categorical codes" in printed


def test_run_data_dir_given_a_file_says_so(write_csv: WriteCsv, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv("all.csv", "age,y\n61.5,0\n")

    with pytest.raises(DataError, match=r"is a file, not a directory.*--data "):
        find_site_files(path)
    schema = path.with_name("schema.toml")
    schema_of(numeric=("age",), categorical={}, target="y", positive=("1",)).save(schema)
    code = main(["run", "--data-dir", str(path), "--schema", str(schema), "--quiet"])

    assert code == 2
    assert f"{path} is a file, not a directory" in capsys.readouterr().err


def test_run_data_given_a_directory_says_so(write_csv: WriteCsv, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_two_sites(write_csv)
    schema = tmp_path / "schema.toml"
    infer_schema(paths, target="y").save(schema)
    capsys.readouterr()

    code = main(["run", "--data", str(tmp_path / "sites"), "--schema", str(schema), "--quiet"])

    assert code == 2
    assert f"{tmp_path / 'sites'} is a directory, not a file" in capsys.readouterr().err
    with pytest.raises(DataError, match="is a directory, not a file"):
        read_table(tmp_path)


def test_single_file_round_trip_infer_then_run_the_printed_command(
        write_csv: WriteCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One export holding every site: infer, then run exactly the command it prints."""
    n = 150
    rng = np.random.default_rng(7)
    age = rng.normal(60, 9, n)
    outcome = (rng.random(n) < 1 / (1 + np.exp(-0.1 * (age - 60)))).astype(int)
    lab = [f"{v:.3f}" for v in rng.normal(5, 1, n)]  # exact lab values as text
    lab_text = [f"v{v}" for v in lab]
    write_csv("trial.csv", csv_text({
        "rownames": [str(i + 1) for i in range(n)],
        "hospital": [["bern", "basel", "geneva"][i % 3] for i in range(n)],
        "age": ["." if i % 10 == 0 else f"{a:.1f}" for i, a in enumerate(age)],
        "lab": lab_text,
        "ward": [["er", "icu"][i % 2] for i in range(n)],
        "death_date": [f"2022-01-{i % 28 + 1:02d}" for i in range(n)],
        "outcome": [str(o) for o in outcome]}))
    monkeypatch.chdir(tmp_path)

    assert main(["schema", "infer", "trial.csv", "--site-column", "hospital",
                 "--target", "outcome", "--out", "schema.toml"]) == 0
    hint = capsys.readouterr().out.splitlines()[-1]
    assert hint == "Review it, then: fedcare run --data trial.csv --schema schema.toml"

    command = hint.split("fedcare ", 1)[1].split()
    code = main([*command, "--rounds", "1", "--no-baselines", "--quiet", "--out", "run"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 sites from files" in captured.out
    schema = Schema.load(tmp_path / "schema.toml")
    assert schema.ignore == ("rownames", "lab", "death_date")
    assert schema.numeric == ("age",)
    published = "".join((tmp_path / "run" / name).read_text(encoding="utf-8")
                        for name in ("summary.json", "model_card.md", "report.html"))
    assert "ward" in published  # the vocabulary that is published...
    assert not [v for v in lab_text if v in published]  # ...holds no patient's lab value
    card = (tmp_path / "run" / "model_card.md").read_text(encoding="utf-8")
    for column in ("rownames", "lab", "death_date"):
        assert f"| {column} | not used (schema's ignore list) | - |" in card


def test_the_model_card_does_not_list_a_long_hand_written_vocabulary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 60
    codes = [f"W{i:02d}q" for i in range(MAX_VOCABULARY + 5)]
    data = tmp_path / "sites"
    data.mkdir()
    for k, site in enumerate(("north", "south")):
        (data / f"{site}.csv").write_text(csv_text({
            "age": numbers(n, seed=k), "ward": [codes[i % 3] for i in range(n)],
            "y": outcomes(n)}), encoding="utf-8")
    schema = tmp_path / "schema.toml"
    schema_of(numeric=("age",), categorical={"ward": tuple(codes)}, target="y",
           positive=("1",)).save(schema)

    code = main(["run", "--data-dir", str(data), "--schema", str(schema), "--rounds", "1",
                 "--no-baselines", "--quiet", "--out", str(tmp_path / "run")])

    assert code == 0, capsys.readouterr().err
    card = (tmp_path / "run" / "model_card.md").read_text(encoding="utf-8")
    assert f"| ward | categorical | {len(codes)} categories (not listed: more than " in card
    assert codes[-1] not in card


def test_proposed_schema_is_a_frozen_value(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,y\n61.5,0\n52.5,1\n")

    proposal = infer_schema([path], target="y")

    assert isinstance(proposal, ProposedSchema)
    with pytest.raises(AttributeError):
        proposal.schema = proposal.schema  # type: ignore[misc]


def test_resume_takes_no_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--resume", str(tmp_path), "--data", str(tmp_path / "trial.csv")])

    assert code == 2
    assert "takes no --data" in capsys.readouterr().err
