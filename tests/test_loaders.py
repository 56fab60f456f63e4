"""Loading user files into validated site tables: every refusal says where and what."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedcare.data.loaders import (
    MissingPolicy,
    SiteTable,
    apply_missing_policy,
    find_site_files,
    load_sites,
)
from fedcare.data.schema import Schema
from fedcare.errors import DataError, SchemaError

WriteCsv = Callable[[str, str], Path]

SCHEMA = Schema(numeric=("age", "chol"), categorical={"cp": ("1", "2", "3")}, target="y",
                positive=("1",), negative=("0",))
HEADER = "age,chol,cp,y\n"


def load_one(path: Path, schema: Schema = SCHEMA) -> SiteTable:
    (site,) = load_sites([path], schema)
    return site


def assert_mentions(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in message {message!r}"


# ------------------------------------------------------------------ good files
def test_valid_file_becomes_numeric_site_table(write_csv: WriteCsv) -> None:
    path = write_csv("north.csv", HEADER + "63,233,1,1\n41,204,3,0\n,250,,0\n")

    site = load_one(path)

    assert site.name == "north"
    assert site.source == str(path)
    np.testing.assert_array_equal(site.lines, [2, 3, 4])
    np.testing.assert_array_equal(site.rows, [0, 1, 2])
    np.testing.assert_array_equal(site.numeric, [[63, 233], [41, 204], [np.nan, 250]])
    np.testing.assert_array_equal(site.categorical, [[0], [2], [-1]])
    np.testing.assert_array_equal(site.target, [1.0, 0.0, 0.0])


def test_one_file_per_site_keeps_file_order(write_csv: WriteCsv) -> None:
    paths = [write_csv("zeta.csv", HEADER + "1,2,1,0\n"),
             write_csv("alpha.csv", HEADER + "3,4,2,1\n5,6,3,0\n")]

    sites = load_sites(paths, SCHEMA)

    assert [s.name for s in sites] == ["zeta", "alpha"]
    assert [len(s) for s in sites] == [1, 2]


def test_trailing_blank_lines_are_ignored(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "1,2,1,0\n3,4,2,1\n\n\n")

    assert len(load_one(path)) == 2


def test_find_site_files_lists_data_files_sorted(write_csv: WriteCsv, tmp_path: Path) -> None:
    write_csv("data/b.csv", HEADER)
    write_csv("data/a.csv", HEADER)
    write_csv("data/readme.txt", "not data")

    assert [p.name for p in find_site_files(tmp_path / "data")] == ["a.csv", "b.csv"]


def test_find_site_files_refuses_directory_without_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds no \.csv or \.parquet file") as excinfo:
        find_site_files(tmp_path)

    assert str(tmp_path) in str(excinfo.value)


def test_load_sites_refuses_no_files() -> None:
    with pytest.raises(DataError, match="No data files given"):
        load_sites([], SCHEMA)


def test_load_sites_refuses_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"

    with pytest.raises(DataError, match="does not exist") as excinfo:
        load_sites([path], SCHEMA)

    assert str(path) in str(excinfo.value)


# ------------------------------------------------------------------ bad values
def test_wrong_type_in_numeric_column(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\nabc,204,2,0\n")

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "row 2 (line 3)", "column 'age'",
                    "expected a number", "abc")


def test_wrong_type_message_quotes_the_cell_as_written(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "abc,204,2,0\n")

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    assert "found 'abc'." in str(excinfo.value)


def test_non_finite_number(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,2,0\n50,inf,3,1\n")

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "row 3 (line 4)", "column 'chol'",
                    "expected a finite number", "inf")


def test_unknown_category(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,7,0\n")

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "row 2 (line 3)", "column 'cp'",
                    "unknown category '7'", "expected one of ['1', '2', '3']")


def test_non_number_in_numeric_target(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,2,yes\n")

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "row 2 (line 3)", "column 'y'",
                    "'yes' is neither positive ['1'] nor negative ['0']")


def test_missing_target_row_dropped_under_drop(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n50,210,3,?\n41,204,2,0\n")
    site = load_one(path)

    kept = apply_missing_policy(site, SCHEMA, MissingPolicy.DROP)

    np.testing.assert_array_equal(kept.rows, [0, 2])
    np.testing.assert_array_equal(kept.target, [1.0, 0.0])
    assert kept.where(1) == f"{path}, row 3 (line 4)"


def test_all_missing_column(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,,1,1\n41,NA,2,0\n50,?,3,1\n")

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "column 'chol'", "missing in all 3 rows",
                    "site 'a'")


def test_all_missing_categorical_column(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,1,,1\n41,2,,0\n")

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "column 'cp'", "missing in all 2 rows")


def test_empty_site_header_only(write_csv: WriteCsv) -> None:
    path = write_csv("empty.csv", HEADER)

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "site 'empty'", "no data rows")


def test_empty_file(write_csv: WriteCsv) -> None:
    path = write_csv("blank.csv", "\n")

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "empty", "expected a header line")


def test_columns_differ_across_sites(write_csv: WriteCsv) -> None:
    first = write_csv("a.csv", HEADER + "63,233,1,1\n")
    second = write_csv("b.csv", "age,chol,cp,y,bmi\n63,233,1,1,22\n")

    with pytest.raises(SchemaError) as excinfo:
        load_sites([first, second], SCHEMA)

    assert_mentions(str(excinfo.value), str(first), str(second), "columns differ",
                    "only in this file ['bmi']")


def test_required_column_missing(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,cp,y\n63,1,1\n")

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "['chol']", "required by the schema",
                    "found columns ['age', 'cp', 'y']")


def test_ragged_line(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,2\n50,210,3,1\n")

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), f"{path}, line 3", "3 fields", "expected 4")


def test_blank_line_inside_data_is_skipped_and_lines_stay_exact(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,2,0\n\nabc,210,3,1\n")

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), f"{path}, row 3 (line 5)", "column 'age'", "'abc'")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "63,233,1,1\n41,204,2,0 # Müller\n").encode("latin-1"))

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "not UTF-8", "UTF-8 CSV")


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes((HEADER + "63,233,1,1\n").encode("utf-8-sig"))

    np.testing.assert_array_equal(load_one(path).numeric, [[63, 233]])


def test_duplicate_header_names(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,chol,cp,y,age\n63,233,1,1,63\n")

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "['age']", "more than once")


def test_fail_policy_names_first_missing_cell(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,,0\n,210,3,1\n")
    site = load_one(path)

    with pytest.raises(SchemaError) as excinfo:
        apply_missing_policy(site, SCHEMA, MissingPolicy.FAIL)

    assert_mentions(str(excinfo.value), str(path), "row 2 (line 3)", "column 'cp'",
                    "value missing", "'fail'")


def test_fail_policy_names_a_missing_feature_not_a_dropped_missing_target(
        write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,,0\n50,210,3,\n")
    site = load_one(path)

    with pytest.raises(SchemaError) as excinfo:
        apply_missing_policy(site, SCHEMA, MissingPolicy.FAIL)

    assert_mentions(str(excinfo.value), "row 2 (line 3)", "column 'cp'")


def test_impute_policy_keeps_missing_features(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1\n41,204,,0\n,210,3,1\n")
    site = load_one(path)

    kept = apply_missing_policy(site, SCHEMA, MissingPolicy.IMPUTE)

    assert len(kept) == 3
    assert np.isnan(kept.numeric[2, 0])
    assert kept.categorical[1, 0] == -1


def test_drop_policy_leaving_site_empty(write_csv: WriteCsv) -> None:
    # Each column has a value somewhere, but every row misses one.
    path = write_csv("sparse.csv", HEADER + ",233,1,1\n41,,2,0\n50,210,,1\n")
    site = load_one(path)

    with pytest.raises(DataError) as excinfo:
        apply_missing_policy(site, SCHEMA, MissingPolicy.DROP)

    assert_mentions(str(excinfo.value), str(path), "site 'sparse'", "no row left",
                    "all 3 were dropped", "0 with a missing outcome ('y')",
                    "3 with a missing feature under missing = \"drop\"",
                    "Use missing = \"impute\"")


def test_line_numbers_count_physical_lines_after_multiline_field(write_csv: WriteCsv) -> None:
    schema = Schema(numeric=("age",), categorical={}, target="y", positive=("1",), negative=("0",))
    path = write_csv("notes.csv", 'note,age,y\n"two\nlines",63,1\nok,abc,0\n')

    with pytest.raises(SchemaError) as excinfo:
        load_one(path, schema)

    assert "row 2 (line 4)" in str(excinfo.value)


# ------------------------------------------------------------------ categories
@pytest.mark.parametrize(
    ("vocabulary", "cells"),
    [(("1", "2"), ("1.0", "2")), (("1.0", "2.0"), ("1", "2.0")), (("1", "2"), ("1", "2.00"))],
    ids=["file-writes-1.0", "schema-writes-1.0", "file-writes-2.00"],
)
def test_numeric_categories_match_whatever_their_spelling(
        write_csv: WriteCsv, vocabulary: tuple[str, ...], cells: tuple[str, str]) -> None:
    schema = Schema(numeric=("age",), categorical={"sex": vocabulary}, target="y",
                    positive=("1",), negative=("0",))
    path = write_csv("a.csv", f"age,sex,y\n63,{cells[0]},1\n41,{cells[1]},0\n")

    np.testing.assert_array_equal(load_one(path, schema).categorical[:, 0], [0, 1])


def test_target_written_as_float_matches_positive_value(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", HEADER + "63,233,1,1.0\n41,204,2,0.0\n")

    np.testing.assert_array_equal(load_one(path).target, [1.0, 0.0])


# ------------------------------------------------------------------ site column
SITE_SCHEMA = Schema(numeric=("age",), categorical={"cp": ("1", "2")}, target="y",
                     positive=("1",), negative=("0",), site_column="hospital")


def test_site_column_splits_in_first_appearance_order(write_csv: WriteCsv) -> None:
    path = write_csv("all.csv", "hospital,age,cp,y\nbern,61,1,0\nbasel,52,2,1\n"
                                "bern,70,2,1\nzurich,45,1,0\nbasel,58,1,0\n")

    sites = load_sites([path], SITE_SCHEMA)

    assert [s.name for s in sites] == ["bern", "basel", "zurich"]
    np.testing.assert_array_equal(sites[0].rows, [0, 2])
    np.testing.assert_array_equal(sites[1].rows, [1, 4])
    np.testing.assert_array_equal(sites[2].rows, [3])
    np.testing.assert_array_equal(sites[1].numeric[:, 0], [52, 58])
    np.testing.assert_array_equal(sites[0].target, [0.0, 1.0])
    assert all(s.source == str(path) for s in sites)


def test_site_column_errors_name_the_row_in_the_file(write_csv: WriteCsv) -> None:
    path = write_csv("all.csv", "hospital,age,cp,y\nbern,61,1,0\nbasel,52,2,1\n"
                                "bern,70,2,1\nbasel,x,1,0\n")

    with pytest.raises(SchemaError) as excinfo:
        load_sites([path], SITE_SCHEMA)

    assert_mentions(str(excinfo.value), str(path), "row 4 (line 5)", "column 'age'")


def test_site_column_absent_from_file(write_csv: WriteCsv) -> None:
    path = write_csv("all.csv", "age,cp,y\n61,1,0\n")

    with pytest.raises(SchemaError) as excinfo:
        load_sites([path], SITE_SCHEMA)

    assert_mentions(str(excinfo.value), str(path), "'hospital'")


def test_duplicate_site_names_across_files_refused(write_csv: WriteCsv) -> None:
    first = write_csv("east.csv", "hospital,age,cp,y\nbern,61,1,0\nbasel,52,2,1\n")
    second = write_csv("west.csv", "hospital,age,cp,y\ngeneva,61,1,0\nbasel,40,1,0\n")

    with pytest.raises(DataError) as excinfo:
        load_sites([first, second], SITE_SCHEMA)

    assert_mentions(str(excinfo.value), "['basel']", "more than one file", "unique")


def test_duplicate_file_stems_refused(write_csv: WriteCsv) -> None:
    first = write_csv("2023/site.csv", HEADER + "63,233,1,1\n")
    second = write_csv("2024/site.csv", HEADER + "41,204,2,0\n")

    with pytest.raises(DataError, match=r"\['site'\]"):
        load_sites([first, second], SCHEMA)


# ------------------------------------------------------------------ Parquet
def test_parquet_site_loads_like_the_csv_equivalent(write_csv: WriteCsv,
                                                    tmp_path: Path) -> None:
    csv_path = write_csv("north.csv", HEADER + "63,233.5,1,1\n41,,3,0\n,250,,0\n")
    parquet_path = tmp_path / "parquet" / "north.parquet"
    parquet_path.parent.mkdir()
    pq.write_table(pa.table({
        "age": pa.array([63, 41, None], type=pa.int64()),
        "chol": pa.array([233.5, None, 250.0], type=pa.float64()),
        "cp": pa.array(["1", "3", None], type=pa.string()),
        "y": pa.array([1, 0, 0], type=pa.int64()),
    }), parquet_path)

    from_csv = load_one(csv_path)
    from_parquet = load_one(parquet_path)

    assert from_parquet.name == from_csv.name == "north"
    assert from_parquet.lines is None
    np.testing.assert_array_equal(from_parquet.rows, from_csv.rows)
    np.testing.assert_array_equal(from_parquet.numeric, from_csv.numeric)
    np.testing.assert_array_equal(from_parquet.categorical, from_csv.categorical)
    np.testing.assert_array_equal(from_parquet.target, from_csv.target)


def test_parquet_integer_categories_match_text_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "south.parquet"
    pq.write_table(pa.table({"age": [1.0, 2.0], "chol": [3.0, 4.0], "cp": [3, 1],
                             "y": [0, 1]}), path)

    np.testing.assert_array_equal(load_one(path).categorical[:, 0], [2, 0])


def test_parquet_wrong_type_names_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "south.parquet"
    pq.write_table(pa.table({"age": ["63", "41", "old"], "chol": [233.0, 204.0, 250.0],
                             "cp": ["1", "2", "3"], "y": [1, 0, 0]}), path)

    with pytest.raises(SchemaError) as excinfo:
        load_one(path)

    message = str(excinfo.value)
    assert_mentions(message, f"{path}, row 3", "column 'age'", "expected a number", "old")
    assert "line" not in message


def test_unreadable_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")

    with pytest.raises(DataError) as excinfo:
        load_one(path)

    assert_mentions(str(excinfo.value), str(path), "not a readable Parquet file")
