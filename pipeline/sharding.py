"""Splitting a stage's maps over shards across the tasks of a job array.

A data stage maps a function over its input shards (``stages.common.shards.map_shards``), resumable
per shard through done markers. Each map names its phase (``map_shards(..., phase="signatures")``), and
a stage that lists phases in ``Stage.shard_phases = ("signatures", "buckets")`` runs on a cluster as
one job array per listed phase and one final job, chained so that each starts after the previous one
succeeded:

- the array of phase ``P``, ``n`` tasks: task ``i`` runs the stage from the start, and its map named
  ``P`` handles only the shards whose index ``% n == i``; then the task ends (:class:`SliceDone`).
  The maps before it find their shards done by the earlier arrays and only sum their markers.
- the final job runs the stage as a local run would: every map finds its shards done, the global
  steps between maps (dedup's union-find, tokenize's packing) run once, and the output is committed.

A map whose phase is not listed (or has none) always runs whole. Phases are named, not counted, so a
stage that adds a map does not renumber the arrays of the others.

A phase may also be one step of the stage's own work rather than a map: ``single("tokenizer")`` in
``shard_phases`` marks it. On a cluster it is one task (an array of one, with its own resources:
``cluster.slurm.stages.<stage>.phases.<phase>``) that runs the stage up to its :func:`end_phase`
call and ends there; the arrays and the final job after it find that work done (the stage is
resumable) and go on. So tokenize trains its tokenizer once, on a node sized for it, instead of in
the first encode task with a slice's resources while the other tasks wait for the lock.

The work a stage does before its split map (listing inputs, training a tokenizer, writing a plan
file) runs in every task, so it runs under an exclusive lock, one task at a time: the first does it,
the others find it done (the stage is resumable). The lock is released when the split map starts,
and by the kernel if the task dies. A stage that never reaches its split map therefore runs whole,
one task after the other: wasted work, never two writers at once.

The slice travels as an environment variable, so a stage's code needs nothing beyond calling
:func:`claim_map` with the phase's name at the start of each map over shards (map_shards does), and
:func:`end_phase` where the work of a single phase ends.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ENV = "LLMPIPE_SHARD_SLICE"  # "<index>/<count>@<phase name>", set for a stage process that is one array task
LOCK_FILE = "_slices.lock"


class ShardSliceError(ValueError):
    """A malformed LLMPIPE_SHARD_SLICE value."""


@dataclass(frozen=True)
class ShardSlice:
    """Which shards one array task handles, in which map over shards."""

    index: int  # this task, 0-based
    count: int  # tasks in the array
    phase: str  # the name of the map over shards that is split (``map_shards(..., phase=...)``)

    def __post_init__(self) -> None:
        if not (0 <= self.index < self.count and valid_phase(self.phase)):
            raise ShardSliceError(f"{ENV}: task {self.index} of {self.count} in phase {self.phase!r} is not a slice")

    def encode(self) -> str:
        return f"{self.index}/{self.count}@{self.phase}"

    @classmethod
    def decode(cls, text: str) -> ShardSlice:
        try:
            where, phase = text.split("@")
            index, count = where.split("/")
            return cls(int(index), int(count), phase)
        except ValueError as exc:
            raise ShardSliceError(f"{ENV}={text!r} is not '<index>/<count>@<phase>' ({exc})") from None

    def selects(self, shard_index: int) -> bool:
        return shard_index % self.count == self.index


class SliceDone(BaseException):  # noqa: N818 - a signal, not an error
    """This array task finished its shards of the split map: the stage run ends here.

    A BaseException, so that a stage's own ``except Exception`` does not swallow it.
    """

    def __init__(self, shard_slice: ShardSlice, shards: int):
        super().__init__(f"array task {shard_slice.index} of {shard_slice.count} finished its {shards} shard(s) "
                         f"of phase '{shard_slice.phase}'")
        self.slice = shard_slice
        self.shards = shards


class PhaseDone(SliceDone):
    """The task of a single phase reached the end of that phase's work (:func:`end_phase`): the run ends here."""

    def __init__(self, shard_slice: ShardSlice):
        BaseException.__init__(self, f"the task of phase '{shard_slice.phase}' did the stage's work up to the end "
                                     "of that phase")
        self.slice = shard_slice
        self.shards = 0


class SinglePhase(str):
    """The name of a phase that is one step of a stage's work, not a map over shards: one task runs it."""

    __slots__ = ()


def single(name: str) -> SinglePhase:
    """Mark ``name`` in a stage's ``shard_phases`` as a single phase: a task of its own, ended by :func:`end_phase`."""
    return SinglePhase(name)


def tasks_of(phase: str, array_tasks: int) -> int:
    """How many tasks a cluster gives ``phase`` when maps are split ``array_tasks`` ways: one for a single phase."""
    return 1 if isinstance(phase, SinglePhase) else array_tasks


_prelude_lock: IO | None = None


def valid_phase(name: object) -> bool:
    """A phase name: an identifier (it becomes part of job names and log file names)."""
    return isinstance(name, str) and name.isidentifier()


def current() -> ShardSlice | None:
    """The slice of this process, or None when it runs a stage whole (locally or as a final job)."""
    text = os.environ.get(ENV)
    return ShardSlice.decode(text) if text else None


def begin_prelude(output_dir: Path) -> None:
    """Take the lock that serialises the array tasks' work before the split map (worker side)."""
    global _prelude_lock
    output_dir.mkdir(parents=True, exist_ok=True)
    _prelude_lock = open(output_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until the split map starts
    fcntl.flock(_prelude_lock.fileno(), fcntl.LOCK_EX)


def _end_prelude() -> None:
    global _prelude_lock
    if _prelude_lock is not None:
        fcntl.flock(_prelude_lock.fileno(), fcntl.LOCK_UN)
        _prelude_lock.close()
        _prelude_lock = None


def claim_map(phase: str | None) -> ShardSlice | None:
    """Call at the start of every map over shards, in the stage's own process, with the map's phase.

    Returns this task's slice when this map is the one split across the array (and lets the other
    tasks past their preludes); None when the map must run over every shard (no slice, another
    phase's array, or a map with no phase).
    """
    shard_slice = current()
    if shard_slice is None or phase is None or phase != shard_slice.phase:
        return None
    _end_prelude()
    return shard_slice


def end_phase(phase: str) -> None:
    """Call in the stage's own process where the work of single phase ``phase`` is done (and saved).

    The task of that phase ends here (:class:`PhaseDone`, which the worker takes as success); any
    other run of the stage (local, another phase's task, the final job) goes on.
    """
    shard_slice = current()
    if shard_slice is not None and shard_slice.phase == phase:
        raise PhaseDone(shard_slice)
