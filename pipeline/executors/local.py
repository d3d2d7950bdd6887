"""Runs a stage attempt as a child process on this machine.

A child process keeps heavy imports (torch, vllm) out of the orchestrator, lets the DeepSpeed
launcher spawn its ranks, and lets us kill the whole process group on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.executors.base import Task, TaskResult
from pipeline.worker import ERROR_FILE, EXIT_NOT_IMPLEMENTED, RESULT_FILE


class LocalExecutor:
    echo: bool = True  # also print the stage's output on the console, prefixed with its name

    def run(self, task: Task, on_tick: Callable[[], None]) -> TaskResult:
        task_file = task.output_dir / "_task.json"
        task_file.write_text(json.dumps(task.to_json(), indent=2))
        for name in (RESULT_FILE, ERROR_FILE):
            (task.output_dir / name).unlink(missing_ok=True)
        env = {**os.environ, **task.env}
        if task.cwd:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(task.cwd), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "pipeline.worker", str(task_file)]
        with open(task.log_file, "ab") as log:
            log.write(f"\n===== {task.stage} attempt {task.attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"=====\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    cwd=task.cwd, start_new_session=True, preexec_fn=_die_with_parent)
            pump = threading.Thread(target=self._pump, args=(proc, log, task.stage), daemon=True)
            pump.start()
            try:
                while proc.poll() is None:
                    time.sleep(0.2)
                    on_tick()
            except BaseException:
                terminate_group(proc)
                raise
            finally:
                pump.join(timeout=5)
            on_tick()
        return _result(task, proc.returncode)

    def _pump(self, proc: subprocess.Popen, log, stage: str) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            log.write(line)
            log.flush()
            if self.echo:
                sys.stderr.write(f"[{stage}] {line.decode(errors='replace')}")
                sys.stderr.flush()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the orchestrator dies (even by SIGKILL), so no stage keeps
    writing into a partial directory that a later run will reuse."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: Ctrl-C handling still stops the group
        pass


def terminate_group(proc: subprocess.Popen, grace_s: float = 10.0, kill_wait_s: float = 10.0) -> None:
    """Stop a stage process and everything it started (its process group): SIGTERM, then SIGKILL
    after ``grace_s``. Used by every executor that runs the worker as a child process."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _result(task: Task, returncode: int) -> TaskResult:
    out = Path(task.output_dir)
    if returncode == 0 and (out / RESULT_FILE).is_file():
        metrics = json.loads((out / RESULT_FILE).read_text())
        (out / RESULT_FILE).unlink()
        (out / "_task.json").unlink(missing_ok=True)
        return TaskResult(ok=True, metrics=metrics)
    error = f"exit code {returncode}"
    if returncode < 0:
        error = f"killed by signal {signal.Signals(-returncode).name}"
    if (out / ERROR_FILE).is_file():
        info = json.loads((out / ERROR_FILE).read_text())
        error = f"{info['type']}: {info['message']}"
    return TaskResult(ok=False, metrics={}, error=error, not_implemented=returncode == EXIT_NOT_IMPLEMENTED)
