"""Schema inference from data files, and the `fedcare schema infer` command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedcare.cli.main import main
from fedcare.data.infer import MAX_CODE_LEVELS, infer_schema
from fedcare.data.loaders import load_sites
from fedcare.data.schema import Schema
from fedcare.errors import SchemaError

WriteCsv = Callable[[str, str], Path]


def test_fractional_numbers_become_numeric(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "chol,y\n233.5,0\n204.1,1\n250,0\n")

    schema, _ = infer_schema([path], target="y")

    assert schema.numeric == ("chol",)
    assert schema.categorical == {}


def test_many_whole_numbers_become_numeric(write_csv: WriteCsv) -> None:
    ages = range(40, 40 + MAX_CODE_LEVELS + 1)
    path = write_csv("a.csv", "age,y\n" + "".join(f"{a},{a % 2}\n" for a in ages))

    schema, _ = infer_schema([path], target="y")

    assert schema.numeric == ("age",)


def test_few_whole_number_codes_become_categorical(write_csv: WriteCsv) -> None:
    first = write_csv("a.csv", "cp,chol,y\n3,233.5,0\n1,204.1,1\n")
    second = write_csv("b.csv", "cp,chol,y\n2.0,250,0\n10,199.9,1\n1.0,180.2,0\n")

    schema, notes = infer_schema([first, second], target="y")

    # Ordered by value (10 after 2.0); 1 and 1.0 are one category, kept as first seen.
    assert schema.categorical == {"cp": ("1", "2.0", "3", "10")}
    assert schema.numeric == ("chol",)
    assert any(note.startswith("cp:") and "categorical codes" in note for note in notes)


def test_text_becomes_categorical_with_vocabulary_of_every_file(write_csv: WriteCsv) -> None:
    first = write_csv("a.csv", "ward,y\nnorth,0\nsouth,1\n")
    second = write_csv("b.csv", "ward,y\neast,0\nnorth,1\n?,0\n")

    schema, _ = infer_schema([first, second], target="y")

    assert schema.categorical == {"ward": ("east", "north", "south")}


def test_site_column_is_not_a_feature(write_csv: WriteCsv) -> None:
    path = write_csv("all.csv", "hospital,age,y\nbern,61.5,0\nbasel,52.5,1\n")

    schema, _ = infer_schema([path], target="y", site_column="hospital")

    assert schema.site_column == "hospital"
    assert schema.feature_columns == ("age",)


def test_column_missing_everywhere_is_left_out_with_a_note(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "age,ldl,y\n61.5,,0\n52.5,NA,1\n")

    schema, notes = infer_schema([path], target="y")

    assert "ldl" not in schema.feature_columns
    assert any(note.startswith("ldl:") and "missing in every row" in note for note in notes)


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

    schema, notes = infer_schema([path], target="outcome")

    assert schema.target == "outcome"
    assert schema.positive == positive
    assert any("positive class" in note for note in notes)


def test_graded_target_takes_every_nonzero_value_as_positive(write_csv: WriteCsv) -> None:
    rows = [f"{40 + i}.5,{i % 5}\n" for i in range(10)]
    path = write_csv("a.csv", "age,num\n" + "".join(rows))

    schema, _ = infer_schema([path], target="num")

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


# ------------------------------------------------------------------ CLI
def write_two_sites(write_csv: WriteCsv) -> list[Path]:
    header = "age,cp,ward,y\n"
    return [
        write_csv("sites/north.csv", header + "63.5,1,icu,yes\n41.2,3,er,no\n55.0,2,icu,no\n"),
        write_csv("sites/south.csv", header + "70.1,4.0,er,yes\n38.9,1,ward,no\n,2,ward,yes\n"),
    ]


def test_cli_schema_infer_writes_a_schema_load_sites_accepts(
        write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_two_sites(write_csv)
    out = tmp_path / "schema.toml"

    code = main(["schema", "infer", *map(str, paths), "--target", "y", "--out", str(out)])

    assert code == 0
    assert f"Wrote {out}" in capsys.readouterr().out
    schema = Schema.load(out)
    assert schema == infer_schema(paths, target="y")[0]
    assert schema.numeric == ("age",)
    assert schema.categorical == {"cp": ("1", "2", "3", "4.0"), "ward": ("er", "icu", "ward")}
    assert schema.positive == ("yes",)
    sites = load_sites(paths, schema)
    assert [s.name for s in sites] == ["north", "south"]
    np.testing.assert_array_equal(sites[1].categorical[:, 0], [3, 0, 1])
    np.testing.assert_array_equal(sites[1].target, [1.0, 0.0, 1.0])


def test_cli_schema_infer_accepts_a_directory(write_csv: WriteCsv, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_two_sites(write_csv)
    out = tmp_path / "schema.toml"

    code = main(["schema", "infer", str(tmp_path / "sites"), "--target", "y", "--out", str(out)])

    assert code == 0
    capsys.readouterr()
    assert Schema.load(out) == infer_schema(paths, target="y")[0]


def test_cli_schema_infer_reports_errors_without_writing(
        write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv("a.csv", "age,num\n61.5,0\n52.5,0\n")
    out = tmp_path / "schema.toml"

    code = main(["schema", "infer", str(path), "--target", "num", "--out", str(out)])

    assert code == 2
    assert "single value" in capsys.readouterr().err
    assert not out.exists()
