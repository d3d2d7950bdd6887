"""dedup: exact then MinHash-LSH near-duplicate removal, disk-backed so the corpus may exceed memory.

Exact duplicates are documents whose normalised text (NFKC, case-folded, whitespace collapsed)
is identical; near duplicates are documents whose word n-gram shingle sets have an estimated
Jaccard similarity of at least ``threshold``. Both are found in one pass over the text
(datasketch MinHash per shard, in parallel), grouped on disk partition by partition, joined into
clusters with union-find, and each cluster keeps one survivor: the longest normalised text, then
the smallest ``id`` (see stages/dedup/lsh.py for the machinery and the exact rule).

Why 256 permutations and a verification margin: LSH candidates are checked against the estimated
Jaccard of their signatures, and the estimate has a standard deviation of sqrt(J(1-J)/num_perm)
(0.035 at J=0.8 with 128 permutations, 0.025 with 256). Checking strictly at ``threshold`` loses
about half of the pairs sitting at the threshold and a few percent of those at 0.85. Measured with
bench/data.py's planted families (5,000 docs, 650 to remove, 200 decoys at J 0.5-0.7):
128 perms, no margin: recall 0.988; 128 + margin 0.03: 0.997; 256 + margin 0.02: 1.000, all with
precision 0.995 and no decoy removed, for ~1.25x the CPU time of 128 perms.

Outputs: ``documents`` (the kept documents, one shard per input shard, all input columns plus
``dedup_cluster_size``: how many documents its cluster had, 1 for unique ones) and ``removed``
(one shard per input shard: id, url, reason 'exact'/'near', cluster, survivor_id, jaccard = the
estimated Jaccard to the survivor).

Scratch files live in ``<output>/_work`` while the stage runs; each step is resumable (a
restarted attempt redoes only unfinished shards / partitions) and the dir is removed at the end
unless ``keep_work``.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import Invalid, Stage, StageContext
from stages.common.shards import workers_problem
from stages.dedup.lsh import (
    DedupInputError,
    LshPlan,
    group_partition,
    read_documents_schema,
    resolve,
    resolved_schema,
    signature_shard,
    work_paths,
)

WORK_DIR = "_work"


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    threshold: float  # estimated Jaccard at or above which two documents are near duplicates
    ngram: int  # words per shingle
    num_perm: int  # MinHash permutations (signature length)
    seed: int  # MinHash permutation seed
    hashfunc: Literal["xxh32", "sha1"]  # shingle hash: xxh32 (~3.5x faster) or datasketch's default sha1
    bands: int | None  # LSH bands; null (with rows null): datasketch's optimum for threshold and weights
    rows: int | None  # MinHash values per band; set together with bands, bands * rows <= num_perm
    lsh_weights: tuple[float, float]  # (false positive, false negative) weights of the optimum
    verify: bool  # check LSH candidates by estimated Jaccard before linking them
    verify_margin: float  # link verified candidates whose estimate is >= threshold - margin (estimator noise)
    partitions: int  # spill partitions; one partition's keys must fit in memory (execution-only)
    workers: int | None  # processes; null: the allocation's or machine's CPUs (execution-only)
    keep_work: bool  # keep the _work scratch dir after success, for inspection (execution-only)

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.threshold <= 1.0:
            problems.append(("threshold", f"must be in (0, 1], got {self.threshold}"))
        problems += [(key, f"must be >= 1, got {getattr(self, key)}")
                     for key in ("ngram", "partitions") if getattr(self, key) < 1]
        if problem := workers_problem(self.workers):
            problems.append(("workers", problem))
        if self.num_perm < 2:
            problems.append(("num_perm", f"must be >= 2, got {self.num_perm}"))
        if not 0.0 <= self.verify_margin < self.threshold:
            problems.append(("verify_margin", f"must be in [0, threshold={self.threshold}), got {self.verify_margin}"))
        if (self.bands is None) != (self.rows is None):
            problems.append(("", f"bands ({self.bands}) and rows ({self.rows}) must both be set or both be null"))
        elif self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            problems.append(("", f"bands * rows = {self.bands} * {self.rows} must be >= 1 and <= num_perm "
                                 f"({self.num_perm})"))
        if len(self.lsh_weights) != 2 or min(self.lsh_weights) < 0 or abs(sum(self.lsh_weights) - 1) > 1e-9:
            problems.append(("lsh_weights", f"must be two non-negative numbers summing to 1, got {self.lsh_weights}"))
        Invalid.check(problems)


def lsh_params(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows): the configured ones, or datasketch's optimum for the threshold and weights.

    datasketch's optimum minimises the weighted areas under the false-positive and false-negative
    curves. With its default equal weights (9 x 13 for 0.8 / 128) only 40% of pairs at exactly the
    threshold become candidates, and recall on planted duplicates with Jaccard in [0.8, 1) was
    ~0.87. Candidates are verified here, so extra ones cost a comparison while misses are lost:
    the default (0.05, 0.95) gives 16 x 8 (95% of pairs at 0.8 collide) and recall ~0.95.
    """
    if cfg.bands is not None:
        return cfg.bands, cfg.rows
    return _optimal_lsh_params(cfg.threshold, cfg.num_perm, cfg.lsh_weights)


@functools.lru_cache(maxsize=8)
def _optimal_lsh_params(threshold: float, num_perm: int, weights: tuple[float, float]) -> tuple[int, int]:
    # ~1 s of numerical integration per call: cached for repeated runs in one process (tests).
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, *weights)


def run(cfg: DedupConfig, ctx: StageContext) -> dict[str, float]:
    from stages.common.shards import ShardResult, Throughput, done_marker, list_parquet, map_shards, shard_name

    clock = Throughput()
    sources = list_parquet(ctx.input("ingest.documents"))
    if not sources:
        raise DedupInputError(f"dedup: no Parquet shards in {ctx.input('ingest.documents')}")
    for src in sources:  # fail before any work on a shard that is not a documents shard
        read_documents_schema(str(src), ("id", "url", "text"))
    bands, rows = lsh_params(cfg)
    work = ctx.output_dir / WORK_DIR
    plan = LshPlan(work=work, threshold=cfg.threshold - cfg.verify_margin, ngram=cfg.ngram, num_perm=cfg.num_perm,
                   seed=cfg.seed,
                   hashfunc=cfg.hashfunc, bands=bands, rows=rows, partitions=cfg.partitions, verify=cfg.verify)
    _reuse_or_clear(work, plan, len(sources), ctx)
    ctx.log.info("dedup: %d shards, MinHash %d perms, LSH %d bands x %d rows, %d partitions",
                 len(sources), cfg.num_perm, bands, rows, cfg.partitions)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    sig = map_shards(signature_shard, sources, work / "sig", plan, workers=cfg.workers, desc="dedup signatures",
                     phase="signatures")
    timings["seconds_signatures"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    parts = [str(p) for p in range(cfg.partitions)]
    groups = map_shards(group_partition, parts, work / "group", plan, workers=cfg.workers, desc="dedup buckets",
                        phase="buckets")
    per_partition = [ShardResult.from_json(_read_json(done_marker(work / "group", shard_name(p))))
                     for p in range(cfg.partitions)]
    timings["seconds_buckets"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clusters = resolve(plan, len(sources))
    timings["seconds_resolve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    final = map_shards(_write_shard, sources, ctx.output_dir, cfg, workers=cfg.workers, desc="dedup write",
                       phase="write",
                       on_progress=lambda n, total: ctx.log_metrics({"docs_out": total.docs_out}, step=n))
    timings["seconds_write"] = time.perf_counter() - t0

    metrics: dict[str, float] = final.metrics(clock.seconds)
    metrics.setdefault("dropped_exact", 0)
    metrics.setdefault("dropped_near", 0)
    metrics.update(timings)
    metrics.update({
        "clusters": clusters["clusters"],
        "docs_in_clusters": clusters["docs_in_clusters"],
        "skipped_empty": sig.counts["skipped_empty"],
        "candidate_pairs": groups.counts["candidate_pairs"],
        "near_edges": groups.counts["near_edges"],
        "exact_edges": groups.counts["exact_edges"],
        "band_rows": sig.counts["band_rows"],
        # The largest partition is what step 2 holds in memory at once: ~band_rows / partitions.
        "max_partition_rows": max(r.counts["band_rows_grouped"] for r in per_partition),
        "lsh_bands": bands,
        "lsh_rows": rows,
    })
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    ctx.log.info("dedup: %d -> %d documents (%d exact, %d near duplicates removed) in %.1fs",
                 metrics["docs_in"], metrics["docs_out"], metrics["dropped_exact"], metrics["dropped_near"],
                 clock.seconds)
    ctx.log_dataset("ingest.documents", ctx.input("ingest.documents"), rows=metrics["docs_in"])  # MLflow lineage
    ctx.log_dataset("dedup.documents", ctx.output("documents"), rows=metrics["docs_out"], context="output")
    return metrics


def _reuse_or_clear(work: Path, plan: LshPlan, num_shards: int, ctx: StageContext) -> None:
    """Keep a previous attempt's scratch files only if they were made with the same plan.

    ``partitions`` is execution-only (results do not depend on it), but the spill written with one
    partition count cannot be grouped with another, so a change restarts the scratch work. The
    final outputs of finished shards stay valid either way.
    """
    import json

    record = {k: str(v) for k, v in vars(plan).items()} | {"num_shards": str(num_shards)}
    plan_file = work / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != record:
        ctx.log.warning("dedup: %s was written with another plan; starting the scratch work over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(record))


def _write_shard(task: Any) -> Any:
    """Final pass for one input shard: kept documents and the removed rows, same shard name."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from stages.common.shards import ShardResult, write_parquet_atomic

    table = pq.read_table(task.source)
    if "dedup_cluster_size" in table.column_names:  # input deduplicated before: recount
        table = table.drop_columns(["dedup_cluster_size"])
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    size = np.ones(n, dtype=np.int64)
    resolved_path = work_paths(task.output_dir / WORK_DIR)["resolved"] / f"{task.name}.parquet"
    resolved = pq.read_table(resolved_path) if resolved_path.is_file() else resolved_schema().empty_table()
    rows = resolved.column("row").to_numpy()
    keep[rows] = resolved.column("keep").to_numpy(zero_copy_only=False)
    size[rows] = resolved.column("cluster_size").to_numpy()
    gone = resolved.filter(pc.invert(resolved.column("keep")))
    kept = table.filter(pa.array(keep)).append_column("dedup_cluster_size", pa.array(size[keep]))
    gone_rows = pa.array(gone.column("row").to_numpy())
    removed = pa.table({
        "id": table.column("id").take(gone_rows),
        "url": table.column("url").take(gone_rows),
        "reason": gone.column("reason"),
        "cluster": gone.column("cluster"),
        "survivor_id": gone.column("survivor_id"),
        "jaccard": gone.column("jaccard"),
    })
    text_bytes = lambda t: pc.sum(pc.binary_length(t.column("text"))).as_py() or 0
    result = ShardResult(docs_in=n, docs_out=kept.num_rows, bytes_in=text_bytes(table), bytes_out=text_bytes(kept))
    result.drops.update(gone.column("reason").to_pylist())
    write_parquet_atomic(kept, task.output_dir / "documents" / f"{task.name}.parquet")
    write_parquet_atomic(removed, task.output_dir / "removed" / f"{task.name}.parquet")
    return result


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text())


STAGE = Stage(
    name="dedup",
    config=DedupConfig,
    run=run,
    inputs=("ingest.documents",),
    outputs=("documents", "removed"),
    unhashed=frozenset(["workers", "partitions", "keep_work"]),
    resumable=True,
    # On Slurm: arrays for signatures, then for bucket partitions; union-find and the writing in the final job.
    shard_phases=("signatures", "buckets"),
    description="Exact then MinHash near-duplicate removal.",
)
