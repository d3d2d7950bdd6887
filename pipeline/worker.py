"""Runs one stage attempt in its own process: ``python -m pipeline.worker <task.json>``.

The same entry point serves every executor (a local subprocess, a Slurm job). The task file says
which project, stage, config and paths; the worker writes ``_error.json`` into the output dir and
exits non-zero on failure. On success it either writes ``_metrics.json`` for the executor to pick
up (local: the orchestrator commits), or, when the task carries a ``commit`` section, commits the
output itself (Slurm: a job chained with ``afterok`` must find its inputs committed when it starts,
whether or not the orchestrator is still there).

With ``LLMPIPE_SHARD_SLICE`` set, the process is one task of a job array: it runs its share of one
map over shards and stops (pipeline/sharding.py); nothing is committed.
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
from pipeline.errors import StageNotImplemented
from pipeline.logs import setup_logging
from pipeline.schema import build
from pipeline.stage import Project, StageContext

RESULT_FILE = "_metrics.json"
ERROR_FILE = "_error.json"
EXIT_FAILED, EXIT_NOT_IMPLEMENTED = 1, 3


def load_project(import_path: str) -> Project:
    module, _, attr = import_path.partition(":")
    project = getattr(importlib.import_module(module), attr)
    if not isinstance(project, Project):
        raise TypeError(f"{import_path} is a {type(project).__name__}, not a pipeline Project")
    return project


def run_task(task: dict[str, Any]) -> int:
    output_dir = Path(task["output_dir"])
    project = load_project(task["project"])
    stage = project.stage(task["stage"])
    config = build(stage.config, task["config"], path=f"stage.{stage.name}")
    shard_slice = sharding.current()
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
                               f"reaching its map over shards number {shard_slice.phase} (it declares "
                               f"shard_phases={stage.shard_phases}): it made fewer maps than that")
        missing = [a for a in stage.outputs if not ctx.output(a).exists()]
        if missing:
            raise RuntimeError(f"stage '{stage.name}' returned without writing its declared outputs {missing}")
        metrics = {k: float(v) for k, v in dict(metrics).items()}
    except StageNotImplemented as exc:
        _write(output_dir / ERROR_FILE, {"type": type(exc).__name__, "message": str(exc)})
        ctx.log.error("%s", exc)
        return EXIT_NOT_IMPLEMENTED
    except BaseException as exc:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        _write(output_dir / ERROR_FILE, {"type": type(exc).__name__, "message": str(exc),
                                         "traceback": traceback.format_exc()})
        traceback.print_exc()
        return EXIT_FAILED
    metrics.setdefault("duration_s", time.time() - started)
    if task.get("commit"):
        try:
            ctx.log.info("committed %s", commit_output(task, metrics, started))
        except OSError as exc:  # e.g. the shared file system: the output stays in the partial dir
            _write(output_dir / ERROR_FILE, {"type": type(exc).__name__, "message": f"commit failed: {exc}",
                                             "traceback": traceback.format_exc()})
            traceback.print_exc()
            return EXIT_FAILED
    else:
        _write(output_dir / RESULT_FILE, metrics)
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


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _stop_group(signum: int, frame: Any) -> None:
    """SIGTERM stops the stage and everything it started (launchers, ranks, servers): the worker
    leads its own process group."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(os.getpgid(0), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.worker TASK.json", file=sys.stderr)
        return 2
    task = json.loads(Path(argv[0]).read_text())
    setup_logging(stream=sys.stdout)
    signal.signal(signal.SIGTERM, _stop_group)
    return run_task(task)


if __name__ == "__main__":
    sys.exit(main())
