"""Unit tests of cbctl.core.model.lanesfile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbctl.core.model.errors import BadInput
from cbctl.core.model.lanesfile import MAX_BYTES, LanesFileError, parse_lanes_file

KNOWN = [f"lane-{i:02d}" for i in range(16)]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Relative names, as an operator types them: messages must use the name as given.
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, content: str | bytes) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else content
    Path(name).write_bytes(data)
    return name


def problems_of(path: str, known=KNOWN, **kw) -> list[str]:
    with pytest.raises(LanesFileError) as info:
        parse_lanes_file(path, known, **kw)
    err = info.value
    assert isinstance(err, BadInput)
    assert err.exit_code == 2
    assert str(err) == "\n".join(err.problems)
    assert err.path == path
    return err.problems


def test_parses_ids_comments_blanks_whitespace(in_tmp):
    path = write(
        "lanes.txt",
        "# canary lanes\n\n  lane-03  \nlane-01 # trailing comment\n\t\n#lane-02\nlane-15\r\n",
    )
    assert parse_lanes_file(path, KNOWN) == ("lane-03", "lane-01", "lane-15")


def test_no_trailing_newline_and_bom(in_tmp):
    path = write("lanes.txt", b"\xef\xbb\xbflane-00\nlane-01")
    assert parse_lanes_file(path, KNOWN) == ("lane-00", "lane-01")


def test_accepts_pathlike(in_tmp):
    write("lanes.txt", "lane-02\n")
    assert parse_lanes_file(Path("lanes.txt"), frozenset(KNOWN)) == ("lane-02",)


def test_known_none_allows_any_id(in_tmp):
    path = write("subs.txt", "sub-a\nnode-7/consumer\n# x\n")
    assert parse_lanes_file(path, None) == ("sub-a", "node-7/consumer")


def test_unknown_lane(in_tmp):
    path = write("lanes.txt", "lane-01\n" * 1 + "\n" * 5 + "lane-99\n")
    assert problems_of(path) == ["lanes.txt:7: unknown lane 'lane-99'"]


def test_duplicate_names_first_line(in_tmp):
    path = write("lanes.txt", "# header\nlane-01\nlane-02\n\n\n\n\n\nlane-01\n")
    assert problems_of(path) == ["lanes.txt:9: duplicate lane 'lane-01' (first on line 2)"]


def test_duplicate_subscriber_uses_what(in_tmp):
    path = write("subs.txt", "a\na\n")
    assert problems_of(path, None, what="subscriber") == ["subs.txt:2: duplicate subscriber 'a' (first on line 1)"]


def test_every_bad_line_reported_together(in_tmp):
    path = write(
        "lanes.txt",
        "\n".join(
            [
                "lane-01",  # 1 ok
                "lane-99",  # 2 unknown
                "lane-01",  # 3 duplicate of 1
                "lane-02 lane-03",  # 4 two ids
                "lane-04,lane-05",  # 5 comma
                "lane-99",  # 6 duplicate of 2 (also unknown)
                "lane-05  # fine",  # 7 ok
                "LANE-06",  # 8 unknown (case matters)
            ]
        )
        + "\n",
    )
    assert problems_of(path) == [
        "lanes.txt:2: unknown lane 'lane-99'",
        "lanes.txt:3: duplicate lane 'lane-01' (first on line 1)",
        "lanes.txt:4: expected one lane per line, got 2: 'lane-02 lane-03'",
        "lanes.txt:5: invalid lane 'lane-04,lane-05' (one id per line, no ',')",
        "lanes.txt:6: duplicate lane 'lane-99' (first on line 2)",
        "lanes.txt:8: unknown lane 'LANE-06'",
    ]


@pytest.mark.parametrize("content", ["", "\n\n  \n", "# only\n  # comments\n"])
def test_empty_file(in_tmp, content):
    path = write("lanes.txt", content)
    assert problems_of(path) == ["lanes.txt: no lane ids (the file is empty or only comments)"]


def test_non_utf8_line_is_located_and_other_lines_checked(in_tmp):
    path = write("lanes.txt", b"lane-01\nlane-\xff2\nlane-42\n")
    assert problems_of(path) == [
        "lanes.txt:2: not valid UTF-8 (byte 0xff at column 6)",
        "lanes.txt:3: unknown lane 'lane-42'",
    ]


def test_non_utf8_whole_file(in_tmp):
    path = write("lanes.txt", "lane-01\n".encode("utf-16"))
    # UTF-16 has NUL bytes: reported as binary, which is what it is to a UTF-8 reader.
    assert problems_of(path) == ["lanes.txt: binary file (NUL byte at offset 3), expected one id per line"]
    path = write("latin1.txt", "lané-01\n".encode("latin-1"))
    assert problems_of(path) == ["latin1.txt:1: not valid UTF-8 (byte 0xe9 at column 4)"]


def test_binary_file(in_tmp):
    path = write("lanes.bin", b"lane-01\n\x00\x01\x02")
    assert problems_of(path) == ["lanes.bin: binary file (NUL byte at offset 8), expected one id per line"]


def test_missing_file(in_tmp):
    assert problems_of("nope.txt") == ["nope.txt: no such file"]


def test_directory(in_tmp):
    os.mkdir("adir")
    [problem] = problems_of("adir")
    assert problem.startswith("adir: cannot read: ")
    assert "directory" in problem.lower()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(in_tmp):
    path = write("secret.txt", "lane-01\n")
    os.chmod(path, 0)
    try:
        assert problems_of(path) == ["secret.txt: cannot read: Permission denied"]
    finally:
        os.chmod(path, 0o600)


def test_too_large(in_tmp):
    path = write("big.txt", b"lane-01\n" + b"#" * MAX_BYTES)
    assert problems_of(path) == [f"big.txt: too large (over {MAX_BYTES} bytes) for a lanes file"]


def test_absolute_path_is_named_as_given(tmp_path):
    path = str(tmp_path / "lanes.txt")
    write(path, "lane-77\n")
    assert problems_of(path) == [f"{path}:1: unknown lane 'lane-77'"]


def test_all_unknown_is_not_also_called_empty(in_tmp):
    path = write("lanes.txt", "x\ny\n")
    assert problems_of(path) == ["lanes.txt:1: unknown lane 'x'", "lanes.txt:2: unknown lane 'y'"]
