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

A stage worker goes one step further (:func:`fork_guard`): it forks, the child runs the stage, and
the parent stays behind as a *guard* that only waits. The guard is a child subreaper, so whatever
the stage starts stays below it even after its own parent is gone, in whatever session or group
(vLLM's server). When the guard is stopped, it stops that whole tree; when its owner dies (the
orchestrator, even by SIGKILL), with a short grace. Why a separate process: a Python signal handler
runs only when the main thread gets back to bytecode, which a stage deep in a C call (a training
step, fastText) may not do for seconds, and a process that dies first cannot clean up after itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger("llmpipe.processes")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PROC = Path("/proc")


def _prctl(option: int, value: int) -> bool:
    """Linux's prctl(2); False where it is not available (another OS) or refused."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn`` of a child: ``sig`` (SIGTERM) to it when the thread that started it dies (Linux; a
    no-op elsewhere)."""
    _prctl(_PR_SET_PDEATHSIG, sig)


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


def live_descendants(pid: int) -> list[int]:
    """:func:`descendants` of ``pid`` that still run (zombies waiting to be reaped do not count)."""
    return [p for p in descendants(pid) if pid_alive(p)]


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


# ---------------------------------------------------------------- the guard of a stage worker

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_LEFTOVER_WAIT_S = 2.0  # what a finished stage leaves (multiprocessing's resource tracker) gets this long to exit
_KILL_WAIT_S = 5.0


def fork_guard(*, stop_grace_s: float, orphan_grace_s: float) -> None:
    """Fork: the caller goes on in the child (it runs the stage); this process stays behind as the
    child's guard, and never returns from here: it exits as the child did, once the child and every
    process below it is gone.

    The guard is a child subreaper (Linux), so everything the stage starts stays below it, even in
    another session (vLLM's server) and after the stage process itself is gone. SIGTERM, SIGINT or
    SIGHUP to the guard (a cancel, or the parent-death signal when its owner dies) stops that whole
    tree: SIGTERM, then SIGKILL after ``stop_grace_s``, or after ``orphan_grace_s`` when the guard's
    parent is gone (nobody waits for the stage any more; a rerun may). Processes that the stage left
    behind when it ended are stopped too. The child gets SIGKILL if the guard is killed outright.

    Open files (a lock) are shared with the child, so they stay open until both are gone. Call it
    before threads exist. Where signals cannot be waited for (not Linux) it returns without forking.
    """
    if not hasattr(signal, "sigtimedwait"):
        return
    parent = os.getppid()
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    watched = {*_STOP_SIGNALS, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)  # taken with sigtimedwait, no handler races
    sys.stdout.flush()
    sys.stderr.flush()
    guard = os.getpid()
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        die_with_parent(signal.SIGKILL)
        if os.getppid() != guard:  # the guard was killed before the line above
            os._exit(128 + signal.SIGKILL)
        return
    _Guard(child, parent, stop_grace_s, orphan_grace_s).run(watched)


class _Guard:
    """The parent side of :func:`fork_guard`."""

    def __init__(self, child: int, parent: int, stop_grace_s: float, orphan_grace_s: float):
        self.child, self.parent = child, parent
        self.stop_grace_s, self.orphan_grace_s = stop_grace_s, orphan_grace_s
        self.status: int | None = None  # the child's wait status, once reaped

    def reap(self) -> bool:
        """Reap every child that ended (the stage process, orphans of the tree handed to us); whether
        any child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.child:
                self.status = status

    def tree(self) -> list[int]:
        """Every process below the guard that still runs. No child left means none at all: a subreaper
        inherits whatever the processes below it leave behind (no /proc walk then, the common case)."""
        return live_descendants(os.getpid()) if self.reap() else []

    def stop(self, grace_s: float, why: str) -> None:
        """SIGTERM to every process below the guard, SIGKILL to what is left after ``grace_s``."""
        if not (tree := self.tree()):
            return
        _say(f"===== {why}: stopping {len(tree)} process(es) of the stage ({' '.join(map(str, tree))}) =====")

        def send(sig: int) -> None:
            for pid in self.tree():  # taken again: a process may have started one meanwhile
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

        _escalate(lambda: bool(self.tree()), send, grace_s, _KILL_WAIT_S, "the stage's processes")

    def run(self, watched: set[int]) -> None:
        stopped_by = None
        while self.status is None:
            info = signal.sigtimedwait(watched, 0.5)
            self.reap()
            if info is not None and info.si_signo != signal.SIGCHLD:
                stopped_by = info.si_signo
                break
        if stopped_by is not None and os.getppid() != self.parent:
            self.stop(self.orphan_grace_s, "the process that started the stage is gone")
        elif stopped_by is not None:
            self.stop(self.stop_grace_s, f"stopped by {signal.Signals(stopped_by).name}")
        else:
            deadline = time.monotonic() + _LEFTOVER_WAIT_S
            while self.tree() and time.monotonic() < deadline:
                time.sleep(0.05)
            grace = self.orphan_grace_s if os.getppid() != self.parent else self.stop_grace_s
            self.stop(grace, "the stage ended and left processes behind")
        deadline = time.monotonic() + _KILL_WAIT_S
        while self.status is None and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        if stopped_by is not None:
            _exit_by_signal(stopped_by)
        if self.status is None:  # the child survived SIGKILL (stuck in the kernel): report that
            os._exit(128 + signal.SIGKILL)
        if os.WIFSIGNALED(self.status):
            _exit_by_signal(os.WTERMSIG(self.status))
        os._exit(os.waitstatus_to_exitcode(self.status))


def _say(line: str) -> None:
    """A line in the stage log (the guard's stderr); nothing when it cannot be written (a full disk)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"{line}\n")
        sys.stderr.flush()


def _exit_by_signal(sig: int) -> None:
    """End this process by ``sig``, so that whoever waits for it sees what the stage process saw."""
    import resource

    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the stage process dumped core already, if any
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal that does not end a process (SIGCHLD...)


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
