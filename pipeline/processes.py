"""Child processes that never outlive their owner: process groups, parent-death signals, environment.

Every long-lived child llmpipe starts (a stage worker, a vLLM server, the MLflow UI) leads its own
process group (``start_new_session=True``), so that stopping it is one signal to the group, which
reaches whatever the child started in turn (launchers, ranks, server workers). A child started with
``preexec_fn=die_with_parent`` also gets SIGTERM when its parent dies, even by SIGKILL.

A child that must stay in its parent's group instead (a training launcher: the worker stops its
whole group on SIGTERM, and DeepSpeed's runner does not forward signals to its ranks) is stopped
with :func:`terminate_tree`, which follows parent links rather than the group.

Both stops escalate the same way: SIGTERM, a grace period, SIGKILL, and they return only when
every process is gone (or SIGKILL's wait ran out), so a port or an output directory is free again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger("llmpipe.processes")

_PR_SET_PDEATHSIG = 1
_PROC = Path("/proc")


def die_with_parent() -> None:
    """``preexec_fn`` of a child: SIGTERM to it when the thread that started it dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stat_fields(pid: int | str) -> list[str] | None:
    """``state ppid pgrp ...`` of a process from /proc (None when it is gone)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:  # exited while we looked
        return None
    return stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs (a zombie waiting to be reaped does not count, where /proc says so)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid) if _PROC.is_dir() else None
    return not (fields and fields[0] in ("Z", "X"))


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies waiting to be reaped do not count)."""
    if not _PROC.is_dir():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), from /proc; [] where there is none."""
    if not _PROC.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group; a group that is gone already is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _escalate(alive: Callable[[], bool], send: Callable[[int], None], grace_s: float, kill_wait_s: float,
              what: str) -> bool:
    """SIGTERM, wait up to ``grace_s``, SIGKILL, wait up to ``kill_wait_s``; True when nothing is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        if not alive():
            return True
        if sig == signal.SIGKILL:
            log.warning("%s still running %.0f s after SIGTERM: killing it", what, grace_s)
        send(sig)
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    if alive():
        log.error("%s survived SIGKILL", what)
        return False
    return True


def terminate_group(proc: subprocess.Popen | int, grace_s: float = 10.0, kill_wait_s: float = 10.0) -> bool:
    """Stop a process group and wait until every member is gone: SIGTERM, then SIGKILL after ``grace_s``.

    ``proc`` is the group leader (a Popen, reaped here, or its pid, which is the group id). Waiting
    for the whole group, not only the leader, matters: a server whose leader exits on SIGTERM may
    leave workers behind that still hold its port or write into its output. Returns True when the
    group is gone.
    """
    popen = proc if isinstance(proc, subprocess.Popen) else None
    pgid = popen.pid if popen is not None else int(proc)

    def alive() -> bool:
        if popen is not None:
            popen.poll()  # reap the leader, so that it does not count as a running member
        return group_alive(pgid)

    return _escalate(alive, lambda sig: signal_group(pgid, sig), grace_s, kill_wait_s, f"process group {pgid}")


def terminate_tree(proc: subprocess.Popen | int, grace_s: float = 10.0, kill_wait_s: float = 10.0) -> bool:
    """Stop a process and all its descendants, for a child that shares its parent's process group.

    The tree is taken when this is called (a descendant whose parent dies is re-parented and could
    no longer be found); SIGTERM goes to every member, SIGKILL to those left after ``grace_s``.
    Returns True when every member is gone.
    """
    popen = proc if isinstance(proc, subprocess.Popen) else None
    pid = popen.pid if popen is not None else int(proc)
    members = [pid, *descendants(pid)]

    def alive() -> bool:
        if popen is not None:
            popen.poll()
        return any(pid_alive(p) for p in members)

    def send(sig: int) -> None:
        for p in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)

    return _escalate(alive, send, grace_s, kill_wait_s, f"process {pid} and its {len(members) - 1} descendant(s)")


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
