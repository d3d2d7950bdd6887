"""Following files that a stage's job appends to, while the job itself moves them.

The runner echoes a running stage's log and forwards its metrics records to tracking as they are
written. The job commits its own output (partial dir renamed onto the final one) while it may
still be writing, so a tail follows the file through that rename.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class LogTail:
    """Reads what was appended to a file since the last call, and follows it when a job commits:
    ``path`` (in the partial dir) is read first; once it is gone, ``moved_to`` (the same file after
    the rename, recognised by its inode, or created since this tail started) at the same offset.
    An older file at ``moved_to`` (the output a forced run replaces) is never read. Only complete
    lines are returned."""

    def __init__(self, path: Path, moved_to: Path | None = None):
        self.path, self.moved_to = path, moved_to
        self.started = time.time()
        stat = _stat(path)
        self.inode, self.offset = (stat.st_ino, stat.st_size) if stat else (None, 0)

    def _current(self) -> Path | None:
        if self.path.exists():
            return self.path
        stat = _stat(self.moved_to) if self.moved_to else None
        if stat and (stat.st_ino == self.inode or (self.inode is None and stat.st_mtime >= self.started)):
            return self.moved_to
        return None

    def lines(self) -> list[str]:
        path = self._current()
        if path is None:
            return []
        try:
            with open(path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if self.inode not in (None, inode):  # a new file in the partial dir (a restarted attempt)
                    self.offset = 0
                self.inode = inode
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:  # renamed between the two calls: the next poll reads the new path
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


class MetricsTail(LogTail):
    """Follows a stage's metrics.jsonl and forwards new records, so curves appear while it runs."""

    def __init__(self, path: Path, sink: Callable[[list[dict[str, Any]]], None], moved_to: Path | None = None):
        super().__init__(path, moved_to)
        self.sink = sink

    def poll(self) -> None:
        records = [json.loads(line) for line in self.lines() if line.strip()]
        if records:
            self.sink(records)
