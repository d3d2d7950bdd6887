"""Runs one stage attempt in its own process: ``python -m pipeline.worker <task.json>``.

The same entry point serves every executor (a local process, a Slurm job). The task file says
which project, stage, config and paths, and carries a ``commit`` section: on success the worker
completes the stage_info the orchestrator prepared and commits the output itself, so that a
stage chained after it finds its inputs committed when it starts, whether or not the orchestrator
is still there. On failure it writes ``_error.json`` into the output dir (:func:`write_error`,
read back by :func:`read_error`) and exits non-zero.

With ``LLMPIPE_SHARD_SLICE`` set, the process is one task of a job array: it runs its share of one
named map over shards and stops (pipeline/sharding.py); nothing is committed.

No orphans, no second writer. The worker takes the output's job lock (``job_lock`` in the task;
pipeline/store.py), then forks (``pipeline.processes.fork_guard``): the child runs the stage, the
parent stays as its guard, holds the lock, and exits only once every process the stage started is
gone, vLLM's server in its own session included. A SIGTERM (a cancel) stops them all with
:data:`STOP_GRACE_S`; the death of whoever started the worker (the orchestrator, even by SIGKILL:
the local executor asks for a parent-death signal) with :data:`ORPHAN_GRACE_S`. A rerun waits for
the job lock before it touches the partial dir.

A full disk is named as such (``pipeline.store.disk_full``), whichever library hit it: the worker
keeps a small reserve file while the stage runs and frees it to write its error report.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline import sharding
from pipeline.files import write_json_atomic
from pipeline.logs import setup_logging
from pipeline.processes import fork_guard
from pipeline.schema import build
from pipeline.secrets import redact_text, register_config
from pipeline.stage import Project, StageContext
from pipeline.store import DiskFull, Store, disk_full, hold_job_lock, release_space, reserve_space

ERROR_FILE = "_error.json"
EXIT_FAILED, EXIT_USAGE = 1, 2
STOP_GRACE_S = 10.0  # a cancelled stage's processes get this long after SIGTERM before SIGKILL
ORPHAN_GRACE_S = 1.0  # ... and this long when the orchestrator that started them is gone
JOB_LOCK_WAIT_S = 600.0  # the run waited for an earlier attempt already; this is for a scheduler's stragglers


def load_project(import_path: str) -> Project:
    module, _, attr = import_path.partition(":")
    project = getattr(importlib.import_module(module), attr)
    if not isinstance(project, Project):
        raise TypeError(f"{import_path} is a {type(project).__name__}, not a pipeline Project")
    return project


def write_error(output_dir: Path, exc: BaseException, message: str | None = None, kind: str | None = None) -> None:
    """Record why the attempt failed (the exception, and its traceback) for the orchestrator.

    Where even that cannot be written (a full disk), it is said on stderr (the stage log, if that
    still takes it) and the orchestrator tells the full disk itself."""
    try:
        write_json_atomic(Path(output_dir) / ERROR_FILE, {
            "type": kind or type(exc).__name__, "message": redact_text(str(exc) if message is None else message),
            "traceback": redact_text(traceback.format_exc()),
        }, indent=2, default=str)
    except OSError as err:
        with contextlib.suppress(OSError, ValueError):
            print(f"pipeline.worker: could not write {Path(output_dir) / ERROR_FILE} ({err}): "
                  f"{kind or type(exc).__name__}: {exc if message is None else message}", file=sys.stderr)


def read_error(output_dir: Path) -> str | None:
    """``"<type>: <message>"`` of the failed attempt in ``output_dir``, or None when it left no error file."""
    path = Path(output_dir) / ERROR_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # cut short (the disk filled up?): say so rather than hide the failure
        return f"unreadable {path}"
    return f"{info.get('type', 'Error')}: {info.get('message', '')}"


def clear_error(output_dir: Path) -> None:
    """Forget an earlier attempt's error before a new attempt starts."""
    (Path(output_dir) / ERROR_FILE).unlink(missing_ok=True)


def run_task(task: dict[str, Any]) -> int:
    output_dir = Path(task["output_dir"])
    shard_slice = sharding.current()
    if shard_slice is None and not task.get("commit"):
        print(f"pipeline.worker: the task of stage '{task.get('stage')}' has no commit section: "
              "only an array task (LLMPIPE_SHARD_SLICE set) runs without one", file=sys.stderr)
        return EXIT_USAGE
    project = load_project(task["project"])
    stage = project.stage(task["stage"])
    config = build(stage.config, task["config"], path=f"stage.{stage.name}")
    ctx = StageContext(
        stage=stage.name,
        fingerprint=task["fingerprint"],
        output_dir=output_dir,
        inputs={ref: Path(p) for ref, p in task["inputs"].items()},
        attempt=task["attempt"],
        log=logging.getLogger(f"llmpipe.{stage.name}"),
        # Array tasks report no curves: their steps would interleave; the final job reports the totals.
        metrics_file=None if shard_slice else Path(task["metrics_file"]),
    )
    started = time.time()
    try:
        if not shard_slice:  # array tasks share the partial dir: the final job reports for them all
            reserve_space(output_dir)
        if shard_slice:
            sharding.begin_prelude(output_dir)
        try:
            metrics = stage.run(config, ctx) or {}
        except sharding.SliceDone as done:
            ctx.log.info("%s", done)
            return 0
        if shard_slice:
            raise RuntimeError(f"stage '{stage.name}' ran as array task {shard_slice.encode()} but returned without "
                               f"reaching its map over shards '{shard_slice.phase}' (it declares shard_phases="
                               f"{stage.shard_phases}): no map_shards(..., phase='{shard_slice.phase}') call ran, "
                               f"nor sharding.end_phase('{shard_slice.phase}')")
        missing = [a for a in stage.outputs if not ctx.output(a).exists()]
        if missing:
            raise RuntimeError(f"stage '{stage.name}' returned without writing its declared outputs {missing}")
        metrics = {k: float(v) for k, v in dict(metrics).items()}
    except BaseException as exc:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        _failed(stage.name, output_dir, exc)
        return EXIT_FAILED
    metrics.setdefault("duration_s", time.time() - started)
    try:
        ctx.log.info("committed %s", commit_output(task, metrics, started))
    except OSError as exc:  # e.g. the shared file system: the output stays in the partial dir
        _failed(stage.name, output_dir, exc, f"commit failed: {exc}")
        return EXIT_FAILED
    return 0


def _failed(stage: str, output_dir: Path, exc: BaseException, message: str | None = None) -> None:
    """Report a failed attempt: a full disk as such (measured before the reserve is given back), with
    the library's own error after it; then the error report and the traceback."""
    full = disk_full(output_dir, exc)
    release_space(output_dir)
    own = f"{type(exc).__name__}: {exc if message is None else message}"
    if full:
        write_error(output_dir, exc, f"{full}; stage '{stage}' failed with {own}", kind=DiskFull.__name__)
    else:
        write_error(output_dir, exc, message)
    with contextlib.suppress(OSError, ValueError):
        traceback.print_exc()
        if full:
            print(f"pipeline.worker: {full}: stage '{stage}' failed with {own}", file=sys.stderr)


def commit_output(task: dict[str, Any], metrics: dict[str, float], started: float) -> Path:
    """Complete the stage_info the orchestrator prepared with what only the job knows, and commit."""
    from pipeline.provenance import host

    commit = task["commit"]
    finished = time.time()
    info = dict(commit["info"])
    info.update({
        "started_at": started, "finished_at": finished, "duration_s": finished - started, "host": host(),
        "finished_at_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
        "metrics": metrics,
    })
    executor = dict(info.get("executor", {}))
    executor.update({name.lower(): os.environ[name] for name in commit.get("record_env", ()) if name in os.environ})
    info["executor"] = executor
    (Path(task["output_dir"]) / sharding.LOCK_FILE).unlink(missing_ok=True)  # the array tasks are over
    return Store(Path(commit["root"])).commit(task["stage"], task["fingerprint"], info)  # gives the reserve back


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.worker TASK.json", file=sys.stderr)
        return EXIT_USAGE
    task = json.loads(Path(argv[0]).read_text())
    job_lock = None
    if task.get("job_lock"):  # held by the guard and the stage alike: released when the last of them is gone
        job_lock = hold_job_lock(task["job_lock"], shared=sharding.current() is not None, wait_s=JOB_LOCK_WAIT_S)
    fork_guard(stop_grace_s=STOP_GRACE_S, orphan_grace_s=ORPHAN_GRACE_S)  # returns in the stage process only
    setup_logging(stream=sys.stdout)
    register_config(task["config"])  # the stage's own secrets are masked in its log and error reports too
    code = run_task(task)
    del job_lock  # open until here, in the guard until everything is gone
    return code


if __name__ == "__main__":
    sys.exit(main())
