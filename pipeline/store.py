"""Where stage outputs live, and how they are committed.

    <root>/<stage>/<stage>-<fingerprint>/           committed output: artifacts, stage_info.json,
                                                    stage.log, metrics.jsonl, _SUCCESS (last file)
    <root>/<stage>/.partial/<stage>-<fingerprint>/  attempt in progress or failed (kept for resume)
    <root>/<stage>/.locks/<stage>-<fingerprint>.lock       held by the run that produces the output
    <root>/<stage>/.locks/<stage>-<fingerprint>.job.lock   held by the stage's processes (the jobs)
    <root>/<stage>/.superseded/...                  outputs replaced by run.force, never deleted

The partial directory is renamed onto the final path in one step after ``_SUCCESS`` is written,
so a final directory exists only complete. A crash leaves only ``.partial``.

Two locks, because a stage's processes may outlive the run that started them for a moment (a
killed orchestrator's stage takes up to a second to stop) or for long (Slurm jobs carry on): the
run's lock says which run produces an output; the job lock, taken by the stage's worker and held
until its last process is gone, says that something still writes into the partial dir. A run
waits for both before it starts a new attempt there.

An attempt's record in the partial dir: ``_ATTEMPTS`` (its number, written when it begins) and,
when it ends without committing, ``_FAILED.json``. An attempt that began and has neither a failure
record nor a lock holder was *interrupted*: its orchestrator was killed or its machine lost.

A full disk: the worker keeps a small reserve file in the partial dir while the stage runs, and
frees it to write its error report (``_RESERVE``); :func:`disk_full` tells a full disk behind
whatever error a library raised; recording a failure degrades to a logged message when even that
cannot be written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import LlmpipeError, LockTimeout
from pipeline.files import fsync_dir, write_json_atomic, write_text_atomic
from pipeline.secrets import redact_text

log = logging.getLogger("llmpipe.store")

SUCCESS = "_SUCCESS"
STAGE_INFO = "stage_info.json"
FAILURE = "_FAILED.json"
LOG_FILE = "stage.log"
METRICS_FILE = "metrics.jsonl"
ATTEMPTS = "_ATTEMPTS"
RESERVE = "_RESERVE"  # room kept by the running worker for its error report (see disk_full)
RESERVE_BYTES = 256 * 1024  # an error report with a long traceback, the failure record and the log's last lines
# Files of an attempt that survive a non-resumable restart: the log and curves of every attempt.
_KEPT_ON_RESTART = {LOG_FILE, METRICS_FILE, ATTEMPTS, FAILURE}
# flock errors of a file system that cannot lock (NFS without lockd, Lustre mounted without flock).
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# numpy's and Python's words for a write the file system cut short: "96512 requested and 26624 written".
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
NEARLY_FULL_BYTES = 64 * 1024 * 1024  # below this much free space (or 1% of the file system) it counts as full


class DiskFull(LlmpipeError):
    """A stage (or the orchestrator) could not write because the file system is full."""


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

    def interrupted(self, stage: str, fp: str) -> int | None:
        """The number of the last attempt if it was interrupted: it began, and neither committed,
        recorded a failure, nor runs still (no run or job holds its locks); else None."""
        if self.is_done(stage, fp) or (self.partial_dir(stage, fp) / FAILURE).is_file():
            return None
        attempt = self.attempts(stage, fp)
        return attempt if attempt and not self.is_running(stage, fp) else None

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

    def abandon_attempt(self, stage: str, fp: str, attempt: int) -> None:
        """Take back an attempt that never started (its job was cancelled while it waited for another),
        so that it counts neither as interrupted nor in the attempt numbers."""
        path = self.partial_dir(stage, fp) / ATTEMPTS
        if self.attempts(stage, fp) != attempt:
            return
        try:
            if attempt > 1:
                path.write_text(f"{attempt - 1}\n")
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: could not take back attempt %d in %s: %s", stage, attempt, path, exc)

    def record_failure(self, stage: str, fp: str, reason: str, attempt: int) -> bool:
        """Write the failure record; False (and an error logged) when it cannot be written (a full
        disk): the run goes on, and the attempt then shows as interrupted."""
        partial = self.partial_dir(stage, fp)
        try:
            partial.mkdir(parents=True, exist_ok=True)
            _write_info(partial / FAILURE, {
                "stage": stage, "fingerprint": fp, "reason": redact_text(reason), "attempt": attempt,
                "failed_at": time.time(), "host": socket.gethostname(),
            })
        except OSError as exc:
            full = disk_full(partial, exc)
            log.error("%s: could not record the failure of attempt %d in %s (%s): %s", stage, attempt,
                      partial / FAILURE, full or exc, reason)
            return False
        return True

    def commit(self, stage: str, fp: str, info: dict[str, Any]) -> Path:
        """Write stage_info and _SUCCESS into the partial dir, then rename it into place."""
        partial = self.partial_dir(stage, fp)
        final = self.final_dir(stage, fp)
        release_space(partial)  # the worker's reserve: room for stage_info.json, and not part of the output
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
    def lock_path(self, stage: str, fp: str) -> Path:
        return self.root / stage / ".locks" / f"{stage}-{fp}.lock"

    def job_lock_path(self, stage: str, fp: str) -> Path:
        return self.root / stage / ".locks" / f"{stage}-{fp}.job.lock"

    @contextlib.contextmanager
    def lock(self, stage: str, fp: str, wait_s: float) -> Iterator[None]:
        """Exclusive lock on one output, so two runs never produce the same fingerprint twice.

        flock works on local disks and on NFSv4/Lustre mounted with flock support.
        """
        path = self.lock_path(stage, fp)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            _flock(f, fcntl.LOCK_EX, wait_s, f"{stage}-{fp} is being produced by {{holder}}; waiting for it")
            _write_holder(f)
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                f.flush()
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def wait_for_jobs(self, stage: str, fp: str, wait_s: float) -> None:
        """Return once no process of an earlier attempt holds the output's job lock: a killed run's
        stage that is still stopping, or a job the scheduler has not ended yet. LockTimeout after ``wait_s``."""
        path = self.job_lock_path(stage, fp)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            if _flock(f, fcntl.LOCK_EX, wait_s, f"{stage}-{fp}: the processes of an earlier attempt ({{holder}}) "
                                                  "still run; waiting for them to end"):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def is_locked(self, stage: str, fp: str) -> bool:
        """Whether a run holds the output's lock."""
        return _held(self.lock_path(stage, fp))

    def is_running(self, stage: str, fp: str) -> bool:
        """Whether a run produces the output, or processes of an attempt still run."""
        return self.is_locked(stage, fp) or _held(self.job_lock_path(stage, fp), fcntl.LOCK_EX)


def hold_job_lock(path: Path | str, *, shared: bool, wait_s: float) -> IO | None:
    """Take an output's job lock for this process and what it forks (the stage worker, before it
    starts the stage): exclusive for the job that commits, shared for the tasks of a job array.
    Keep the returned file open for as long as the stage's processes run; None when the file
    system cannot lock (a warning is logged, and the stage runs without it)."""
    f = open(path, "a+")  # noqa: SIM115 - held by the caller until its processes are gone
    try:
        if not _flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, wait_s,
                      f"{path}: the processes of an earlier attempt ({{holder}}) still run; waiting for them to end"):
            f.close()
            return None
        if not shared:
            with contextlib.suppress(OSError):  # who holds it, for a waiting run; a full disk is no reason to fail
                _write_holder(f)
    except BaseException:
        f.close()
        raise
    return f


def _flock(f: IO, mode: int, wait_s: float, waiting: str) -> bool:
    """flock ``f`` (``mode``: LOCK_EX or LOCK_SH), logging ``waiting`` (with ``{holder}`` filled in from
    the file) once if it has to wait; LockTimeout after ``wait_s``. False where the file system
    cannot lock at all (logged)."""
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        try:
            fcntl.flock(f.fileno(), mode | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in _NO_LOCKING:
                log.warning("cannot lock %s on this file system (%s): going on without the lock", f.name, exc)
                return False
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if not warned:
            f.seek(0)
            log.warning("%s", waiting.replace("{holder}", f.read().strip() or "another process"))
            warned = True
        if time.monotonic() > deadline:
            raise LockTimeout(f"gave up waiting {wait_s:.0f}s for the lock on {f.name}") from None
        time.sleep(0.2)


def _write_holder(f: IO) -> None:
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()


def _held(path: Path, mode: int = fcntl.LOCK_SH) -> bool:
    """Whether some process holds a lock on ``path`` that conflicts with ``mode``: LOCK_SH sees an
    exclusive holder, LOCK_EX shared ones too (the tasks of a job array; it needs a writable file
    where flock is emulated, NFS)."""
    try:
        f = open(path, "r+" if mode == fcntl.LOCK_EX else "r")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    except PermissionError:  # someone else's run root: a shared lock still sees an exclusive holder
        f, mode = open(path), fcntl.LOCK_SH  # noqa: SIM115
    with f:
        try:
            fcntl.flock(f.fileno(), mode | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno not in _NO_LOCKING
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


# -- a full disk -------------------------------------------------------------------------------
def free_bytes(path: Path | str) -> tuple[int, int] | None:
    """(bytes free to us, size) of the file system holding ``path`` (its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full(path: Path | str, exc: BaseException | None = None) -> str | None:
    """``"disk full: <path> has N bytes free"`` when ``exc`` (or an exception behind it) says the disk or
    quota is full (ENOSPC, EDQUOT, a short write), or when the file system of ``path`` (or of the file
    ``exc`` names) is nearly full: under 1% of it free, and under 64 MiB. Else None.

    Libraries do not always say it: fastText saves a cut-short model without a word and fails
    later to read it ("Vector::mul: size mismatch"), numpy says "96512 requested and 26624 written".
    So any failure is checked against the free space, as close to the failure as can be (the worker
    does it before freeing its reserve).
    """
    paths = [Path(path)]
    said, what = False, "disk full"
    for e in _causes(exc):
        if isinstance(e, OSError) and (e.errno in _DISK_FULL or _SHORT_WRITE.search(str(e))):
            said = True
            what = "disk quota exceeded" if e.errno == errno.EDQUOT else what
            if e.filename and isinstance(e.filename, (str, os.PathLike)):
                paths.insert(0, Path(e.filename))
    for where in paths:
        space = free_bytes(where)
        if space is None:
            continue
        free, size = space
        if said or free < min(NEARLY_FULL_BYTES, size // 100):
            return f"{what}: {where} has {free} bytes free (of {size / 2**20:.1f} MiB)"
    return f"{what}: {paths[0]}" if said else None


def reserve_space(directory: Path | str) -> None:
    """Keep RESERVE_BYTES in ``directory`` for the report of a failure on a full disk (real bytes:
    a sparse or zero-filled file may take no room on a compressing file system). OSError when even
    that does not fit."""
    path = Path(directory) / RESERVE
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(RESERVE_BYTES))
    except OSError:
        path.unlink(missing_ok=True)
        raise


def release_space(directory: Path | str) -> None:
    """Give the reserve back (before the error report is written, or the output is committed)."""
    (Path(directory) / RESERVE).unlink(missing_ok=True)
