"""Propose a schema from data files, for the user to review before training.

`infer_schema` reads every file, guesses each column's role and lists every
guess that could be wrong, all at once. It is built to be reviewed, and to
keep what a schema publishes free of patient values:

- **Columns that are not features** go to the schema's ``ignore`` list with
  the reason: identifiers (named like one, or a different whole number or
  text in every row), columns whose name says they were recorded after the
  outcome (`LATER_WORDS`: ``death_date``, ``discharge_*``, ``followup*``,
  ``outcome_*`` other than the target...), dates (never a feature, and often
  recorded later), columns missing in more than `MAX_MISSING_SHARE` of rows
  and columns missing in every row of some site (that site could neither
  train on them nor impute them).
- **Missing-value tokens** (`MISSING_TOKENS`: ``.``, ``NA``, ``n/a``, ``?``,
  empty...) found anywhere are added to ``missing_values``; a column whose
  other cells are numbers stays numeric. `AMBIGUOUS_MISSING_TOKENS` (``-``,
  ``none``...) mean "missing" only in a column otherwise numeric: in a text
  column they may be a category (a negative dipstick test, no chest pain).
  Another non-numeric text in a numeric column is suggested as a missing value
  when it is seen at least `MIN_CATEGORY_COUNT` times (a code such as
  ``pending``); rarer ones are not written (they may be one patient's value)
  and the loader will refuse the cell, naming file, row and column.
- **Vocabularies are public**: the schema travels to every site and into
  model_card.md and report.html. A text column with more than
  `MAX_VOCABULARY` values is ignored (recode it into groups first), and a
  category seen fewer than `MIN_CATEGORY_COUNT` times is never written: rows
  holding it are refused by the loader with the file, row and column, to be
  merged into a larger category in the data.
- **Bounds** (public ranges, needed by private runs) are suggested as
  comments from `CLINICAL_BOUNDS`, clinical defaults looked up by column
  name, and ``[0, 1]`` for a 0/1 indicator; never from the data's own
  minimum and maximum, which would reveal the patients at the extremes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedcare.data.schema import DEFAULT_MISSING_VALUES, Schema
from fedcare.data.tables import Table, read_table
from fedcare.errors import FedcareError, SchemaError
from fedcare.toml_writer import toml_value

# A numeric column with at most this many distinct whole-number values is
# proposed as categorical (codes such as chest-pain type 1-4).
MAX_CODE_LEVELS = 10
# A text column with more values than this is not written as a vocabulary.
MAX_VOCABULARY = 30
# A category (or a non-numeric token) seen fewer times than this in all files
# together is never written to the schema: it could single out a patient
# (the k of k-anonymity; 5 is the smallest cell size most disclosure-control
# guidelines for health statistics allow).
MIN_CATEGORY_COUNT = 5
# A column missing in more than this share of rows is ignored.
MAX_MISSING_SHARE = 0.5
# A column is numeric when at least this share of its non-missing cells are numbers.
MIN_NUMERIC_SHARE = 0.8
# A column holding a different whole number (or text) in every row is taken for an
# identifier only from this many rows on: in a few dozen rows a whole-number lab value
# (cholesterol in mg/dL) can differ in every row by chance; in 50 it almost never does.
MIN_ROWS_FOR_UNIQUE = 50

# Cell contents that mean "missing" in common exports (compared in lower case).
MISSING_TOKENS = frozenset({"", ".", "..", "?", "na", "n/a", "n.a.", "nan", "null", "#n/a"})
# Cell contents that mean "missing" in a column otherwise numeric, but may be a
# category in a text column (compared in lower case).
AMBIGUOUS_MISSING_TOKENS = frozenset({"-", "--", "none", "missing", "unknown", "not done", "nd"})
# Column names (lower case, separators removed) of identifiers; a name ending in
# "_id" (or " id", ".id", "-id") is one too.
ID_NAMES = frozenset({"id", "rownames", "rowname", "row", "rownumber", "rowid", "index",
                      "unnamed0", "mrn", "pid", "uuid", "guid", "patientid", "patientnumber",
                      "patientno", "subjectid", "subject", "studyid", "recordid", "caseid",
                      "encounterid", "admissionid", "hadmid", "visitid", "nhsnumber", "ssn"})
# Words in a column name (split at separators and case changes) saying the value is
# known only after the outcome: a model trained on it predicts what already happened.
LATER_WORDS = frozenset({"death", "dead", "died", "deceased", "dod", "discharge", "discharged",
                         "followup", "follow", "fu", "outcome", "outcomes", "readmission",
                         "readmitted", "readmit", "survival", "survived", "mortality",
                         "censored", "censor", "los", "lengthofstay", "autopsy"})
_DATE = re.compile(r"^(\d{4}-\d{1,2}-\d{1,2}([ T].*)?|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4})$")

# Clinical plausibility ranges by column name (lower case, separators removed):
# (low, high, what and unit). Written from clinical definitions, never from data.
_BOUNDS: list[tuple[tuple[str, ...], float, float, str]] = [
    (("age",), 0, 120, "years"),
    (("trestbps", "sbp", "systolic", "systolicbp", "sysbp", "restingbp", "bpsys"), 50, 250,
     "systolic blood pressure, mmHg"),
    (("dbp", "diastolic", "diastolicbp", "diabp", "bpdia"), 30, 150,
     "diastolic blood pressure, mmHg"),
    (("chol", "cholesterol", "totalcholesterol", "totchol"), 0, 700,
     "total cholesterol, mg/dL (0: some exports code 'not measured' as 0)"),
    (("ldl",), 0, 500, "LDL cholesterol, mg/dL"),
    (("hdl",), 0, 200, "HDL cholesterol, mg/dL"),
    (("thalach", "heartrate", "hr", "pulse", "maxhr"), 20, 250, "heart rate, beats/min"),
    (("bmi",), 10, 80, "body-mass index, kg/m2"),
    (("weight", "weightkg"), 1, 300, "weight, kg"),
    (("height", "heightcm"), 40, 250, "height, cm"),
    (("temperature", "temp"), 30, 45, "body temperature, degrees C"),
    (("glucose", "glu", "bloodglucose"), 10, 1500, "glucose, mg/dL"),
    (("hba1c",), 3, 20, "HbA1c, %"),
    (("creatinine", "creat"), 0.1, 25, "serum creatinine, mg/dL"),
    (("sodium",), 100, 180, "sodium, mmol/L"),
    (("potassium",), 1, 10, "potassium, mmol/L"),
    (("hemoglobin", "haemoglobin", "hgb"), 2, 25, "haemoglobin, g/dL"),
    (("spo2", "o2sat", "oxygensaturation"), 50, 100, "oxygen saturation, %"),
    (("resprate", "respiratoryrate", "rr"), 4, 70, "respiratory rate, breaths/min"),
    (("oldpeak",), -3, 7, "ST depression, mm"),
]
CLINICAL_BOUNDS: dict[str, tuple[float, float, str]] = {
    name: (low, high, what) for names, low, high, what in _BOUNDS for name in names}
"""Suggested public bounds by normalised column name: (low, high, what and unit)."""


@dataclass(frozen=True)
class ProposedSchema:
    """A schema proposed from data, with everything the user should review.

    Attributes
    ----------
    schema : Schema
        The proposal; its ``ignore`` list holds the columns left out on purpose.
    ignored : dict of str to str
        Why each ignored column is ignored (written beside it in the TOML).
    bounds : dict of str to (float, float, str)
        Suggested public bounds of numeric columns, with what they assume
        (written as comments: the user checks the units, then uncomments).
    notes : list of str
        Every other guess to review, one line each, in column order.
    """

    schema: Schema
    ignored: dict[str, str] = field(default_factory=dict)
    bounds: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_toml(self) -> str:
        """The schema file: header comments, the schema, then the commented bounds."""
        header = ["Proposed by `fedcare schema infer`: review every line before training.",
                  *self.notes]
        text = self.schema.to_toml(header, ignore_reasons=self.ignored)
        unbounded = [c for c in self.schema.numeric if c not in self.bounds]
        if not self.bounds and not unbounded:
            return text
        lines = ["", "# Public bounds of numeric columns, needed by private runs",
                 "# (data.standardize = \"bounds\"): clinical defaults looked up by column name,",
                 "# never the data's own minimum and maximum. Check each unit, then uncomment.",
                 "# [bounds]"]
        lines += [f"# {_key(c)} = {toml_value([_number(lo), _number(hi)])}  # {what}"
                  for c, (lo, hi, what) in self.bounds.items()]
        lines += [f"# {_key(c)} = [low, high]  # no clinical default known for this name"
                  for c in unbounded]
        return text + "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        """Write `to_toml` to `path`."""
        Path(path).write_text(self.to_toml(), encoding="utf-8")


@dataclass
class _Column:
    """One column's cells over every file, and the site of each cell."""

    name: str
    cells: list[str | None]
    sites: list[str]


def infer_schema(
    paths: Sequence[str | Path],
    target: str,
    site_column: str | None = None,
    missing_values: Sequence[str] = DEFAULT_MISSING_VALUES,
    min_category_count: int = MIN_CATEGORY_COUNT,
) -> ProposedSchema:
    """Guess column roles and types from the files; return the proposal to review.

    Parameters
    ----------
    paths : sequence of path
        CSV or Parquet files, one per site (site = file stem) or any number
        holding a `site_column`.
    target : str
        The binary outcome column.
    site_column : str, optional
        Column naming each row's site.
    missing_values : sequence of str
        Cell contents known to mean "missing"; tokens found in the data
        (`MISSING_TOKENS`) are added.
    min_category_count : int, >= 1
        Fewest occurrences of a category (or token) for it to be written.

    Raises
    ------
    SchemaError
        Listing every problem found (unreadable files, columns that differ
        between files, a target or site column that is absent, a target that
        is not binary), not only the first.
    """
    tables, problems = _read_all(paths)
    columns = tables[0].columns if tables else []
    for table in tables[1:]:
        if set(table.columns) != set(columns):
            problems.append(f"{table.source}: columns differ from {tables[0].source}: only in "
                            f"this file {sorted(set(table.columns) - set(columns))}, only in "
                            f"{tables[0].source} {sorted(set(columns) - set(table.columns))}. "
                            "Every site must export the same columns.")
    if tables:
        for role, required in (("target", target), ("site column", site_column)):
            if required is not None and required not in columns:
                problems.append(f"{tables[0].source}: {role} {required!r} not found; columns "
                                f"are {columns}.")
    if problems:
        raise _problems(problems)
    site_of_rows = [_row_sites(t, site_column) for t in tables]
    known_missing = set(missing_values)
    found_tokens: dict[str, None] = {}  # in first-seen order
    numeric: list[str] = []
    categorical: dict[str, tuple[str, ...]] = {}
    ignored: dict[str, str] = {}
    bounds: dict[str, tuple[float, float, str]] = {}
    notes: list[str] = []
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    for name in columns:
        if name == site_column:
            continue
        column = _Column(name, [c for t in tables for c in t.cells[name]],
                         [s for sites in site_of_rows for s in sites])
        verdict = {c: _is_missing(c, known_missing) for c in set(column.cells)}
        absent = [verdict[c] for c in column.cells]
        for cell in dict.fromkeys(column.cells):  # distinct, in first-seen order
            if verdict[cell] and cell is not None and cell not in known_missing:
                found_tokens.setdefault(cell)
        counts = Counter(c for c, gone in zip(column.cells, absent, strict=True)
                         if not gone and c is not None)
        parsed = {v: _number_or_none(v) for v in counts}  # each distinct value parsed once
        if name == target:
            levels = sorted(counts, key=_sort_key)
            try:
                positive = _positive_values(levels, notes, name)
                negative = tuple(lv for lv in levels if lv not in positive)
            except SchemaError as exc:
                problems.append(f"{', '.join(t.source for t in tables)}: {exc}")
            continue
        reason = _not_a_feature(column, absent, counts, parsed, target)
        if reason is not None:
            ignored[name] = reason
            continue
        kind = _feature(column.name, counts, parsed, min_category_count, notes, found_tokens)
        if isinstance(kind, str):
            ignored[name] = kind
        elif kind is None:
            numeric.append(name)
            suggestion = _suggest_bounds(name, parsed)
            if suggestion is not None:
                bounds[name] = suggestion
                outside = _count_outside(counts, parsed, suggestion)
                if outside:
                    notes.append(f"{name}: {outside} value(s) outside the suggested bounds "
                                 f"[{_number(suggestion[0])}, {_number(suggestion[1])}] "
                                 f"({suggestion[2]}); check the unit.")
        else:
            categorical[name] = kind
    if problems:
        raise _problems(problems)
    new_tokens = [t for t in found_tokens if t not in known_missing]
    for name, vocabulary in list(categorical.items()):
        read_as_missing = [v for v in vocabulary if v in new_tokens]
        if not read_as_missing:
            continue
        kept = tuple(v for v in vocabulary if v not in read_as_missing)
        notes.append(f"{name}: {read_as_missing} will be read as missing (a numeric column "
                     "uses it so), not as a category; edit missing_values if that is wrong.")
        if len(kept) >= 2:
            categorical[name] = kept
        else:
            del categorical[name]
            ignored[name] = "fewer than two categories once missing values are removed"
    if new_tokens:
        notes.append(f"missing_values: added {new_tokens} found in the files; a numeric column "
                     "holding them stays numeric.")
    try:
        schema = Schema(numeric=tuple(numeric), categorical=categorical, target=target,
                        positive=positive, negative=negative, site_column=site_column,
                        missing_values=(*missing_values, *new_tokens),
                        ignore=tuple(ignored))
    except SchemaError as exc:
        reasons = [f"{c}: {why}" for c, why in ignored.items()]
        raise SchemaError(f"{exc} Every column was ignored: " + "; ".join(reasons)) from None
    return ProposedSchema(schema, ignored, bounds, notes)


def _read_all(paths: Sequence[str | Path]) -> tuple[list[Table], list[str]]:
    tables: list[Table] = []
    problems: list[str] = []
    if not paths:
        problems.append("No data files given; expected CSV or Parquet files or a directory.")
    for path in paths:
        try:
            tables.append(read_table(path))
        except FedcareError as exc:
            problems.append(str(exc))
    return tables, problems


def _problems(problems: list[str]) -> SchemaError:
    if len(problems) == 1:
        return SchemaError(problems[0])
    return SchemaError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def _row_sites(table: Table, site_column: str | None) -> list[str]:
    if site_column is None:
        return [Path(table.source).stem] * table.n_rows
    return ["" if v is None else str(v) for v in table.cells[site_column]]


def _is_missing(cell: str | None, known: set[str]) -> bool:
    return cell is None or cell in known or cell.strip().lower() in MISSING_TOKENS


def _not_a_feature(column: _Column, absent: list[bool], counts: Counter[str],
                   parsed: Mapping[str, float | None], target: str) -> str | None:
    """Why `column` is not a feature (one reason), or None if it may be one."""
    name = column.name
    if _normalise(name) in ID_NAMES or re.search(r"[_ .-]id$", name.lower()):
        return "named like an identifier: not a feature"
    later = sorted(set(_words(name)) & LATER_WORDS)
    if later:
        return (f"the name ({', '.join(later)}) suggests it is recorded after the outcome "
                f"{target!r}, so it would leak it; move it to the features only if it is known "
                "at prediction time")
    n = len(column.cells)
    n_present = sum(counts.values())
    if not n_present:
        return "missing in every row of every file"
    share = sum(absent) / n
    if share > MAX_MISSING_SHARE:
        return (f"missing in {share:.0%} of rows (more than {MAX_MISSING_SHARE:.0%}); training on "
                "it would drop or impute most rows")
    empty_at = _sites_where_all_missing(column.sites, absent)
    if empty_at:
        return (f"missing in every row at site(s) {empty_at}, which could neither train on it "
                "nor impute it")
    if sum(k for v, k in counts.items() if _DATE.match(v)) >= MIN_NUMERIC_SHARE * n_present:
        return ("holds dates: never a feature (and often recorded after the outcome); derive "
                "an interval, such as age at admission, before exporting")
    known_measurement = _normalise(name) in CLINICAL_BOUNDS
    if n_present >= MIN_ROWS_FOR_UNIQUE and len(counts) == n_present and not known_measurement:
        numbers = list(parsed.values())
        if any(x is None for x in numbers) or all(x is not None and x.is_integer()
                                                   for x in numbers):
            return "a different value in every row: an identifier, not a feature"
    return None


def _sites_where_all_missing(sites: list[str], absent: list[bool]) -> list[str]:
    seen: dict[str, bool] = {}
    for site, gone in zip(sites, absent, strict=True):
        seen[site] = seen.get(site, True) and gone
    return [site for site, all_gone in seen.items() if all_gone]


def _feature(name: str, counts: Counter[str], parsed: Mapping[str, float | None],
             min_count: int, notes: list[str],
             found_tokens: dict[str, None]) -> str | tuple[str, ...] | None:
    """None for numeric, a vocabulary for categorical, or the reason to ignore the column."""
    text = {v: n for v, n in counts.items() if parsed[v] is None}
    n_text = sum(text.values())
    n_present = sum(counts.values())
    if n_present - n_text >= MIN_NUMERIC_SHARE * n_present:
        numbers = {x for x in parsed.values() if x is not None}
        if text:
            # A missing-value word is no patient's value: suggested however rare.
            common = [v for v, n in text.items()
                      if n >= min_count or v.lower() in AMBIGUOUS_MISSING_TOKENS]
            rare = sum(n for v, n in text.items() if v not in common)
            for token in common:
                found_tokens.setdefault(token)
            if common:
                notes.append(f"{name}: numeric; non-numeric value(s) {common} read as missing "
                             "(added to missing_values); check they mean 'not measured'.")
            if rare:
                notes.append(f"{name}: numeric, but {rare} cell(s) hold text seen fewer than "
                             f"{min_count} times (not written here: it may be one patient's "
                             "value); a run stops at such a cell, naming it: correct it or add "
                             "it to missing_values.")
        values = sorted(numbers)
        if set(values) <= {0.0, 1.0}:
            notes.append(f"{name}: a 0/1 indicator, kept numeric.")
            return None
        if len(values) <= MAX_CODE_LEVELS and all(v.is_integer() for v in values):
            codes: Counter[float] = Counter()
            spelled: dict[float, str] = {}
            for v in sorted((v for v in counts if v not in text), key=_sort_key):
                codes[float(v)] += counts[v]
                spelled.setdefault(float(v), v)
            return _vocabulary(name, {spelled[x]: n for x, n in sorted(codes.items())},
                               min_count, notes, codes=True)
        return None
    return _vocabulary(name, dict(sorted(counts.items(), key=lambda kv: _sort_key(kv[0]))),
                       min_count, notes, codes=False)


def _vocabulary(name: str, counts: Mapping[str, int], min_count: int, notes: list[str],
                codes: bool) -> str | tuple[str, ...]:
    if len(counts) > MAX_VOCABULARY:
        return (f"{len(counts)} distinct values (more than {MAX_VOCABULARY}): not written as a "
                "vocabulary, which is published with the model and could hold individual "
                "patients' values; recode it into fewer groups (or export it as numbers) first")
    kept = tuple(v for v, n in counts.items() if n >= min_count)
    rare = len(counts) - len(kept)
    if len(kept) < 2:
        return (f"fewer than two categories seen at least {min_count} times; a category seen "
                "fewer times is never written (it could single out a patient)")
    what = (f"{len(kept)} whole-number values, proposed as categorical codes; move it to "
            "[numeric] if the values are quantities" if codes else
            f"categorical, {len(kept)} categories")
    notes.append(f"{name}: {what}.")
    if rare:
        notes.append(f"{name}: {rare} categor{'y' if rare == 1 else 'ies'} seen fewer than "
                     f"{min_count} times left out of the vocabulary (it could single out a "
                     "patient); the loader refuses rows holding one, naming file, row and "
                     "column: merge them into a larger category in the data.")
    return kept


def _suggest_bounds(name: str,
                    parsed: Mapping[str, float | None]) -> tuple[float, float, str] | None:
    known = CLINICAL_BOUNDS.get(_normalise(name))
    if known is not None:
        return known
    numbers = {x for x in parsed.values() if x is not None}
    if numbers and numbers <= {0.0, 1.0}:
        return (0.0, 1.0, "a 0/1 indicator")
    return None


def _count_outside(counts: Counter[str], parsed: Mapping[str, float | None],
                   bounds: tuple[float, float, str]) -> int:
    return sum(counts[v] for v, x in parsed.items()
               if x is not None and not bounds[0] <= x <= bounds[1])


def _positive_values(levels: list[str], notes: list[str], column: str) -> tuple[str, ...]:
    if not levels:
        raise SchemaError(f"target {column!r} is missing in every row.")
    numbers = _as_numbers(levels)
    if len(levels) == 1:
        raise SchemaError(f"target {column!r} takes a single value {levels[0]!r}; a binary "
                          "outcome needs two.")
    if len(levels) == 2:
        notes.append(f"{column} (target): {levels[1]!r} is the positive class, {levels[0]!r} "
                     "the negative; swap `positive` and `negative` if that is wrong.")
        return (levels[1],)
    if numbers is not None and min(numbers) == 0:
        zero = [lv for lv, n in zip(levels, numbers, strict=True) if n == 0]
        notes.append(f"{column} (target): {len(levels)} values; every value other than 0 is "
                     "taken as positive (e.g. disease grades 1-4).")
        return tuple(lv for lv in levels if lv not in zero)
    raise SchemaError(f"target {column!r} takes {len(levels)} values {levels[:10]}; fedcare "
                      "trains binary outcomes. Write the schema by hand with `positive = [...]`.")


def _number_or_none(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _as_numbers(levels: list[str]) -> list[float] | None:
    numbers = [_number_or_none(v) for v in levels]
    return None if any(n is None for n in numbers) else [n for n in numbers if n is not None]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _words(name: str) -> list[str]:
    """Lower-case words of a column name: split at separators and at case changes."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    words = [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]
    return [*words, "".join(words)]  # "follow_up" -> follow, up, followup


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else toml_value(name)


def _sort_key(value: str) -> tuple[int, float, str]:
    number = _number_or_none(value)
    return (1, 0.0, value) if number is None else (0, number, value)
