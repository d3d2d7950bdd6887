"""A request that a running stage save its state at its next step boundary and stop: the time limit is near.

On Slurm, the time-limit signal (``sbatch --signal=B:USR2@<cluster.slurm.signal_lead_s>``) reaches
the job's own process (pipeline/executors/slurm.py). It does not stop the stage at once: it creates
the file named by :data:`ENV` in the stage's environment, waits for the stage to exit (for the lead
less a margin), then stops whatever is left and requeues the job. A stage that trains in steps looks
for the file at every step boundary (:func:`requested`); once it is there, the stage saves a
checkpoint of that step, stops, and raises :class:`SavedOnRequest`: the attempt ends as a failure that
the requeued job resumes from, and a half-trained model is never committed as the stage's output. A
stage that does not look just goes on until it is stopped, as it would without this.

A file rather than a signal to the stage: the stage's processes (a launcher, its ranks, on several
nodes) need no handler, and whichever looks sees it; it lives on the shared file system, one per job
attempt, and each attempt starts without one. The orchestrator knows nothing of steps or ranks: this
module is the whole contract, and the training stages do the looking (stages/pretrain/loop.py,
stages/common/training.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from pipeline.errors import LlmpipeError
from pipeline.files import write_text_atomic

ENV = "LLMPIPE_SAVE_REQUEST"  # the path of the request file, set for a stage process that may be asked to save


class SavedOnRequest(LlmpipeError):
    """The stage saved its state at a step boundary because a save was requested, and stopped there.

    Raised by the stage so that the attempt fails (nothing is committed); the requeued job resumes
    from that step.
    """

    def __init__(self, step: int, where: str = ""):
        super().__init__(f"saved at step {step} on the time-limit signal{f' ({where})' if where else ''}; "
                         "requeued to resume from that step")
        self.step = step


def request_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where this process's save request would appear (``LLMPIPE_SAVE_REQUEST``); None: nobody will ask."""
    value = (os.environ if environ is None else environ).get(ENV)
    return Path(value) if value else None


def requested(path: Path | str | None = None) -> bool:
    """Whether a save was requested: the request file exists (``path`` defaults to :func:`request_path`).

    One ``stat``, cheap enough for every step boundary. Processes that must act on the same step
    (the ranks of one training run) agree on the answer among themselves: each may see the file at
    another step.
    """
    path = request_path() if path is None else Path(path)
    return path is not None and path.exists()


def request(path: Path | str, why: str) -> None:
    """Ask the stage whose :data:`ENV` is ``path`` to save and stop (atomically: it sees a whole file or none)."""
    write_text_atomic(path, json.dumps({"t": time.time(), "why": why}) + "\n")


def withdraw(path: Path | str) -> None:
    """Remove a request (an earlier attempt's), if any."""
    Path(path).unlink(missing_ok=True)
