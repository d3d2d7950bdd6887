"""Shard in, shard out: the execution model of the data stages.

A data stage is a function from one input shard to one output shard (plus a ShardResult with
its counts). ``map_shards`` runs it over every shard in a process pool, with a progress bar,
and is resumable per shard: each finished shard leaves ``_shards/<name>.json`` next to the
outputs, so a restarted attempt redoes only the shards that did not finish. Each map names its
phase (``phase="signatures"``); a phase the stage lists in ``Stage.shard_phases`` runs on a cluster
as a job array: each array task takes the shards ``index % tasks == task`` of that map and stops
there (see ``pipeline.sharding``); the final job then finds every shard done.

Every data stage's ``workers`` key is the size of that pool; null takes it from where the stage runs
(``resolve_workers``): the allocation's ``SLURM_CPUS_PER_TASK`` in a Slurm job, else the CPUs this
process may run on. Workers never change a stage's output (the key is execution-only).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.files import atomic_path, write_json_atomic

log = logging.getLogger("llmpipe.shards")

DONE_DIR = "_shards"
ALLOCATION_ENV = "SLURM_CPUS_PER_TASK"  # the CPUs Slurm gave the task (sbatch --cpus-per-task)


def available_cpus() -> tuple[int, str]:
    """The CPUs this process may use, and where that number comes from.

    ``SLURM_CPUS_PER_TASK`` when set (a Slurm job: the allocation, not the node, is ours), else the
    CPUs the process is pinned to (``sched_getaffinity``: cgroups, taskset, a container's cpuset),
    else ``os.cpu_count()``.
    """
    value = os.environ.get(ALLOCATION_ENV, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value), ALLOCATION_ENV
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0))), "CPU affinity"
    return max(1, os.cpu_count() or 1), "os.cpu_count()"


def resolve_workers(workers: int | None) -> int:
    """A data stage's ``workers``: the configured number, or with null the CPUs of ``available_cpus``."""
    return available_cpus()[0] if workers is None else workers


def workers_problem(workers: int | None) -> str | None:
    """What is wrong with a configured ``workers`` value (None when it is fine), for the config checks."""
    if workers is not None and workers < 1:
        return f"must be at least 1, or null for the CPUs of the allocation ({ALLOCATION_ENV}) or machine, " \
               f"got {workers}"
    return None


@dataclass
class ShardResult:
    """Counts for one shard; summed over shards into the stage's metrics."""

    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    drops: Counter = field(default_factory=Counter)  # reason -> documents dropped
    counts: Counter = field(default_factory=Counter)  # any other additive count (e.g. pii_email)
    # Work done in this attempt only (not restored from done markers): the basis of docs/s and bytes/s.
    timed_docs: int = 0
    timed_bytes: int = 0

    def add(self, other: ShardResult, timed: bool = True) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.drops.update(other.drops)
        self.counts.update(other.counts)
        if timed:
            self.timed_docs += other.timed_docs if other.timed_docs else other.docs_in
            self.timed_bytes += other.timed_bytes if other.timed_bytes else other.bytes_in

    def to_json(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "drops": dict(self.drops), "counts": dict(self.counts)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardResult:
        return cls(data["docs_in"], data["docs_out"], data["bytes_in"], data["bytes_out"],
                   Counter(data["drops"]), Counter(data["counts"]))

    def metrics(self, seconds: float) -> dict[str, float]:
        """The stage metrics: docs in/out, drops per reason, throughput."""
        out: dict[str, float] = {"docs_in": self.docs_in, "docs_out": self.docs_out,
                                 "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                                 "docs_dropped": self.docs_in - self.docs_out}
        out.update({f"dropped_{reason}": n for reason, n in sorted(self.drops.items())})
        out.update({k: v for k, v in sorted(self.counts.items())})
        # Shards restored from done markers (an earlier attempt, or the array tasks of a cluster run)
        # took none of these seconds: with no shard processed here there is no rate to report.
        if seconds > 0 and (self.timed_docs or self.timed_bytes or not self.docs_in):
            out["docs_per_s"] = self.timed_docs / seconds
            out["bytes_per_s"] = self.timed_bytes / seconds
        return out


@dataclass(frozen=True)
class ShardTask:
    """One unit of work handed to a worker process."""

    index: int  # position of the shard in the sorted input list
    source: str  # input shard path or URL
    name: str  # stable output name, e.g. "00003"
    output_dir: Path  # where the shard's outputs go (the stage's output dir or a subfolder)
    config: Any  # the stage's typed config (picklable frozen dataclass)


ShardFn = Callable[[ShardTask], ShardResult]


def shard_name(index: int) -> str:
    return f"{index:05d}"


def done_marker(output_dir: Path, name: str) -> Path:
    return output_dir / DONE_DIR / f"{name}.json"


def map_shards(
    fn: ShardFn,
    sources: Sequence[str | Path],
    output_dir: Path,
    config: Any,
    *,
    workers: int | None,
    desc: str,
    phase: str | None = None,
    on_progress: Callable[[int, ShardResult], None] | None = None,
    shard_indices: Iterable[int] | None = None,
) -> ShardResult:
    """Run ``fn`` on every shard not yet done; return the sum over all shards (done before too).

    ``fn`` must be a module-level function (it is pickled to worker processes). It must write
    its outputs atomically (``write_parquet_atomic``): the done marker is written after it returns.

    ``phase`` names this map, for ``Stage.shard_phases``. In an array task of that phase, only the
    task's share of the shards runs and the stage run then ends with ``pipeline.sharding.SliceDone``
    (nothing after this map runs there). A map with no phase, or one not listed, runs whole.

    ``workers`` processes run the shards (one: in this process); None: ``resolve_workers``.
    """
    from tqdm import tqdm

    from pipeline import sharding

    if workers is None:
        workers, source = available_cpus()
        log.info("%s: %d worker processes (workers: null, from %s)", desc, workers, source)
    output_dir = Path(output_dir)
    (output_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
    indices = list(range(len(sources))) if shard_indices is None else list(shard_indices)
    shard_slice = sharding.claim_map(phase)
    if shard_slice is not None:
        indices = [i for i in indices if shard_slice.selects(i)]
        log.info("%s: array task %d of %d takes %d of %d shards", desc, shard_slice.index, shard_slice.count,
                 len(indices), len(sources))
    total = ShardResult()
    todo: list[ShardTask] = []
    for i in indices:
        name = shard_name(i)
        marker = done_marker(output_dir, name)
        if marker.is_file():
            total.add(ShardResult.from_json(json.loads(marker.read_text())), timed=False)
        else:
            todo.append(ShardTask(i, str(sources[i]), name, output_dir, config))
    if len(todo) < len(indices):
        log.info("%s: %d of %d shards already done, resuming", desc, len(indices) - len(todo), len(indices))

    def finish(task: ShardTask, result: ShardResult) -> None:
        write_json_atomic(done_marker(output_dir, task.name), result.to_json())
        total.add(result)
        bar.update(1)
        bar.set_postfix(docs=total.docs_in, kept=total.docs_out)
        if on_progress:
            on_progress(bar.n, total)

    # tqdm writes to stderr; the executor captures it into the stage log.
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), desc=desc, unit="shard",
               mininterval=2.0, disable=None if os.isatty(2) else False)
    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                finish(task, fn(task))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
                pending = {pool.submit(fn, t): t for t in todo}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finish(pending.pop(fut), fut.result())
    finally:
        bar.close()
    if shard_slice is not None:
        raise sharding.SliceDone(shard_slice, len(indices))
    return total


def write_parquet_atomic(table: Any, path: Path, **kwargs: Any) -> int:
    """Write a pyarrow Table to ``path`` via a temporary file; return the bytes written."""
    import pyarrow.parquet as pq

    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=kwargs.pop("compression", "zstd"), **kwargs)
    return path.stat().st_size


def list_parquet(directory: Path) -> list[Path]:
    """The Parquet shards of a documents artifact, in a stable order."""
    return sorted(Path(directory).glob("*.parquet"))


class Throughput:
    """Wall time of a stage body, for docs/s and bytes/s."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
