"""Propose a schema from data files, for the user to review before training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedcare.data.schema import DEFAULT_MISSING_VALUES, Schema
from fedcare.data.tables import read_table
from fedcare.errors import SchemaError

# A numeric column with at most this many distinct whole-number values is
# proposed as categorical (codes such as chest-pain type 1-4).
MAX_CODE_LEVELS = 10


def infer_schema(
    paths: Sequence[str | Path],
    target: str,
    site_column: str | None = None,
    missing_values: Sequence[str] = DEFAULT_MISSING_VALUES,
) -> tuple[Schema, list[str]]:
    """Guess column types from the files; return the schema and notes to review.

    Numbers become numeric columns unless they take at most
    ``MAX_CODE_LEVELS`` whole values (then categorical codes); text becomes
    categorical with the vocabulary seen in any file. Every guess that could
    be wrong is listed in the notes.
    """
    tables = [read_table(p) for p in paths]
    columns = tables[0].columns
    for table in tables[1:]:
        if set(table.columns) != set(columns):
            raise SchemaError(f"{table.source}: columns {table.columns} differ from "
                              f"{tables[0].source}: {columns}. Every site must export the same "
                              "columns.")
    for required in (target, site_column):
        if required is not None and required not in columns:
            raise SchemaError(f"{tables[0].source}: column {required!r} not found; columns are "
                              f"{columns}.")
    missing = set(missing_values)
    numeric: list[str] = []
    categorical: dict[str, tuple[str, ...]] = {}
    notes = ["Proposed by `fedcare schema infer`: review every line before training."]
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    for column in columns:
        if column == site_column:
            continue
        values = [v for t in tables for v in t.cells[column] if v is not None and v not in missing]
        if not values:
            notes.append(f"{column}: missing in every row of every file; left out.")
            continue
        levels = sorted(set(values), key=_sort_key)
        numbers = _as_numbers(levels)
        if column == target:
            try:
                positive = _positive_values(levels, numbers, notes, column)
                negative = tuple(lv for lv in levels if lv not in positive)
            except SchemaError as exc:
                names = ", ".join(t.source for t in tables)
                raise SchemaError(f"{names}: {exc}") from None
            continue
        if numbers is None:
            categorical[column] = tuple(levels)
            notes.append(f"{column}: categorical, {len(levels)} categories.")
        elif set(numbers) <= {0.0, 1.0}:
            numeric.append(column)
            notes.append(f"{column}: a 0/1 indicator, kept numeric.")
        elif len(levels) <= MAX_CODE_LEVELS and all(n.is_integer() for n in numbers):
            categorical[column] = tuple(_dedupe_numbers(levels))
            notes.append(f"{column}: {len(levels)} whole-number values, proposed as categorical "
                         "codes; move it to [numeric] if the values are quantities.")
        else:
            numeric.append(column)
    schema = Schema(numeric=tuple(numeric), categorical=categorical, target=target,
                    positive=positive, negative=negative, site_column=site_column,
                    missing_values=tuple(missing_values))
    return schema, notes


def _positive_values(levels: list[str], numbers: list[float] | None, notes: list[str],
                     column: str) -> tuple[str, ...]:
    if len(levels) == 1:
        raise SchemaError(f"target {column!r} takes a single value {levels[0]!r}; a binary "
                          "outcome needs two.")
    if len(levels) == 2:
        notes.append(f"{column} (target): {levels[1]!r} is the positive class, {levels[0]!r} "
                     "the negative; swap them in `positive` if that is wrong.")
        return (levels[1],)
    if numbers is not None and min(numbers) == 0:
        zero = [lv for lv, n in zip(levels, numbers, strict=True) if n == 0]
        notes.append(f"{column} (target): {len(levels)} values; every value other than 0 is "
                     "taken as positive (e.g. disease grades 1-4).")
        return tuple(lv for lv in levels if lv not in zero)
    raise SchemaError(f"target {column!r} takes {len(levels)} values {levels[:10]}; fedcare "
                      "trains binary outcomes. Write the schema by hand with `positive = [...]`.")


def _as_numbers(levels: list[str]) -> list[float] | None:
    try:
        numbers = [float(v) for v in levels]
    except ValueError:
        return None
    return numbers if all(np.isfinite(numbers)) else None


def _dedupe_numbers(levels: list[str]) -> list[str]:
    # "1" and "1.0" are one category (the loader matches numeric spellings).
    seen: dict[float, str] = {}
    for v in levels:
        seen.setdefault(float(v), v)
    return list(seen.values())


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)
