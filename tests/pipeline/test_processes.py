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
