"""Runs one stage attempt in its own process: ``python -m pipeline.worker <task.json>``.

The same entry point serves every executor (a local subprocess now, a Slurm job later). The
task file says which project, stage, config and paths; the worker writes ``_metrics.json`` on
success or ``_error.json`` on failure into the output dir and exits non-zero on failure.
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
    ctx = StageContext(
        stage=stage.name,
        fingerprint=task["fingerprint"],
        output_dir=output_dir,
        inputs={ref: Path(p) for ref, p in task["inputs"].items()},
        attempt=task["attempt"],
        log=logging.getLogger(f"llmpipe.{stage.name}"),
        metrics_file=Path(task["metrics_file"]),
    )
    started = time.time()
    try:
        metrics = stage.run(config, ctx) or {}
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
    _write(output_dir / RESULT_FILE, metrics)
    return 0


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
