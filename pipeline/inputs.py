"""Plan-time checks of the files a stage reads from outside the pipeline: does a glob match, can a file
be read, does it start like a file of the expected kind.

A stage that finds a bad input only when it runs fails late: after the run root, the output locks,
the tracking journal and the MLflow store exist, after the stages before it have run, and with a
traceback. So a stage may name a check of its outside inputs (``Stage.preflight``), built from the
helpers here; ``llmpipe plan`` and ``llmpipe run`` call it for every stage that would run, before
anything runs or is created, and report every problem at once (:func:`pipeline.plan.check_inputs`).

The checks are cheap on purpose, so that planning stays fast over thousands of input files: a stat
and the first bytes (or the first line) of each file, never a full parse. They do not replace the
stage's own checks, which stay for a file that changes or vanishes between plan and run. Paths are
read as the stage reads them: relative ones against the project folder (the working directory of
``plan``, ``run`` and the stage processes). URLs are the stage's to check: planning does not touch
the network.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

Problem = tuple[str, str]  # (config key relative to the stage, what is wrong, naming the path)

GZIP_MAGIC = b"\x1f\x8b"
MAX_LISTED = 5  # bad files listed per pattern; the rest are counted (a wrong folder may hold thousands)
FIRST_LINE_LIMIT = 16 << 20  # a first JSON line longer than this is not parsed (it is accepted)
_HEAD = 16  # bytes of a file shown when it is not of the expected kind


@dataclass(frozen=True)
class Kind:
    """What a file must look like. ``test`` reads the start of the file, open in binary mode at
    offset 0, and returns None when it is of this kind, else why not ("it starts with b'PK'")."""

    name: str  # for messages: "a WARC file", "a Parquet file"
    test: Callable[[IO[bytes]], str | None]


def starts_with(name: str, *magics: bytes, empty_ok: bool = False) -> Kind:
    """A kind told by its magic bytes (any of ``magics``)."""

    def test(f: IO[bytes]) -> str | None:
        head = f.read(max(_HEAD, *map(len, magics)))
        if not head:
            return None if empty_ok else "it is empty"
        return None if head.startswith(magics) else f"it starts with {head[:_HEAD]!r}"

    return Kind(name, test)


def _first_json_line(gzipped: bool) -> Callable[[IO[bytes]], str | None]:
    def test(f: IO[bytes]) -> str | None:
        stream: IO[bytes] = gzip.GzipFile(fileobj=f) if gzipped else f
        while line := stream.readline(FIRST_LINE_LIMIT):
            if len(line) == FIRST_LINE_LIMIT and not line.endswith(b"\n"):
                return None  # a huge first record: parsing it is the stage's job
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                    return f"its first line is not JSON ({exc})"
                return None
        return "it holds no line"

    return test


def _utf8_text(empty_ok: bool) -> Callable[[IO[bytes]], str | None]:
    def test(f: IO[bytes]) -> str | None:
        head = f.read(4096)
        if not head and not empty_ok:
            return "it is empty"
        try:  # not final: the read may end inside a multi-byte character
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as exc:
            return f"it does not decode as UTF-8 ({exc.reason} at byte {exc.start})"
        return None

    return test


PARQUET = starts_with("a Parquet file", b"PAR1")
JSON_LINES = Kind("a JSON Lines file", _first_json_line(gzipped=False))
GZIP_JSON_LINES = Kind("a gzipped JSON Lines file", _first_json_line(gzipped=True))
TEXT = Kind("a UTF-8 text file", _utf8_text(empty_ok=True))
NONEMPTY_TEXT = Kind("a UTF-8 text file", _utf8_text(empty_ok=False))


def file_problem(path: str | Path, kind: Kind | None = None) -> str | None:
    """None when ``path`` is a readable file (of ``kind``, when given); else what is wrong, naming it."""
    p = Path(path)
    try:
        if not p.exists():
            return f"{str(path)!r} does not exist"
        if not p.is_file():
            return f"{str(path)!r} is {'a directory' if p.is_dir() else 'not a regular file'}, not a file"
        with open(p, "rb") as f:
            if kind is None:
                f.read(1)  # readable is all that is asked
                return None
            reason = kind.test(f)
    except gzip.BadGzipFile as exc:  # an OSError, but about the content
        reason = str(exc)
    except (EOFError, ValueError, zlib.error) as exc:  # a cut-off or corrupt gzip stream
        reason = f"{type(exc).__name__}: {exc}"
    except OSError as exc:  # permissions, an I/O error
        return f"{str(path)!r} cannot be read: {exc.strerror or exc}"
    return f"{str(path)!r} is not {kind.name}: {reason}" if reason and kind else None


def dir_problem(path: str | Path, required: Sequence[str] = ()) -> str | None:
    """None when ``path`` is a directory holding every file in ``required``; else what is wrong."""
    p = Path(path)
    if not p.is_dir():
        return f"{str(path)!r} {'is a file, not a directory' if p.exists() else 'does not exist'}"
    missing = [name for name in required if not (p / name).is_file()]
    if missing:
        return f"{str(path)!r} has no {', '.join(missing)}"
    return None


def pattern_problems(key: str, patterns: Iterable[str], expand: Callable[[str], Sequence[str | Path]],
                     kind: Kind | None = None) -> list[Problem]:
    """Every pattern must match at least one file (``expand`` is the stage's own expansion of a path,
    glob or folder), and every match be a readable file of ``kind``. Bad files are listed up to
    MAX_LISTED per pattern, then counted."""
    problems: list[Problem] = []
    for pattern in patterns:
        matches = expand(pattern)
        if not matches:
            problems.append((key, f"{pattern!r} matches no file"))
            continue
        bad = [problem for problem in (file_problem(m, kind) for m in matches) if problem]
        problems += [(key, problem) for problem in bad[:MAX_LISTED]]
        if len(bad) > MAX_LISTED:
            problems.append((key, f"... and {len(bad) - MAX_LISTED} more of the {len(matches)} files that "
                                  f"{pattern!r} matches"))
    return problems
