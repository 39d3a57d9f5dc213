"""Regenerate (or check) the completion scripts shipped in the package (``cbctl/completions/``).

    python -m cbctl.cli.completion_gen          # write cbctl.bash, cbctl.zsh, cbctl.fish (make completions)
    python -m cbctl.cli.completion_gen --check  # exit 1 and name the stale files
    python -m cbctl.cli.completion_gen DIR      # the same, into another directory

The scripts are exactly what ``cbctl completion SHELL`` prints. They are package data
(pyproject.toml), so an installed wheel carries them: :func:`shipped_dir` finds them.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

from cbctl.cli.completion import PROG_NAME, SHELLS, script


def shipped_dir() -> Path:
    """The package's ``completions/`` directory (``cbctl/completions/`` in a checkout)."""
    shipped = importlib.resources.files("cbctl").joinpath("completions")
    return shipped if isinstance(shipped, Path) else Path(str(shipped))


def expected_files(prog_name: str = PROG_NAME) -> dict[str, str]:
    """File name -> content, for every supported shell."""
    return {f"{prog_name}.{shell}": script(shell, prog_name=prog_name) for shell in SHELLS}


def stale(directory: Path) -> list[str]:
    """Names of the files in ``directory`` that are missing or differ from the generated ones."""
    out = []
    for name, content in expected_files().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            out.append(name)
    return out


def write(directory: Path) -> list[str]:
    """Write every script into ``directory`` (created if needed); return the names written."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name, content in expected_files().items():
        (directory / name).write_text(content, encoding="utf-8")
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbctl.cli.completion_gen", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, nargs="?", default=None,
                        help="where the scripts live (default: the package's cbctl/completions/)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.directory is None:
        args.directory = shipped_dir()
    if args.check:
        bad = stale(args.directory)
        for name in bad:
            sys.stderr.write(f"{args.directory / name}: stale; run python -m cbctl.cli.completion_gen {args.directory}\n")
        return 1 if bad else 0
    for name in write(args.directory):
        sys.stderr.write(f"wrote {args.directory / name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
