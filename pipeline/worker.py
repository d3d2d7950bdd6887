"""Runs one stage attempt in its own process: ``python -m pipeline.worker <task.json>``.

The same entry point serves every executor (a local process, a Slurm job). The task file says
which project, stage, config and paths, and carries a ``commit`` section: on success the worker
completes the stage_info the orchestrator prepared and commits the output itself, so that a
stage chained after it finds its inputs committed when it starts, whether or not the orchestrator
is still there. On failure it writes ``_error.json`` into the output dir (:func:`write_error`,
read back by :func:`read_error`) and exits non-zero.

With ``LLMPIPE_SHARD_SLICE`` set, the process is one task of a job array: it runs its share of one
named map over shards and stops (pipeline/sharding.py); nothing is committed.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline import sharding
from pipeline.files import write_json_atomic
from pipeline.logs import setup_logging
from pipeline.processes import signal_group
from pipeline.schema import build
from pipeline.stage import Project, StageContext

ERROR_FILE = "_error.json"
EXIT_FAILED, EXIT_USAGE = 1, 2


def load_project(import_path: str) -> Project:
    module, _, attr = import_path.partition(":")
    project = getattr(importlib.import_module(module), attr)
    if not isinstance(project, Project):
        raise TypeError(f"{import_path} is a {type(project).__name__}, not a pipeline Project")
    return project


def write_error(output_dir: Path, exc: BaseException, message: str | None = None) -> None:
    """Record why the attempt failed (the exception, and its traceback) for the orchestrator."""
    write_json_atomic(Path(output_dir) / ERROR_FILE, {
        "type": type(exc).__name__, "message": str(exc) if message is None else message,
        "traceback": traceback.format_exc(),
    }, indent=2, default=str)


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
                               f"{stage.shard_phases}): no map_shards(..., phase='{shard_slice.phase}') call ran")
        missing = [a for a in stage.outputs if not ctx.output(a).exists()]
        if missing:
            raise RuntimeError(f"stage '{stage.name}' returned without writing its declared outputs {missing}")
        metrics = {k: float(v) for k, v in dict(metrics).items()}
    except BaseException as exc:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        write_error(output_dir, exc)
        traceback.print_exc()
        return EXIT_FAILED
    metrics.setdefault("duration_s", time.time() - started)
    try:
        ctx.log.info("committed %s", commit_output(task, metrics, started))
    except OSError as exc:  # e.g. the shared file system: the output stays in the partial dir
        write_error(output_dir, exc, f"commit failed: {exc}")
        traceback.print_exc()
        return EXIT_FAILED
    return 0


def commit_output(task: dict[str, Any], metrics: dict[str, float], started: float) -> Path:
    """Complete the stage_info the orchestrator prepared with what only the job knows, and commit."""
    from pipeline.provenance import host
    from pipeline.store import Store

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
    return Store(Path(commit["root"])).commit(task["stage"], task["fingerprint"], info)


def _stop_group(signum: int, frame: Any) -> None:
    """SIGTERM stops the stage and everything it started (launchers, ranks, servers): the worker
    leads its own process group."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal_group(os.getpgid(0), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.worker TASK.json", file=sys.stderr)
        return EXIT_USAGE
    task = json.loads(Path(argv[0]).read_text())
    setup_logging(stream=sys.stdout)
    signal.signal(signal.SIGTERM, _stop_group)
    return run_task(task)


if __name__ == "__main__":
    sys.exit(main())
