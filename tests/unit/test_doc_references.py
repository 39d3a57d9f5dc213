"""Citations stay true: every file path and every ``cbctl.*`` dotted name that the docs, the README,
the code's comments and docstrings, the tests and the benches mention exists in the repository.

The project cites only files it holds (docs/architecture.md); after a module moves or splits this
test names each reference left pointing at nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Where references are looked for.
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] + [
    p for d in ("cbctl", "tests", "bench", "scripts") for p in sorted((ROOT / d).rglob("*"))
    if p.suffix in {".py", ".sh", ".md", ".lua"} and "__pycache__" not in p.parts
]

PATH_RE = re.compile(r"(?<![\w./-])((?:cbctl|tests|bench|docs|scripts|deploy)/[\w./-]*[\w/])")
DOTTED_RE = re.compile(r"(?<![\w./-])(cbctl(?:\.[A-Za-z_]\w*)+)")
LINK_RE = re.compile(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)")
OUTSIDE = re.compile(r"\b(DESIGN|ENVIRONMENT|STYLE)\.md\b")


def _path_exists(ref: str) -> bool:
    ref = ref.rstrip(".")
    if "*" in ref or "<" in ref:
        return True
    return (ROOT / ref).exists()


#: A dotted word ending in one of these is a file name (``cbctl.toml``), not a Python name.
FILE_SUFFIXES = frozenset({"toml", "bash", "zsh", "fish", "yaml", "yml", "json", "sqlite", "service", "md", "txt", "log"})


def _dotted_exists(ref: str) -> bool:
    parts = ref.rstrip(".").split(".")
    if parts[-1] in FILE_SUFFIXES:
        return True
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        obj: object = importlib.import_module(name)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_cited_path_and_name_exists() -> None:
    missing: list[str] = []
    for source in SOURCES:
        text = source.read_text(encoding="utf-8", errors="replace")
        rel = source.relative_to(ROOT)
        for lineno, line in enumerate(text.splitlines(), 1):
            for ref in PATH_RE.findall(line):
                if not _path_exists(ref):
                    missing.append(f"{rel}:{lineno}: path {ref}")
            for ref in DOTTED_RE.findall(line):
                if not _dotted_exists(ref):
                    missing.append(f"{rel}:{lineno}: name {ref}")
            if source.suffix == ".md":
                for link in LINK_RE.findall(line):
                    if not (source.parent / link).exists():
                        missing.append(f"{rel}:{lineno}: link {link}")
            if OUTSIDE.search(line) and source != Path(__file__):
                missing.append(f"{rel}:{lineno}: cites a file outside the repository")
    assert not missing, "references to nothing:\n" + "\n".join(missing[:80])
