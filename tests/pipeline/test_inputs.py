"""Plan-time input checks: globs that match nothing, unreadable files, files of the wrong kind."""

import gzip
import os

import pytest

from pipeline.inputs import (
    GZIP_JSON_LINES,
    JSON_LINES,
    MAX_LISTED,
    NONEMPTY_TEXT,
    PARQUET,
    TEXT,
    dir_problem,
    file_problem,
    pattern_problems,
    starts_with,
)


def test_file_problem_names_the_path_and_what_is_wrong(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1....PAR1")
    (tmp_path / "b.parquet").write_bytes(b'{"not": "parquet"}\n')
    assert file_problem(tmp_path / "a.parquet", PARQUET) is None
    assert file_problem(tmp_path / "b.parquet", PARQUET) == (
        f"'{tmp_path}/b.parquet' is not a Parquet file: it starts with b'{{\"not\": \"parquet'")
    assert file_problem(tmp_path / "gone.parquet") == f"'{tmp_path}/gone.parquet' does not exist"
    assert file_problem(tmp_path) == f"'{tmp_path}' is a directory, not a file"
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert file_problem(tmp_path / "empty.parquet", PARQUET).endswith("is not a Parquet file: it is empty")
    assert file_problem(tmp_path / "empty.parquet", starts_with("x", b"X", empty_ok=True)) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_a_problem(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    assert file_problem(path, TEXT) == f"'{path}' cannot be read: Permission denied"


def test_json_lines_checks_the_first_non_empty_line_gzipped_or_not(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('\n{"messages": []}\nnot json, the stage counts it\n')
    bad.write_text("PAR1 binary\n")
    assert file_problem(good, JSON_LINES) is None
    assert "is not a JSON Lines file: its first line is not JSON (Expecting value" in file_problem(bad, JSON_LINES)
    (tmp_path / "good.jsonl.gz").write_bytes(gzip.compress(good.read_bytes()))
    assert file_problem(tmp_path / "good.jsonl.gz", GZIP_JSON_LINES) is None
    assert "is not a gzipped JSON Lines file: Not a gzipped file" in file_problem(good, GZIP_JSON_LINES)
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:30])
    assert "is not a gzipped JSON Lines file: EOFError" in file_problem(tmp_path / "cut.jsonl.gz", GZIP_JSON_LINES)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert file_problem(tmp_path / "blank.jsonl", JSON_LINES).endswith("it holds no line")


def test_text_must_decode_as_utf8(tmp_path):
    (tmp_path / "words.txt").write_bytes("caf\u00e9\n".encode() * 2000)  # 4096 bytes cut inside a character
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    assert file_problem(tmp_path / "words.txt", TEXT) is None
    assert "does not decode as UTF-8 (invalid continuation byte at byte 3)" in file_problem(
        tmp_path / "latin1.txt", TEXT)
    assert file_problem(tmp_path / "empty.txt", TEXT) is None
    assert file_problem(tmp_path / "empty.txt", NONEMPTY_TEXT).endswith("it is empty")


def test_dir_problem(tmp_path):
    (tmp_path / "tok").mkdir()
    assert dir_problem(tmp_path / "tok", ("tokenizer.json",)) == f"'{tmp_path}/tok' has no tokenizer.json"
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    assert dir_problem(tmp_path / "tok", ("tokenizer.json",)) is None
    file = tmp_path / "tok" / "tokenizer.json"
    assert dir_problem(file) == f"'{file}' is a file, not a directory"
    assert dir_problem(tmp_path / "nope") == f"'{tmp_path}/nope' does not exist"


def test_pattern_problems_lists_every_pattern_and_counts_many_bad_files(tmp_path):
    for i in range(MAX_LISTED + 3):
        (tmp_path / f"{i}.parquet").write_text("csv,not,parquet\n")
    (tmp_path / "ok.parquet").write_bytes(b"PAR1")

    def expand(pattern):
        return sorted(str(p) for p in tmp_path.glob(pattern))

    problems = pattern_problems("data.files", ["*.parquet", "none/*.parquet", "ok.parquet"], expand, PARQUET)
    assert [key for key, _ in problems] == ["data.files"] * (MAX_LISTED + 2)
    assert all("is not a Parquet file: it starts with b'csv,not," in m for _, m in problems[:MAX_LISTED])
    assert problems[MAX_LISTED][1] == f"... and 3 more of the {MAX_LISTED + 4} files that '*.parquet' matches"
    assert problems[-1][1] == "'none/*.parquet' matches no file"
