"""decontaminate: remove documents that share an n-gram with an evaluation text.

Shard in, shard out over ``pii.documents``, before tokenize, so nothing the evaluate stage scores on is
trained on. The evaluation texts (``stage.decontaminate.files`` and the standard lm-eval tasks of
``stage.decontaminate.tasks``; stages/decontaminate/index.py) are indexed in memory as hashes of their
word n-grams (``ngram`` words, 13 by default as in the GPT-3 paper's decontamination; the words and the
hash: stages/decontaminate/ngrams.py), then the corpus is streamed shard by shard in the worker pool.

A document sharing at least one n-gram with an evaluation text goes to ``contaminated/<shard>.parquet``
with every input column plus ``contamination_task`` (the task of the first matching gram) and
``contamination_ngram`` (that gram's words, lower-cased and joined by spaces); every other document goes
to ``documents/<shard>.parquet`` unchanged. Nothing is dropped silently: documents without text pass
through (they match nothing), and ``docs_out + contaminated_docs == docs_in``.

Metrics: ``contaminated_docs``, ``contaminated.<task>`` per task (the count of removed documents whose
first match is in that task), ``eval_texts``, ``eval_texts_too_short``, ``eval_ngrams``, the usual
docs/bytes counts and ``docs_per_s``. With no evaluation text at all (no files, only local tasks) the
stage copies its input and warns.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import Invalid, LlmpipeError, Stage, StageContext
from pipeline.inputs import Problem
from stages.common.documents import read_documents, text_bytes
from stages.common.shards import (
    ShardResult,
    ShardTask,
    Throughput,
    list_parquet,
    map_shards,
    workers_problem,
    write_parquet_atomic,
)
from stages.decontaminate.index import FILE_SUFFIXES, FILES_KEY, EvalIndex, build_index, file_texts, task_texts
from stages.decontaminate.ngrams import words

INPUT = "pii.documents"
INDEX_FILE = "_eval_index.npz"
TASK_COLUMN = "contamination_task"
NGRAM_COLUMN = "contamination_ngram"
log = logging.getLogger("llmpipe.decontaminate")


class DecontaminateError(LlmpipeError):
    """An input shard cannot be read or lacks the string column ``text``."""


@dataclass(frozen=True, kw_only=True)
class DecontaminateConfig:
    files: tuple[str, ...]  # JSONL files (paths or globs) of evaluation texts, one `text` per record
    tasks: tuple[str, ...]  # lm-eval task names (default: the evaluate stage's tasks; local ones skipped)
    ngram: int  # words per n-gram
    min_words: int  # evaluation texts with fewer words are skipped; shorter than ngram: matched whole
    workers: int | None  # processes; null: the allocation's or machine's CPUs (execution-only)

    def __post_init__(self) -> None:
        problems = []
        if self.ngram < 1:
            problems.append(("ngram", f"must be at least 1, got {self.ngram}"))
        if not 1 <= self.min_words <= max(self.ngram, 1):
            problems.append(("min_words", f"must be between 1 and ngram={self.ngram}, got {self.min_words}"))
        if problem := workers_problem(self.workers):
            problems.append(("workers", problem))
        Invalid.check(problems)

    @property
    def standard_tasks(self) -> tuple[str, ...]:
        """The lm-eval tasks to read: the configured ones but the evaluate stage's local held-out tasks."""
        from stages.common.benchmarks import standard_tasks

        return standard_tasks(self.tasks)


@dataclass(frozen=True)
class ShardJob:
    """What each worker needs: where the index is (loaded once per process)."""

    index_path: str


def run(cfg: DecontaminateConfig, ctx: StageContext) -> dict[str, float]:
    from stages.common.hub import hub_offline

    timer = Throughput()
    sources = list_parquet(ctx.input(INPUT))
    if not sources:
        ctx.log.warning("%s at %s holds no Parquet shard", INPUT, ctx.input(INPUT))
    index_path = ctx.output_dir / INDEX_FILE
    if index_path.is_file():  # a resumed attempt: the same config gives the same index
        index = EvalIndex.load(index_path)
    else:
        hub_offline()
        texts = _chain(file_texts(cfg.files), task_texts(cfg.standard_tasks))
        index = build_index(texts, cfg.ngram, cfg.min_words)
        index.save(index_path)
        ctx.log.info("evaluation index: %d texts of %d tasks (%d too short), %d distinct grams of lengths %s in %.1f s",
                     index.counts["texts"], len(index.tasks), index.counts["too_short"], index.counts["grams"],
                     index.lengths, timer.seconds)
        if not index.grams:
            ctx.log.warning("decontaminate: no evaluation text to check against (files: %s, lm-eval tasks: %s); "
                            "documents are copied unchanged", list(cfg.files), list(cfg.standard_tasks))
    for artifact in ("documents", "contaminated"):
        ctx.output(artifact).mkdir(parents=True, exist_ok=True)

    def progress(done: int, total: ShardResult) -> None:
        ctx.log_metrics({"docs_in": total.docs_in, "contaminated_docs": total.counts["contaminated_docs"]}, step=done)

    total = map_shards(scan_shard, sources, ctx.output_dir, ShardJob(str(index_path)), workers=cfg.workers,
                       desc="decontaminate", phase="scan", on_progress=progress)
    metrics = total.metrics(timer.seconds)
    metrics.setdefault("contaminated_docs", 0)
    metrics.update({"eval_texts": index.counts["texts"], "eval_texts_too_short": index.counts["too_short"],
                    "eval_ngrams": index.counts["grams"]})
    per_task = {k: v for k, v in metrics.items() if k.startswith("contaminated.")}
    ctx.log.info("decontaminate: %d of %d documents share a %d-gram with an evaluation text: %s",
                 metrics["contaminated_docs"], total.docs_in, cfg.ngram, per_task or "none")
    ctx.log_dataset(INPUT, ctx.input(INPUT), rows=total.docs_in)  # MLflow lineage
    ctx.log_dataset("decontaminate.documents", ctx.output("documents"), rows=total.docs_out, context="output")
    return metrics


def _chain(*iterators: Any) -> Any:
    for it in iterators:
        yield from it


# --- one shard (runs in a worker process) ---------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _index(path: str) -> EvalIndex:
    return EvalIndex.load(Path(path))


def scan_shard(task: ShardTask) -> ShardResult:
    """Split one shard into its clean and contaminated documents."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = _index(task.config.index_path)
    table = read_documents(Path(task.source), DecontaminateError)
    result = ShardResult(docs_in=table.num_rows, bytes_in=text_bytes(table))
    cache: dict[str, int] = {}
    clean: list[bool] = []
    found_tasks: list[str] = []
    found_grams: list[str] = []
    for text in table.column("text").to_pylist():
        hit = index.match(words(text), cache) if text and index.grams else None
        clean.append(hit is None)
        if hit is not None:
            found_tasks.append(hit[0])
            found_grams.append(hit[1])
            result.counts["contaminated_docs"] += 1
            result.counts[f"contaminated.{hit[0]}"] += 1
    mask = pa.array(clean, pa.bool_())
    kept = table.filter(mask)
    removed = table.filter(pc.invert(mask))
    removed = removed.append_column(TASK_COLUMN, pa.array(found_tasks, pa.string()))
    removed = removed.append_column(NGRAM_COLUMN, pa.array(found_grams, pa.string()))
    result.docs_out = kept.num_rows
    result.bytes_out = text_bytes(kept)
    write_parquet_atomic(removed, task.output_dir / "contaminated" / f"{task.name}.parquet")
    write_parquet_atomic(kept, task.output_dir / "documents" / f"{task.name}.parquet")
    return result


# --- plan time ------------------------------------------------------------------------------------


def files_external(cfg: DecontaminateConfig) -> dict[str, str]:
    """The evaluation files' content in the fingerprint (one key per file: `llmpipe why` names it)."""
    from stages.common.inputs import files_state

    return files_state(cfg.files, FILES_KEY)


def input_problems(cfg: DecontaminateConfig) -> list[Problem]:
    from stages.common.inputs import data_file_problems

    return [(FILES_KEY, message) for _, message in data_file_problems(cfg.files, FILE_SUFFIXES)]


STAGE = Stage(
    name="decontaminate",
    config=DecontaminateConfig,
    run=run,
    inputs=(INPUT,),
    outputs=("documents", "contaminated"),
    unhashed=frozenset(["workers"]),
    resumable=True,
    shard_phases=("scan",),  # on Slurm: one job array over the shards, then the final job
    external=files_external,
    preflight=input_problems,
    description="Remove documents that share an n-gram with an evaluation text.",
)
