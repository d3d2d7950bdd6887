"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Every writer in llmpipe that publishes a file another process (or a later attempt) may read goes
through here: write to a temporary sibling, flush it to disk, rename it onto the final name, and
flush the directory entry. A crash at any point leaves either the old content or the new one, plus
at most a ``.<name>.<pid>.tmp`` sibling that the next write replaces.

    write_json_atomic(path, data, indent=2)         # small files
    with atomic_path(dest) as tmp:                  # anything a library writes: a parquet file,
        model.save_pretrained(tmp)                  # a model directory, a numpy array...
    tmp = temp_sibling(dest); ...; publish(tmp, dest)   # a file written piece by piece over time
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        _fsync(path)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(Path(root) / name)
            fsync_dir(root)
    else:
        _fsync(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_sibling(path: Path | str) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under (hidden, per process); its folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def publish(tmp: Path | str, path: Path | str, *, fsync: bool = True) -> None:
    """Rename a finished temporary file or directory onto ``path``, flushing it to disk first
    (unless ``fsync=False``). For writers that stream into :func:`temp_sibling` over a longer span
    than a ``with`` block; everything else uses :func:`atomic_path`. A directory replaces an
    existing one: the old one is moved aside, the new one renamed in, the old one deleted."""
    tmp, path = Path(tmp), Path(path)
    if fsync:
        _fsync_tree(tmp)
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path | str, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file, or a directory the caller creates);
    when the block succeeds, publish it under ``path`` (:func:`publish`).

    The temporary is flushed to disk first (every file of a directory) unless ``fsync=False``
    (scratch files no other process relies on). When the block raises, the temporary is removed
    and ``path`` is left as it was.
    """
    tmp = temp_sibling(path)
    _remove(tmp)
    try:
        yield tmp
        publish(tmp, path, fsync=fsync)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(path: Path | str, data: bytes, *, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path | str, text: str, *, fsync: bool = True) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(path: Path | str, data: Any, *, indent: int | None = None, sort_keys: bool = False,
                      default: Any = None, ensure_ascii: bool = True, newline: bool = False,
                      fsync: bool = True) -> None:
    """``json.dumps(data, ...)`` (plus a final newline if asked) written atomically. The formatting
    arguments are json's own, so a file keeps its exact bytes when its writer moves here."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=ensure_ascii)
    write_text_atomic(path, text + ("\n" if newline else ""), fsync=fsync)
