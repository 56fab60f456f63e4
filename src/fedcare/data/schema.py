"""The shared description of a federation's tabular data.

Every site must hold the same columns with the same meaning; the `Schema` says
which columns are numeric, which are categorical (with their full vocabulary,
so one-hot encodings line up across sites without pooling any row), which
column is the binary target and which values of it count as positive.

A schema lives in a small TOML file next to the data::

    target = "num"
    positive = ["1", "2", "3", "4"]
    negative = ["0"]
    site_column = "hospital"        # optional: one file holding every site
    missing_values = ["", "?", "NA"]
    drop_first = false              # one-hot: drop each column's first category
    ignore = ["patient_id"]         # optional: columns in the files that are not features

    [numeric]
    columns = ["age", "chol"]

    [categorical]
    cp = ["1", "2", "3", "4"]

    [bounds]                        # optional: public ranges of numeric columns
    age = [18, 100]
    chol = [100, 600]

    [labels.sex]                    # optional: what a code means, for reports
    0 = "female"
    1 = "male"

Everything in a schema is shared by every site and, with differential
privacy, treated as public: write vocabularies and bounds from clinical
definitions, not from the data (a category seen only in one patient's record,
or a range read off the data, would reveal that patient). Bounds are what a
private run standardises with (``data.standardize = "bounds"``): values are
clipped to them and scaled to [-1, 1], so no statistic of the data is shared.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.errors import SchemaError
from fedcare.toml_writer import toml_str, toml_value

DEFAULT_MISSING_VALUES: tuple[str, ...] = ("", "?", "NA", "N/A", "NaN", "nan", "null", "None")


@dataclass(frozen=True)
class Schema:
    """Columns of one federation's data and how to read them.

    Parameters
    ----------
    numeric : sequence of str
        Columns read as floating-point numbers.
    categorical : mapping of str to sequence of str
        Columns read as categories, each with its complete vocabulary (as the
        strings found in the files). A value outside the vocabulary is an error.
    target : str
        The binary outcome column.
    positive : sequence of str
        Values of `target` that count as the positive class (label 1).
    negative : sequence of str
        Values of `target` that count as the negative class (label 0); disjoint
        from `positive`. A target value in neither list is an error naming the
        file, row and value (`fedcare.data.loaders.parse_table`).

        Required, also of schemas written before it existed (they are refused
        with a message saying what to add). Reading "every value not positive
        is negative" was how ``positive = ["yes"]`` on 0/1 data, or a 3-class
        outcome with ``positive = ["1"]``, trained without a word and reported
        accuracy 1.000. Inferring the negative value from the data (allowed
        when they hold exactly two values) would not close that: a deployed
        site reads only its own file, and two sites could each see two values
        and disagree on the third. One explicit line closes it everywhere.
    site_column : str or None
        Column naming the site of each row, when one file holds every site.
    ignore : sequence of str
        Columns of the files that are deliberately not used (identifiers,
        values recorded after the outcome...): never read, and not required
        in every file.
    missing_values : sequence of str
        Cell contents read as "missing".
    drop_first : bool
        Whether one-hot encoding drops each categorical column's first category.
    bounds : mapping of str to (float, float)
        Public plausible range (low, high) of numeric columns, for
        standardisation that depends on no data (private runs).
    labels : mapping of str to mapping of str to str
        What codes mean, per column (``{"sex": {"0": "female", "1": "male"}}``),
        as the report and model card show them; codes of a categorical column
        must be in its vocabulary.
    """

    numeric: tuple[str, ...]
    categorical: Mapping[str, tuple[str, ...]]
    target: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()  # () is refused: the default is there for that message
    site_column: str | None = None
    ignore: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = DEFAULT_MISSING_VALUES
    drop_first: bool = False
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    _order: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numeric", tuple(self.numeric))
        object.__setattr__(
            self, "categorical", {k: tuple(v) for k, v in self.categorical.items()}
        )
        object.__setattr__(self, "positive", tuple(self.positive))
        object.__setattr__(self, "negative", tuple(self.negative))
        object.__setattr__(self, "missing_values", tuple(self.missing_values))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        features = (*self.numeric, *self.categorical)
        seen: set[str] = set()
        site = [self.site_column] if self.site_column else []
        for name in (*features, self.target, *site, *self.ignore):
            if name in seen:
                raise SchemaError(f"Schema names column {name!r} twice; each column has one role.")
            seen.add(name)
        if not features:
            raise SchemaError("Schema has no feature columns; expected at least one numeric or "
                              "categorical column.")
        if not self.positive:
            raise SchemaError(f"Schema gives no positive value for target {self.target!r}; "
                              "expected a non-empty list such as positive = [\"1\"].")
        if not self.negative:
            raise SchemaError(
                f"Schema gives no negative value for target {self.target!r}; add the list of "
                f"values that count as label 0 beside positive = {list(self.positive)}, such "
                "as negative = [\"0\"]. Every target value must be in one of the two lists, so "
                "a third class or a wrong positive list is an error instead of silent "
                "negative labels.")
        both = sorted(_values_in_both(self.positive, self.negative))
        if both:
            raise SchemaError(f"Target {self.target!r} lists {both} as both positive and "
                              f"negative (positive = {list(self.positive)}, negative = "
                              f"{list(self.negative)}); each value has one class.")
        for name, vocabulary in self.categorical.items():
            if len(vocabulary) == 0:
                raise SchemaError(f"Categorical column {name!r} has an empty vocabulary.")
            if len(set(vocabulary)) != len(vocabulary):
                raise SchemaError(f"Categorical column {name!r} lists a category twice: "
                                  f"{list(vocabulary)}.")
        bounds = {}
        for name, pair in self.bounds.items():
            if name not in self.numeric:
                raise SchemaError(f"Bounds are given for {name!r}, which is not a numeric column "
                                  f"(numeric: {list(self.numeric)}).")
            low, high = (float(v) for v in pair)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise SchemaError(f"Bounds of column {name!r} are [{low}, {high}]; expected two "
                                  "finite numbers, low < high.")
            bounds[name] = (low, high)
        object.__setattr__(self, "bounds", bounds)
        for name, codes in self.labels.items():
            if name not in (*features, self.target):
                raise SchemaError(f"Labels are given for {name!r}, which is neither a feature "
                                  f"nor the target (features: {list(features)}).")
            unknown = [c for c in codes if c not in self.categorical.get(name, codes)]
            if unknown:
                raise SchemaError(f"Labels of column {name!r} name codes {unknown} outside its "
                                  f"vocabulary {list(self.categorical[name])}.")
        object.__setattr__(self, "labels", {k: {str(c): str(t) for c, t in v.items()}
                                            for k, v in self.labels.items()})
        object.__setattr__(self, "_order", features)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """Input columns in encoding order: numeric first, then categorical."""
        return self._order

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Every column a data file must hold."""
        site = (self.site_column,) if self.site_column else ()
        return (*self._order, self.target, *site)

    def encoded_feature_names(self) -> list[str]:
        """Names of the model's inputs after one-hot encoding, in order."""
        names = list(self.numeric)
        for column, vocabulary in self.categorical.items():
            kept = vocabulary[1:] if self.drop_first else vocabulary
            names.extend(f"{column}={value}" for value in kept)
        return names

    def numeric_bounds(self, purpose: str) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) arrays over the numeric columns; every column must have bounds."""
        missing = [c for c in self.numeric if c not in self.bounds]
        if missing:
            raise SchemaError(
                f"{purpose} needs public bounds for every numeric column; {missing} have none. "
                f"Add them to the schema, e.g. [bounds] {missing[0]} = [low, high], from "
                "clinical plausibility ranges, not from the data's minimum and maximum.")
        pairs = np.array([self.bounds[c] for c in self.numeric], dtype=np.float64)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    @property
    def n_features(self) -> int:
        """Width of the encoded input vector."""
        return len(self.encoded_feature_names())

    # --------------------------------------------------------------- files
    def to_toml(self, comments: Sequence[str] = (),
                ignore_reasons: Mapping[str, str] | None = None) -> str:
        """Render the schema as TOML; `comments` become leading ``#`` lines.

        `ignore_reasons` maps an ignored column to why it is ignored, written as
        a comment beside it in the ``ignore`` list.
        """
        out = [f"# {line}" for line in comments]
        out.append(f"target = {toml_str(self.target)}")
        out.append(f"positive = {_toml_list(self.positive)}")
        out.append(f"negative = {_toml_list(self.negative)}")
        if self.site_column is not None:
            out.append(f"site_column = {toml_str(self.site_column)}")
        out.append(f"missing_values = {_toml_list(self.missing_values)}")
        out.append(f"drop_first = {'true' if self.drop_first else 'false'}")
        if self.ignore:
            reasons = ignore_reasons or {}
            out.append("ignore = [")
            for name in self.ignore:
                why = " ".join(reasons.get(name, "").split())  # one line, whatever it holds
                out.append(f"    {toml_str(name)},{f'  # {why}' if why else ''}")
            out.append("]")
        out.append("")
        out.append("[numeric]")
        out.append(f"columns = {_toml_list(self.numeric)}")
        out.append("")
        out.append("[categorical]")
        out.extend(f"{_toml_key(k)} = {_toml_list(v)}" for k, v in self.categorical.items())
        if self.bounds:
            out.append("")
            out.append("[bounds]")
            out.extend(f"{_toml_key(k)} = {toml_value(list(v))}" for k, v in self.bounds.items())
        for column, codes in self.labels.items():
            out += ["", f"[labels.{_toml_key(column)}]"]
            out.extend(f"{_toml_key(c)} = {toml_str(t)}" for c, t in codes.items())
        return "\n".join(out) + "\n"

    def save(self, path: str | Path, comments: Sequence[str] = ()) -> None:
        """Write the schema to a TOML file."""
        Path(path).write_text(self.to_toml(comments), encoding="utf-8")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "schema") -> Schema:
        """Build a schema from parsed TOML, naming `source` in every error."""
        allowed = {"target", "positive", "negative", "site_column", "missing_values",
                   "drop_first", "numeric", "categorical", "bounds", "ignore", "labels"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise SchemaError(f"{source}: unknown key(s) {unknown}; expected only "
                              f"{sorted(allowed)}.")
        target = raw.get("target")
        if not isinstance(target, str) or not target:
            raise SchemaError(f"{source}: 'target' must be a column name (string); "
                              f"found {target!r}.")
        numeric_table = raw.get("numeric", {})
        if not isinstance(numeric_table, Mapping) or set(numeric_table) - {"columns"}:
            raise SchemaError(f"{source}: [numeric] must be a table with only "
                              f"'columns = [...]'; found {numeric_table!r}.")
        numeric = _str_list(numeric_table.get("columns", []), f"{source}: numeric.columns")
        categorical_raw = raw.get("categorical", {})
        if not isinstance(categorical_raw, Mapping):
            raise SchemaError(f"{source}: [categorical] must be a table of column = [values].")
        categorical = {
            str(k): tuple(_str_list(v, f"{source}: categorical.{k}"))
            for k, v in categorical_raw.items()
        }
        site_column = raw.get("site_column")
        if site_column is not None and not isinstance(site_column, str):
            raise SchemaError(f"{source}: 'site_column' must be a string; found {site_column!r}.")
        drop_first = raw.get("drop_first", False)
        if not isinstance(drop_first, bool):
            raise SchemaError(f"{source}: 'drop_first' must be true or false; "
                              f"found {drop_first!r}.")
        bounds_raw = raw.get("bounds", {})
        if not isinstance(bounds_raw, Mapping) or not all(
                isinstance(v, list) and len(v) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
                for v in bounds_raw.values()):
            raise SchemaError(f"{source}: [bounds] must be a table of column = [low, high] "
                              f"(numbers); found {bounds_raw!r}.")
        labels_raw = raw.get("labels", {})
        if not isinstance(labels_raw, Mapping) or not all(
                isinstance(v, Mapping) and all(isinstance(t, str) for t in v.values())
                for v in labels_raw.values()):
            raise SchemaError(f"{source}: [labels] must hold one table per column of code = "
                              f"\"meaning\" (e.g. [labels.sex] 0 = \"female\"); found "
                              f"{labels_raw!r}.")
        positive = _str_list(raw.get("positive", []), f"{source}: positive")
        negative = _str_list(raw.get("negative", []), f"{source}: negative")
        missing = _str_list(raw.get("missing_values", list(DEFAULT_MISSING_VALUES)),
                            f"{source}: missing_values")
        ignore = _str_list(raw.get("ignore", []), f"{source}: ignore")
        try:
            return cls(
                numeric=tuple(numeric),
                categorical=categorical,
                target=target,
                positive=tuple(positive),
                negative=tuple(negative),
                site_column=site_column,
                ignore=tuple(ignore),
                missing_values=tuple(missing),
                drop_first=drop_first,
                bounds={str(k): (float(v[0]), float(v[1])) for k, v in bounds_raw.items()},
                labels={str(k): dict(v) for k, v in labels_raw.items()},
            )
        except SchemaError as exc:
            raise SchemaError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read a schema TOML file."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SchemaError(f"Schema file {path} does not exist.") from None
        except tomllib.TOMLDecodeError as exc:
            raise SchemaError(f"Schema file {path} is not valid TOML: {exc}.") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (for run directories and model files)."""
        described: dict[str, Any] = {
            "target": self.target,
            "positive": list(self.positive),
            "negative": list(self.negative),
            "site_column": self.site_column,
            "missing_values": list(self.missing_values),
            "drop_first": self.drop_first,
            "numeric": {"columns": list(self.numeric)},
            "categorical": {k: list(v) for k, v in self.categorical.items()},
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            # Only when given: a schema without labels keeps the description (and hash) it had.
            **({"labels": {k: dict(v) for k, v in self.labels.items()}} if self.labels else {}),
        }
        if self.ignore:  # absent when empty, so existing schemas describe (and hash) as before
            described["ignore"] = list(self.ignore)
        return described

    def label(self, column: str, code: str) -> str:
        """`code` with its meaning, e.g. ``0 (female)``; the bare code when none is given."""
        meaning = self.labels.get(column, {}).get(code)
        return code if meaning is None else f"{code} ({meaning})"


def _str_list(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        raise SchemaError(f"{where} must be a list of strings; found {value!r}.")
    return [v if isinstance(v, str) else _number_text(v) for v in value]


def _values_in_both(positive: Sequence[str], negative: Sequence[str]) -> set[str]:
    # "1" and "1.0" are one target value (the loader matches numeric spellings).
    def canonical(value: str) -> str:
        try:
            return repr(float(value))
        except ValueError:
            return value

    negatives = {canonical(v) for v in negative}
    return {v for v in positive if canonical(v) in negatives}


def _number_text(value: int | float) -> str:
    # Vocabularies are matched against the text in the files; 1.0 in TOML means "1.0".
    return str(value)


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else toml_str(key)


def _toml_list(values: Sequence[str]) -> str:
    return toml_value(list(values))
