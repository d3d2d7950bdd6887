"""Content digests of the files and folders a stage reads from outside the pipeline, for fingerprints.

An outside input (a data file, a base model dir, a tokenizer, a classifier) is part of a stage's
fingerprint by what it holds, not by its name or its date: editing one line of an SFT file re-runs
sft, touching or copying it does not. Hashing a multi-GB model dir on every ``plan`` would be slow,
so a digest is kept in a small SQLite cache keyed by the file's real path, size, mtime and inode; a
file whose stat is unchanged is not read again. The cache is shared by every project of a user
(``$LLMPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmpipe``, else ``~/.cache/llmpipe``); losing it only
costs one re-read. A file rewritten in the same nanosecond with the same size would be missed, as in
make and rsync's quick check.

    content_digest("data/chat.jsonl")        # "xxh3_128:9f0c..." of the bytes
    content_digest("models/base")            # one digest over every file's relative path and digest

The digest is xxh3-128 (pipeline/files.py measured it at 0.25 s/GiB): it tells content apart, it does
not guard against an adversary. Light module: no third-party import until a file is hashed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline.files import HASHES, file_hash

ALGORITHM = HASHES[0]
MISSING = "missing"
_SCHEMA = ("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
           "inode INTEGER, digest TEXT)")
_lock = threading.Lock()


def cache_dir() -> Path:
    if env := os.environ.get("LLMPIPE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmpipe"


@contextlib.contextmanager
def _cache() -> Iterator[sqlite3.Connection | None]:
    """The digest cache, or None where it cannot be opened (read-only home): digests are then computed."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(folder / "content-digests.sqlite", timeout=30)
    except (OSError, sqlite3.Error):
        yield None
        return
    try:
        db.execute(_SCHEMA)
        yield db
        db.commit()
    except sqlite3.Error:  # a damaged or locked cache costs speed, never a wrong digest
        yield None
    finally:
        db.close()


def _file_digest(path: Path, db: sqlite3.Connection | None) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    if db is not None:
        row = db.execute("SELECT size, mtime_ns, inode, digest FROM digests WHERE path = ?", (real,)).fetchone()
        if row and tuple(row[:3]) == key:
            return row[3]
    digest = f"{ALGORITHM}:{file_hash(real, ALGORITHM)}"
    if db is not None:
        db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", (real, *key, digest))
    return digest


def _dir_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (symlinks followed: a hub snapshot links into its blobs), sorted;
    hidden entries (``.cache/``, ``.git/``, editor files) left out."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder) / f for f in files if not f.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def content_digest(path: Path | str) -> str:
    """The digest of a file's bytes, or of a folder's files (relative paths and digests); ``"missing"``
    when nothing is there (``plan`` still works; the stage's preflight names the problem)."""
    p = Path(path)
    with _lock, _cache() as db:
        if p.is_file():
            return _file_digest(p, db)
        if not p.is_dir():
            return MISSING
        from pipeline.files import _hasher

        h = _hasher(ALGORITHM)
        for f in _dir_files(p):
            h.update(f"{f.relative_to(p).as_posix()}\0{_file_digest(f, db)}\n".encode())
        return f"{ALGORITHM}:{h.hexdigest()}"

