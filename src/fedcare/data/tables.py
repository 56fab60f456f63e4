"""Reading raw tables (CSV, Parquet) into columns of text, remembering where each cell came from."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcare.errors import DataError


@dataclass(frozen=True)
class Table:
    """A file's cells as text, column by column.

    Attributes
    ----------
    source : str
        The file the table was read from, as the user named it.
    columns : list of str
        Column names, in file order.
    cells : dict of str to ndarray
        Each column's cells as an object array of ``str`` (``None`` for a null
        in a typed file such as Parquet).
    lines : ndarray of int64 or None
        Physical line (1-based) on which each data row starts, for text files;
        ``None`` for binary formats. Messages point at the line to fix.
    """

    source: str
    columns: list[str]
    cells: dict[str, np.ndarray]
    lines: np.ndarray | None

    @property
    def n_rows(self) -> int:
        return 0 if not self.columns else len(self.cells[self.columns[0]])

    def where(self, row: int) -> str:
        """Human location of data row `row` (0-based): file, row and line."""
        line = None if self.lines is None else int(self.lines[row])
        return locate(self.source, row, line)


def locate(source: str, row: int, line: int | None) -> str:
    """Human location of data row `row` (0-based) of `source`: file, row and, for text, line."""
    if line is None:
        return f"{source}, row {row + 1}"
    return f"{source}, row {row + 1} (line {line})"


def read_table(path: str | Path, header: Sequence[str] | None = None) -> Table:
    """Read a CSV or Parquet file.

    Parameters
    ----------
    path : path
        ``.csv`` (comma-separated, first line the header unless `header` is
        given), ``.parquet`` or ``.pq``.
    header : sequence of str, optional
        Column names for a CSV file that has no header line.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"Data file {path} is a directory, not a file; give the files in it, "
                        "or the directory as data.data_dir (--data-dir).")
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    return _read_csv(path, header)


def _read_csv(path: Path, header: Sequence[str] | None) -> Table:
    records: list[tuple[int, list[str]]] = []  # (first physical line, fields)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            line = 1
            for record in reader:
                # A quoted field may span lines: a record starts after the previous one ended.
                if record and not (len(record) == 1 and not record[0].strip()):
                    records.append((line, record))
                line = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "export the file as UTF-8 CSV.") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV: {exc}.") from None
    if header is None:
        if not records:
            raise DataError(f"{path}: the file is empty; expected a header line and data rows.")
        names, data = records[0][1], records[1:]
    else:
        names, data = list(header), records
    names = [n.strip() for n in names]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: the header names column(s) {duplicates} more than once.")
    if any(not n for n in names):
        raise DataError(f"{path}: the header has an empty column name at position "
                        f"{[i + 1 for i, n in enumerate(names) if not n]}.")
    for line, record in data:
        if len(record) != len(names):
            raise DataError(f"{path}, line {line}: {len(record)} fields; expected {len(names)} "
                            "as in the header.")
    grid = np.array([r for _, r in data], dtype=object).reshape(len(data), len(names))
    cells = {name: np.array([c.strip() for c in grid[:, j]], dtype=object)
             for j, name in enumerate(names)}
    return Table(str(path), names, cells, np.array([line for line, _ in data], dtype=np.int64))


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; "
                        "install fedcare[parquet].") from None
    try:
        arrow = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}.") from None
    cells = {}
    for name in arrow.column_names:
        values = arrow.column(name).to_pylist()
        cells[name] = np.array([None if v is None else str(v) for v in values], dtype=object)
    return Table(str(path), list(arrow.column_names), cells, None)
