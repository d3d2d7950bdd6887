"""Which documents go where before packing: the held-out split and the tokenizer's training sample.

Held-out split. A document is held out when a hash of its id, salted with ``validation_seed``, falls
below a fraction (``HeldoutRule``), so the split depends on nothing but the id: not on sharding, order
or worker count. If that picks no document of a corpus of two or more, the one with the lowest hash is
held out, so validation is never empty. The fraction is ``validation_fraction``, or it comes from
``heldout_tokens``:

Held-out size in tokens. A token count is known only once the tokenizer exists, and the tokenizer must
not be trained on held-out text. So, first, every document that ``heldout_tokens`` could ever hold out
(hash below ``heldout_bound``: the fraction it would take if a token were ``MAX_BYTES_PER_TOKEN`` bytes;
web text under a byte-level BPE is 4-5) is kept out of the tokenizer's training. Then the tokenizer's
tokens per byte are measured on about ``MEASURE_CHARS`` characters of the sample below, the corpus's
tokens are estimated as its text bytes (counted while the sample is drawn) times that, plus one EOS per
document, and the fraction is ``heldout_tokens`` over the estimate (at most the bound). About
``heldout_tokens`` tokens are then held out: a sum over randomly chosen documents, whose real count
``tokens/meta.json`` records. The measurement is saved (``_sample/heldout.json``) so that every array
task and the final job use the same fraction.

Tokenizer sample. ``tokenizer_train_chars`` bounds the text the BPE is trained on. Every input shard
gives its share of it, in proportion to its text size (the uncompressed size of its ``text`` column, read
from the Parquet footer); within a shard, the documents of the train split with the lowest hash of their
id (salted with ``tokenizer_train_seed``; independent of the held-out hash) are taken until the share is
full, the last one cut to fit. So the sample holds at most ``tokenizer_train_chars`` characters, drawn
from all shards rather than the first ones, and the same config draws the same sample whatever the
batch size, worker count or row order within a shard. It is drawn shard by shard in the worker pool
(``map_shards``, resumable per shard) into ``_sample/<shard>.parquet``; those files are removed once the
tokenizer (and the held-out fraction) are saved, the done markers with their counts stay.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import LlmpipeError
from pipeline.files import write_json_atomic
from stages.common.shards import ShardResult, ShardTask, map_shards, shard_name, write_parquet_atomic

SAMPLE_DIR = "_sample"  # under the output dir: the tokenizer sample, one Parquet file per input shard
HELDOUT_FILE = "heldout.json"  # in SAMPLE_DIR: the held-out fraction that heldout_tokens came to
# Expected held-out documents above which the "at least one" fallback cannot matter: the chance that
# the hash picks none is (1 - fraction) ** n < exp(-50), so the scan of all ids is skipped.
SURE_HELDOUT = 50
MEASURE_CHARS = 10_000_000  # characters of the sample encoded to measure the tokenizer's tokens per byte
MAX_BYTES_PER_TOKEN = 16  # bound on a tokenizer's mean bytes per token, for heldout_bound
MAX_HELDOUT = 0.5  # heldout_tokens never holds out more than this share of the documents


class TokenizeInputError(LlmpipeError):
    """An input shard or the configured tokenizer cannot be used (missing column, unreadable file...)."""


# ---------------------------------------------------------------- input shards


def open_shard(path: Path) -> Any:
    """A ParquetFile with string ``id`` and ``text`` columns, or a TokenizeInputError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise TokenizeInputError(f"{path}: cannot read as Parquet: {exc}") from exc
    schema = pf.schema_arrow
    for column in ("id", "text"):
        if column not in schema.names:
            raise TokenizeInputError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
        if not (pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)):
            raise TokenizeInputError(f"{path}: column {column!r} is {schema.field(column).type}, expected string")
    return pf


def text_size(pf: Any) -> int:
    """Uncompressed bytes of the ``text`` column, from the footer (nothing else is read): a shard's text size."""
    meta = pf.metadata
    return sum(col.total_uncompressed_size for r in range(meta.num_row_groups)
               for col in (meta.row_group(r).column(c) for c in range(meta.num_columns))
               if col.path_in_schema == "text")


@dataclass(frozen=True)
class ShardStats:
    """What the input shards' footers say: documents and text size, per shard."""

    rows: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def read(cls, shards: Sequence[Path]) -> ShardStats:
        rows, sizes = [], []
        for path in shards:  # one open file at a time: a crawl has more shards than a process may open
            with open_shard(path) as pf:
                rows.append(pf.metadata.num_rows)
                sizes.append(text_size(pf))
        return cls(tuple(rows), tuple(sizes))


def drop_reason(doc_id: str | None, text: str | None) -> str | None:
    """Why a record cannot be tokenized, or None when it can."""
    if doc_id is None:
        return "missing_id"
    if text is None:
        return "missing_text"
    if not text:
        return "empty_text"
    return None


# ---------------------------------------------------------------- held-out split


@dataclass(frozen=True)
class HeldoutRule:
    """Which documents are held out: by a salted hash of the id, plus ids forced in (see module doc)."""

    fraction: float
    seed: int
    forced: frozenset[str] = frozenset()

    def score(self, doc_id: str) -> float:
        """A uniform number in [0, 1) that depends only on the id and the seed."""
        digest = hashlib.blake2b(f"{self.seed}\0{doc_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def __call__(self, doc_id: str) -> bool:
        return self.score(doc_id) < self.fraction or doc_id in self.forced


def heldout_rule(fraction: float, seed: int, shards: Sequence[Path], n_docs: int, log: Any) -> HeldoutRule:
    """The held-out rule for this corpus: the hash rule, or the lowest-hash id when the rule picks none."""
    import pyarrow.parquet as pq

    rule = HeldoutRule(fraction, seed)
    if fraction == 0 or n_docs < 2 or n_docs * fraction >= SURE_HELDOUT:
        return rule
    lowest: tuple[float, str] | None = None
    for path in shards:
        for batch in pq.ParquetFile(path).iter_batches(columns=["id"]):
            for doc_id in batch.column(0).to_pylist():
                if doc_id is None:
                    continue
                if rule(doc_id):
                    return rule
                candidate = (rule.score(doc_id), doc_id)
                lowest = candidate if lowest is None or candidate < lowest else lowest
    if lowest is None:
        return rule
    log.info("no document id hashed below the held-out fraction %s; holding out %r so validation is not empty",
             fraction, lowest[1])
    return HeldoutRule(rule.fraction, rule.seed, frozenset([lowest[1]]))


def heldout_bound(heldout_tokens: int, total_size: int) -> float:
    """The largest fraction ``heldout_tokens`` can come to on a corpus of ``total_size`` text bytes."""
    if total_size <= 0:
        return MAX_HELDOUT
    return min(MAX_HELDOUT, heldout_tokens * MAX_BYTES_PER_TOKEN / total_size)


# ---------------------------------------------------------------- the sample


@dataclass(frozen=True)
class SampleJob:
    """What every worker of the sample map needs besides its shard."""

    budget: int  # characters of the whole sample
    total_size: int  # text size of all input shards: a shard's share is budget * its size / this
    seed: int  # salt of the sample's id hash
    rule: HeldoutRule  # the documents that may be held out: never in the sample


def sample_score(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) from the id; another hash than the held-out one (its own prefix)."""
    digest = hashlib.blake2b(f"tokenizer-sample\0{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sample_shard(task: ShardTask) -> ShardResult:
    """Draw one shard's share of the sample into ``<task.output_dir>/<shard>.parquet`` (see module doc)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    job: SampleJob = task.config
    pf = open_shard(Path(task.source))
    share = job.budget * text_size(pf) // job.total_size if job.total_size else 0
    table = pf.read(columns=["id", "text"])
    ids, text = table.column("id").to_pylist(), table.column("text")
    chars, sizes = pc.utf8_length(text).to_pylist(), pc.binary_length(text).to_pylist()
    result = ShardResult(docs_in=len(ids))
    ranked = []
    for i, doc_id in enumerate(ids):
        if doc_id is None or not chars[i]:  # what drop_reason drops: never tokenized, not in the corpus
            continue
        result.counts["corpus_docs"] += 1
        result.counts["corpus_bytes"] += sizes[i]
        if not job.rule(doc_id):
            ranked.append((sample_score(job.seed, doc_id), i))
    ranked.sort()
    taken: list[int] = []
    total = 0
    for _, i in ranked:
        if total >= share:
            break
        taken.append(i)
        total += chars[i]
    order = sorted(taken)
    texts = text.take(pa.array(order, pa.int64())).to_pylist() if order else []
    if total > share:  # the last document taken is cut to fit the share
        last = order.index(taken[-1])
        texts[last] = texts[last][: chars[taken[-1]] - (total - share)]
    result.docs_out = len(texts)
    result.counts["sample_docs"] = len(texts)
    result.counts["sample_chars"] = min(total, share)
    result.bytes_out = write_parquet_atomic(pa.table({"text": pa.array(texts, pa.large_string())}),
                                            task.output_dir / f"{task.name}.parquet")
    return result


@dataclass(frozen=True)
class Sample:
    """A drawn sample: its files, in shard order, and the counts of the draw."""

    directory: Path
    files: tuple[Path, ...]
    chars: int  # characters in the sample
    docs: int  # documents in the sample (the cut one included)
    corpus_bytes: int  # UTF-8 bytes of every document that is tokenized, held out or not
    corpus_docs: int  # those documents

    def batches(self, batch_size: int) -> Iterator[list[str]]:
        """The sample's texts, in batches, shard by shard."""
        import pyarrow.parquet as pq

        for path in self.files:
            if not path.is_file():
                raise TokenizeInputError(f"{path}: this tokenizer sample file is gone, but no tokenizer was saved; "
                                         f"remove {self.directory} to draw the sample again")
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                yield batch.column(0).to_pylist()

    def measure_texts(self) -> list[str]:
        """About MEASURE_CHARS characters of the sample, every k-th document, so from every shard."""
        stride = max(1, self.chars // MEASURE_CHARS)
        texts, n = [], 0
        for batch in self.batches(1000):
            for text in batch:
                if n % stride == 0:
                    texts.append(text)
                n += 1
        return texts

    def remove_texts(self) -> None:
        """Delete the sample's files (the done markers stay, so a resumed attempt does not draw it again)."""
        for path in self.files:
            path.unlink(missing_ok=True)


def draw_sample(shards: Sequence[Path], stats: ShardStats, rule: HeldoutRule, budget: int, seed: int,
                output_dir: Path, workers: int | None, log: Any) -> Sample:
    """Draw (or, resuming, finish drawing) the sample of ``budget`` characters from every shard."""
    directory = output_dir / SAMPLE_DIR
    job = SampleJob(budget=budget, total_size=sum(stats.sizes), seed=seed, rule=rule)
    # No phase: on a cluster this runs whole, in the array task that first takes the prelude lock (the
    # others find its shards done), with that task's worker processes.
    totals = map_shards(sample_shard, shards, directory, job, workers=workers, desc="tokenizer sample")
    sample = Sample(directory, tuple(directory / f"{shard_name(i)}.parquet" for i in range(len(shards))),
                    chars=totals.counts["sample_chars"], docs=totals.counts["sample_docs"],
                    corpus_bytes=totals.counts["corpus_bytes"], corpus_docs=totals.counts["corpus_docs"])
    log.info("tokenizer sample: %d characters (%d documents) of at most %d, drawn from %d shards holding %d bytes "
             "of text in %d documents", sample.chars, sample.docs, budget, len(shards), sample.corpus_bytes,
             sample.corpus_docs)
    return sample


# ---------------------------------------------------------------- held-out size in tokens


def heldout_fraction(heldout_tokens: int, bound: float, sample: Sample, count_tokens: Callable[[list[str]], int],
                     log: Any) -> dict[str, float]:
    """The held-out fraction that ``heldout_tokens`` comes to, with how it was found (see module doc).

    ``count_tokens(texts)`` counts the tokens of texts (no special tokens added). Saved on first use;
    later calls (resumed attempts, other array tasks, the final job) read the saved numbers.
    """
    saved = sample.directory / HELDOUT_FILE
    if saved.is_file():
        return json.loads(saved.read_text())
    texts = sample.measure_texts()
    measured = sum(len(t.encode()) for t in texts)
    per_byte = count_tokens(texts) / measured if measured else 0.0
    estimate = sample.corpus_bytes * per_byte + sample.corpus_docs  # + one EOS per document
    wanted = heldout_tokens / estimate if estimate else 0.0
    if wanted > bound:
        log.warning("heldout_tokens=%d is about %.0f%% of the corpus's estimated %d tokens; holding out the "
                    "documents of fraction %.4g instead (fewer tokens)", heldout_tokens, 100 * wanted, estimate, bound)
    info = {"heldout_tokens": heldout_tokens, "fraction": min(wanted, bound), "bound": bound,
            "tokens_per_byte": per_byte, "measured_bytes": measured, "corpus_bytes": sample.corpus_bytes,
            "corpus_docs": sample.corpus_docs, "estimated_tokens": estimate}
    write_json_atomic(saved, info, indent=2, newline=True)
    log.info("heldout_tokens=%d: %.4f tokens per byte on %d sample bytes, about %d tokens in the corpus: "
             "holding out fraction %.6g", heldout_tokens, per_byte, measured, estimate, info["fraction"])
    return info
