"""Child processes that never outlive their owner: process groups, parent-death signals, environment.

Every long-lived child llmpipe starts (a stage worker, a vLLM server, the MLflow UI) leads its own
process group (``start_new_session=True``), so that stopping it is one signal to the group, which
reaches whatever the child started in turn (launchers, ranks, server workers). A child started with
``preexec_fn=die_with_parent`` also gets SIGTERM when its parent dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` of a child: SIGTERM to it when the thread that started it dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group; a group that is gone already is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def terminate_group(proc: subprocess.Popen | int, grace_s: float = 10.0, kill_wait_s: float = 10.0) -> bool:
    """Stop a process group and wait until every member is gone: SIGTERM, then SIGKILL after ``grace_s``.

    ``proc`` is the group leader (a Popen, reaped here, or its pid, which is the group id). Waiting
    for the whole group, not only the leader, matters: a server whose leader exits on SIGTERM may
    leave workers behind that still hold its port or write into its output. Returns True when the
    group is gone.
    """
    popen = proc if isinstance(proc, subprocess.Popen) else None
    pgid = popen.pid if popen is not None else int(proc)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        if not _alive(popen, pgid):
            return True
        signal_group(pgid, sig)
        deadline = time.monotonic() + wait_s
        while _alive(popen, pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    return not _alive(popen, pgid)


def _alive(popen: subprocess.Popen | None, pgid: int) -> bool:
    if popen is not None:
        popen.poll()  # reap the leader, so that it does not count as a running member
    return group_alive(pgid)


def child_env(extra: Mapping[str, str] | None = None, *, pythonpath: Iterable[Path | str] = (),
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: ``base`` (default: this process's), then ``extra``, with
    ``pythonpath`` entries put in front of PYTHONPATH (so that a child finds the project's modules
    whatever its working directory)."""
    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    front = [str(p) for p in pythonpath]
    if front:
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in front]
        env["PYTHONPATH"] = os.pathsep.join([*front, *rest])
    return env
