"""Where stage outputs live, and how they are committed.

    <root>/<stage>/<stage>-<fingerprint>/           committed output: artifacts, stage_info.json,
                                                    stage.log, metrics.jsonl, _SUCCESS (last file)
    <root>/<stage>/.partial/<stage>-<fingerprint>/  attempt in progress or failed (kept for resume)
    <root>/<stage>/.locks/<stage>-<fingerprint>.lock
    <root>/<stage>/.superseded/...                  outputs replaced by run.force, never deleted

The partial directory is renamed onto the final path in one step after ``_SUCCESS`` is written,
so a final directory exists only complete. A crash leaves only ``.partial``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import LockTimeout
from pipeline.files import fsync_dir, write_json_atomic, write_text_atomic

log = logging.getLogger("llmpipe.store")

SUCCESS = "_SUCCESS"
STAGE_INFO = "stage_info.json"
FAILURE = "_FAILED.json"
LOG_FILE = "stage.log"
METRICS_FILE = "metrics.jsonl"
ATTEMPTS = "_ATTEMPTS"
# Files of an attempt that survive a non-resumable restart: the log and curves of every attempt.
_KEPT_ON_RESTART = {LOG_FILE, METRICS_FILE, ATTEMPTS, FAILURE}


def _write_info(path: Path, data: Any) -> None:
    """stage_info.json and _FAILED.json: sorted, indented, values json cannot encode as strings."""
    write_json_atomic(path, data, indent=2, sort_keys=True, default=str, newline=True)


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    # -- addresses ---------------------------------------------------------------------------
    def final_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / f"{stage}-{fp}"

    def partial_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / ".partial" / f"{stage}-{fp}"

    def artifact(self, stage: str, fp: str, artifact: str) -> Path:
        return self.final_dir(stage, fp) / artifact

    # -- state -------------------------------------------------------------------------------
    def is_done(self, stage: str, fp: str) -> bool:
        return (self.final_dir(stage, fp) / SUCCESS).is_file()

    def info(self, stage: str, fp: str) -> dict[str, Any] | None:
        path = self.final_dir(stage, fp) / STAGE_INFO
        if not (self.final_dir(stage, fp) / SUCCESS).is_file() or not path.is_file():
            return None
        return json.loads(path.read_text())

    def failure(self, stage: str, fp: str) -> dict[str, Any] | None:
        path = self.partial_dir(stage, fp) / FAILURE
        return json.loads(path.read_text()) if path.is_file() else None

    def attempts(self, stage: str, fp: str) -> int:
        path = self.partial_dir(stage, fp) / ATTEMPTS
        return int(path.read_text().strip() or 0) if path.is_file() else 0

    def successes(self, stage: str) -> list[dict[str, Any]]:
        """stage_info of every committed output of ``stage``, oldest first."""
        infos = []
        for d in (self.root / stage).glob(f"{stage}-*"):
            if (d / SUCCESS).is_file() and (d / STAGE_INFO).is_file():
                with contextlib.suppress(ValueError):
                    infos.append(json.loads((d / STAGE_INFO).read_text()))
        return sorted(infos, key=lambda i: i.get("finished_at", 0))

    # -- attempts ----------------------------------------------------------------------------
    def begin_attempt(self, stage: str, fp: str, resumable: bool) -> tuple[Path, int]:
        """Create (or reuse) the partial dir; return it and this attempt's number.

        A non-resumable stage starts from an empty directory, keeping only the previous
        attempts' logs and metrics.
        """
        partial = self.partial_dir(stage, fp)
        partial.mkdir(parents=True, exist_ok=True)
        if not resumable:
            for child in partial.iterdir():
                if child.name not in _KEPT_ON_RESTART:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        (partial / FAILURE).unlink(missing_ok=True)
        attempt = self.attempts(stage, fp) + 1
        (partial / ATTEMPTS).write_text(f"{attempt}\n")
        return partial, attempt

    def record_failure(self, stage: str, fp: str, reason: str, attempt: int) -> None:
        partial = self.partial_dir(stage, fp)
        partial.mkdir(parents=True, exist_ok=True)
        _write_info(partial / FAILURE, {
            "stage": stage, "fingerprint": fp, "reason": reason, "attempt": attempt,
            "failed_at": time.time(), "host": socket.gethostname(),
        })

    def commit(self, stage: str, fp: str, info: dict[str, Any]) -> Path:
        """Write stage_info and _SUCCESS into the partial dir, then rename it into place."""
        partial = self.partial_dir(stage, fp)
        final = self.final_dir(stage, fp)
        (partial / ATTEMPTS).unlink(missing_ok=True)
        (partial / FAILURE).unlink(missing_ok=True)
        _write_info(partial / STAGE_INFO, info)
        write_text_atomic(partial / SUCCESS, f"{info.get('finished_at', time.time())}\n")  # flushes partial too
        if final.exists():  # only with run.force: keep the previous output, never overwrite it
            superseded = self.root / stage / ".superseded" / f"{final.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            superseded.parent.mkdir(parents=True, exist_ok=True)
            os.rename(final, superseded)
            log.info("previous output of %s kept at %s", stage, superseded)
        os.rename(partial, final)
        fsync_dir(final.parent)
        return final

    # -- locking -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, stage: str, fp: str, wait_s: float) -> Iterator[None]:
        """Exclusive lock on one output, so two runs never produce the same fingerprint twice.

        flock works on local disks and on NFSv4/Lustre mounted with flock support.
        """
        path = self.root / stage / ".locks" / f"{stage}-{fp}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            deadline = time.monotonic() + wait_s
            warned = False
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if not warned:
                        f.seek(0)
                        holder = f.read().strip() or "another process"
                        log.warning("%s-%s is being produced by %s; waiting for it", stage, fp, holder)
                        warned = True
                    if time.monotonic() > deadline:
                        raise LockTimeout(f"gave up waiting {wait_s:.0f}s for the lock on {path}") from None
                    time.sleep(0.5)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                f.flush()
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def is_locked(self, stage: str, fp: str) -> bool:
        path = self.root / stage / ".locks" / f"{stage}-{fp}.lock"
        if not path.exists():
            return False
        with open(path) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False
