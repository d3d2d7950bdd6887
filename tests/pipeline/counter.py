"""A one-stage test project whose stage counts steps and honours save requests (pipeline/save_request.py)
as the training stages do: at every step boundary it looks for the request; once it is there it keeps
its count (atomically, its checkpoint) and raises SavedOnRequest. ``ignore_requests`` makes it a stage
that never looks, which the executor has to stop. Worker processes import it by ``COUNTER.import_path``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline import Project, Stage, StageContext
from pipeline.files import write_text_atomic
from pipeline.save_request import SavedOnRequest, requested


@dataclass(frozen=True)
class CounterConfig:
    steps: int
    step_s: float
    ignore_requests: bool


def run_count(cfg: CounterConfig, ctx: StageContext) -> dict[str, float]:
    progress = ctx.output_dir / "progress.txt"
    done = int(progress.read_text()) if progress.exists() else 0
    for step in range(done + 1, cfg.steps + 1):
        time.sleep(cfg.step_s)
        write_text_atomic(progress, str(step), fsync=False)
        if step < cfg.steps and not cfg.ignore_requests and requested():
            raise SavedOnRequest(step, str(progress))
    ctx.output("count").write_text(str(cfg.steps))
    return {"resumed_from": done}


COUNTER = Project(
    name="counter",
    stages=(Stage("count", CounterConfig, run_count, (), ("count",), resumable=True),),
    import_path="tests.pipeline.counter:COUNTER",
)
