"""``fedcare keys``: make and check the CKKS key set of a federation.

``fedcare keys init DIR`` writes ``site.ckks`` (secret key, for the sites),
``aggregator.ckks`` (parameters, no key: for the aggregator) and ``keys.json``
(parameters and fingerprint); run it on a trusted machine and copy the files
out of band. ``fedcare keys fingerprint FILE`` prints the fingerprint of
either key file, to check every party holds the same key set. Both use
`fedcare.protection.ckks`, imported only when they run (TenSEAL takes a third
of a second to import).
"""

from __future__ import annotations

import argparse
import shutil
import stat
import subprocess
import sys
from pathlib import Path


def add_keys_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``keys init`` and ``keys fingerprint`` under `commands`.

    Each sets ``handler`` (``Namespace -> int``, the exit code) on the parsed
    arguments; a handler raises `fedcare.errors.ConfigError` for a bad input
    (existing files without ``--overwrite``, an unreadable key file).
    """
    keys = commands.add_parser(
        "keys", help="CKKS keys for homomorphic aggregation: make them, check them",
        description="The CKKS key set the sites encrypt their updates under and the "
                    "aggregator adds them with.")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)

    init = keys_commands.add_parser(
        "init", help="make a key set in DIR",
        description="Write site.ckks (secret key: copy it to every site, never to the "
                    "aggregator), aggregator.ckks (parameters, no key: for the aggregator) and "
                    "keys.json (parameters and fingerprint, no secrets) to DIR. Run it on a "
                    "trusted machine; key files are created with mode 0600.")
    init.add_argument("directory", metavar="DIR", help="directory to write to (created if missing)")
    init.add_argument("--poly-modulus-degree", type=int, default=8192, metavar="N",
                      help="ring dimension, a power of two; N/2 values per ciphertext "
                           "(default 8192; 16384 and 32768 also pass the 128-bit check)")
    init.add_argument("--overwrite", action="store_true",
                      help="replace existing key files (every site then needs the new site.ckks)")
    init.set_defaults(handler=cmd_keys_init)

    fingerprint = keys_commands.add_parser(
        "fingerprint", help="print the fingerprint of a key file",
        description="Load site.ckks or aggregator.ckks and print its kind, permissions and "
                    "fingerprint (SHA-256 of aggregator.ckks); both files of one key set "
                    "print the same fingerprint.")
    fingerprint.add_argument("file", metavar="FILE", help="site.ckks or aggregator.ckks")
    fingerprint.set_defaults(handler=cmd_keys_fingerprint)


def git_work_tree(path: Path) -> Path | None:
    """The top of the git work tree holding `path` (a folder with ``.git``), or None."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".git").exists():
            return folder
    return None


def warn_if_in_git_work_tree(directory: str | Path, what: str) -> None:
    """Warn on stderr when secret files were written inside a git work tree.

    Silent when git itself says `directory` is ignored (``git check-ignore``): a
    ``git add .`` would then not pick them up.
    """
    path = Path(directory)
    top = git_work_tree(path)
    if top is None:
        return
    git = shutil.which("git")
    if git is not None:
        ignored = subprocess.run([git, "-C", str(top), "check-ignore", "-q", str(path.resolve())],
                                 capture_output=True, check=False)
        if ignored.returncode == 0:
            return
    print(f"warning: {path} holds {what} and is inside the git work tree {top}, not ignored: "
          f"one `git add` publishes them. Add {path.name}/ to {top / '.gitignore'}, or write "
          "them outside the repository.", file=sys.stderr)


def cmd_keys_init(args: argparse.Namespace) -> int:
    """Write a key set to ``args.directory``; print the files, their modes and the fingerprint."""
    from fedcare.protection.ckks import CkksParameters, generate_keys

    params = CkksParameters(poly_modulus_degree=args.poly_modulus_degree)
    files = generate_keys(args.directory, params, overwrite=args.overwrite)
    moduli = "+".join(str(bits) for bits in params.coeff_mod_bit_sizes)
    print(f"Wrote a CKKS key set (poly_modulus_degree {params.poly_modulus_degree}, coefficient "
          f"moduli {moduli} bits, scale 2**{params.global_scale_bits}) to {args.directory}:")
    roles = ((files.site, "secret key: copy to every site, never to the aggregator"),
             (files.aggregator, "parameters and key-set id, no key: for the aggregator"),
             (files.manifest, "parameters and fingerprint, no secrets"))
    width = max(len(str(path)) for path, _ in roles)
    for path, role in roles:
        info = path.stat()
        print(f"  {stat.filemode(info.st_mode)}  {info.st_size:>9,} B  {path!s:<{width}}  "
              f"{role}")
    print(f"Fingerprint (SHA-256 of {files.aggregator.name}): {files.fingerprint}")
    print("Each party checks its copy with: fedcare keys fingerprint FILE")
    warn_if_in_git_work_tree(args.directory, "the federation's secret CKKS key (site.ckks)")
    return 0


def cmd_keys_fingerprint(args: argparse.Namespace) -> int:
    """Print the kind, permissions and fingerprint of the key file ``args.file``.

    Warns on stderr (exit code still 0) when a file holding the secret key is
    readable by group or others.
    """
    from fedcare.protection.ckks import SiteContext, load_context

    path = Path(args.file)
    context = load_context(path)
    mode = path.stat().st_mode
    secret = isinstance(context, SiteContext)
    kind = "site context (holds the secret key)" if secret else "aggregator context (public)"
    print(f"{path}: {kind}, {stat.filemode(mode)}, poly_modulus_degree "
          f"{context.poly_modulus_degree}, scale 2**{context.scale_bits}")
    print(f"fingerprint {context.fingerprint}")
    if secret and mode & 0o077:
        print(f"warning: {path} holds the secret key and is readable by group or others; "
              f"run: chmod 600 {path}", file=sys.stderr)
    return 0
