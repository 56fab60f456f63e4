"""``fedcare schema``: propose a schema for a user's own files, to review.

``fedcare schema infer DATA... --target T --out schema.toml`` reads CSV or
Parquet files (one per site, a directory of them, or one file with
``--site-column``), writes a proposed schema (`fedcare.data.infer`) and prints
every note to review at once, then the ``fedcare run`` command for that data.
An existing schema file is replaced only with ``--overwrite``: it may hold a
reviewer's edits.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from fedcare.errors import ConfigError


def add_schema_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``schema infer`` under `commands`.

    Sets ``handler`` (``Namespace -> int``, the exit code) on the parsed
    arguments; the handler raises a `fedcare.errors.FedcareError` for bad
    input (unreadable data, an existing ``--out`` without ``--overwrite``).
    """
    schema = commands.add_parser("schema", help="work with data schemas")
    schema_commands = schema.add_subparsers(dest="schema_command", required=True)
    infer = schema_commands.add_parser(
        "infer", help="propose a schema from data files, to review",
        description="Read the files and write a schema TOML to review: numeric and "
                    "categorical columns, the target and its positive values, the columns to "
                    "ignore (identifiers, recorded after the outcome, mostly missing) and why, "
                    "missing-value tokens found, and suggested public bounds as comments. "
                    "Vocabularies never hold a category seen in fewer than 5 rows.")
    infer.add_argument("data", nargs="+", metavar="DATA",
                       help="CSV/Parquet files (one per site, or one with --site-column) or a "
                            "directory of them")
    infer.add_argument("--target", required=True, metavar="COLUMN",
                       help="the binary outcome column")
    infer.add_argument("--site-column", metavar="COLUMN",
                       help="column naming each row's site (one file holding every site)")
    infer.add_argument("--out", required=True, metavar="FILE", help="schema file to write")
    infer.add_argument("--overwrite", action="store_true",
                       help="replace --out if it exists (it may hold your review's edits)")
    infer.set_defaults(handler=run_infer)


def run_infer(args: argparse.Namespace) -> int:
    """``fedcare schema infer``: write the proposal and print what to review."""
    from fedcare.data.infer import infer_schema
    from fedcare.data.loaders import find_site_files

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; expected a schema file to write, such "
                          "as schema.toml.")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} exists (it may hold your review's edits); pass "
                          "--overwrite to replace it, or choose another file.")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist.")
    paths: list[Path] = []
    for item in args.data:
        path = Path(item)
        paths.extend(find_site_files(path) if path.is_dir() else [path])
    proposal = infer_schema(paths, args.target, args.site_column)
    try:
        proposal.save(out)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the schema: {exc.strerror}.") from None
    schema = proposal.schema
    print(f"Wrote {out}: {len(schema.numeric)} numeric and {len(schema.categorical)} "
          f"categorical columns, {len(schema.ignore)} ignored, target {schema.target!r} "
          f"(positive: {list(schema.positive)}, negative: {list(schema.negative)}).")
    if proposal.ignored:
        print("Ignored (listed in `ignore`, with the reason):")
        for column, why in proposal.ignored.items():
            print(f"  - {column}: {why}")
    if proposal.notes:
        print("To review:")
        for note in proposal.notes:
            print(f"  - {note}")
    if len(args.data) == 1 and Path(args.data[0]).is_dir():
        data = f"--data-dir {shlex.quote(args.data[0])}"
    else:
        data = "--data " + " ".join(shlex.quote(str(p)) for p in paths)
    print(f"Review it, then: fedcare run {data} --schema {shlex.quote(str(out))}")
    return 0
