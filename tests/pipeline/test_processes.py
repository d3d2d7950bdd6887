"""pipeline/processes.py: stopping process groups and trees, dying with the parent, the child environment."""

import os
import signal
import subprocess
import sys
import time

from pipeline.processes import (
    child_env,
    descendants,
    group_alive,
    pid_alive,
    terminate_group,
    terminate_tree,
)

# A leader that exits on SIGTERM and a worker that ignores it: what `mlflow ui` (uvicorn workers)
# and vLLM (engine processes) look like to whoever stops them.
STUBBORN_GROUP = "(trap '' TERM; exec sleep 300) & echo $! > {pidfile}; exec sleep 300"


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)
    return predicate()


def test_terminate_group_waits_for_every_member_and_kills_the_stubborn(tmp_path):
    pidfile = tmp_path / "worker.pid"
    leader = subprocess.Popen(["bash", "-c", STUBBORN_GROUP.format(pidfile=pidfile)], start_new_session=True)
    assert _wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip())
    worker = int(pidfile.read_text())
    assert group_alive(leader.pid) and pid_alive(worker)
    t0 = time.monotonic()
    assert terminate_group(leader, grace_s=1, kill_wait_s=5)
    assert leader.returncode == -signal.SIGTERM  # the leader went at once...
    assert time.monotonic() - t0 >= 1  # ...the worker ignored SIGTERM and took the SIGKILL
    assert not group_alive(leader.pid) and not pid_alive(worker)


def test_terminate_group_of_a_group_that_is_gone_returns_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    t0 = time.monotonic()
    assert terminate_group(proc, grace_s=30)
    assert time.monotonic() - t0 < 5


def test_terminate_tree_stops_a_child_and_its_children_in_our_own_group():
    parent = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"])  # no new session
    assert _wait_for(lambda: len(descendants(parent.pid)) == 2)
    children = descendants(parent.pid)
    assert os.getpgid(parent.pid) == os.getpgid(0)  # a group kill would hit this test process too
    assert terminate_tree(parent, grace_s=5)
    assert parent.returncode is not None and not any(pid_alive(c) for c in children)


def test_a_child_started_with_die_with_parent_dies_with_its_parent(tmp_path):
    """The middle process is SIGKILLed (no chance to clean up): its child still gets SIGTERM."""
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "from pipeline.processes import die_with_parent\n"
        "child = subprocess.Popen(['sleep', '300'], preexec_fn=die_with_parent)\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    middle = subprocess.Popen([sys.executable, "-c", code])  # conftest put the repo on PYTHONPATH
    assert _wait_for(lambda: pidfile.is_file() and pidfile.read_text())
    child = int(pidfile.read_text())
    assert pid_alive(child)
    middle.send_signal(signal.SIGKILL)
    middle.wait()
    assert _wait_for(lambda: not pid_alive(child)), "the child outlived its parent"


def test_pid_alive_counts_a_zombie_as_dead():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert _wait_for(lambda: not pid_alive(proc.pid))  # exited, not yet reaped
    assert proc.poll() == 0
    assert not pid_alive(None) and not pid_alive(0)


def test_child_env_puts_the_project_first_once_and_keeps_the_rest():
    base = {"PATH": "/bin", "PYTHONPATH": f"/other{os.pathsep}/proj{os.pathsep}"}
    env = child_env({"X": "1"}, pythonpath=["/proj"], base=base)
    assert env == {"PATH": "/bin", "X": "1", "PYTHONPATH": f"/proj{os.pathsep}/other"}
    assert child_env(base={"A": "b"}) == {"A": "b"}
    assert child_env({"PYTHONPATH": "/x"}, pythonpath=["/p"], base={})["PYTHONPATH"] == f"/p{os.pathsep}/x"


# A worker as pipeline.worker runs it: fork_guard, then the stage (here: a helper that ignores SIGTERM, in a
# session of its own as vLLM's server is, then whatever STAGE says). argv: pid file, grace on stop, STAGE.
GUARDED = """
import os, subprocess, sys, time
from pipeline.processes import fork_guard
fork_guard(stop_grace_s=float(sys.argv[2]), orphan_grace_s=0.5)
helper = subprocess.Popen(["bash", "-c", "trap '' TERM; exec sleep 300"], start_new_session=True)
open(sys.argv[1], "w").write(f"{os.getpid()} {helper.pid}")
exec(sys.argv[3])
"""
# What starts the worker with a parent-death signal, as the local executor does; argv: the worker's argv.
OWNER = """
import subprocess, sys, time
from pipeline.processes import die_with_parent
subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], start_new_session=True, preexec_fn=die_with_parent)
time.sleep(300)
"""


def _guarded(tmp_path, stage: str, grace_s: float = 30.0, owner: bool = False):
    """(the process started, the guard's pid, the stage process's pid, the helper's pid)."""
    pidfile = tmp_path / "pids"
    argv = [GUARDED, str(pidfile), str(grace_s), stage]
    proc = subprocess.Popen([sys.executable, "-c", *([OWNER, *argv] if owner else argv)], start_new_session=True)
    assert _wait_for(lambda: pidfile.is_file() and len(pidfile.read_text().split()) == 2)
    stage_pid, helper = map(int, pidfile.read_text().split())
    guard = proc.pid if not owner else next(p for p in descendants(proc.pid) if stage_pid in descendants(p))
    return proc, guard, stage_pid, helper


def test_fork_guard_stops_everything_when_its_owner_dies_even_in_other_sessions(tmp_path):
    """The owner is SIGKILLed: the guard stops the stage and its helper (own session, ignores SIGTERM) with
    the short orphan grace, not the long stop grace."""
    owner, guard, stage, helper = _guarded(tmp_path, "time.sleep(300)", grace_s=30, owner=True)
    assert os.getpgid(helper) != os.getpgid(stage)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    t0 = time.monotonic()
    assert _wait_for(lambda: not any(map(pid_alive, (guard, stage, helper))), timeout=10)
    assert time.monotonic() - t0 < 2.0


def test_fork_guard_exits_as_its_stage_did_and_leaves_nothing_behind(tmp_path):
    proc, guard, stage, helper = _guarded(tmp_path, "sys.exit(3)", grace_s=0.5)
    assert proc.wait(timeout=20) == 3  # after the helper was stopped: SIGTERM ignored, SIGKILL after 0.5 s
    assert not pid_alive(helper) and not pid_alive(stage)
    proc, guard, stage, helper = _guarded(tmp_path, "os.kill(os.getpid(), 9)", grace_s=0.5)
    assert proc.wait(timeout=20) == -signal.SIGKILL and not pid_alive(helper)


def test_fork_guard_stops_the_tree_on_sigterm_with_the_stop_grace(tmp_path):
    proc, guard, stage, helper = _guarded(tmp_path, "time.sleep(300)", grace_s=1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # a cancel: the guard only, not its group
    assert proc.wait(timeout=20) == -signal.SIGTERM
    assert 1.0 <= time.monotonic() - t0 < 10 and not pid_alive(stage) and not pid_alive(helper)
