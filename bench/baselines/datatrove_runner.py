"""The DataTrove baselines of bench/data.py, run in .venv-bench (bench/setup_baselines.sh).

    .venv-bench/bin/python bench/baselines/datatrove_runner.py ingest --warc-dir D --out O --tasks T --workers W
    .venv-bench/bin/python bench/baselines/datatrove_runner.py dedup --docs-dir D --out O --tasks T --workers W

Each prints one JSON line on stdout (DataTrove's own logs go to stderr and to ``<out>/logs``):
``seconds`` is the wall time of the LocalPipelineExecutor ``run()`` calls only, measured here after
the imports and the pipeline objects are built, so interpreter start-up and import time are not in it
(process-pool start-up, reading the inputs and writing the outputs are); ``cpu_seconds`` the CPU time
(user + system) of this process and its workers over the same span; ``stats`` are DataTrove's own
per-step counters.

- ingest: WarcReader -> Trafilatura (DataTrove's defaults: favour_precision, deduplicate; the
  per-document timeout of its extractor sandbox process is ``--extract-timeout``, default 1 s as in
  DataTrove) -> ParquetWriter, one task per WARC file.
- dedup: DataTrove's four MinHash steps with its default MinhashConfig (5-grams, 14 buckets x 8
  hashes, 64-bit xxhash, English word tokenizer): signatures (one task per input Parquet file),
  buckets (one task per bucket), cluster (one task), filter (one task per input file, writing the
  kept documents and, through the exclusion writer, the removed ones to ``<out>/removed``).

This file imports only DataTrove's environment (no llmpipe module): it is a separate venv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have been waited for (pool workers
    and their extractor processes, once the executor has joined them)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def counters(stats: object) -> list[dict]:
    """DataTrove's PipelineStats as [{name, counts}] with plain numbers (its JSON nests some as {total: n})."""
    out = []
    for step in json.loads(stats.to_json()):
        counts = {k: (v["total"] if isinstance(v, dict) else v) for k, v in step["stats"].items()}
        out.append({"name": step["name"], "counts": counts})
    return out


def run_ingest(args: argparse.Namespace) -> dict:
    # Imported here, before the pool forks: DataTrove's extractor sandbox forks a child per task that
    # imports trafilatura on its warm-up call (~1 s, more on a busy machine), and a warm-up that
    # exceeds the 1 s per-document timeout kills the child, drops the document as a timeout and starts
    # the next child cold. Measured on 2 cores: 2/3 of the pages lost that way without this import.
    import trafilatura  # noqa: F401
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import ParquetWriter

    out = Path(args.out)
    executor = LocalPipelineExecutor(
        pipeline=[WarcReader(args.warc_dir, glob_pattern="*.warc.gz"), Trafilatura(timeout=args.extract_timeout),
                  ParquetWriter(str(out / "documents"))],
        tasks=args.tasks, workers=args.workers, logging_dir=str(out / "logs"), start_method=args.start_method)
    start, cpu = time.perf_counter(), cpu_seconds()
    stats = executor.run()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu, "stats": counters(stats)}


def run_dedup(args: argparse.Namespace) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    out = Path(args.out)
    config = MinhashConfig()  # DataTrove's defaults, as its examples/minhash_deduplication.py uses them

    def reader() -> ParquetReader:
        # read_metadata=False: only text and id, like the llmpipe side reads.
        return ParquetReader(args.docs_dir, glob_pattern="*.parquet", read_metadata=False)

    def executor(pipeline: list, tasks: int, name: str) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(args.workers, tasks),
                                     logging_dir=str(out / "logs" / name), start_method=args.start_method)

    steps = [
        ("signatures", executor([reader(), MinhashDedupSignature(str(out / "signatures"), config=config)],
                                args.tasks, "signatures")),
        ("buckets", executor([MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=config)],
                             config.num_buckets, "buckets")),
        ("cluster", executor([MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"), config=config)],
                             1, "cluster")),
        ("filter", executor([reader(),
                             MinhashDedupFilter(str(out / "remove_ids"),
                                                exclusion_writer=ParquetWriter(str(out / "removed"))),
                             ParquetWriter(str(out / "documents"))], args.tasks, "filter")),
    ]
    seconds: dict[str, float] = {}
    stats = {}
    cpu = cpu_seconds()
    for name, ex in steps:  # in order: each step reads what the previous one wrote
        start = time.perf_counter()
        stats[name] = counters(ex.run())
        seconds[name] = time.perf_counter() - start
    return {"seconds": sum(seconds.values()), "cpu_seconds": cpu_seconds() - cpu, "step_seconds": seconds,
            "stats": stats,
            "config": str(config), "removed_dir": str(out / "removed")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DataTrove baselines of bench/data.py")
    parser.add_argument("what", choices=["ingest", "dedup"])
    parser.add_argument("--warc-dir", help="folder of *.warc.gz (ingest)")
    parser.add_argument("--docs-dir", help="folder of Parquet documents with id and text (dedup)")
    parser.add_argument("--out", required=True, help="empty folder for outputs and DataTrove's logs")
    parser.add_argument("--tasks", type=int, required=True, help="tasks = input files")
    parser.add_argument("--workers", type=int, required=True, help="processes running tasks at once")
    parser.add_argument("--extract-timeout", type=float, default=1.0,
                        help="Trafilatura's per-document timeout in seconds (DataTrove's default: 1)")
    parser.add_argument("--start-method", default="fork", choices=["fork", "forkserver", "spawn"],
                        help="multiprocess start method (llmpipe's process pool forks too)")
    args = parser.parse_args(argv)
    if args.what == "ingest" and not args.warc_dir or args.what == "dedup" and not args.docs_dir:
        parser.error(f"{args.what} needs {'--warc-dir' if args.what == 'ingest' else '--docs-dir'}")
    result = run_ingest(args) if args.what == "ingest" else run_dedup(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
