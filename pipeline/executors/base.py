from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Task:
    """One stage attempt, as handed to the worker (serialised to task.json)."""

    project: str  # import path of the Project
    stage: str
    fingerprint: str
    config: dict[str, Any]  # validated stage config as plain data
    output_dir: Path  # the partial dir
    inputs: Mapping[str, Path]
    attempt: int
    log_file: Path
    metrics_file: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project, "stage": self.stage, "fingerprint": self.fingerprint,
            "config": self.config, "output_dir": str(self.output_dir),
            "inputs": {k: str(v) for k, v in self.inputs.items()}, "attempt": self.attempt,
            "metrics_file": str(self.metrics_file),
        }


@dataclass
class TaskResult:
    ok: bool
    metrics: dict[str, float]
    error: str = ""
    not_implemented: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # executor facts for stage_info (pid, job id...)


class Executor(Protocol):
    def run(self, task: Task, on_tick: Callable[[], None]) -> TaskResult:
        """Run the task to completion, calling ``on_tick`` every second or so (metrics streaming)."""
        ...
