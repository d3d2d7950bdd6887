"""Before a Slurm run submits anything: the interpreter of every GPU stage must have a torch that can use a GPU.

A stage's jobs run ``cluster.slurm.python``, or, when it is null, the orchestrator's own interpreter (a venv on
the shared file system). On a login node that is usually the CPU environment (``make setup`` builds it where
``nvidia-smi`` does not answer): a training stage would then wait in the queue for its GPUs and fail on them
("launch.accelerator=cuda but no CUDA device is visible", bf16 refused). Asking the interpreter here costs one
short process per interpreter and catches that before a single job is queued.

What counts: a GPU stage is one whose Slurm resources ask for GPUs (``gpus_per_node`` > 0, the stage's own or
cluster.slurm's). Its interpreter is asked for its torch version through ``importlib.metadata``, never by
importing torch (seconds, and CUDA initialisation on a login node). A ``+cpu`` build, or no torch at all, is
CPU-only; any other build is taken at its word (PyPI's Linux wheels are CUDA builds; ``+cuXXX`` and ``+rocmX``
name their GPU). Not asked, and said so in the log: the interpreter of a stage that runs in a container image
(it lives in the image, not here), a ``python`` that is a command with arguments (``apptainer exec img python``:
running it here could start a container or a job), and one that cannot be run here (a warning: it may exist on
the compute nodes only).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.config import SlurmConfig
from pipeline.errors import ConfigError

log = logging.getLogger("llmpipe.slurm")

PROBE_TIMEOUT_S = 60.0  # a venv on a slow shared file system can take seconds to list its packages
# Prints the installed torch's version, or nothing when there is none.
PROBE = ("from importlib.metadata import PackageNotFoundError, version\n"
         "try:\n    print(version('torch'))\nexcept PackageNotFoundError:\n    print('')")


class CpuOnlyInterpreter(ConfigError):
    """GPU stages would run an interpreter whose torch cannot use a GPU (found before anything was submitted)."""


@dataclass(frozen=True)
class Probe:
    """What one interpreter said about its torch."""

    python: str
    torch: str | None = None  # the installed torch's version; None: no torch (or not asked)
    error: str = ""  # why it could not be asked here; then ``torch`` says nothing

    @property
    def cpu_only(self) -> bool:
        return not self.error and (self.torch is None or self.torch.endswith("+cpu"))

    def describe(self) -> str:
        return f"has torch {self.torch}, a CPU-only build" if self.torch else "has no torch"


@functools.cache
def probe(python: str) -> Probe:
    """Ask ``python`` (a path, or a name on PATH) which torch it has; once per interpreter and process."""
    try:
        proc = subprocess.run([os.path.expanduser(python), "-c", PROBE], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return Probe(python, error=str(exc))
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return Probe(python, error=tail)
    return Probe(python, proc.stdout.strip() or None)


def gpu_stages(slurm: SlurmConfig, stages: Iterable[str]) -> list[str]:
    """The stages among ``stages`` whose Slurm jobs ask for GPUs."""
    return [s for s in stages if (slurm.for_stage(s).gpus_per_node or 0) > 0]


def check_gpu_interpreters(slurm: SlurmConfig, stages: Iterable[str]) -> None:
    """Raise :class:`CpuOnlyInterpreter` when a GPU stage among ``stages`` would run a CPU-only torch."""
    probed: list[str] = []
    for stage in gpu_stages(slurm, stages):
        image = slurm.for_stage(stage).container_image
        if image:
            log.info("%s: its interpreter is inside the container image %s; its torch is not checked here",
                     stage, image)
        else:
            probed.append(stage)
    if not probed:
        return
    python = slurm.python or sys.executable
    if len(python.split()) != 1:  # the batch script runs it as a shell command line
        log.info("cluster.slurm.python=%r is a command, not an interpreter: the torch of stages %s is not checked "
                 "here", python, ", ".join(probed))
        return
    found = probe(python)
    if found.error:
        log.warning("cannot ask %s which torch it has here (%s): the torch of GPU stages %s is not checked",
                    python, found.error, ", ".join(probed))
        return
    if not found.cpu_only:
        return
    who = "cluster.slurm.python" if slurm.python else "cluster.slurm.python is null: the orchestrator's own"
    raise CpuOnlyInterpreter(
        f"GPU stage{'s' if len(probed) > 1 else ''} {', '.join(probed)} (gpus_per_node > 0) would run in jobs whose "
        f"interpreter, {python} ({who}), {found.describe()}: they would wait for their GPUs, then fail on them. "
        "Set cluster.slurm.python=/path/to/gpu/venv/bin/python (a venv built with `make setup PROFILE=gpu`), or "
        "cluster.slurm.container_image=<an image with a CUDA torch> (docker/gpu.Dockerfile; for one stage: "
        "cluster.slurm.stages.<stage>.container_image). Nothing was submitted.")
