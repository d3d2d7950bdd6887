"""How fast the data stages are, against DataTrove and Hugging Face datasets, on the same data and workers.

Targets (issue 3): ingest >= 5x DataTrove's WarcReader + Trafilatura pipeline; dedup >= 2x DataTrove's
four-step MinHash dedup at equal or better recall; tokenize >= 1x a plain batched ``datasets.map``
with the same fast tokenizer. One run each, same machine, same input, same worker count.

The data, generated deterministically in a temporary folder (nothing downloaded):

- ingest: the embedded corpus (``data/embedded``, built by ``python -m llmpipe.corpus``) copied
  ``copies`` times into ``4 x workers`` WARC.gz files with warcio. Every record is kept (warcinfo,
  requests, HTML pages, non-HTML responses, 404s, redirects); copy k > 0 gets its own URLs and
  record IDs, and in its HTML pages about half of the words of six letters or more are swapped for
  other words of the corpus (one mapping per copy), so that no copy repeats another's paragraphs
  (Trafilatura's ``deduplicate`` would otherwise drop them). The figure is HTML pages (2xx,
  text/html) per second, the same count for every row.
- dedup: documents made of the sentences that llmpipe's ingest extracted from that WARC, with
  planted families of known ground truth: near copies (word edits to an exact 5-shingle Jaccard in
  [0.85, 0.98]), exact copies (other case and whitespace), and decoys (Jaccard in [0.5, 0.7], which
  must be kept). Unrelated documents draw from ~60,000 sentences and share almost no 5-shingle. The
  truth is the connected components of the pairs, within each family, whose exact Jaccard
  (NFKC, case-folded, whitespace words) is >= 0.8 or whose normalised texts are equal. A system
  that removes the set R scores TP = sum over true clusters C of min(|R & C|, |C| - 1) (any survivor
  is fine); recall = TP / sum(|C| - 1), precision = TP / |R|.
- tokenize: the same documents; a byte-level BPE (the model's vocab_size) is trained on a prefix
  of them first, untimed, and both sides encode with that tokenizer.json.

What each figure includes (wall clock, perf_counter; the table's ratios are wall-time throughputs):

- llmpipe: the stage's ``run(cfg, ctx)`` with the shipped config (``conf/tiny.yaml`` composed by
  Hydra; input, workers and, for tokenize, the tokenizer overridden) and a StageContext on a temp
  dir, timed inside a fresh child process (one per stage, as the orchestrator runs them): process
  pool start, reading inputs, all the stage's work, writing its outputs. Not interpreter start-up
  nor the imports of the stage's libraries (``PREIMPORT``, done before the clock starts).
- DataTrove (``bench/baselines/datatrove_runner.py`` in ``.venv-bench``): its LocalPipelineExecutor
  ``run()`` calls only (the four dedup steps added up); pool start, reading and writing included;
  interpreter start-up and imports not. Pools fork, like llmpipe's. Trafilatura is imported
  before the pool forks and its per-document timeout is raised from 1 s to 5 s (``--extract-timeout``)
  so that pages are not lost to a busy machine; the timeouts are reported.
- warcio floor: ArchiveIterator over every record of the same files, reading every payload, one
  process per file with the same worker count: the I/O and parsing limit of any WARC ingest.
- datasets.map: ``Dataset.from_parquet`` (untimed) then a timed ``map`` (batched, batch_size 1000,
  num_proc = workers, ``TOKENIZERS_PARALLELISM=false`` like llmpipe's workers, input_ids only,
  no cache reuse), in a child process of the main venv.
- "cpu ratio": baseline CPU seconds / llmpipe CPU seconds (user + system of the timing process and
  its joined workers, over the same span as the wall time). On a shared, busy machine wall times
  move with the load; CPU time much less, so it is the check on the wall ratio.

Run: ``make bench`` or ``.venv/bin/python bench/data.py [--scale S] [--workers N] [--only ingest,dedup,tokenize]``.
Exit status: 0 when everything ran (missed targets included), 1 on an error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
RUNNER = REPO / "bench" / "baselines" / "datatrove_runner.py"
SETUP = REPO / "bench" / "setup_baselines.sh"
EMBEDDED = REPO / "data" / "embedded"
SEED = 20240501
STAGES = ("ingest", "dedup", "tokenize")
TARGETS = {"ingest": 5.0, "dedup": 2.0, "tokenize": 1.0}  # minimum llmpipe / baseline throughput ratio
# Sizes at --scale 1, for ~5 minutes on 2 idle cores (~300 CPU-seconds in all, most of it DataTrove's):
INGEST_COPIES = 4  # copies of the embedded corpus: 1,288 pages (DataTrove + Trafilatura: ~70 CPU-seconds)
DEDUP_DOCS = 10_000  # documents (DataTrove's spaCy-tokenised signatures: ~120 CPU-seconds)
THRESHOLD = 0.8  # dedup's shipped threshold: the ground truth is computed at it
NGRAM = 5
TOKENIZER_TRAIN_CHARS = 5_000_000  # the bench tokenizer's training text (untimed)
EXTRACT_TIMEOUT = 5.0  # DataTrove's per-page Trafilatura timeout here (its default: 1 s)
# Libraries each llmpipe stage imports lazily, imported by its child before the clock starts (the
# DataTrove runner likewise imports before timing): the figures compare work, not import time.
PREIMPORT = {"ingest": ("pyarrow.parquet", "resiliparse.extract.html2text", "warcio.archiveiterator"),
             "dedup": ("datasketch", "numpy", "pyarrow.parquet", "xxhash"),
             "tokenize": ("pyarrow.parquet", "tokenizers", "transformers")}

log = logging.getLogger("llmpipe.bench.data")


class BenchError(RuntimeError):
    """A benchmark step failed (not a missed target): a baseline crashed, an input is missing..."""


@dataclass
class Row:
    """One line of the result table."""

    stage: str
    unit: str
    ours: float | None
    base: float | None
    target: float | None = None  # minimum ours / base; None: shown for information
    notes: list[str] = field(default_factory=list)
    ours_cpu: float | None = None  # CPU seconds (user + system, all processes) of the timed span
    base_cpu: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.ours / self.base if self.ours and self.base else None

    @property
    def cpu_ratio(self) -> float | None:
        """Baseline CPU time over llmpipe's for the same work: the ratio a busy machine disturbs least."""
        return self.base_cpu / self.ours_cpu if self.ours_cpu and self.base_cpu else None

    @property
    def verdict(self) -> str:
        if self.target is None or self.ratio is None:
            return "-"
        return "PASS" if self.ratio >= self.target else "FAIL"


# ---------------------------------------------------------------------------------------------
# The ingest corpus: the embedded crawl, copied and varied


@dataclass(frozen=True)
class WarcSet:
    files: list[Path]
    records: int  # every WARC record written
    pages: int  # HTML responses with a 2xx status: the unit of docs/s
    bytes: int  # compressed size of the files


_TAG = re.compile(r"(<[^>]*>)")
_LONG_WORD = re.compile(r"(?<![&#\w])[a-z]{6,}\b")  # not an entity name (&hellip;) nor part of a word


def copy_mapping(vocab: list[str], copy: int, seed: int = SEED) -> dict[str, str]:
    """Copy 0 is the original; copy k swaps about half of the long words for other words of ``vocab``."""
    if copy == 0:
        return {}
    rng = random.Random(f"{seed}:{copy}")
    return {w: rng.choice(vocab) for w in vocab if rng.random() < 0.5}


def vary_html(html: str, mapping: dict[str, str]) -> str:
    """``html`` with the words of its text (not of its tags) replaced by ``mapping``."""
    if not mapping:
        return html
    parts = _TAG.split(html)  # text at even positions, tags at odd ones
    for i in range(0, len(parts), 2):
        parts[i] = _LONG_WORD.sub(lambda m: mapping.get(m.group(0), m.group(0)), parts[i])
    return "".join(parts)


def _html_charset(http: Any) -> tuple[bool, str]:
    """(is an HTML 2xx response, its charset) from warcio's parsed HTTP headers."""
    code = (http.get_statuscode() or "") if http else ""
    value = (http.get_header("Content-Type") or "") if http else ""
    mime, _, params = value.partition(";")
    match = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", params, re.IGNORECASE)
    html = code.startswith("2") and mime.strip().lower() in ("text/html", "application/xhtml+xml")
    return html, match.group(1) if match else "utf-8"


def _read_units(src_dir: Path) -> list[list[tuple[Any, bytes, bytes]]]:
    """The source records as (record, raw body, decoded body), grouped request + response.

    ``raw`` is the HTTP body as stored (gzip Content-Encoding kept), ``decoded`` the same body after
    warcio undoes the Content-Encoding (read for HTML pages only: they are the ones rewritten).
    """
    from warcio.archiveiterator import ArchiveIterator

    units: list[list[tuple[Any, bytes, bytes]]] = []
    pending: list[tuple[Any, bytes, bytes]] = []
    files = sorted(src_dir.glob("*.warc.gz"))
    if not files:
        raise BenchError(f"no *.warc.gz in {src_dir}: build the embedded corpus first "
                         f"(.venv/bin/python -m llmpipe.corpus {src_dir})")
    for path in files:
        with open(path, "rb") as fh:
            for record in ArchiveIterator(fh):
                if record.rec_type == "warcinfo":
                    continue  # every output file gets its own
                is_html, _ = _html_charset(record.http_headers)
                if is_html and record.rec_type == "response":
                    raw = b""
                    decoded = record.content_stream().read()
                else:
                    raw, decoded = record.raw_stream.read(), b""
                pending.append((record, raw, decoded))
                if record.rec_type != "request":  # a unit ends with its response
                    units.append(pending)
                    pending = []
    if pending:
        units.append(pending)
    return units


def build_bench_warcs(src_dir: Path, out_dir: Path, copies: int, files: int, seed: int = SEED) -> WarcSet:
    """Write ``copies`` varied copies of every record of ``src_dir``'s WARCs into ``files`` WARC.gz files.

    Units (a request and its response) are dealt round-robin over the files, so every file gets
    the same mix. Deterministic: record IDs come from a seeded generator, gzip carries no time.
    """
    import gzip
    import uuid

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    units = _read_units(src_dir)
    vocab = sorted({w for unit in units for _, _, decoded in unit if decoded
                    for w in _LONG_WORD.findall(decoded.decode("utf-8", "replace"))})
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"bench-{i:05d}.warc.gz" for i in range(files)]
    handles = [open(p, "wb") for p in paths]
    writers = [WARCWriter(h, gzip=True, warc_version="1.0") for h in handles]
    records = pages = 0

    def warc_ids(date: str | None) -> dict[str, str]:  # warcio would draw a random ID and take the clock
        return {"WARC-Record-ID": f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>",
                "WARC-Date": date or "2024-05-01T00:00:00Z"}

    try:
        for i, writer in enumerate(writers):
            info = f"software: llmpipe bench/data.py\r\ndescription: bench shard {i}\r\n".encode()
            writer.write_record(writer.create_warc_record("", "warcinfo", payload=io.BytesIO(info), length=len(info),
                                                          warc_content_type="application/warc-fields",
                                                          warc_headers_dict=warc_ids(None)))
            records += 1
        n = 0
        for copy in range(copies):
            mapping = copy_mapping(vocab, copy, seed)
            for unit in units:
                writer = writers[n % files]
                n += 1
                for record, raw, decoded in unit:
                    url = record.rec_headers.get_header("WARC-Target-URI") or ""
                    if copy:
                        url = url.replace("://", f"://c{copy}.", 1)
                    headers = warc_ids(record.rec_headers.get_header("WARC-Date"))
                    http = record.http_headers
                    body = raw
                    if decoded:  # an HTML page: vary its text, encode and compress it as it was served
                        _, charset = _html_charset(http)
                        html = vary_html(decoded.decode(charset, "replace"), mapping)
                        body = html.encode(charset, errors="xmlcharrefreplace")
                        if (http.get_header("Content-Encoding") or "").lower() == "gzip":
                            body = gzip.compress(body, mtime=0)
                        http = StatusAndHeaders(http.statusline, list(http.headers), protocol=http.protocol)
                        http.replace_header("Content-Length", str(len(body)))
                        pages += 1
                    new = writer.create_warc_record(url, record.rec_type, payload=io.BytesIO(body), length=len(body),
                                                    http_headers=http, warc_headers_dict=headers)
                    writer.write_record(new)
                    records += 1
    finally:
        for h in handles:
            h.close()
    return WarcSet(paths, records, pages, sum(p.stat().st_size for p in paths))


# ---------------------------------------------------------------------------------------------
# The dedup corpus: real sentences, planted families, exact ground truth


def norm_words(text: str) -> list[str]:
    """The words the ground truth compares: NFKC, case-folded, split on whitespace."""
    return unicodedata.normalize("NFKC", text).casefold().split()


def shingle_set(words: list[str], n: int = NGRAM) -> frozenset[tuple[str, ...]]:
    if len(words) <= n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def sentence_pool(texts: list[str], min_words: int = 5) -> list[str]:
    """Distinct sentences (and lines) of at least ``min_words`` words, in first-seen order."""
    pieces = (s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+|\n+", t))
    return list(dict.fromkeys(s for s in pieces if len(s.split()) >= min_words))


@dataclass
class DedupCorpus:
    docs: list[dict[str, str]]  # id, url, text
    family: dict[str, int]  # id -> planted family (its base included); unrelated documents are absent
    kind: dict[str, str]  # id -> base | unique | near | exact | decoy
    base_jaccard: dict[str, float]  # planted copy -> exact Jaccard to its base


def _render(words: list[str], breaks: frozenset[int]) -> str:
    """Words joined by spaces, with a paragraph break before the indices in ``breaks``."""
    return "".join(("\n\n" if i in breaks else " ") + w if i else w for i, w in enumerate(words))


def _apply_edits(words: list[str], edits: list[tuple[float, float, str]]) -> list[str]:
    out = list(words)
    for op, where, word in edits:
        pos = min(int(where * len(out)), len(out) - 1)
        if op < 0.5:
            out[pos] = word
        elif op < 0.75:
            out.insert(pos, word)
        elif len(out) > 2 * NGRAM:
            del out[pos]
    return out


def edited_copy(words: list[str], lo: float, hi: float, rng: random.Random,
                vocab: list[str]) -> tuple[list[str], float]:
    """A copy of ``words`` edited (replace, insert, delete words) until its 5-shingle Jaccard to it is in [lo, hi].

    A random edit sequence is drawn and the number of its edits applied is bisected for a target
    Jaccard drawn in [lo, hi]; ~8 evaluations instead of one per edit.
    """
    folded = [w.casefold() for w in words]
    base = shingle_set(folded)
    for _ in range(50):
        target = rng.uniform(lo, hi)
        # An edit changes at most 5 of ~len(words) shingles: len/3 edits reach well below Jaccard 0.5.
        edits = [(rng.random(), rng.random(), rng.choice(vocab)) for _ in range(max(8, len(words) // 3))]
        left, right = 1, len(edits)
        while left < right:  # smallest m whose Jaccard is <= target (Jaccard falls as edits add up)
            mid = (left + right) // 2
            j = jaccard(base, shingle_set([w.casefold() for w in _apply_edits(folded, edits[:mid])]))
            left, right = (mid + 1, right) if j > target else (left, mid)
        out = _apply_edits(words, edits[:left])
        j = jaccard(base, shingle_set([w.casefold() for w in out]))
        if lo <= j <= hi and j < 1.0:
            return out, j
    raise BenchError(f"could not edit a {len(words)}-word document to a Jaccard in [{lo}, {hi}]")


def exact_variant(words: list[str], rng: random.Random) -> str:
    """The same words with other case and whitespace: equal after either system's normalisation."""
    out = []
    for w in words:
        r = rng.random()
        out.append(w.upper() if r < 0.15 else w.capitalize() if r < 0.3 else w)
    return "".join((rng.choice(["  ", "\n", " ", " \t "]) if i else "") + w for i, w in enumerate(out))


def make_dedup_corpus(pool: list[str], n_docs: int, seed: int = SEED, near_share: float = 0.10,
                      exact_share: float = 0.03, decoy_share: float = 0.04) -> DedupCorpus:
    """``n_docs`` documents: unrelated ones drawn from ``pool``, plus planted near/exact copies and decoys."""
    if len(pool) < 1000:
        raise BenchError(f"sentence pool too small ({len(pool)} sentences) for a dedup corpus")
    rng = random.Random(seed)
    vocab = sorted({w for s in rng.sample(pool, min(len(pool), 20_000)) for w in s.split() if w.isalpha()})
    n_near, n_exact, n_decoy = int(n_docs * near_share), int(n_docs * exact_share), int(n_docs * decoy_share)
    n_base = n_docs - n_near - n_exact - n_decoy
    ids = iter(f"d{i:08d}" for i in rng.sample(range(10**8), n_docs))
    corpus = DedupCorpus([], {}, {}, {})
    bases: list[tuple[str, list[str], frozenset[int]]] = []

    def add(text: str, kind: str, family: int | None = None, base_j: float | None = None) -> str:
        doc_id = next(ids)
        corpus.docs.append({"id": doc_id, "url": f"https://bench.example.test/{doc_id}", "text": text})
        corpus.kind[doc_id] = kind
        if family is not None:
            corpus.family[doc_id] = family
        if base_j is not None:
            corpus.base_jaccard[doc_id] = base_j
        return doc_id

    for _ in range(n_base):
        target, words, breaks = rng.randint(150, 600), [], set()
        while len(words) < target:
            if rng.random() < 0.25 and words:
                breaks.add(len(words))
            words += rng.choice(pool).split()
        frozen = frozenset(breaks)
        bases.append((add(_render(words, frozen), "unique"), words, frozen))

    families: dict[str, int] = {}

    def family_of(base_id: str) -> int:
        if base_id not in families:
            families[base_id] = len(families)
            corpus.family[base_id] = families[base_id]
            corpus.kind[base_id] = "base"
        return families[base_id]

    def plant(count: int, kind: str, lo: float, hi: float, per_base: list[int]) -> None:
        while count > 0:
            base_id, words, breaks = rng.choice(bases)
            for _ in range(min(count, rng.choice(per_base))):
                if kind == "exact":
                    add(exact_variant(words, rng), kind, family_of(base_id), 1.0)
                else:
                    edited, j = edited_copy(words, lo, hi, rng, vocab)
                    add(_render(edited, breaks), kind, family_of(base_id), j)
                count -= 1

    plant(n_near, "near", 0.85, 0.98, [1, 1, 2, 3])
    plant(n_exact, "exact", 1.0, 1.0, [1])
    plant(n_decoy, "decoy", 0.5, 0.7, [1])
    rng.shuffle(corpus.docs)
    return corpus


def true_clusters(corpus: DedupCorpus, threshold: float = THRESHOLD) -> list[set[str]]:
    """Connected components (size >= 2) of the pairs of each family at Jaccard >= threshold or equal text."""
    by_family: dict[int, list[str]] = defaultdict(list)
    for doc_id, fam in corpus.family.items():
        by_family[fam].append(doc_id)
    texts = {d["id"]: d["text"] for d in corpus.docs}
    clusters: list[set[str]] = []
    for members in by_family.values():
        words = {m: norm_words(texts[m]) for m in members}
        sets = {m: shingle_set(words[m]) for m in members}
        parent = {m: m for m in members}
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if words[a] == words[b] or jaccard(sets[a], sets[b]) >= threshold:
                    parent[_find(parent, a)] = _find(parent, b)
        groups: dict[str, set[str]] = defaultdict(set)
        for m in members:
            groups[_find(parent, m)].add(m)
        clusters += [g for g in groups.values() if len(g) >= 2]
    return clusters


def _find(parent: dict[str, str], x: str) -> str:
    while parent[x] != x:
        x = parent[x]
    return x


def score(removed: set[str], clusters: list[set[str]]) -> dict[str, float]:
    """Recall and precision of a removed set against the true clusters (any survivor counts)."""
    tp = sum(min(len(removed & c), len(c) - 1) for c in clusters)
    should = sum(len(c) - 1 for c in clusters)
    return {"removed": len(removed), "should_remove": should, "true_positives": tp,
            "recall": tp / should if should else 1.0, "precision": tp / len(removed) if removed else 1.0}


def error_profile(removed: set[str], clusters: list[set[str]], corpus: DedupCorpus) -> str:
    """Where a system errs: recall on single near copies by Jaccard band, and the decoys it removed."""
    bands = {"0.85-0.90": [0, 0], "0.90-0.95": [0, 0], "0.95-1.00": [0, 0]}
    for c in clusters:
        copies = [m for m in c if corpus.kind.get(m) == "near"]
        if len(c) != 2 or len(copies) != 1:
            continue
        j = corpus.base_jaccard[copies[0]]
        band = bands["0.85-0.90" if j < 0.9 else "0.90-0.95" if j < 0.95 else "0.95-1.00"]
        band[0] += bool(removed & c)
        band[1] += 1
    in_clusters = set().union(*clusters) if clusters else set()
    decoys = [d for d, k in corpus.kind.items() if k == "decoy" and d not in in_clusters]
    by_band = ", ".join(f"{name} {hit}/{total}" for name, (hit, total) in bands.items())
    return f"pairs found by Jaccard {by_band}; decoys removed {len(removed & set(decoys))}/{len(decoys)}"


def write_docs(docs: list[dict[str, str]], directory: Path, shards: int) -> list[Path]:
    """``docs`` round-robin into ``shards`` Parquet files with id, url, text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        part = docs[s::shards]
        table = pa.table({k: pa.array([d[k] for d in part], pa.string()) for k in ("id", "url", "text")})
        paths.append(directory / f"{s:05d}.parquet")
        pq.write_table(table, paths[-1], compression="zstd")
    return paths


# ---------------------------------------------------------------------------------------------
# Running the two sides


def stage_config(stage: Any, **changes: Any) -> Any:
    """The stage's shipped config (conf/tiny.yaml, as ``make pipeline`` runs it) with ``changes``; lists (from
    the JSON spec of a child) become the tuples the config holds. The config class checks the result."""
    import dataclasses

    from llmpipe.project import stage_config as shipped

    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    return dataclasses.replace(shipped(stage.name), **changes)


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have been waited for (pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class StageRun:
    """What a child process running one llmpipe stage reports."""

    seconds: float  # wall time of run(cfg, ctx)
    cpu: float  # CPU seconds of the child and its pool workers over the same span
    metrics: dict[str, float]  # what the stage returned
    config: dict[str, Any]  # the stage's validated config


def run_stage(name: str, out: Path, inputs: dict[str, Path], logfile: Path, **overrides: Any) -> StageRun:
    """Run llmpipe's stage ``name`` in a fresh child process of this venv, as the orchestrator does.

    A fresh process per stage (not this one, which holds the corpora in memory) so that the pool's
    forked workers start from the same small parent a real run has. The stage's log and progress
    bars go to ``logfile``.
    """
    shutil.rmtree(out, ignore_errors=True)
    spec = {"stage": name, "out": str(out), "inputs": {k: str(v) for k, v in inputs.items()}, "overrides": overrides}
    result = _child(["--stage-child", json.dumps(spec)], logfile, f"llmpipe {name}")
    return StageRun(result["seconds"], result["cpu_seconds"], result["metrics"], result["config"])


def stage_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The child side of ``run_stage``: compose the config, time ``run(cfg, ctx)``."""
    import dataclasses
    import importlib

    from pipeline import StageContext

    stage = importlib.import_module(f"stages.{spec['stage']}").STAGE
    cfg = stage_config(stage, **spec["overrides"])
    for module in PREIMPORT.get(stage.name, ()):
        importlib.import_module(module)
    if stage.name == "tokenize":
        from transformers import AutoTokenizer  # noqa: F401  (transformers resolves it lazily)
    out = Path(spec["out"])
    out.mkdir(parents=True)
    ctx = StageContext(stage=stage.name, fingerprint="bench", output_dir=out,
                       inputs={k: Path(v) for k, v in spec["inputs"].items()},
                       log=logging.getLogger(f"llmpipe.bench.{stage.name}"))
    start, cpu = time.perf_counter(), cpu_seconds()
    metrics = stage.run(cfg, ctx)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}


def _child(args: list[str], logfile: Path, what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python bench/data.py ARGS`` in this venv (stderr to ``logfile``); its last stdout line as JSON."""
    with open(logfile, "w") as err:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE,
                              stderr=err, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise BenchError(f"{what} failed (exit {proc.returncode}); log {logfile}:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_datatrove(what: str, args: list[str], out: Path, logfile: Path) -> dict[str, Any]:
    """Run the DataTrove runner in .venv-bench; its JSON result (its own timing of the pipeline)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BENCH_PYTHON), str(RUNNER), what, "--out", str(out), *args]
    with open(logfile, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise BenchError(f"DataTrove {what} failed (exit {proc.returncode}); log {logfile}:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_records(path: str) -> tuple[int, int]:
    """(records, bytes of payload) of one WARC file, every payload read: the I/O floor."""
    from warcio.archiveiterator import ArchiveIterator

    records = payload = 0
    with open(path, "rb") as fh:
        for record in ArchiveIterator(fh):
            records += 1
            payload += len(record.content_stream().read())
    return records, payload


def warcio_floor(files: list[Path], workers: int) -> tuple[float, int]:
    """Wall seconds for warcio alone to read every record of ``files`` (``workers`` processes)."""
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    if workers <= 1:
        counts = [_read_records(str(f)) for f in files]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            counts = list(pool.map(_read_records, [str(f) for f in files]))
    return time.perf_counter() - start, sum(c[0] for c in counts)


def datatrove_counts(result: dict[str, Any], step: int) -> dict[str, int]:
    return result["stats"][step]["counts"]


def ensure_baseline_venv() -> None:
    """Create .venv-bench if needed (bench/setup_baselines.sh: idempotent, returns at once when done)."""
    proc = subprocess.run(["bash", str(SETUP)], cwd=REPO)
    if proc.returncode != 0 or not BENCH_PYTHON.exists():
        raise BenchError(f"bash {SETUP.relative_to(REPO)} failed (exit {proc.returncode}): no DataTrove baseline")


# ---------------------------------------------------------------------------------------------
# The three benchmarks


@dataclass
class Bench:
    work: Path
    workers: int
    scale: float
    rows: list[Row] = field(default_factory=list)
    ingest_docs: Path | None = None  # llmpipe's ingest output, the source of the dedup sentences

    def path(self, name: str) -> Path:
        return self.work / name


def bench_ingest(b: Bench, with_trafilatura: bool) -> None:
    copies = max(1, round(INGEST_COPIES * b.scale))
    t0 = time.perf_counter()
    warcs = build_bench_warcs(EMBEDDED, b.path("warc"), copies=copies, files=4 * b.workers)
    print(f"ingest corpus: {copies} copies of {EMBEDDED.relative_to(REPO)} -> {len(warcs.files)} WARC.gz files, "
          f"{warcs.records:,} records, {warcs.pages:,} HTML pages, {warcs.bytes / 1e6:.1f} MB "
          f"(built in {time.perf_counter() - t0:.1f}s)", flush=True)
    pattern = str(b.path("warc") / "*.warc.gz")

    floor_s, floor_records = warcio_floor(warcs.files, b.workers)
    if floor_records != warcs.records:
        raise BenchError(f"warcio read {floor_records} records, {warcs.records} were written")

    ours = run_stage("ingest", b.path("llmpipe-ingest"), {}, b.path("llmpipe-ingest.log"), input=[pattern],
                     workers=b.workers)
    b.ingest_docs = b.path("llmpipe-ingest") / "documents"
    extractor_name = ours.config["extractor"]
    print(f"  llmpipe ingest ({extractor_name}): {ours.seconds:.1f}s, {int(ours.metrics['docs_out']):,} documents "
          f"out of {int(ours.metrics['docs_in']):,} records", flush=True)

    dt = run_datatrove("ingest", ["--warc-dir", str(b.path("warc")), "--tasks", str(len(warcs.files)),
                                  "--workers", str(b.workers), "--extract-timeout", str(EXTRACT_TIMEOUT)],
                       b.path("datatrove-ingest"), b.path("datatrove-ingest.log"))
    reader, extractor = datatrove_counts(dt, 0), datatrove_counts(dt, 1)
    print(f"  DataTrove WarcReader + Trafilatura: {dt['seconds']:.1f}s, {extractor.get('forwarded', 0):,} "
          f"documents out of {reader.get('documents', 0):,} read, {extractor.get('timeout', 0)} timeouts", flush=True)

    pages = warcs.pages
    b.rows.append(Row("ingest", "pages/s", pages / ours.seconds, pages / dt["seconds"], TARGETS["ingest"],
                      ours_cpu=ours.cpu, base_cpu=dt["cpu_seconds"], notes=[
        f"llmpipe ingest ({extractor_name}, {b.workers} workers): {ours.seconds:.2f}s ({ours.cpu:.1f} CPU-s) for "
        f"{pages:,} HTML pages ({warcs.records:,} records); {int(ours.metrics['docs_out']):,} documents out",
        f"DataTrove WarcReader + Trafilatura + ParquetWriter ({len(warcs.files)} tasks, {b.workers} workers): "
        f"{dt['seconds']:.2f}s ({dt['cpu_seconds']:.1f} CPU-s); {extractor.get('forwarded', 0):,} documents out "
        f"of {reader.get('documents', 0):,} read (it also extracts 4xx pages), {extractor.get('timeout', 0)} "
        f"extraction timeouts (limit {EXTRACT_TIMEOUT:g}s/page)",
        f"floor, warcio alone reading every record and payload: {floor_s:.2f}s = {pages / floor_s:,.0f} pages/s; "
        f"llmpipe ingest runs at {floor_s / ours.seconds:.0%} of it",
    ]))
    if with_trafilatura:
        traf = run_stage("ingest", b.path("llmpipe-ingest-trafilatura"), {}, b.path("llmpipe-ingest-trafilatura.log"),
                         input=[pattern], workers=b.workers, extractor="trafilatura")
        b.rows.append(Row("ingest, both trafilatura", "pages/s", pages / traf.seconds, pages / dt["seconds"], None,
                          ours_cpu=traf.cpu, base_cpu=dt["cpu_seconds"], notes=[
            f"llmpipe ingest with extractor=trafilatura: {traf.seconds:.2f}s ({traf.cpu:.1f} CPU-s), "
            f"{int(traf.metrics['docs_out']):,} documents out "
            "(same extractor library as the baseline, other options: the framework's share of the difference)",
        ]))


def ingest_texts_for_pool(b: Bench) -> list[str]:
    """The texts llmpipe's ingest extracted from the bench WARC (running it, untimed, when ingest was skipped)."""
    import pyarrow.parquet as pq

    from stages.common.shards import list_parquet

    if b.ingest_docs is None:
        build_bench_warcs(EMBEDDED, b.path("warc"), copies=max(1, round(INGEST_COPIES * b.scale)),
                          files=4 * b.workers)
        run_stage("ingest", b.path("llmpipe-ingest"), {}, b.path("llmpipe-ingest.log"),
                  input=[str(b.path("warc") / "*.warc.gz")], workers=b.workers)
        b.ingest_docs = b.path("llmpipe-ingest") / "documents"
    return [t for p in list_parquet(b.ingest_docs) for t in pq.read_table(p, columns=["text"]).column(0).to_pylist()]


def dedup_corpus(b: Bench) -> tuple[DedupCorpus, list[Path]]:
    docs_dir = b.path("dedup-docs")
    n_docs = max(2000, round(DEDUP_DOCS * b.scale))
    t0 = time.perf_counter()
    pool = sentence_pool(ingest_texts_for_pool(b))
    corpus = make_dedup_corpus(pool, n_docs)
    paths = write_docs(corpus.docs, docs_dir, shards=4 * b.workers)
    kinds = defaultdict(int)
    for k in corpus.kind.values():
        kinds[k] += 1
    words = sum(len(d["text"].split()) for d in corpus.docs)
    print(f"dedup corpus: {len(corpus.docs):,} documents ({words / len(corpus.docs):.0f} words on average) from "
          f"{len(pool):,} distinct sentences; planted: {kinds['near']:,} near copies, {kinds['exact']:,} exact "
          f"copies, {kinds['decoy']:,} decoys; {len(paths)} Parquet shards (built in "
          f"{time.perf_counter() - t0:.1f}s)", flush=True)
    return corpus, paths


def bench_dedup(b: Bench, corpus: DedupCorpus, docs_dir: Path) -> None:
    import pyarrow.parquet as pq

    from stages.common.shards import list_parquet

    clusters = true_clusters(corpus)
    n = len(corpus.docs)
    run = run_stage("dedup", b.path("llmpipe-dedup"), {"ingest.documents": docs_dir}, b.path("llmpipe-dedup.log"),
                    workers=b.workers)
    cfg, metrics = run.config, run.metrics
    ours_removed = {i for p in list_parquet(b.path("llmpipe-dedup") / "removed")
                    for i in pq.read_table(p, columns=["id"]).column(0).to_pylist()}
    ours = score(ours_removed, clusters)
    print(f"  llmpipe dedup: {run.seconds:.1f}s, removed {len(ours_removed):,}", flush=True)

    dt = run_datatrove("dedup", ["--docs-dir", str(docs_dir), "--tasks", str(len(list_parquet(docs_dir))),
                                 "--workers", str(b.workers)], b.path("datatrove-dedup"), b.path("datatrove-dedup.log"))
    dt_removed = {i for p in sorted(Path(dt["removed_dir"]).glob("*.parquet"))
                  for i in pq.read_table(p, columns=["id"]).column(0).to_pylist()}
    base = score(dt_removed, clusters)
    print(f"  DataTrove MinHash (4 steps): {dt['seconds']:.1f}s, removed {len(dt_removed):,}", flush=True)

    steps = ", ".join(f"{k} {v:.1f}s" for k, v in dt["step_seconds"].items())
    own_steps = ", ".join(f"{k.removeprefix('seconds_')} {v:.1f}s" for k, v in metrics.items()
                          if k.startswith("seconds_"))
    truth = (f"ground truth: {len(clusters):,} clusters, {ours['should_remove']:,} documents to remove "
             f"(Jaccard >= {THRESHOLD} on {NGRAM}-word shingles)")
    b.rows.append(Row("dedup", "docs/s", n / run.seconds, n / dt["seconds"], TARGETS["dedup"], ours_cpu=run.cpu,
                      base_cpu=dt["cpu_seconds"], notes=[
        truth,
        f"llmpipe dedup ({cfg['num_perm']} perms, LSH {int(metrics['lsh_bands'])}x{int(metrics['lsh_rows'])}, "
        f"verify={cfg['verify']}): {run.seconds:.2f}s ({run.cpu:.1f} CPU-s; {own_steps}); recall {ours['recall']:.4f}, "
        f"precision {ours['precision']:.4f} ({ours['removed']:,} removed); "
        f"{error_profile(ours_removed, clusters, corpus)}",
        f"DataTrove ({dt['config']}): {dt['seconds']:.2f}s ({dt['cpu_seconds']:.1f} CPU-s; {steps}); recall "
        f"{base['recall']:.4f}, precision {base['precision']:.4f} ({base['removed']:,} removed); "
        f"{error_profile(dt_removed, clusters, corpus)}",
    ]))
    b.rows.append(Row("dedup recall", "", ours["recall"], base["recall"], 1.0,
                      ["target: llmpipe recall >= DataTrove's"]))


def bench_tokenize(b: Bench, docs_dir: Path) -> None:
    from stages.common.shards import list_parquet

    tok_dir = b.path("tokenizer")
    t0 = time.perf_counter()
    spec = {"docs": [str(p) for p in list_parquet(docs_dir)], "out": str(tok_dir), "workers": b.workers,
            "max_chars": TOKENIZER_TRAIN_CHARS}
    vocab = _child(["--train-tokenizer", json.dumps(spec)], b.path("tokenizer.log"), "tokenizer training")["vocab"]
    print(f"tokenizer: byte-level BPE, vocab {vocab}, trained on {TOKENIZER_TRAIN_CHARS / 1e6:g} MB of text in "
          f"{time.perf_counter() - t0:.1f}s (untimed)", flush=True)

    run = run_stage("tokenize", b.path("llmpipe-tokenize"), {"decontaminate.documents": docs_dir},
                    b.path("llmpipe-tokenize.log"), workers=b.workers, tokenizer=str(tok_dir))
    metrics = run.metrics
    ours_tokens = int(metrics["doc_tokens_train"] + metrics["doc_tokens_val"] - metrics["docs_out"])  # without EOS
    print(f"  llmpipe tokenize: {run.seconds:.1f}s, {ours_tokens:,} tokens", flush=True)

    spec = {"docs": [str(p) for p in list_parquet(docs_dir)], "tokenizer": str(tok_dir), "workers": b.workers,
            "cache": str(b.path("datasets-cache"))}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false" if b.workers > 1 else "true", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    base = _child(["--tokenize-baseline", json.dumps(spec)], b.path("datasets-map.log"), "datasets.map baseline", env)
    print(f"  datasets.map: {base['seconds']:.1f}s, {base['tokens']:,} tokens", flush=True)
    same = "the same" if base["tokens"] == ours_tokens else f"DIFFERENT: {base['tokens']:,} vs {ours_tokens:,}"
    b.rows.append(Row("tokenize", "tokens/s", ours_tokens / run.seconds, base["tokens"] / base["seconds"],
                      TARGETS["tokenize"], ours_cpu=run.cpu, base_cpu=base["cpu_seconds"], notes=[
        f"llmpipe tokenize ({b.workers} workers): {run.seconds:.2f}s ({run.cpu:.1f} CPU-s) for {ours_tokens:,} tokens "
        f"of {int(metrics['docs_out']):,} documents: encode, pack into {run.config['seq_len']}-token rows, write token "
        "files and held-out Parquet",
        f"datasets.map (num_proc={b.workers}, batched): {base['seconds']:.2f}s ({base['cpu_seconds']:.1f} CPU-s); "
        f"token counts {same}",
    ]))


def _batches(texts: Any, max_chars: int, size: int = 1000) -> Any:
    batch, seen = [], 0
    for t in texts:
        batch.append(t)
        seen += len(t)
        if len(batch) == size or seen >= max_chars:
            yield batch
            batch = []
        if seen >= max_chars:
            return
    if batch:
        yield batch


def train_tokenizer_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the bench tokenizer with the tokenize stage's own trainer (the shipped config, tokenizer null)."""
    import pyarrow.parquet as pq

    from stages.tokenize import stage as tokenize

    cfg = stage_config(tokenize.STAGE, workers=spec["workers"], tokenizer=None)
    texts = (t for p in spec["docs"] for t in pq.read_table(p, columns=["text"]).column(0).to_pylist())
    tok = tokenize.train_tokenizer(cfg, _batches(texts, max_chars=spec["max_chars"]))
    tokenize.save_tokenizer(tok, Path(spec["out"]), portable_class=True)
    return {"vocab": len(tok)}


def tokenize_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The datasets.map side (run in a child process): load untimed, then time ``map``."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"], local_files_only=True)
    ds = datasets.Dataset.from_parquet(spec["docs"], columns=["text"], cache_dir=spec["cache"])

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tok(batch["text"], add_special_tokens=False, return_attention_mask=False)

    start, cpu = time.perf_counter(), cpu_seconds()
    out = ds.map(encode, batched=True, batch_size=1000, num_proc=spec["workers"] if spec["workers"] > 1 else None,
                 remove_columns=["text"], load_from_cache_file=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py()
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "docs": len(out)}


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.4g}"


def print_table(rows: list[Row]) -> None:
    header = ("stage", "unit", "llmpipe", "baseline", "ratio", "target", "result", "cpu ratio")
    cells = [header] + [(r.stage, r.unit, _fmt(r.ours), _fmt(r.base), f"{r.ratio:.2f}x" if r.ratio else "-",
                         f">= {r.target:g}x" if r.target else "-", r.verdict,
                         f"{r.cpu_ratio:.2f}x" if r.cpu_ratio else "-") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print()
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(c, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for r in rows:
        for note in r.notes:
            print(f"  [{r.stage}] {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"corpus size factor (1: {INGEST_COPIES} copies of the embedded corpus, "
                             f"{DEDUP_DOCS:,} documents)")
    parser.add_argument("--workers", type=int, default=2, help="processes on both sides")
    parser.add_argument("--only", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--ingest-trafilatura", action="store_true",
                        help="also time llmpipe's ingest with extractor=trafilatura (an information row)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    # Internal: the child processes (a JSON spec each).
    parser.add_argument("--stage-child", help=argparse.SUPPRESS)
    parser.add_argument("--train-tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--tokenize-baseline", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, child in (("stage_child", stage_child), ("train_tokenizer", train_tokenizer_child),
                        ("tokenize_baseline", tokenize_baseline)):
        if getattr(args, flag):
            sys.path.insert(0, str(REPO))
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            print(json.dumps(child(json.loads(getattr(args, flag)))))
            return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(STAGES))
    if unknown or args.workers < 1 or args.scale <= 0:
        parser.error(f"--only: unknown {unknown}" if unknown else "--workers and --scale must be positive")

    sys.path.insert(0, str(REPO))
    from pipeline.processes import child_env

    os.environ["PYTHONPATH"] = child_env(pythonpath=[REPO])["PYTHONPATH"]  # the stages' worker pools import us
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"bench/data.py: workers={args.workers}, scale={args.scale:g}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    work_ctx = (contextlib.nullcontext(str(args.keep)) if args.keep
                else tempfile.TemporaryDirectory(prefix="bench-data-"))
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        ensure_baseline_venv()
        with work_ctx as work:
            Path(work).mkdir(parents=True, exist_ok=True)
            b = Bench(Path(work), args.workers, args.scale, rows)
            if "ingest" in only:
                bench_ingest(b, args.ingest_trafilatura)
            if "dedup" in only or "tokenize" in only:
                corpus, paths = dedup_corpus(b)
                if "dedup" in only:
                    bench_dedup(b, corpus, paths[0].parent)
                if "tokenize" in only:
                    bench_tokenize(b, paths[0].parent)
    except (BenchError, OSError, ValueError, KeyError) as exc:
        print_table(rows)
        print(f"bench/data.py: error: {exc}", file=sys.stderr)
        return 1
    print_table(rows)
    load = os.getloadavg()[0]
    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at the end {load:.1f} on {os.cpu_count()} CPUs"
          + (" (a busy machine: figures are noisy)" if load > (os.cpu_count() or 1) else ""))
    if args.json:
        args.json.write_text(json.dumps([{"stage": r.stage, "unit": r.unit, "llmpipe": r.ours, "baseline": r.base,
                                          "ratio": r.ratio, "target": r.target, "result": r.verdict,
                                          "llmpipe_cpu_s": r.ours_cpu, "baseline_cpu_s": r.base_cpu,
                                          "notes": r.notes} for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
