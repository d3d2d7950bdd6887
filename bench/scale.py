"""The data stages at scale: docs/s and peak memory of each stage as the corpus grows (issue 14, item 5).

What it answers: does a data stage keep its throughput, and does its memory stay bounded, when the
corpus grows from 50k to 200k documents? Each stage runs alone on generated input of each size, in a
fresh child process (as the orchestrator runs it), with the shipped config (``conf/tiny.yaml``; the
overrides are listed below). The comparison is with itself: every growth ratio is against the
smallest size (``--sizes``, 50k by default) of the same stage, on the same machine, in the same run.

The corpus (generated, seeded, nothing downloaded; ~40 s per 100k documents on one busy core):

- Web-like documents of 200 to 5,000 characters (log-uniform), words drawn with Zipf frequencies
  (exponent ``ZIPF_EXPONENT``) from a vocabulary whose ~100 most frequent words are English function
  words and the rest ``VOCAB_WORDS`` pronounceable made-up words, so the distinct words seen keep
  growing with the corpus as in real text (Heaps' law). Sentences of 6-24 words, paragraphs of 2-6.
- Planted, in shares of the documents: exact copies (other case and whitespace, ``EXACT_SHARE``) and
  near copies (words replaced to a 5-shingle Jaccard of about [0.85, 0.95], ``NEAR_SHARE``) of earlier
  one of the ``RECENT`` long documents before them (a sliding window, so that duplicates cross shard
  boundaries while the size of the duplicate clusters, and with it dedup's work per document, does not
  grow with the corpus: drawn from everything before, early documents gather ever more copies); junk pages of
  llmpipe.corpus's five kinds (``JUNK_SHARE``); a paragraph of generated personal data
  (llmpipe.corpus.pii_paragraph, ``PII_SHARE``); a whole evaluation text (``CONTAMINATED_SHARE``).
- Parquet shards of ``--shard-docs`` (10k) documents with the columns ingest writes (id, url, date,
  content_hash, language='en', language_score, text, warc_file, source), the input of dedup, quality, pii,
  decontaminate and tokenize. The documents are one stream: the corpus of size N is its first N
  documents (every copy comes after what it copies), generated once for all sizes.
- For ingest, WARC.gz files of ``--warc-pages-per-file`` HTTP responses holding the first
  ``--warc-share`` x N documents as HTML pages (navigation, header and footer around the paragraphs;
  one in 40 is a 404 page), so ingest too runs at three sizes.
- ``scale-eval.jsonl``: ``EVAL_TEXTS`` evaluation texts for decontaminate (``stage.decontaminate.files``).

Overrides of the shipped config: ``workers`` (``--workers``); ingest ``input``; quality
``classifier.enabled: false`` (the shipped classifier is trained on the embedded Python docs: the
stage refuses it for another crawl, see stages/quality/stage.py; heuristics only here); decontaminate
``files`` the generated scale-eval.jsonl and ``tasks: []`` (no lm-eval dataset); tokenize
``tokenizer_train_chars`` (``--tokenizer-train-chars``, 10M: the shipped null trains on every document,
which no large corpus does; conf/llama-7b.yaml sets 2e9).

What is measured, per stage and size:

- seconds: wall time of the stage's ``run(cfg, ctx)`` in the child, after the imports (as bench/data.py);
  docs/s = the stage's ``docs_in`` / seconds (for ingest: WARC records, one per page plus a warcinfo).
- peak memory of the process tree (the stage's process and its worker pool), sampled every
  ``SAMPLE_S`` seconds from here with psutil: the largest sum of RSS over the tree (shared pages, such as
  the libraries forked workers share with their parent, count once per process) and the largest sum
  of PSS (each shared page divided among its sharers: what the tree really holds); plus the largest
  single process, exactly: the child's high-water mark (VmHWM) and its joined workers' (``getrusage``).
- ``rss_before``: the child's RSS after its imports, before ``run``: the fixed part of the peak.

Run: ``.venv/bin/python bench/scale.py [--sizes 50000,100000,200000] [--workers 2] [--out scale.json]``;
a quick check: ``--sizes 2000,8000``; another setting: ``--set stage.dedup.partitions=2``. Exit status 0
when every stage ran, 1 on an error.

Measured (the defaults: workers=2, 10k-document shards; 2 CPUs shared with other work, load average 5-8,
so wall-clock docs/s move by +-30% between runs; CPU seconds per 1,000 documents is the steadier figure;
ingest's sizes are 5k, 10k, 20k pages). Per size 50k / 100k / 200k:

    stage          docs/s                  CPU-s/1k docs       peak PSS tree MB    largest process MB
    ingest           319 /   375 /   373   1.88 / 1.65 / 1.75   407 /   409 / 400   246 / 248 / 254
    dedup          1,089 /   991 / 1,185   0.61 / 0.67 / 0.56   499 /   498 / 525   314 / 304 / 312
    quality        1,877 / 1,544 / 1,710   0.37 / 0.43 / 0.36   455 /   476 / 470   268 / 280 / 288
    pii            4,161 / 5,199 / 4,439   0.15 / 0.18 / 0.15   436 /   454 / 461   261 / 264 / 275
    decontaminate  2,225 / 3,224 / 2,396   0.30 / 0.31 / 0.34   520 /   527 / 525   304 / 301 / 318
    tokenize         520 /   722 /   777   1.14 / 0.96 / 0.92   882 / 1,014 / 994   848 / 848 / 852

From 50k to 200k (4x the documents) no stage's CPU per document rose by more than 13% and no peak (PSS
of the tree) by more than 13%: docs/s x1.17, x1.09, x0.91, x1.07, x1.08, x1.50 and peak PSS x0.98, x1.05,
x1.03, x1.06, x1.01, x1.13 in the order above. decontaminate ran at x1.19, x2.09, x1.40 quality's docs/s.
dedup's row is after the fix of stages/dedup/lsh.py's SignatureStore: with the signature files left
mapped its largest process grew 316 / 368 / 479 MB (+1.1 KB a document, 1 GB more at 1M). dedup at 200k
with 2 partitions instead of 16 (2.45M band keys a partition, what 1.6M documents give with 16): peak PSS
794 MB, largest process 447 MB; with 1 partition (4.9M keys): largest process 701 MB, ~110 bytes a key.
tokenize's fixed part is its imports (678 MB before ``run``: transformers' AutoTokenizer imports torch);
with ``tokenizer_train_chars: null`` (train on every document) its largest process grew from 884 to
1,023 MB between 10k and 40k documents (the BPE trainer's word counts; 848-852 MB with the 10M sample).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import io
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: bench.data and the stages are imported from the repo
    sys.path.insert(0, str(REPO))

from bench.data import PREIMPORT, BenchError, cpu_seconds, exact_variant  # noqa: E402

SEED = 20240514
SIZES = (50_000, 100_000, 200_000)
STAGES = ("ingest", "dedup", "quality", "pii", "decontaminate", "tokenize")
# The input each stage reads (all but ingest read the generated Parquet documents).
INPUT_REF = {"dedup": "ingest.documents", "quality": "dedup.documents", "pii": "quality.documents",
             "decontaminate": "pii.documents", "tokenize": "decontaminate.documents"}
# Imported by the child before the clock starts, besides bench/data.py's (the figures are work, not imports).
SCALE_PREIMPORT = {**PREIMPORT, "quality": ("pyarrow.parquet", "stages.quality.rules"),
                   "pii": ("pyarrow.parquet", "phonenumbers", "stages.pii.detectors"),
                   "decontaminate": ("numpy", "pyarrow.parquet", "xxhash", "stages.decontaminate.index")}
SHARD_DOCS = 10_000  # documents per Parquet shard
WARC_SHARE = 0.1  # ingest reads this share of each size as WARC pages (20k pages at 200k documents)
WARC_PAGES_PER_FILE = 2_000
TOKENIZER_TRAIN_CHARS = 10_000_000
SAMPLE_S = 0.2  # memory sampling interval

# The generated text.
VOCAB_WORDS = 300_000
ZIPF_EXPONENT = 1.05
MIN_CHARS, MAX_CHARS = 200, 5_000
CHARS_PER_WORD = 5.6  # of this text, space included: turns a length in characters into a word count
FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has had its would more will if can when who so what no "
    "out up into them some could other than then these also may two first any new only about over like time "
    "most after such our very even just where those how each made well many much before must through back "
    "years way people because between still under same while last never own another").split()
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"
# The planted shares (of all documents).
EXACT_SHARE, NEAR_SHARE, JUNK_SHARE, PII_SHARE, CONTAMINATED_SHARE = 0.03, 0.05, 0.03, 0.05, 0.002
NEAR_MIN_WORDS = 150  # shorter documents cannot be edited into the Jaccard range
RECENT = 5_000  # a copy is drawn from the last RECENT documents of NEAR_MIN_WORDS words or more
EVAL_TEXTS = 500
EVAL_TASK = "scale-eval"

log = logging.getLogger("llmpipe.bench.scale")


# ---------------------------------------------------------------------------------------------
# The corpus


class Words:
    """The vocabulary and a stream of Zipf-distributed words drawn from it."""

    def __init__(self, seed: int, size: int = VOCAB_WORDS, exponent: float = ZIPF_EXPONENT):
        import itertools

        import numpy as np

        syllables = [c + v for c in CONSONANTS for v in VOWELS]
        seen = set(FUNCTION_WORDS)
        self.vocab = list(FUNCTION_WORDS)
        for length in itertools.count(2):  # made-up words of 2, then 3... syllables (4+ letters)
            for parts in itertools.product(syllables, repeat=length):
                word = "".join(parts)
                if word not in seen:
                    self.vocab.append(word)
                if len(self.vocab) >= size:
                    break
            if len(self.vocab) >= size:
                break
        weights = 1.0 / np.arange(1, len(self.vocab) + 1) ** exponent
        self.cdf = np.cumsum(weights) / weights.sum()
        self.rng = np.random.default_rng(seed)
        self.buffer: list[str] = []
        self.pos = 0

    def take(self, n: int) -> list[str]:
        """The next ``n`` words of the stream (drawn a million at a time)."""
        import numpy as np

        out: list[str] = []
        while n > 0:
            if self.pos >= len(self.buffer):
                ranks = np.searchsorted(self.cdf, self.rng.random(1_000_000), side="right")
                self.buffer = [self.vocab[i] for i in np.minimum(ranks, len(self.vocab) - 1).tolist()]
                self.pos = 0
            part = self.buffer[self.pos:self.pos + n]
            self.pos += len(part)
            n -= len(part)
            out += part
        return out


Paragraphs = list[list[str]]  # a document: paragraphs of words (punctuation attached)


def prose(words: Words, rng: random.Random, n_words: int) -> Paragraphs:
    """``n_words`` words as sentences of 6-24 words (capitalised, ending in '.') in paragraphs of 2-6."""
    flat = words.take(n_words)
    paragraphs, pos, start, in_paragraph, paragraph_len = [], 0, 0, 0, rng.randint(2, 6)
    while pos < len(flat):
        end = min(len(flat), pos + rng.randint(6, 24))
        flat[pos] = flat[pos].capitalize()
        flat[end - 1] += "."
        in_paragraph += 1
        if in_paragraph == paragraph_len or end == len(flat):
            paragraphs.append(flat[start:end])
            start, in_paragraph, paragraph_len = end, 0, rng.randint(2, 6)
        pos = end
    return paragraphs


def render(paragraphs: Paragraphs) -> str:
    return "\n\n".join(" ".join(p) for p in paragraphs)


def near_copy(paragraphs: Paragraphs, rng: random.Random, vocab: list[str], lo: float = 0.85,
              hi: float = 0.95) -> tuple[Paragraphs, float]:
    """A copy with words replaced so that its 5-shingle Jaccard to the original is about J in [lo, hi].

    Closed form instead of bench/data.py's bisection (``edited_copy``, ~20 ms a copy): replaced words
    5 positions apart, none in the first or last 4, each change 5 of the S shingles, so k of them give
    J = (S - 5k) / (S + 5k) when the original's shingles are distinct (random Zipf text: they are).
    Returns the copy and that J.
    """
    n = sum(len(p) for p in paragraphs)
    shingles = n - 4
    target = rng.uniform(lo, hi)
    k = max(1, round(shingles * (1 - target) / (5 * (1 + target))))
    slots = range(1, (n - 5) // 5 + 1)  # slot s is word 5s: spaced 5 apart, each inside 5 whole shingles
    k = min(k, len(slots))
    positions = sorted(rng.sample(slots, k))
    copy = [list(p) for p in paragraphs]
    where = [(i, j) for i, p in enumerate(copy) for j in range(len(p))]
    for slot in positions:
        i, j = where[5 * slot]
        old = copy[i][j]
        new = rng.choice(vocab)
        while new == old.rstrip(".").lower():
            new = rng.choice(vocab)
        copy[i][j] = new.capitalize() + "." if old[0].isupper() and old.endswith(".") else \
            new.capitalize() if old[0].isupper() else new + "." if old.endswith(".") else new
    return copy, (shingles - 5 * k) / (shingles + 5 * k)


@dataclass
class Planted:
    """What the generator planted in the first ``docs`` documents (the ground truth of the checks)."""

    docs: int = 0
    chars: int = 0
    exact_copies: int = 0
    exact_repeats: int = 0  # documents whose dedup-normalised text equals an earlier one (copies and junk)
    near_copies: int = 0
    junk: int = 0
    pii_docs: int = 0
    contaminated: int = 0
    near_pairs: list[tuple[str, str]] = field(default_factory=list)  # (copy id, original id)
    contaminated_ids: list[str] = field(default_factory=list)
    warc_pages: int = 0
    warc_records: int = 0
    warc_files: int = 0

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, list)}


def eval_texts(words: Words, rng: random.Random) -> list[str]:
    """The evaluation texts decontaminate indexes: one or two sentences of 20-40 words each."""
    return [render(prose(words, rng, rng.randint(20, 40))) for _ in range(EVAL_TEXTS)]


def documents(seed: int, evals: list[str], words: Words) -> Iterator[tuple[dict[str, Any], str, str | None]]:
    """The endless document stream: (ingest-shaped row, kind, id of the copied document or None).

    ``kind`` is base (maybe with +pii, +contaminated), exact, near or junk.
    """
    from llmpipe import corpus
    from stages.dedup.lsh import normalize

    rng = random.Random(seed)
    edit_vocab = words.vocab[:5_000]
    junk_vocab = words.vocab[len(FUNCTION_WORDS):len(FUNCTION_WORDS) + 2_000]
    recent: deque[tuple[str, Paragraphs]] = deque(maxlen=RECENT)  # (id, paragraphs) of the last long documents
    i = 0
    while True:
        r = rng.random()
        kind = "base"
        if r < EXACT_SHARE and recent:
            kind, (original, base) = "exact", rng.choice(recent)
            text = exact_variant([w for p in base for w in p], rng)
        elif r < EXACT_SHARE + NEAR_SHARE and recent:
            kind, (original, base) = "near", rng.choice(recent)
            text = render(near_copy(base, rng, edit_vocab)[0])
        elif r < EXACT_SHARE + NEAR_SHARE + JUNK_SHARE:
            kind, text = "junk", corpus.junk_text(rng.choice(corpus.JUNK_KINDS), rng, junk_vocab)
        doc_id = hashlib.sha1(f"scale:{seed}:{i}".encode()).hexdigest()
        if kind == "base":
            original = None
            chars = math.exp(rng.uniform(math.log(MIN_CHARS), math.log(MAX_CHARS)))
            n_words = max(8, round(chars / CHARS_PER_WORD))
            paragraphs = prose(words, rng, n_words)
            for what, share, paragraph in (("pii", PII_SHARE, lambda: corpus.pii_paragraph(rng)[0]),
                                           ("contaminated", CONTAMINATED_SHARE, lambda: rng.choice(evals))):
                if rng.random() < share:
                    paragraphs.insert(rng.randint(0, len(paragraphs)), paragraph().split(" "))
                    kind += f"+{what}"
            text = render(paragraphs)
            if n_words >= NEAR_MIN_WORDS:
                recent.append((doc_id, paragraphs))
        elif kind == "junk":
            original = None
        row = {"id": doc_id, "url": f"https://site{rng.randrange(5_000)}.scale.example/{i}",
               "date": "2024-05-14T00:00:00Z", "content_hash": hashlib.sha256(text.encode()).hexdigest(),
               "language": "en", "language_score": 0.99, "text": text, "warc_file": "generated",
               "source": "scale"}
        row["_norm"] = hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()
        yield row, kind, original
        i += 1


def html_page(row: dict[str, Any]) -> str:
    """A page around the document: header, navigation and footer that ingest's extractor must strip."""
    title = html.escape(row["text"][:60].split("\n")[0])
    body = "".join(f"<p>{html.escape(p)}</p>" for p in row["text"].split("\n\n"))
    nav = "".join(f'<li><a href="/section/{k}">Section {k}</a></li>' for k in range(8))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title></head><body>'
            f'<header><a class="logo" href="/">Example site</a><nav><ul>{nav}</ul></nav></header>'
            f"<main><article><h1>{title}</h1>{body}</article></main>"
            '<footer><p>Copyright 2024 Example site. <a href="/privacy">Privacy</a> &middot; '
            '<a href="/terms">Terms</a></p></footer></body></html>')


class WarcFiles:
    """WARC.gz files of HTTP responses, a new file every ``per_file`` pages or at ``cut()``."""

    def __init__(self, folder: Path, per_file: int, seed: int):
        self.folder, self.per_file, self.rng = folder, per_file, random.Random(seed)
        folder.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.fh: Any = None
        self.writer: Any = None
        self.in_file = self.records = 0

    def _ids(self) -> dict[str, str]:
        return {"WARC-Record-ID": f"<urn:uuid:{uuid.UUID(int=self.rng.getrandbits(128), version=4)}>",
                "WARC-Date": "2024-05-14T00:00:00Z"}

    def add(self, url: str, body: bytes, status: str) -> None:
        from warcio.statusandheaders import StatusAndHeaders
        from warcio.warcwriter import WARCWriter

        if self.writer is None:
            self.paths.append(self.folder / f"scale-{len(self.paths):05d}.warc.gz")
            self.fh = open(self.paths[-1], "wb")  # closed by cut()
            self.writer = WARCWriter(self.fh, gzip=True, warc_version="1.0")
            info = b"software: llmpipe bench/scale.py\r\n"
            self.writer.write_record(self.writer.create_warc_record(
                "", "warcinfo", payload=io.BytesIO(info), length=len(info),
                warc_content_type="application/warc-fields", warc_headers_dict=self._ids()))
            self.records += 1
        headers = StatusAndHeaders(status, [("Content-Type", "text/html; charset=utf-8"),
                                            ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
        self.writer.write_record(self.writer.create_warc_record(
            url, "response", payload=io.BytesIO(body), length=len(body), http_headers=headers,
            warc_headers_dict=self._ids()))
        self.records += 1
        self.in_file += 1
        if self.in_file >= self.per_file:
            self.cut()

    def cut(self) -> None:
        if self.fh is not None:
            self.fh.close()
        self.fh = self.writer = None
        self.in_file = 0


def generate(work: Path, sizes: Sequence[int], shard_docs: int, warc_share: float, warc_per_file: int,
             seed: int = SEED) -> dict[int, Planted]:
    """Write the corpus of every size: ``docs-<N>/`` (Parquet), ``warc-<N>/`` and ``scale-eval.jsonl``.

    One stream for all sizes: shards and WARC files are cut at every size too, and each size's folder
    holds hard links to the files of its prefix. Returns what each size holds.
    """
    from stages.common.shards import write_parquet_atomic
    from stages.ingest.stage import COLUMNS, _table  # the exact schema ingest writes

    sizes = sorted(sizes)
    words = Words(seed)
    rng = random.Random(seed + 1)
    evals = eval_texts(words, rng)
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{EVAL_TASK}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in evals))
    pool, warc_pool = work / "pool-docs", work / "pool-warc"
    pool.mkdir(parents=True, exist_ok=True)
    warcs = WarcFiles(warc_pool, warc_per_file, seed + 2)
    planted = Planted()
    out: dict[int, Planted] = {}
    shards: list[Path] = []
    rows: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    seen_norm: set[bytes] = set()
    page_targets = {n: round(n * warc_share) for n in sizes}

    def flush() -> None:
        if rows["id"]:
            shards.append(pool / f"{len(shards):05d}.parquet")
            write_parquet_atomic(_table(rows), shards[-1])
            for values in rows.values():
                values.clear()

    stream = documents(seed, evals, words)
    for n in sizes:
        while planted.docs < n:
            row, kind, original = next(stream)
            norm = row.pop("_norm")
            if norm in seen_norm:
                planted.exact_repeats += 1
            seen_norm.add(norm)
            planted.exact_copies += kind == "exact"
            planted.junk += kind == "junk"
            planted.pii_docs += "+pii" in kind
            if "+contaminated" in kind:
                planted.contaminated += 1
                planted.contaminated_ids.append(row["id"])
            if kind == "near":
                planted.near_copies += 1
                planted.near_pairs.append((row["id"], original))
            for c in COLUMNS:
                rows[c].append(row[c])
            planted.docs += 1
            planted.chars += len(row["text"])
            if len(rows["id"]) >= shard_docs:
                flush()
            if planted.warc_pages < page_targets[n]:
                page = html_page(row).encode()
                status = "200 OK"
                if planted.warc_pages % 40 == 39:
                    page, status = b"<html><body><h1>Not Found</h1></body></html>", "404 Not Found"
                warcs.add(row["url"], page, status)
                planted.warc_pages += 1
        flush()
        warcs.cut()
        planted.warc_records, planted.warc_files = warcs.records, len(warcs.paths)
        out[n] = Planted(**{**asdict(planted), "near_pairs": list(planted.near_pairs),
                            "contaminated_ids": list(planted.contaminated_ids)})
        for folder, files in ((work / f"docs-{n}", shards), (work / f"warc-{n}", warcs.paths)):
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                os.link(f, folder / f.name)
        (work / f"planted-{n}.json").write_text(json.dumps(asdict(out[n])))
    return out


# ---------------------------------------------------------------------------------------------
# Memory of a process tree


@dataclass
class TreePeak:
    """The largest memory figures seen over a process tree's samples, in bytes."""

    rss_tree: int = 0  # sum of RSS over the tree (shared pages counted once per process)
    pss_tree: int = 0  # sum of PSS (shared pages divided among the processes sharing them)
    anon_tree: int = 0  # sum of anonymous RSS (heap, arrays; not mapped files such as memory-mapped arrays)
    rss_proc: int = 0  # the largest single process's RSS
    anon_proc: int = 0  # the largest single process's anonymous RSS (its RSS less mapped files)
    processes: int = 0  # the most processes seen at once
    samples: int = 0

    def sample(self, root: Any) -> None:
        """Add one sample of ``root`` (a psutil.Process) and all its descendants."""
        import psutil

        try:
            procs = [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return
        rss = pss = anon = top = top_anon = alive = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()  # /proc/<pid>/smaps_rollup: ~0.3 ms
                own_anon = proc_status(proc.pid, "RssAnon")
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, FileNotFoundError,
                    ProcessLookupError):
                continue  # a worker that just exited
            rss += info.rss
            pss += info.pss
            anon += own_anon
            top, top_anon = max(top, info.rss), max(top_anon, own_anon)
            alive += 1
        self.rss_tree, self.pss_tree = max(self.rss_tree, rss), max(self.pss_tree, pss)
        self.anon_tree, self.anon_proc = max(self.anon_tree, anon), max(self.anon_proc, top_anon)
        self.rss_proc, self.processes = max(self.rss_proc, top), max(self.processes, alive)
        self.samples += 1


def proc_status(pid: int | str, key: str) -> int:
    """A size field of /proc/<pid>/status (RssAnon, VmHWM...) in bytes; 0 where the kernel has none."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(key.encode() + b":"):
                return int(line.split()[1]) * 1024
    return 0


def watch(cmd: list[str], stdout: Path, stderr: Path, interval: float = SAMPLE_S,
          env: dict[str, str] | None = None) -> tuple[int, TreePeak]:
    """Run ``cmd`` to completion, sampling its process tree's memory every ``interval`` seconds."""
    import psutil

    peak = TreePeak()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        # Its own session, so that an interrupted bench takes the child and its workers down with it.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env, start_new_session=True)
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak.sample(root)
                time.sleep(interval)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return proc.returncode, peak


# ---------------------------------------------------------------------------------------------
# Running one stage


@dataclass
class Run:
    """One stage at one size."""

    stage: str
    size: int  # documents of the generated corpus (ingest reads warc-share of them as pages)
    docs: int  # the stage's docs_in
    seconds: float
    cpu_seconds: float
    docs_per_s: float
    peak_rss_tree_mb: float
    peak_pss_tree_mb: float
    peak_anon_tree_mb: float  # anonymous RSS summed over the tree: what is not a mapped file
    peak_rss_proc_mb: float  # sampled
    peak_anon_proc_mb: float  # sampled: the largest single process's anonymous RSS
    maxrss_proc_mb: float  # exact high-water mark of the largest process (getrusage)
    rss_before_mb: float  # the child after its imports, before run()
    processes: int
    samples: int
    metrics: dict[str, float]


def quote(value: str) -> str:
    """A Hydra override value: single-quoted, so paths with ``*`` or spaces pass as one string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_overrides(stage: str, work: Path, size: int, workers: int, train_chars: int) -> list[str]:
    """The Hydra overrides of the shipped config for one run (see the module doc)."""
    out = [f"stage.{stage}.workers={workers}"]
    if stage == "ingest":
        out.append(f"stage.ingest.input=[{quote(str(work / f'warc-{size}' / '*.warc.gz'))}]")
    elif stage == "quality":
        out.append("stage.quality.classifier.enabled=false")
    elif stage == "decontaminate":
        out += [f"stage.decontaminate.files=[{quote(str(work / f'{EVAL_TASK}.jsonl'))}]",
                "stage.decontaminate.tasks=[]"]
    elif stage == "tokenize":  # 0: null, the shipped default (train on every document)
        out.append(f"stage.tokenize.tokenizer_train_chars={train_chars or 'null'}")
    return out


def run_stage(stage: str, work: Path, size: int, workers: int, train_chars: int, keep_output: bool,
              extra: Sequence[str] = ()) -> Run:
    """Run ``stage`` on the corpus of ``size`` in a fresh child process; time it and watch its memory."""
    out = work / f"out-{stage}-{size}"
    shutil.rmtree(out, ignore_errors=True)
    inputs = {INPUT_REF[stage]: str(work / f"docs-{size}")} if stage in INPUT_REF else {}
    spec = {"stage": stage, "out": str(out), "inputs": inputs,
            "overrides": [*stage_overrides(stage, work, size, workers, train_chars),
                          *(o for o in extra if o.startswith(f"stage.{stage}."))]}
    logs = work / f"out-{stage}-{size}.log", work / f"out-{stage}-{size}.json"
    code, peak = watch([sys.executable, str(Path(__file__).resolve()), "--stage-child", json.dumps(spec)],
                       stdout=logs[1], stderr=logs[0])
    if code != 0:
        tail = logs[0].read_text(errors="replace")[-3000:]
        raise BenchError(f"{stage} at {size:,} documents failed (exit {code}); log {logs[0]}:\n{tail}")
    result = json.loads(logs[1].read_text().strip().splitlines()[-1])
    if not keep_output:
        shutil.rmtree(out, ignore_errors=True)
    mb = 1 / 2**20
    docs = int(result["metrics"].get("docs_in", 0))
    return Run(stage, size, docs, result["seconds"], result["cpu_seconds"],
               docs / result["seconds"] if result["seconds"] > 0 else 0.0,
               peak.rss_tree * mb, peak.pss_tree * mb, peak.anon_tree * mb, peak.rss_proc * mb,
               peak.anon_proc * mb,
               max(result["maxrss_self"], result["maxrss_children"]) * mb, result["rss_before"] * mb,
               peak.processes, peak.samples, result["metrics"])


def stage_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The child side of ``run_stage``: compose the config, import, time ``run(cfg, ctx)``, report rusage."""
    import importlib

    import psutil

    from llmpipe.project import stage_config
    from pipeline import StageContext

    stage = importlib.import_module(f"stages.{spec['stage']}").STAGE
    cfg = stage_config(stage.name, *spec["overrides"])
    for module in SCALE_PREIMPORT.get(stage.name, ()):
        importlib.import_module(module)
    if stage.name == "tokenize":
        from transformers import AutoTokenizer  # noqa: F401  (transformers resolves it lazily)
    out = Path(spec["out"])
    out.mkdir(parents=True)
    ctx = StageContext(stage=stage.name, fingerprint="bench", output_dir=out,
                       inputs={k: Path(v) for k, v in spec["inputs"].items()},
                       log=logging.getLogger(f"llmpipe.bench.{stage.name}"))
    rss_before = psutil.Process().memory_info().rss
    start, cpu = time.perf_counter(), cpu_seconds()
    metrics = stage.run(cfg, ctx)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    # This process's own high-water mark is VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so
    # it would start at the RSS of the bench process that forked it (the corpus generator's). The workers
    # are forked from here: their ru_maxrss (RUSAGE_CHILDREN, the largest of them) is their own.
    kib = 1024  # Linux reports ru_maxrss in KiB
    return {"seconds": seconds, "cpu_seconds": cpu, "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "rss_before": rss_before, "maxrss_self": proc_status("self", "VmHWM"),
            "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib}


# ---------------------------------------------------------------------------------------------
# Report


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through ``points`` (x, y); slope 0 with one x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def growth(runs: list[Run]) -> dict[str, Any]:
    """How one stage's figures grow from its smallest to its largest size (ratios to the smallest)."""
    runs = sorted(runs, key=lambda r: r.size)
    first, last = runs[0], runs[-1]
    ratio = lambda a, b: a / b if b else None
    out: dict[str, Any] = {"from_size": first.size, "to_size": last.size, "docs_ratio": ratio(last.docs, first.docs),
                           "docs_per_s_ratio": ratio(last.docs_per_s, first.docs_per_s),
                           "cpu_per_doc_ratio": ratio(last.cpu_seconds * first.docs, first.cpu_seconds * last.docs)}
    for key in ("peak_rss_tree_mb", "peak_pss_tree_mb", "peak_anon_tree_mb", "maxrss_proc_mb"):
        out[key.replace("_mb", "_ratio")] = ratio(getattr(last, key), getattr(first, key))
    return out


def memory_bound(runs: list[Run], at: int = 1_000_000) -> dict[str, Any]:
    """Peak memory as fixed + slope x documents (least squares over the sizes), extrapolated to ``at``."""
    out: dict[str, Any] = {"at_docs": at}
    for key in ("peak_pss_tree_mb", "peak_rss_tree_mb", "peak_anon_tree_mb", "maxrss_proc_mb", "peak_anon_proc_mb"):
        fixed, slope = fit_line([(r.size, getattr(r, key)) for r in runs])
        out[key] = {"fixed_mb": fixed, "mb_per_100k_docs": slope * 100_000, "at_docs_mb": fixed + slope * at}
    return out


def print_report(runs: list[Run], sizes: Sequence[int], workers: int) -> dict[str, Any]:
    """Print a table per stage and the growth ratios; return the derived figures for the JSON."""
    derived: dict[str, Any] = {"growth": {}, "decontaminate_vs_quality": {}, "memory_bound": {}}
    base = min(sizes)
    print(f"\nbaseline of every growth ratio: the {base:,}-document run of the same stage, this machine, this run "
          f"(workers={workers})")
    by_stage: dict[str, list[Run]] = {}
    for r in runs:
        by_stage.setdefault(r.stage, []).append(r)
    header = ("size", "docs in", "seconds", "docs/s", "CPU-s/1k docs", "peak RSS tree MB", "peak PSS tree MB",
              "anon tree MB", "max proc MB", "before run MB", "procs")
    for stage, rs in by_stage.items():
        rs.sort(key=lambda r: r.size)
        cells = [header] + [(f"{r.size:,}", f"{r.docs:,}", f"{r.seconds:.1f}", f"{r.docs_per_s:,.0f}",
                             f"{1000 * r.cpu_seconds / r.docs:.2f}" if r.docs else "-",
                             f"{r.peak_rss_tree_mb:,.0f}", f"{r.peak_pss_tree_mb:,.0f}", f"{r.peak_anon_tree_mb:,.0f}",
                             f"{r.maxrss_proc_mb:,.0f}",
                             f"{r.rss_before_mb:,.0f}", str(r.processes)) for r in rs]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        print(f"\n{stage}" + (" (docs: WARC records of warc-share x size pages)" if stage == "ingest" else ""))
        for i, c in enumerate(cells):
            print("  " + "  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
        if len(rs) > 1:
            g = derived["growth"][stage] = growth(rs)
            print(f"  growth {g['from_size']:,} -> {g['to_size']:,} (docs x{g['docs_ratio']:.2f}): "
                  f"docs/s x{g['docs_per_s_ratio']:.2f}, CPU per doc x{g['cpu_per_doc_ratio']:.2f}, "
                  f"peak RSS tree x{g['peak_rss_tree_ratio']:.2f}, "
                  f"peak PSS tree x{g['peak_pss_tree_ratio']:.2f}, anon tree x{g['peak_anon_tree_ratio']:.2f}, "
                  f"max process x{g['maxrss_proc_ratio']:.2f}")
            if stage in ("dedup", "tokenize"):
                b = derived["memory_bound"][stage] = memory_bound(rs)
                print("  memory, least squares over the sizes, extrapolated to "
                      f"{b['at_docs']:,} documents: " + "; ".join(
                          f"{name} {fit['fixed_mb']:,.0f} MB + {fit['mb_per_100k_docs']:,.1f} MB per 100k docs -> "
                          f"{fit['at_docs_mb']:,.0f} MB" for name, fit in (
                              ("PSS tree", b["peak_pss_tree_mb"]), ("anon tree", b["peak_anon_tree_mb"]),
                              ("largest process", b["maxrss_proc_mb"]), ("its anon", b["peak_anon_proc_mb"]))))
    quality = {r.size: r for r in by_stage.get("quality", [])}
    decon = {r.size: r for r in by_stage.get("decontaminate", [])}
    if quality and decon:
        print("\ndecontaminate against quality (docs/s on the same corpus):")
        for size in sorted(set(quality) & set(decon)):
            ratio = decon[size].docs_per_s / quality[size].docs_per_s if quality[size].docs_per_s else 0.0
            derived["decontaminate_vs_quality"][str(size)] = ratio
            print(f"  {size:>9,}: decontaminate {decon[size].docs_per_s:,.0f} docs/s, quality "
                  f"{quality[size].docs_per_s:,.0f} docs/s: x{ratio:.2f}")
    return derived


# ---------------------------------------------------------------------------------------------
# Main


def parse_sizes(value: str) -> list[int]:
    sizes = sorted({int(v.replace("_", "")) for v in value.split(",") if v.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"--sizes: positive document counts separated by commas, got {value!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=list(SIZES),
                        help="documents per run, comma-separated (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="every stage's worker processes")
    parser.add_argument("--only", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--shard-docs", type=int, default=SHARD_DOCS, help="documents per Parquet shard")
    parser.add_argument("--warc-share", type=float, default=WARC_SHARE,
                        help="ingest reads this share of each size as WARC pages")
    parser.add_argument("--warc-pages-per-file", type=int, default=WARC_PAGES_PER_FILE)
    parser.add_argument("--set", action="append", default=[], metavar="stage.NAME.KEY=VALUE",
                        help="another override of a stage's config (repeatable), e.g. stage.dedup.partitions=4")
    parser.add_argument("--tokenizer-train-chars", type=int, default=TOKENIZER_TRAIN_CHARS,
                        help="tokenize's tokenizer_train_chars (default: %(default)s); 0: null, train on everything")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it, outputs too (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--stage-child", help=argparse.SUPPRESS)  # internal: the child process (a JSON spec)
    args = parser.parse_args(argv)
    if args.stage_child:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        print(json.dumps(stage_child(json.loads(args.stage_child))))
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := sorted(set(only) - set(STAGES)):
        parser.error(f"--only: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if bad := [o for o in args.set if not o.startswith(tuple(f"stage.{s}." for s in STAGES)) or "=" not in o]:
        parser.error(f"--set: expected stage.<stage>.<key>=<value>, got {bad}")
    if args.workers < 1 or args.shard_docs < 1 or args.warc_pages_per_file < 1 or not 0 < args.warc_share <= 1:
        parser.error("--workers, --shard-docs and --warc-pages-per-file must be >= 1, --warc-share in (0, 1]")

    from pipeline.processes import child_env

    os.environ["PYTHONPATH"] = child_env(pythonpath=[REPO])["PYTHONPATH"]  # the stages' worker pools import us
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"bench/scale.py: sizes {', '.join(f'{n:,}' for n in args.sizes)}; stages {', '.join(only)}; "
          f"workers={args.workers}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    # `timeout` sends SIGTERM: end like Ctrl-C, so that what ran is reported and saved (--out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"bench/scale.py: terminated after {len(runs)} runs"))
    work_ctx = (contextlib.nullcontext(str(args.keep)) if args.keep
                else tempfile.TemporaryDirectory(prefix="bench-scale-"))
    started = time.perf_counter()
    runs: list[Run] = []

    def save(**extra: Any) -> None:
        if args.out:
            args.out.write_text(json.dumps({**result, "runs": [asdict(r) for r in runs], **extra}, indent=2) + "\n")
    result: dict[str, Any] = {"sizes": args.sizes, "workers": args.workers, "stages": only, "cpus": os.cpu_count(),
                              "config": {"set": args.set, "shard_docs": args.shard_docs, "warc_share": args.warc_share,
                                         "warc_pages_per_file": args.warc_pages_per_file,
                                         "tokenizer_train_chars": args.tokenizer_train_chars, "seed": SEED,
                                         "sample_s": SAMPLE_S},
                              "load_average_start": os.getloadavg()[0]}
    try:
        with work_ctx as work_name:
            work = Path(work_name)
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            planted = generate(work, args.sizes, args.shard_docs, args.warc_share, args.warc_pages_per_file)
            result["generate_seconds"] = time.perf_counter() - t0
            result["corpus"] = {str(n): p.summary() for n, p in planted.items()}
            last = planted[max(args.sizes)]
            print(f"corpus: {last.docs:,} documents, {last.chars / 1e6:,.0f} M characters; planted: "
                  f"{last.exact_copies:,} exact copies ({last.exact_repeats:,} repeated texts in all), "
                  f"{last.near_copies:,} near copies, {last.junk:,} junk, {last.pii_docs:,} with PII, "
                  f"{last.contaminated:,} contaminated; {last.warc_pages:,} WARC pages in {last.warc_files} files "
                  f"(generated in {result['generate_seconds']:.0f}s)", flush=True)
            for size in args.sizes:
                for stage in only:
                    r = run_stage(stage, work, size, args.workers, args.tokenizer_train_chars, bool(args.keep),
                                  args.set)
                    runs.append(r)
                    save(partial=True)  # what has run so far, should the rest not finish
                    print(f"  {stage:>13} {size:>9,}: {r.seconds:7.1f}s {r.docs_per_s:8,.0f} docs/s, peak tree "
                          f"RSS {r.peak_rss_tree_mb:,.0f} MB / PSS {r.peak_pss_tree_mb:,.0f} MB, largest process "
                          f"{r.maxrss_proc_mb:,.0f} MB", flush=True)
    except (BenchError, OSError, ValueError, KeyError) as exc:
        print(f"bench/scale.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if runs:
            result.update(print_report(runs, args.sizes, args.workers))
        result["seconds"] = time.perf_counter() - started
        result["load_average_end"] = os.getloadavg()[0]
        save(complete=len(runs) == len(args.sizes) * len(only))
    print(f"\ntotal {result['seconds']:.0f}s; load average at the end {result['load_average_end']:.1f} on "
          f"{os.cpu_count()} CPUs" + (" (a busy machine: the docs/s are noisy)"
                                      if result["load_average_end"] > (os.cpu_count() or 1) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
