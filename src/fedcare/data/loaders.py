"""Validated per-site tables from user files: one file per site, or one file with a site column.

Validation happens here, once, with messages that name the file, the row, the
column, what was expected and what was found. What comes out (`SiteTable`) is
numeric: numbers as float64 with NaN for missing, categories as vocabulary
codes with -1 for missing, the target as 0/1 (NaN for missing).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from fedcare.data.schema import Schema
from fedcare.data.tables import Table, locate, read_table
from fedcare.errors import DataError, SchemaError

DATA_SUFFIXES = (".csv", ".parquet", ".pq")

MAX_MAGNITUDE = 1e15
"""Largest absolute value a numeric cell may hold. No clinical measurement comes near it,
and standardisation squares deviations before the model casts to float32 (max 3.4e38):
1e308 would overflow into inf and silently ruin the run."""


class MissingPolicy(StrEnum):
    """What to do with a missing feature value."""

    DROP = "drop"  #: drop the row (FLamby's choice for Fed-Heart-Disease)
    IMPUTE = "impute"  #: fill from the site's own training data (mean / most frequent)
    FAIL = "fail"  #: refuse the data, naming the first missing cell


@dataclass(frozen=True)
class SiteTable:
    """One site's validated records, before any split or encoding.

    Attributes
    ----------
    name : str
        Site name (the file stem, or the value of the site column).
    source : str
        Where the rows came from (a file path, or a description), for messages.
    rows : ndarray of int64, shape (n,)
        Row index of each record in `source` (0-based).
    lines : ndarray of int64 or None
        Physical line of each record in a text source, so messages name lines.
    numeric : ndarray of float64, shape (n, n_numeric)
        Numeric columns in schema order; NaN where missing.
    categorical : ndarray of int64, shape (n, n_categorical)
        Vocabulary code of each categorical cell; -1 where missing.
    target : ndarray of float64, shape (n,)
        1.0 for a positive value, 0.0 otherwise, NaN where missing.
    """

    name: str
    source: str
    rows: np.ndarray
    lines: np.ndarray | None
    numeric: np.ndarray
    categorical: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, mask_or_index: np.ndarray) -> SiteTable:
        return SiteTable(self.name, self.source, self.rows[mask_or_index],
                         None if self.lines is None else self.lines[mask_or_index],
                         self.numeric[mask_or_index], self.categorical[mask_or_index],
                         self.target[mask_or_index])

    def where(self, i: int) -> str:
        """Location of record `i` of this site in its file."""
        return locate(self.source, int(self.rows[i]),
                      None if self.lines is None else int(self.lines[i]))


def parse_table(table: Table, schema: Schema, name: str,
                rows: np.ndarray | None = None) -> SiteTable:
    """Check `table` (or its `rows`) against `schema` and convert it to numbers."""
    missing = [c for c in schema.required_columns if c not in table.columns]
    if missing:
        raise SchemaError(f"{table.source}: column(s) {missing} required by the schema are not "
                          f"in the file; found columns {table.columns}.")
    index = np.arange(table.n_rows) if rows is None else rows
    if len(index) == 0:
        raise DataError(f"{table.source}: site {name!r} has no data rows.")
    missing_tokens = list(schema.missing_values)

    def is_missing(values: np.ndarray) -> np.ndarray:
        return np.array([v is None for v in values], dtype=bool) | np.isin(
            values.astype(str), missing_tokens)

    numeric = np.empty((len(index), len(schema.numeric)), dtype=np.float64)
    for j, column in enumerate(schema.numeric):
        values = table.cells[column][index]
        absent = is_missing(values)
        numeric[:, j] = _parse_numbers(values, absent, table, index, column)
    categorical = np.empty((len(index), len(schema.categorical)), dtype=np.int64)
    for j, (column, vocabulary) in enumerate(schema.categorical.items()):
        values = table.cells[column][index]
        absent = is_missing(values)
        codes = _encode_categories(values, vocabulary)
        unknown = np.flatnonzero((codes < 0) & ~absent)
        if len(unknown):
            i = int(unknown[0])
            raise SchemaError(f"{table.where(int(index[i]))}, column {column!r}: unknown category "
                              f"{values[i]!r}; expected one of {list(vocabulary)} (add it to the "
                              f"schema's vocabulary if it is valid).")
        categorical[:, j] = np.where(absent, -1, codes)
    values = table.cells[schema.target][index]
    absent = is_missing(values)
    # "1.0" matches positive = ["1"], as categories match across spellings.
    codes = _encode_categories(values, (*schema.positive, *schema.negative))
    unlisted = np.flatnonzero((codes < 0) & ~absent)
    if len(unlisted):
        i = int(unlisted[0])
        raise SchemaError(
            f"{table.where(int(index[i]))}, column {schema.target!r} (target): value "
            f"{values[i]!r} is neither positive {list(schema.positive)} nor negative "
            f"{list(schema.negative)}; add it to the schema's list of the class it belongs to "
            "(a third class must be mapped to one of the two), or correct the row.")
    is_positive = (codes >= 0) & (codes < len(schema.positive))
    target = np.where(absent, np.nan, is_positive.astype(np.float64))
    lines = None if table.lines is None else table.lines[index]
    site = SiteTable(name, table.source, index, lines, numeric, categorical, target)
    _check_all_missing(site, schema)
    return site


def _parse_numbers(values: np.ndarray, absent: np.ndarray, table: Table, index: np.ndarray,
                   column: str) -> np.ndarray:
    filled = np.where(absent, "nan", values).astype(str)
    try:
        parsed = filled.astype(np.float64)
    except ValueError:
        parsed = None
    if parsed is not None and (np.abs(parsed[~absent]) <= MAX_MAGNITUDE).all():
        return parsed
    for i, text in enumerate(filled):
        if absent[i]:
            continue
        try:
            number = float(text)
        except ValueError:
            raise SchemaError(f"{table.where(int(index[i]))}, column {column!r}: expected a "
                              f"number, found {str(text)!r}.") from None
        if not np.isfinite(number):
            raise SchemaError(f"{table.where(int(index[i]))}, column {column!r}: expected a "
                              f"finite number, found {str(text)!r}.")
        if abs(number) > MAX_MAGNITUDE:
            raise SchemaError(f"{table.where(int(index[i]))}, column {column!r}: expected a "
                              f"number of magnitude at most {MAX_MAGNITUDE:.0e}, found "
                              f"{str(text)!r} (a data-entry error? it would overflow "
                              "standardisation and the model's 32-bit arithmetic).")
    raise AssertionError("unreachable: a column failed to parse but no cell was at fault")


def _encode_categories(values: np.ndarray, vocabulary: Sequence[str]) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(vocabulary)}
    # Numeric categories written as 1 in one file and 1.0 in another still match.
    for i, v in enumerate(vocabulary):
        if _is_number(v):
            lookup.setdefault(_canonical_number(v), i)
    codes = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        text = "" if v is None else str(v)
        code = lookup.get(text)
        if code is None and _is_number(text):
            code = lookup.get(_canonical_number(text))
        codes[i] = -1 if code is None else code
    return codes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _canonical_number(text: str) -> str:
    return repr(float(text))


def _check_all_missing(site: SiteTable, schema: Schema) -> None:
    n = len(site)
    for j, column in enumerate(schema.numeric):
        if np.isnan(site.numeric[:, j]).all():
            raise DataError(f"{site.source}: column {column!r} is missing in all {n} rows "
                            f"of site {site.name!r}; the site cannot train on it or impute it. "
                            "Fill it or remove it from the schema.")
    for j, column in enumerate(schema.categorical):
        if (site.categorical[:, j] < 0).all():
            raise DataError(f"{site.source}: column {column!r} is missing in all {n} rows "
                            f"of site {site.name!r}; the site cannot train on it or impute it. "
                            "Fill it or remove it from the schema.")


@dataclass(frozen=True)
class RowAccount:
    """What became of one site's rows between its file and its training: counted, never silent.

    Attributes
    ----------
    site : str
        Site name.
    read : int
        Data rows of the site in its source.
    missing_outcome : int
        Rows dropped because the target is missing (under every missing-value
        policy; a row missing its outcome and a feature counts here).
    missing_feature : int
        Rows dropped because a feature is missing (``drop`` policy only).
    """

    site: str
    read: int
    missing_outcome: int = 0
    missing_feature: int = 0

    @property
    def dropped(self) -> int:
        """Rows dropped, for any reason."""
        return self.missing_outcome + self.missing_feature

    @property
    def used(self) -> int:
        """Rows the site trains and tests on."""
        return self.read - self.dropped

    def to_dict(self) -> dict[str, str | int]:
        """JSON-friendly counts (``site``, ``read``, the two drop reasons, ``used``)."""
        return {"site": self.site, "read": self.read, "missing_outcome": self.missing_outcome,
                "missing_feature": self.missing_feature, "used": self.used}


def apply_missing_policy(site: SiteTable, schema: Schema, policy: MissingPolicy) -> SiteTable:
    """`drop_missing` without its count of dropped rows."""
    return drop_missing(site, schema, policy)[0]


def drop_missing(site: SiteTable, schema: Schema,
                 policy: MissingPolicy) -> tuple[SiteTable, RowAccount]:
    """Drop the rows the missing-value policy cannot use, and count them by reason.

    A row whose target is missing is dropped and counted under every policy:
    a label cannot be imputed, and refusing the file for it left a real export
    no way to run but hand editing. Then ``drop`` drops every row with a
    missing feature; ``impute`` keeps them (features are filled later from the
    site's own training rows); ``fail`` refuses the first missing feature of
    a row it keeps, naming the cell (a missing outcome is dropped and counted,
    not an error: ``fail`` guards the features the model reads).

    Raises
    ------
    DataError
        If no row is left: the message says how many rows were dropped for
        which reason, and what to change.
    SchemaError
        Under ``fail``, at the first missing feature, naming file, row and column.
    """
    feature_missing_at = np.concatenate([np.isnan(site.numeric), site.categorical < 0], axis=1)
    feature_missing = feature_missing_at.any(axis=1)
    target_missing = np.isnan(site.target)
    if policy is MissingPolicy.FAIL and (feature_missing & ~target_missing).any():
        i = int(np.flatnonzero(feature_missing & ~target_missing)[0])
        columns = [*schema.numeric, *schema.categorical]
        column = columns[int(np.flatnonzero(feature_missing_at[i])[0])]
        raise SchemaError(f"{site.where(i)}, column {column!r}: value missing and the missing-"
                          "value policy is 'fail'; use missing = \"drop\" or \"impute\".")
    dropped = target_missing.copy()
    by_feature = np.zeros(len(site), dtype=bool)
    if policy is MissingPolicy.DROP:
        by_feature = feature_missing & ~target_missing
        dropped |= by_feature
    account = RowAccount(site.name, len(site), int(target_missing.sum()), int(by_feature.sum()))
    if account.used == 0:
        raise DataError(_emptied(site, schema, policy, account,
                                 feature_missing_at[~target_missing]))
    return site.subset(~dropped), account


def _emptied(site: SiteTable, schema: Schema, policy: MissingPolicy, account: RowAccount,
             feature_missing_at: np.ndarray) -> str:
    """Why no row of `site` is left, and what to do about it."""
    text = (f"{site.source}: site {site.name!r} has no row left: all {account.read} were "
            f"dropped, {account.missing_outcome} with a missing outcome ({schema.target!r})")
    if account.missing_feature:
        columns = [*schema.numeric, *schema.categorical]
        counts = feature_missing_at.sum(axis=0)
        worst = sorted(range(len(columns)), key=lambda j: -counts[j])[:3]
        text += (f" and {account.missing_feature} with a missing feature under missing = "
                 f"\"{policy.value}\" (most often " + ", ".join(
                     f"{columns[j]!r} in {int(counts[j])} rows" for j in worst if counts[j])
                 + ")")
    text += ". "
    if account.missing_feature:
        return text + ("Use missing = \"impute\" (rows missing a feature are kept and filled "
                       "from the site's own training rows), remove the mostly-missing "
                       "column(s) from the schema, or fill them.")
    return text + (f"Every row lacks the outcome: check that {schema.target!r} is the outcome "
                   "column and that the schema's missing_values do not match its values.")


def load_sites(paths: Sequence[str | Path], schema: Schema) -> list[SiteTable]:
    """Load user files: one per site (site = file stem), or files split by ``schema.site_column``.

    Every file must have the same columns, apart from those the schema ignores; a
    file whose columns differ from the first one is refused, naming both.
    """
    if not paths:
        raise DataError("No data files given; expected one CSV or Parquet file per site, or one "
                        "file with a site column.")
    sites: list[SiteTable] = []
    first: Table | None = None
    ignored = set(schema.ignore)
    for path in paths:
        table = read_table(path)
        if first is None:
            first = table
        elif set(table.columns) - ignored != set(first.columns) - ignored:
            only_here = sorted(set(table.columns) - set(first.columns) - ignored)
            only_there = sorted(set(first.columns) - set(table.columns) - ignored)
            raise SchemaError(f"{table.source}: columns differ from {first.source}: only in this "
                              f"file {only_here}, only in {first.source} {only_there}. Every site "
                              "must export the same columns.")
        if schema.site_column is None:
            sites.append(parse_table(table, schema, Path(path).stem))
            continue
        if schema.site_column not in table.columns:
            raise SchemaError(f"{table.source}: the schema's site column {schema.site_column!r} "
                              f"is not in the file; found columns {table.columns}.")
        labels = np.array(["" if v is None else str(v) for v in table.cells[schema.site_column]])
        if (labels == "").any():
            i = int(np.flatnonzero(labels == "")[0])
            raise SchemaError(f"{table.where(i)}, column {schema.site_column!r} (site): empty; "
                              "every row must name its site.")
        for name in dict.fromkeys(labels):  # first-appearance order, deterministic
            sites.append(parse_table(table, schema, str(name), np.flatnonzero(labels == name)))
    names = [s.name for s in sites]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"Site name(s) {repeated} appear in more than one file; site names must "
                        "be unique.")
    return sites


def find_site_files(data_dir: str | Path) -> list[Path]:
    """The data files of a directory (sorted, so site order is deterministic)."""
    directory = Path(data_dir)
    if directory.is_file():
        raise DataError(f"Data directory {directory} is a file, not a directory; give one file "
                        f"(with a site column in the schema) as data.files = [\"{directory}\"], "
                        f"or `fedcare run --data {directory}`.")
    if not directory.is_dir():
        raise DataError(f"Data directory {directory} does not exist.")
    entries = sorted(directory.iterdir())
    files = [p for p in entries if p.suffix.lower() in DATA_SUFFIXES]
    # Files a user may take for data (an Excel export, a text file): named, so that a site
    # saved in the wrong format is not silently left out of the federation.
    unread = [p.name for p in entries if p.is_file() and not p.name.startswith(".")
              and p.suffix.lower() not in (*DATA_SUFFIXES, ".toml")]  # .toml: a schema
    if unread:
        listed = ", ".join(unread[:10]) + (f" and {len(unread) - 10} more" if len(unread) > 10
                                           else "")
        warnings.warn(f"Data directory {directory}: not read, as only .csv and .parquet files "
                      f"are data: {listed}. Save a site's data as CSV or Parquet to include it.",
                      UserWarning, stacklevel=2)
    if not files:
        raise DataError(f"Data directory {directory} holds no .csv or .parquet file.")
    return files
