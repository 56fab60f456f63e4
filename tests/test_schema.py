"""Schema: TOML files, validation messages and the encoded input layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedcare.data.schema import DEFAULT_MISSING_VALUES, Schema
from fedcare.errors import SchemaError

SOURCE = "site-schema.toml"


def base_raw() -> dict[str, Any]:
    return {
        "target": "y",
        "positive": ["1"],
        "negative": ["0"],
        "numeric": {"columns": ["age", "chol"]},
        "categorical": {"cp": ["1", "2", "3"]},
    }


def test_toml_round_trip_preserves_every_field(tmp_path: Path) -> None:
    schema = Schema(
        numeric=("age", "blood pressure"),
        categorical={"cp": ("1", "2", "3", "4"), "ward.name": ("north", 'say "hi"'),
                     "région": ("é", "ü")},
        target="num",
        positive=("1", "2"),
        negative=("0",),
        site_column="hospital",
        missing_values=("", "?", "NA"),
        drop_first=True,
    )
    path = tmp_path / "schema.toml"
    schema.save(path, comments=["proposed by a test", "review it"])

    loaded = Schema.load(path)

    assert loaded == schema
    assert loaded.to_dict() == schema.to_dict()
    assert list(loaded.categorical) == ["cp", "ward.name", "région"]
    assert path.read_text(encoding="utf-8").startswith("# proposed by a test\n# review it\n")


def test_toml_round_trip_of_defaults_without_site_column(tmp_path: Path) -> None:
    schema = Schema(numeric=("age",), categorical={}, target="y", positive=("yes",),
                    negative=("no",))
    path = tmp_path / "schema.toml"
    schema.save(path)

    loaded = Schema.load(path)

    assert loaded == schema
    assert loaded.site_column is None
    assert loaded.missing_values == DEFAULT_MISSING_VALUES
    assert loaded.drop_first is False


def test_toml_numbers_in_vocabulary_are_read_as_their_text(tmp_path: Path) -> None:
    path = tmp_path / "schema.toml"
    path.write_text('target = "y"\npositive = [1]\nnegative = [0]\n[categorical]\ncp = [1, 2, 3]\n',
                    encoding="utf-8")

    schema = Schema.load(path)

    assert schema.categorical == {"cp": ("1", "2", "3")}
    assert schema.positive == ("1",)
    assert schema.negative == ("0",)


@pytest.mark.parametrize(
    ("key", "value", "expected_in_message"),
    [
        ("bogus", 1, ["'bogus'", "unknown key"]),
        ("target", 3, ["'target'", "found 3"]),
        ("target", "", ["'target'", "found ''"]),
        ("positive", "1", ["positive", "list of strings", "found '1'"]),
        ("drop_first", "yes", ["'drop_first'", "found 'yes'"]),
        ("site_column", 2, ["'site_column'", "found 2"]),
        ("numeric", ["age"], ["[numeric]", "table"]),
        ("categorical", ["cp"], ["[categorical]", "table"]),
        ("categorical", {"cp": "1"}, ["categorical.cp", "list of strings", "found '1'"]),
        ("missing_values", [None], ["missing_values", "list of strings", "found [None]"]),
    ],
    ids=["unknown-key", "target-int", "target-empty", "positive-str", "drop-first-str",
         "site-column-int", "numeric-list", "categorical-list", "vocabulary-str",
         "missing-values-none"],
)
def test_from_dict_refuses_bad_key_naming_source_and_key(
        key: str, value: object, expected_in_message: list[str]) -> None:
    raw = base_raw()
    raw[key] = value

    with pytest.raises(SchemaError) as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    message = str(excinfo.value)
    assert message.startswith(f"{SOURCE}: ")
    for part in expected_in_message:
        assert part in message


def test_from_dict_refuses_wrong_type_of_numeric_columns() -> None:
    raw = base_raw()
    raw["numeric"] = {"columns": "age"}

    with pytest.raises(SchemaError, match=r"numeric\.columns must be a list of strings") as exc:
        Schema.from_dict(raw, source=SOURCE)

    assert SOURCE in str(exc.value)
    assert "found 'age'" in str(exc.value)


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"categorical": {"age": ["1", "2"]}}, "age"),  # numeric and categorical
        ({"site_column": "y"}, "y"),  # target and site column
        ({"numeric": {"columns": ["age", "y"]}}, "y"),  # feature and target
        ({"numeric": {"columns": ["age", "age"]}}, "age"),  # listed twice
    ],
    ids=["numeric-and-categorical", "target-as-site", "target-as-feature", "numeric-twice"],
)
def test_from_dict_refuses_column_with_two_roles(change: dict[str, Any], column: str) -> None:
    raw = base_raw() | change

    with pytest.raises(SchemaError) as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    message = str(excinfo.value)
    assert message.startswith(f"{SOURCE}: ")
    assert f"column {column!r} twice" in message


def test_from_dict_refuses_empty_vocabulary() -> None:
    raw = base_raw()
    raw["categorical"] = {"cp": []}

    with pytest.raises(SchemaError) as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    message = str(excinfo.value)
    assert message.startswith(f"{SOURCE}: ")
    assert "'cp'" in message
    assert "empty vocabulary" in message


def test_from_dict_refuses_vocabulary_listing_a_category_twice() -> None:
    raw = base_raw()
    raw["categorical"] = {"cp": ["1", "2", "1"]}

    with pytest.raises(SchemaError, match="'cp' lists a category twice") as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    assert SOURCE in str(excinfo.value)


@pytest.mark.parametrize("positive", [[], None], ids=["empty-list", "absent"])
def test_from_dict_refuses_no_positive_value(positive: list[str] | None) -> None:
    raw = base_raw()
    if positive is None:
        del raw["positive"]
    else:
        raw["positive"] = positive

    with pytest.raises(SchemaError) as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    message = str(excinfo.value)
    assert message.startswith(f"{SOURCE}: ")
    assert "no positive value" in message
    assert "'y'" in message


def test_from_dict_refuses_schema_without_features() -> None:
    raw = {"target": "y", "positive": ["1"], "negative": ["0"]}

    with pytest.raises(SchemaError, match="no feature columns") as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    assert SOURCE in str(excinfo.value)


def test_load_names_the_file_in_validation_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('target = "y"\npositive = ["1"]\nnegative = ["0"]\ncolour = "red"\n'
                    '[numeric]\ncolumns = ["age"]\n', encoding="utf-8")

    with pytest.raises(SchemaError) as excinfo:
        Schema.load(path)

    assert str(excinfo.value).startswith(f"{path}: ")
    assert "'colour'" in str(excinfo.value)


def test_load_refuses_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(SchemaError, match="does not exist") as excinfo:
        Schema.load(path)

    assert str(path) in str(excinfo.value)


def test_load_refuses_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('target = "y\n', encoding="utf-8")

    with pytest.raises(SchemaError, match="not valid TOML") as excinfo:
        Schema.load(path)

    assert str(path) in str(excinfo.value)


def test_from_dict_refuses_unknown_key_inside_numeric_table() -> None:
    raw = base_raw()
    raw["numeric"] = {"column": ["age", "chol"]}  # typo for "columns"

    with pytest.raises(SchemaError, match="column"):
        Schema.from_dict(raw, source=SOURCE)


@pytest.mark.parametrize("key", ["positive", "missing_values"])
def test_from_dict_names_source_once(key: str) -> None:
    raw = base_raw()
    raw[key] = "not-a-list"

    with pytest.raises(SchemaError) as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    assert str(excinfo.value).count(SOURCE) == 1


def test_encoded_feature_names_without_drop_first() -> None:
    schema = Schema(numeric=("age", "chol"), categorical={"cp": ("1", "2", "3"),
                                                          "sex": ("f", "m")},
                    target="y", positive=("1",), negative=("0",))

    assert schema.encoded_feature_names() == ["age", "chol", "cp=1", "cp=2", "cp=3",
                                              "sex=f", "sex=m"]
    assert schema.n_features == 7
    assert schema.feature_columns == ("age", "chol", "cp", "sex")


def test_encoded_feature_names_with_drop_first() -> None:
    schema = Schema(numeric=("age", "chol"), categorical={"cp": ("1", "2", "3"),
                                                          "sex": ("f", "m")},
                    target="y", positive=("1",), negative=("0",), drop_first=True)

    assert schema.encoded_feature_names() == ["age", "chol", "cp=2", "cp=3", "sex=m"]
    assert schema.n_features == 5


def test_required_columns_include_target_and_site_column() -> None:
    schema = Schema(numeric=("age",), categorical={"cp": ("1",)}, target="y",
                    positive=("1",), negative=("0",), site_column="hospital")

    assert schema.required_columns == ("age", "cp", "y", "hospital")


def test_bounds_round_trip_through_toml(tmp_path: Path) -> None:
    schema = Schema(numeric=("age", "chol"), categorical={}, target="y", positive=("1",),
                    negative=("0",), bounds={"age": (18, 100)})
    schema.save(tmp_path / "schema.toml")
    loaded = Schema.load(tmp_path / "schema.toml")
    assert loaded == schema
    assert loaded.bounds == {"age": (18.0, 100.0)}
    assert loaded.to_dict()["bounds"] == {"age": [18.0, 100.0]}


@pytest.mark.parametrize(("bounds", "message"), [
    ({"sex": (0, 1)}, "not a numeric column"),
    ({"age": (100, 18)}, r"low < high"),
    ({"age": (0, float("inf"))}, "finite"),
])
def test_bad_bounds_are_refused(bounds: dict[str, tuple[float, float]], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Schema(numeric=("age",), categorical={"sex": ("m", "f")}, target="y", positive=("1",),
               negative=("0",), bounds=bounds)


def test_bounds_table_must_hold_pairs_of_numbers() -> None:
    raw = {"target": "y", "positive": ["1"], "negative": ["0"],
           "numeric": {"columns": ["age"]}, "bounds": {"age": [18]}}
    with pytest.raises(SchemaError, match=r"schema.toml: \[bounds\] must be a table"):
        Schema.from_dict(raw, source="schema.toml")


def test_schema_without_negative_is_refused_saying_what_to_add(tmp_path: Path) -> None:
    # A schema written before `negative` existed: every non-positive value used to be
    # label 0, which is how a wrong positive list trained silently on one class.
    path = tmp_path / "old.toml"
    path.write_text('target = "num"\npositive = ["1", "2"]\n[numeric]\ncolumns = ["age"]\n',
                    encoding="utf-8")

    with pytest.raises(SchemaError) as excinfo:
        Schema.load(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path}: Schema gives no negative value for target 'num'")
    assert "beside positive = ['1', '2'], such as negative = [\"0\"]" in message


@pytest.mark.parametrize(("positive", "negative", "both"), [
    (["1", "2"], ["0", "2"], "['2']"),
    (["1"], ["1.0"], "['1']"),  # one value in two spellings
], ids=["same-text", "same-number"])
def test_a_value_both_positive_and_negative_is_refused(
        positive: list[str], negative: list[str], both: str) -> None:
    raw = {**base_raw(), "positive": positive, "negative": negative}

    with pytest.raises(SchemaError) as excinfo:
        Schema.from_dict(raw, source=SOURCE)

    assert str(excinfo.value).startswith(f"{SOURCE}: Target 'y' lists {both} as both "
                                         "positive and negative")


def test_negative_values_round_trip_through_toml_and_dict(tmp_path: Path) -> None:
    schema = Schema.from_dict({**base_raw(), "negative": ["0", "no"]}, source=SOURCE)
    schema.save(tmp_path / "schema.toml")

    assert 'negative = ["0", "no"]' in (tmp_path / "schema.toml").read_text(encoding="utf-8")
    assert Schema.load(tmp_path / "schema.toml").negative == ("0", "no")
    assert schema.to_dict()["negative"] == ["0", "no"]


# ------------------------------------------------------------ labels (issue 22 point 5)
def test_labels_round_trip_through_toml_and_name_codes(tmp_path: Path) -> None:
    raw = base_raw() | {"labels": {"age": {"0": "newborn"}, "cp": {"1": "typical angina"},
                                   "y": {"1": 'died "in hospital"'}}}
    schema = Schema.from_dict(raw, SOURCE)
    schema.save(tmp_path / "schema.toml")
    assert "[labels.cp]\n1 = \"typical angina\"" in (tmp_path / "schema.toml").read_text()
    assert Schema.load(tmp_path / "schema.toml") == schema
    assert schema.label("cp", "1") == "1 (typical angina)" and schema.label("cp", "2") == "2"
    assert schema.to_dict()["labels"]["y"] == {"1": 'died "in hospital"'}
    assert "labels" not in Schema.from_dict(base_raw(), SOURCE).to_dict()  # none: no key


@pytest.mark.parametrize(("labels", "message"), [
    ({"weight": {"0": "light"}}, "Labels are given for 'weight', which is neither a feature"),
    ({"cp": {"9": "other"}}, r"Labels of column 'cp' name codes \['9'\] outside its "
                             r"vocabulary \['1', '2', '3'\]"),
    ({"cp": ["typical"]}, r"\[labels\] must hold one table per column"),
    ({"cp": {"1": 1}}, r"\[labels\] must hold one table per column"),
])
def test_bad_labels_are_refused(labels: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message) as caught:
        Schema.from_dict(base_raw() | {"labels": labels}, SOURCE)
    assert str(caught.value).startswith(SOURCE)
