"""Lanes files: the canary subset given to ``--canary FILE`` (and ``--canary-subscribers FILE``).

Format: one id per line; ``#`` starts a comment (whole line or trailing); blank lines and
surrounding whitespace are ignored; a UTF-8 byte-order mark at the start is tolerated (editors
add one). Example::

    # canary lanes for the Tuesday rollout
    lane-01
    lane-07   # the noisy one

Every bad line is collected and reported at once, so the operator fixes the file in one pass.
Messages name the file as the caller gave it and the 1-based line:
``lanes.txt:7: unknown lane 'lane-99'``; problems with the whole file read ``lanes.txt: reason``.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Final

from cbctl.core.model.errors import BadInput

#: A lanes file lists ids; anything bigger is the wrong file (and /dev/zero must not hang us).
MAX_BYTES: Final = 1024 * 1024


class LanesFileError(BadInput):
    """A lanes file is invalid. ``problems`` holds one ``FILE:LINE: reason`` (or ``FILE: reason``)
    per problem, in line order; the message is those lines joined by newlines."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.path = path
        self.problems = problems


def parse_lanes_file(
    path: str | os.PathLike[str],
    known: Collection[str] | None,
    *,
    what: str = "lane",
) -> tuple[str, ...]:
    """Read the ids in ``path``, in file order.

    ``known`` is the lane inventory every id must belong to; ``None`` allows any non-empty id
    (subscribers). ``what`` names the ids in messages (``"lane"``, ``"subscriber"``).

    Raises :class:`LanesFileError` (exit 2) listing every problem: unknown id, duplicate id
    (naming the line of its first occurrence), several ids on one line, an id containing ``,``,
    a line that is not UTF-8; or, for the whole file: missing/unreadable, binary (NUL byte),
    larger than :data:`MAX_BYTES`, or no ids at all.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise LanesFileError(name, [f"{name}: no such file"]) from None
    except OSError as exc:
        # IsADirectoryError, PermissionError, ...: strerror says which, without a traceback.
        raise LanesFileError(name, [f"{name}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_BYTES:
        raise LanesFileError(name, [f"{name}: too large (over {MAX_BYTES} bytes) for a lanes file"])
    # NUL is valid UTF-8, so look for it first: it is the mark of a binary file.
    nul = data.find(b"\0")
    if nul >= 0:
        raise LanesFileError(name, [f"{name}: binary file (NUL byte at offset {nul}), expected one id per line"])
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]

    allowed = frozenset(known) if known is not None else None
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    ids: list[str] = []
    seen_any = False
    # Decode line by line (not the whole file) so a bad byte is reported at its line and the
    # other lines are still checked.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{name}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
            seen_any = True  # the line may well hold an id: do not also call the file empty
            continue
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        seen_any = True
        words = text.split()
        if len(words) > 1:
            problems.append(f"{name}:{lineno}: expected one {what} per line, got {len(words)}: {text!r}")
            continue
        item = words[0]
        if "," in item:
            problems.append(f"{name}:{lineno}: invalid {what} {item!r} (one id per line, no ',')")
        elif item in first_seen:
            problems.append(f"{name}:{lineno}: duplicate {what} {item!r} (first on line {first_seen[item]})")
        elif allowed is not None and item not in allowed:
            problems.append(f"{name}:{lineno}: unknown {what} {item!r}")
            # Remember it anyway so a repeat is reported as a duplicate of this line.
            first_seen[item] = lineno
        else:
            first_seen[item] = lineno
            ids.append(item)
    if not seen_any:
        problems.append(f"{name}: no {what} ids (the file is empty or only comments)")
    if problems:
        raise LanesFileError(name, problems)
    return tuple(ids)


__all__ = ["MAX_BYTES", "LanesFileError", "parse_lanes_file"]
