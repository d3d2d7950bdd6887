"""tokenize: Train or load a tokenizer; pack token shards; hold out a validation split.

Three steps, each resumable:

1. Held-out split. A document is held out when a hash of its id (salted with
   ``validation_seed``) falls below a fraction, so the split depends on nothing but the id: not
   on sharding, order or worker count. If that picks no document of a corpus of two or more, the
   one with the lowest hash is held out, so validation is never empty. The size is set either as
   that fraction (``validation_fraction``) or in tokens (``heldout_tokens``: the fraction is then
   derived from the tokenizer's tokens per byte, measured on the sample below; stages/tokenize/split.py).
2. Tokenizer. With ``tokenizer: null`` a byte-level BPE is trained with the ``tokenizers``
   library on the train split only. ``tokenizer_train_chars`` bounds what it reads: a seeded
   sample of at most that many characters drawn across all shards, each shard giving its share in
   proportion to its text size, within a shard the documents with the lowest hash of their id
   (salted with ``tokenizer_train_seed``), the last one cut to fit (drawn by the worker pool into
   ``_sample/``, removed once the tokenizer is saved; stages/tokenize/split.py). With null it
   reads every train document, streamed from the Parquet shards. On a cluster this step (the
   sample, the tokenizer and the held-out fraction) is a job of its own, phase ``tokenizer``, with
   its own resources (``cluster.slurm.stages.tokenize.phases.tokenizer``). It has these reserved
   special tokens, ids 0-5 in this order:

   ``<|endoftext|>``  end of a document and separator of packed documents (EOS, also BOS)
   ``<|pad|>``        padding (never inside packed documents)
   ``<|system|>``, ``<|user|>``, ``<|assistant|>``  start of a chat turn, for the sft stage
   ``<|end|>``        end of a chat turn

   It is saved as a transformers fast-tokenizer dir (``AutoTokenizer.from_pretrained`` loads it).
   Otherwise the configured dir is loaded with AutoTokenizer (local only) and saved into the output.
3. Packing. Each worker tokenizes one shard in batches (``Tokenizer.encode_batch_fast``), appends
   EOS after every document and writes rows of ``seq_len`` tokens to ``tokens/<split>/<shard>.bin``
   (layout: stages/common/token_shards.py). The few tokens that do not fill a last row of a shard
   are set aside; at the end they are concatenated in shard order and packed into
   ``tokens/<split>/tail.bin``, so at most ``seq_len - 1`` tokens per split are dropped (or
   padded, with ``keep_partial``) instead of that many per shard. The held-out documents, with all
   their input columns, go to ``heldout/<shard>.parquet`` for the evaluate stage.
4. Mixture (with two or more ``data.sources``): the training stream in which each source's share of the
   training tokens is its weight's share, ``tokens/train/mixture.npy`` (stages/tokenize/mixture.py);
   metrics ``source.<name>.tokens_train``, ``source.<name>.epochs``, ``source.<name>.tokens_unique``.

Text that spells a special token (a web page quoting ``<|endoftext|>``) is encoded as plain text,
so documents cannot forge document boundaries or chat turns.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import Invalid, Stage, StageContext, sharding
from pipeline.files import atomic_path, publish, temp_sibling, write_json_atomic
from pipeline.inputs import Problem, dir_problem
from stages.common.config import SourceConfig
from stages.common.shards import (
    ShardResult,
    ShardTask,
    Throughput,
    list_parquet,
    map_shards,
    resolve_workers,
    shard_name,
    workers_problem,
    write_parquet_atomic,
)
from stages.tokenize.split import (
    MEASURE_CHARS,
    HeldoutRule,
    Sample,
    ShardStats,
    TokenizeInputError,
    draw_sample,
    drop_reason,
    heldout_bound,
    heldout_fraction,
    heldout_rule,
    open_shard,
)

INPUT = "decontaminate.documents"  # the cleaned corpus, with documents that overlap evaluation texts removed
EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (EOS, PAD, *CHAT_TOKENS)
BYTE_ALPHABET = 256  # a byte-level BPE starts from one token per byte

TAIL = "tail"  # name of the shard packed from the leftovers of all shards
TOKENIZER_PHASE = "tokenizer"  # the work before the encode map: the sample, the tokenizer, the held-out fraction
# Files of a tokenizer dir whose content is folded into the fingerprint (not model weights next to them).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges*", "*.model")


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    tokenizer: str | None  # an existing local tokenizer dir to use as is; null: train a byte-level BPE
    vocab_size: int  # vocabulary to train (special tokens included); with `tokenizer`, an upper bound check
    min_frequency: int  # a pair must occur this often to become a BPE merge
    tokenizer_train_chars: int | None  # train the BPE on a sample this long drawn across all shards; null: all
    tokenizer_train_seed: int  # salt of the id hash that draws that sample
    seq_len: int  # tokens per packed sequence
    keep_partial: bool  # pad and keep the last incomplete sequence of each split (false: drop it)
    validation_fraction: float | None  # share of documents held out for validation, by id hash; or null
    heldout_tokens: int | None  # or: hold out about this many tokens (documents by the same id hash)
    validation_seed: int  # salt of the id hash; change it to draw another held-out set
    # data.sources: each source's weight makes its share of the training stream (stages/tokenize/mixture.py);
    # empty or one source: every packed row once. Their inputs are ingest's (not in this fingerprint)
    sources: Mapping[str, SourceConfig]
    mixture_seed: int  # draws which rows of a subsampled source the stream keeps
    batch_size: int  # documents per encode_batch call (execution-only)
    workers: int | None  # processes; null: the allocation's or machine's CPUs (execution-only)

    def __post_init__(self) -> None:
        problems = []
        if (self.validation_fraction is None) == (self.heldout_tokens is None):
            problems.append(("", f"set one of validation_fraction (a share of documents) and heldout_tokens, and "
                                 f"the other null (got validation_fraction={self.validation_fraction}, "
                                 f"heldout_tokens={self.heldout_tokens})"))
        if self.validation_fraction is not None and not 0.0 <= self.validation_fraction < 1.0:
            problems.append(("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}"))
        if self.heldout_tokens is not None and self.heldout_tokens < 0:
            problems.append(("heldout_tokens", f"must be 0 or more, got {self.heldout_tokens}"))
        if self.seq_len < 1:
            problems.append(("seq_len", f"must be at least 1, got {self.seq_len}"))
        if self.tokenizer is None and self.vocab_size < BYTE_ALPHABET + len(SPECIAL_TOKENS):
            problems.append(("vocab_size", f"{self.vocab_size} is too small for a byte-level BPE: it needs at least "
                                           f"{BYTE_ALPHABET + len(SPECIAL_TOKENS)} (bytes + special tokens)"))
        problems += [(name, f"must be at least 1, got {getattr(self, name)}")
                     for name in ("min_frequency", "batch_size") if getattr(self, name) < 1]
        if problem := workers_problem(self.workers):
            problems.append(("workers", problem))
        if self.tokenizer_train_chars is not None and self.tokenizer_train_chars < 1:
            problems.append(("tokenizer_train_chars", f"must be positive or null, got {self.tokenizer_train_chars}"))
        Invalid.check(problems)


# ---------------------------------------------------------------- tokenizer training texts


def training_texts(shards: Sequence[Path], rule: HeldoutRule, batch_size: int) -> Iterator[list[str]]:
    """Batches of every train-split text, for the BPE trainer with ``tokenizer_train_chars: null``."""
    for path in shards:
        for batch in open_shard(path).iter_batches(batch_size=batch_size, columns=["id", "text"]):
            texts = [text for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)
                     if not (drop_reason(doc_id, text) or rule(doc_id))]
            if texts:
                yield texts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(cfg: TokenizeConfig, texts: Iterator[list[str]]) -> Any:
    """A byte-level BPE trained on ``texts``, as a transformers fast tokenizer (not yet saved).

    Byte-level: every string is representable (no unknown token) and decode(encode(x)) == x.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # No BOS is prepended (documents are separated by EOS alone), but trainers expect bos_token set.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(CHAT_TOKENS), model_max_length=cfg.seq_len,
                                   clean_up_tokenization_spaces=False)


def load_tokenizer(path: str) -> Any:
    """The configured tokenizer dir, loaded with AutoTokenizer from local files only (no hub download)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise TokenizeInputError(f"stage.tokenize.tokenizer: {path!r} is not a local directory "
                                 f"(a tokenizer dir is required; nothing is downloaded)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizeInputError(f"stage.tokenize.tokenizer: cannot load {path!r} with AutoTokenizer: {exc}") from exc
    if not getattr(tok, "is_fast", False):
        raise TokenizeInputError(f"stage.tokenize.tokenizer: {path!r} loads as a slow tokenizer; a fast one "
                                 f"(tokenizer.json) is needed for batch tokenization")
    if tok.eos_token_id is None:
        raise TokenizeInputError(f"stage.tokenize.tokenizer: {path!r} has no eos_token; it is needed to "
                                 f"separate packed documents")
    return tok


def save_tokenizer(tok: Any, out: Path, *, portable_class: bool) -> None:
    """Save ``tok`` to ``out`` atomically, with a special_tokens_map.json for older loaders.

    ``portable_class`` names the class PreTrainedTokenizerFast (known to transformers 4 and 5)
    instead of transformers 5's TokenizersBackend, for tokenizers this stage trained.
    """
    with atomic_path(out) as tmp:
        tok.save_pretrained(str(tmp))
        if portable_class:
            config_path = tmp / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special = dict(tok.special_tokens_map)
        extra = list(getattr(tok, "extra_special_tokens", None) or getattr(tok, "additional_special_tokens", None)
                     or [])
        if extra:
            special["additional_special_tokens"] = extra
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def prepare_tokenizer(cfg: TokenizeConfig, shards: Sequence[Path], rule: HeldoutRule, sample: Sample | None,
                      out: Path, log: Any) -> float:
    """Make sure ``out`` holds the tokenizer (reused from an earlier attempt if there); return seconds spent.

    A trained one reads ``sample`` when ``tokenizer_train_chars`` is set, else every document ``rule``
    does not hold out.
    """
    if (out / "tokenizer.json").is_file():
        log.info("reusing the tokenizer of the previous attempt in %s", out)
        return 0.0
    start = time.perf_counter()
    if cfg.tokenizer is None:
        if cfg.tokenizer_train_chars is not None and sample is not None:
            texts = sample.batches(cfg.batch_size)
            source = f"a sample of {sample.chars} characters of the train split drawn from {len(shards)} shards"
        else:
            texts = training_texts(shards, rule, cfg.batch_size)
            source = f"the train split of {len(shards)} shards"
        log.info("training a byte-level BPE: vocab_size=%d min_frequency=%d on %s", cfg.vocab_size,
                 cfg.min_frequency, source)
        tok = train_tokenizer(cfg, texts)
        save_tokenizer(tok, out, portable_class=True)
    else:
        log.info("loading the tokenizer %s", cfg.tokenizer)
        tok = load_tokenizer(cfg.tokenizer)
        missing = [t for t in CHAT_TOKENS if t not in tok.get_vocab()]
        if missing:
            log.warning("tokenizer %s lacks the chat tokens %s that the sft stage's template uses",
                        cfg.tokenizer, missing)
        save_tokenizer(tok, out, portable_class=False)
    return time.perf_counter() - start


def tokenizer_state(cfg: TokenizeConfig) -> dict[str, str] | None:
    """Digest of the configured tokenizer's files, folded into the fingerprint (edits re-run the stage)."""
    if cfg.tokenizer is None:
        return None
    from pipeline.content import content_digest

    root = Path(cfg.tokenizer)
    files = sorted({p for pattern in TOKENIZER_FILES for p in root.glob(pattern) if p.is_file()})
    if not files:
        return {"tokenizer": "missing"}
    # the files the stage reads, by name and content digest (pipeline/content.py: cached by stat)
    return {f"tokenizer[{path.name}]": content_digest(path) for path in files}


def input_problems(cfg: TokenizeConfig) -> list[Problem]:
    """The stage's ``preflight`` (run by ``plan`` and ``run``): a configured tokenizer is a local dir
    with a ``tokenizer.json`` (the fast tokenizer batch encoding needs; nothing is downloaded)."""
    problem = cfg.tokenizer and dir_problem(cfg.tokenizer, ("tokenizer.json",))
    return [("tokenizer", problem)] if problem else []


# ---------------------------------------------------------------- packing (worker side)


@dataclass(frozen=True)
class ShardJob:
    """What every worker needs besides its shard: handed to map_shards as the task config."""

    tokenizer_file: str  # tokenizer.json of the output tokenizer dir
    seq_len: int
    dtype: str  # numpy dtype name of the token files
    eos_id: int
    batch_size: int
    rule: HeldoutRule


_TOKENIZERS: dict[tuple[str, int], Any] = {}  # per process: (path, mtime) -> tokenizers.Tokenizer


def load_encoder(path: str) -> Any:
    """The ``tokenizers.Tokenizer`` of a tokenizer.json, set up to encode documents as packing does."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True  # "<|endoftext|>" inside a page is text, not a boundary
    tok.no_truncation()
    tok.no_padding()
    return tok


def worker_tokenizer(path: str) -> Any:
    """The ``tokenizers.Tokenizer`` of ``path``, loaded once per process."""
    key = (path, os.stat(path).st_mtime_ns)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = load_encoder(path)
    return tok


class PackedWriter:
    """Writes a token stream as rows of ``seq_len`` to ``path`` (atomically on close); keeps the tail."""

    def __init__(self, path: Path, seq_len: int, dtype: str):
        import numpy as np

        self.path, self.seq_len, self.dtype = path, seq_len, np.dtype(dtype)
        self.tmp = temp_sibling(path)
        self.file = open(self.tmp, "wb")  # closed by close() or abort()
        self.carry = np.empty(0, dtype=self.dtype)

    def write(self, docs: Sequence[Sequence[int]], eos_id: int) -> int:
        """Append each document followed by EOS; return the tokens appended."""
        import numpy as np

        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        stream = np.empty(int(lengths.sum()), dtype=self.dtype)
        ends = np.cumsum(lengths)
        for doc, end, n in zip(docs, ends, lengths, strict=True):
            stream[end - n:end - 1] = doc
        stream[ends - 1] = eos_id
        stream = np.concatenate([self.carry, stream])
        full = len(stream) // self.seq_len * self.seq_len
        stream[:full].tofile(self.file)
        self.carry = stream[full:]
        return int(lengths.sum())

    def close(self) -> Any:
        """Publish the file; return the tail that did not fill a row."""
        self.file.close()
        publish(self.tmp, self.path)
        return self.carry

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def tail_path(output_dir: Path, split: str, name: str) -> Path:
    return output_dir / "_tails" / split / f"{name}.npy"


def save_npy_atomic(array: Any, path: Path) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
        np.save(f, array)


def tokenize_shard(task: ShardTask) -> ShardResult:
    """Split one shard into train/val, tokenize both and write their packed rows and held-out docs."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from stages.common.token_shards import SPLITS

    job: ShardJob = task.config
    tok = worker_tokenizer(job.tokenizer_file)
    pf = open_shard(Path(task.source))
    result = ShardResult()
    writers = {s: PackedWriter(task.output_dir / "tokens" / s / f"{task.name}.bin", job.seq_len, job.dtype)
               for s in SPLITS}
    heldout = []
    try:
        for batch in pf.iter_batches(batch_size=job.batch_size):
            ids, texts = batch.column("id").to_pylist(), batch.column("text").to_pylist()
            result.docs_in += len(ids)
            result.bytes_in += pc.sum(pc.binary_length(batch.column("text"))).as_py() or 0
            rows: dict[str, list[int]] = {s: [] for s in SPLITS}
            for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
                reason = drop_reason(doc_id, text)
                if reason:
                    result.drops[reason] += 1
                else:
                    rows["val" if job.rule(doc_id) else "train"].append(i)
            for split, idx in rows.items():
                if not idx:
                    continue
                encodings = tok.encode_batch_fast([texts[i] for i in idx], add_special_tokens=False)
                result.counts[f"doc_tokens_{split}"] += writers[split].write([e.ids for e in encodings], job.eos_id)
                result.counts[f"docs_{split}"] += len(idx)
                result.docs_out += len(idx)
            if rows["val"]:
                heldout.append(batch.take(pa.array(rows["val"], type=pa.int64())))
        tails = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for split, tail in tails.items():
        save_npy_atomic(tail, tail_path(task.output_dir, split, task.name))
    table = pa.Table.from_batches(heldout, schema=pf.schema_arrow)
    result.bytes_out = write_parquet_atomic(table, task.output_dir / "heldout" / f"{task.name}.parquet")
    result.bytes_out += sum(w.path.stat().st_size for w in writers.values())
    return result


# ---------------------------------------------------------------- packing (parent side)


def pack_tails(output_dir: Path, split: str, names: Sequence[str], job: ShardJob, keep_partial: bool,
               pad_id: int | None) -> int:
    """Pack the shards' leftover tokens, in shard order, into ``<split>/tail.bin``; return pad tokens added."""
    import numpy as np

    tails = [np.load(tail_path(output_dir, split, n)) for n in names]
    stream = np.concatenate(tails) if tails else np.empty(0, dtype=job.dtype)
    full = len(stream) // job.seq_len * job.seq_len
    rows, rest = stream[:full], stream[full:]
    pad = 0
    if keep_partial and len(rest):
        pad = job.seq_len - len(rest)
        rows = np.concatenate([rows, rest, np.full(pad, pad_id, dtype=job.dtype)])
    with atomic_path(output_dir / "tokens" / split / f"{TAIL}.bin") as tmp:
        rows.astype(job.dtype).tofile(tmp)
    return pad


def write_meta(tokens_dir: Path, job: ShardJob, names: Sequence[str], vocab_size: int, pad_id: int | None,
               totals: ShardResult, pads: dict[str, int]) -> dict[str, Any]:
    """Write ``meta.json`` from the files on disk (so its counts are what was written); return it."""
    import numpy as np

    from stages.common.token_shards import FORMAT_VERSION, META_FILE, SPLITS

    row_bytes = job.seq_len * np.dtype(job.dtype).itemsize
    splits = {}
    for split in SPLITS:
        shards = []
        for name in [*names, TAIL]:
            size = (tokens_dir / split / f"{name}.bin").stat().st_size
            shards.append({"path": f"{split}/{name}.bin", "sequences": size // row_bytes})
        sequences = sum(s["sequences"] for s in shards)
        doc_tokens = totals.counts[f"doc_tokens_{split}"]
        splits[split] = {
            "docs": totals.counts[f"docs_{split}"],
            "doc_tokens": doc_tokens,  # tokens of the documents, EOS included, before packing
            "sequences": sequences,
            "tokens": sequences * job.seq_len,  # what the files hold, padding included
            "pad_tokens": pads[split],
            "dropped_tokens": doc_tokens - (sequences * job.seq_len - pads[split]),
            "shards": shards,
        }
    meta = {"format": FORMAT_VERSION, "dtype": job.dtype, "seq_len": job.seq_len, "vocab_size": vocab_size,
            "eos_id": job.eos_id, "pad_id": pad_id, "splits": splits}
    write_json_atomic(tokens_dir / META_FILE, meta, indent=2, newline=True)
    return meta


@contextlib.contextmanager
def _serial_tokenizers_in_children(workers: int) -> Iterator[None]:
    """Turn off the tokenizers thread pool in forked workers (the parent's may have run: training).

    A forked child cannot use the parent's Rust thread pool; tokenizers would disable it there
    anyway with a warning per process. Parallelism then comes from the worker processes.
    """
    if workers <= 1:
        yield
        return
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


# ---------------------------------------------------------------- stage


def run(cfg: TokenizeConfig, ctx: StageContext) -> dict[str, float]:
    from transformers import AutoTokenizer

    from stages.common.token_shards import SPLITS, token_dtype

    shards = list_parquet(ctx.input(INPUT))
    if not shards:
        ctx.log.warning("no input shards in %s: the tokens and heldout outputs will be empty",
                        ctx.input(INPUT))
    stats = ShardStats.read(shards)
    n_docs = sum(stats.rows)
    # Every document that may be held out, kept out of the tokenizer's training: with heldout_tokens the
    # fraction is known only once the tokenizer is, and cannot exceed this bound (split.py).
    if cfg.heldout_tokens is None:
        bound = cfg.validation_fraction
    else:
        bound = heldout_bound(cfg.heldout_tokens, sum(stats.sizes))
    may_hold_out = heldout_rule(bound, cfg.validation_seed, shards, n_docs, ctx.log)
    sample = None
    sampled_training = cfg.tokenizer is None and cfg.tokenizer_train_chars is not None
    if sampled_training or cfg.heldout_tokens is not None:
        budget = cfg.tokenizer_train_chars if sampled_training else MEASURE_CHARS
        sample = draw_sample(shards, stats, may_hold_out, budget, cfg.tokenizer_train_seed, ctx.output_dir,
                             cfg.workers, ctx.log)
    tokenizer_dir = ctx.output("tokenizer")
    train_s = prepare_tokenizer(cfg, shards, may_hold_out, sample, tokenizer_dir, ctx.log)

    # Workers use tokenizer.json as saved, so what they encode with is exactly what ships.
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    id_space = max(tok.get_vocab().values()) + 1
    if id_space > cfg.vocab_size:
        raise TokenizeInputError(f"tokenizer {cfg.tokenizer or tokenizer_dir} has ids up to {id_space - 1}, more "
                                 f"than stage.tokenize.vocab_size={cfg.vocab_size} (model.vocab_size): raise it "
                                 f"to at least {id_space} so the model's embedding covers every token")
    # Pretrain masks pad_id out of the loss, so a tokenizer without a pad token records none (not EOS).
    pad_id = tok.pad_token_id
    if cfg.keep_partial and pad_id is None:
        raise TokenizeInputError(f"stage.tokenize.keep_partial pads the last sequence, but tokenizer "
                                 f"{cfg.tokenizer or tokenizer_dir} has no pad token: set keep_partial: false")
    rule = may_hold_out
    if cfg.heldout_tokens is not None:
        encoder = load_encoder(str(tokenizer_dir / "tokenizer.json"))
        split = heldout_fraction(cfg.heldout_tokens, bound, sample, lambda texts: sum(
            len(e.ids) for e in encoder.encode_batch_fast(texts, add_special_tokens=False)), ctx.log)
        rule = heldout_rule(split["fraction"], cfg.validation_seed, shards, n_docs, ctx.log)
    if sample is not None:
        sample.remove_texts()  # the tokenizer and the held-out fraction are saved: nothing reads it again
    sharding.end_phase(TOKENIZER_PHASE)  # on a cluster, the tokenizer's own job ends here
    job = ShardJob(str(tokenizer_dir / "tokenizer.json"), cfg.seq_len, token_dtype(id_space).name,
                   tok.eos_token_id, cfg.batch_size, rule)
    ctx.log.info("tokenizer: %d ids, eos_id=%d, pad_id=%s, token files in %s", id_space, job.eos_id, pad_id, job.dtype)

    for d in ("heldout", "tokens/train", "tokens/val"):
        (ctx.output_dir / d).mkdir(parents=True, exist_ok=True)

    def progress(done: int, total: ShardResult) -> None:
        ctx.log_metrics({"docs_in": total.docs_in,
                         "doc_tokens": total.counts["doc_tokens_train"] + total.counts["doc_tokens_val"]}, step=done)

    clock = Throughput()
    workers = resolve_workers(cfg.workers)
    with _serial_tokenizers_in_children(workers):
        totals = map_shards(tokenize_shard, shards, ctx.output_dir, job, workers=workers,
                            desc="tokenize", phase="encode", on_progress=progress)
    seconds = clock.seconds

    names = [shard_name(i) for i in range(len(shards))]
    pads = {s: pack_tails(ctx.output_dir, s, names, job, cfg.keep_partial, pad_id) for s in SPLITS}
    meta = write_meta(ctx.output("tokens"), job, names, id_space, pad_id, totals, pads)
    mixture = mix_sources(cfg, ctx, shards, meta)

    for split in SPLITS:
        m = meta["splits"][split]
        ctx.log.info("%s: %d docs, %d tokens (EOS included) -> %d sequences of %d = %d tokens "
                     "(%d dropped, %d padding)", split, m["docs"], m["doc_tokens"], m["sequences"], cfg.seq_len,
                     m["tokens"], m["dropped_tokens"], m["pad_tokens"])
    if meta["splits"]["val"]["sequences"] == 0 and meta["splits"]["val"]["docs"]:
        ctx.log.warning("the %d held-out documents make fewer than seq_len=%d tokens: no validation sequence "
                        "(set keep_partial: true or hold out more)", meta["splits"]["val"]["docs"],
                        cfg.seq_len)

    doc_tokens = meta["splits"]["train"]["doc_tokens"] + meta["splits"]["val"]["doc_tokens"]
    metrics = totals.metrics(seconds)
    metrics.update({f"{key}_{split}": meta["splits"][split][key] for split in SPLITS for key in ("docs", "doc_tokens")})
    metrics.update({
        "tokens_train": meta["splits"]["train"]["tokens"],
        "tokens_val": meta["splits"]["val"]["tokens"],
        "sequences_train": meta["splits"]["train"]["sequences"],
        "sequences_val": meta["splits"]["val"]["sequences"],
        "tokens_dropped": meta["splits"]["train"]["dropped_tokens"] + meta["splits"]["val"]["dropped_tokens"],
        "tokens_per_s": doc_tokens / seconds if seconds > 0 else 0.0,  # includes shards done by earlier attempts
        "tokenizer_train_s": train_s,
        "vocab_size": id_space,
        "heldout_fraction": rule.fraction,
    })
    if sample is not None:
        metrics.update({"tokenizer_sample_chars": sample.chars, "tokenizer_sample_docs": sample.docs})
    metrics.update(mixture)
    # MLflow lineage: the documents read; the token shards (rows: packed sequences) and held-out documents made.
    ctx.log_dataset(INPUT, ctx.input(INPUT), rows=n_docs)
    for split in SPLITS:
        ctx.log_dataset(f"tokenize.tokens.{split}", ctx.output("tokens") / split, context="output",
                        rows=meta["splits"][split]["sequences"])
    ctx.log_dataset("tokenize.heldout", ctx.output("heldout"), rows=meta["splits"]["val"]["docs"], context="output")
    return metrics


def mix_sources(cfg: TokenizeConfig, ctx: StageContext, shards: Sequence[Path],
                meta: dict[str, Any]) -> dict[str, float]:
    """With several data sources, the training stream weighted by them (``tokens/train/mixture.npy``, named in
    meta.json, which is written again); returns the per-source metrics. Nothing with fewer than two sources."""
    from stages.common.token_shards import META_FILE
    from stages.tokenize.mixture import shard_source, write_mixture

    if len(cfg.sources) < 2:
        return {}
    sources = {shard_name(i): shard_source(str(path)) for i, path in enumerate(shards)}
    metrics = write_mixture(ctx.output("tokens"), meta, sources, {n: s.weight for n, s in cfg.sources.items()},
                            cfg.mixture_seed)
    write_json_atomic(ctx.output("tokens") / META_FILE, meta, indent=2, newline=True)
    for name, plan in meta["splits"]["train"]["mixture"]["sources"].items():
        ctx.log.info("source %s: %d packed rows, weight %.3f -> %d rows in the stream (%.2f epochs)", name,
                     plan["rows"], plan["weight"], plan["stream_rows"], plan["epochs"])
    return metrics


STAGE = Stage(
    name="tokenize",
    config=TokenizeConfig,
    run=run,
    inputs=(INPUT,),
    outputs=("tokenizer", "tokens", "heldout"),
    # 2: tokenizer_train_chars draws a sample from every shard (1 read the first shards); heldout_tokens added;
    # data.sources mixtures
    version=2,
    unhashed=frozenset(["workers", "batch_size", "sources.*.input"]),
    resumable=True,
    # On Slurm: the tokenizer (sample, training, held-out fraction) in a job of its own, sized for it
    # (cluster.slurm.stages.tokenize.phases.tokenizer), then one job array over the shards, then packing
    # in the final job.
    shard_phases=(sharding.single(TOKENIZER_PHASE), "encode"),
    external=tokenizer_state,
    preflight=input_problems,
    description="Train or load a tokenizer; pack token shards; hold out a validation split.",
)
