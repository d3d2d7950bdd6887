"""Preference pairs for the align stage: (prompt, chosen, rejected) from one of three sources.

``data.source``:

- ``corpus`` (the tiny default): pairs built from the cleaned corpus with no labelling (below).
- ``files``: JSONL (.jsonl, .jsonl.gz) or Parquet files (paths or globs) with ``prompt``,
  ``chosen``, ``rejected``, in TRL's preference formats: each a string, or lists of chat messages
  (``prompt`` may also be left out when ``chosen`` and ``rejected`` hold the whole conversation:
  the shared turns become the prompt, with ``trl.maybe_extract_prompt``). ``chosen`` and
  ``rejected`` must end up as one assistant reply each. An optional ``id`` column keys the split.
  The format is checked per file on its first record (JSONL: the first line that parses; Parquet:
  the columns): without ``chosen`` and ``rejected`` the file is in no preference format, a
  ``PreferenceDataError`` naming the file, the line and the keys found.
- ``dataset``: the same records from ``datasets.load_dataset(data.dataset, split=data.dataset_split)``
  (a hub name on a cluster with the hub or its cache, or a local dataset dir), e.g.
  ``HuggingFaceH4/ultrafeedback_binarized`` with split ``train_prefs``.

Records that cannot be used are counted and skipped with a reason (``dropped_<reason>`` in the
stage's metrics): bad JSON, a missing or malformed field, a multi-turn reply, chosen identical to
rejected, a chat marker spelled inside content. Every record is read; ``max_pairs`` usable pairs are
kept, a seeded subset (the smallest seeded hashes of their content) that file order does not decide;
``pairs_not_sampled`` counts the rest.

The corpus scheme (deterministic: the same corpus and config give the same pairs, byte for byte):

- Documents are read from ``pii.documents`` shard by shard, rows in order, until ``max_pairs``
  pairs exist. A document's text is split into words (any whitespace run is one separator) and
  cut into up to ``pairs_per_doc`` consecutive windows of ``prompt_words + completion_words``
  words from its start. Documents shorter than one window are skipped (``dropped_too_short``),
  as are documents with no text (``dropped_no_text``).
- Each window gives one pair. The prompt is a user turn, ``instruction`` then the first
  ``prompt_words`` words of the window; **chosen** is the true continuation (the window's last
  ``completion_words`` words), as the assistant turn; **rejected** is a corrupted continuation of
  the same length in words, made by one of ``corruptions`` drawn per pair:

  * ``shuffle``: the true continuation's words in a random order (the same bag of words, so only
    word order gives it away);
  * ``other_doc``: the continuation of a window of another document (fluent text, off topic);
  * ``repeat``: one word of the true continuation repeated ``completion_words`` times.

  A corruption that happens to reproduce the true continuation (a shuffle of identical words, a
  duplicate document) is replaced by another kind; a pair for which every kind fails is dropped
  (``dropped_no_corruption``). A pair whose text spells a chat marker (``<|user|>``...) is dropped
  too (``dropped_marker_in_content``): it would forge a turn once rendered.
- Held-out split by document, so no document has pairs on both sides: documents are ordered by
  a salted hash of their id (``seed``) and the first ``eval_fraction`` of them (at least one)
  hold out their pairs. Adding documents to the corpus moves no existing document across splits.
  Records of ``files``/``dataset`` are split the same way, each record its own "document".

Every random choice uses a ``random.Random`` seeded with (``seed``, document id, window index),
so a pair does not depend on which other documents were read before it; ``other_doc`` draws its
donor among the pairs collected, which depend on the corpus prefix read (fixed by shard order).

The pairs of every source are written next to the model (``preferences/{train,eval}.parquet``)
so what the model was aligned on can be inspected.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.schema import Invalid
from stages.common.training import DataSource, TrainingDataError, source_problems

KEY = "stage.align.data"  # how runtime errors name this block
Corruption = Literal["shuffle", "other_doc", "repeat"]
CORRUPTIONS: tuple[str, ...] = ("shuffle", "other_doc", "repeat")
EXTERNAL = "external"  # the kind of a pair read from files or a dataset
PAIR_COLUMNS = ("id", "doc_id", "url", "prompt", "chosen", "rejected", "kind")


class PreferenceDataError(TrainingDataError):
    """The corpus cannot give a usable preference set (missing columns, too few documents...)."""


@dataclass(frozen=True, kw_only=True)
class PreferenceDataConfig:
    source: DataSource  # corpus: pairs built from pii.documents | files | dataset
    files: tuple[str, ...]  # source=files: JSONL/Parquet paths or globs with prompt/chosen/rejected
    dataset: str | None  # source=dataset: a `datasets` name or local dataset dir for load_dataset
    dataset_split: str  # source=dataset: the split read
    instruction: str  # source=corpus: user-turn text put before the passage start
    prompt_words: int  # source=corpus: words of the passage start shown in the prompt
    completion_words: int  # source=corpus: words of the chosen (true) and rejected (corrupted) continuations
    pairs_per_doc: int  # source=corpus: consecutive windows taken from the start of each document, at most
    max_pairs: int  # pairs kept (train + held out): corpus reads until then; files/dataset keep a seeded subset
    corruptions: tuple[Corruption, ...]  # source=corpus: how rejected continuations are made, one drawn per pair
    eval_fraction: float  # share of documents (or records) whose pairs are held out for evaluation
    seed: int  # drives corruption draws and the held-out split

    def __post_init__(self) -> None:
        from stages.common.chat import MARKERS

        problems = [(name, f"must be >= 1, got {getattr(self, name)}")
                    for name in ("prompt_words", "completion_words", "pairs_per_doc", "max_pairs")
                    if getattr(self, name) < 1]
        problems += source_problems(self.source, self.files, self.dataset)
        if not self.corruptions:
            problems.append(("corruptions", "is empty: name at least one of " + ", ".join(CORRUPTIONS)))
        if any(m in self.instruction for m in MARKERS):
            problems.append(("instruction", f"{self.instruction!r} spells a chat marker ({', '.join(MARKERS)})"))
        if not 0.0 < self.eval_fraction < 1.0:
            problems.append(("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}"))
        Invalid.check(problems)


@dataclass(frozen=True)
class Pair:
    id: str  # corpus: "<doc_id>#<window>"; files/dataset: the record's id or "<source>:<row>"
    doc_id: str  # the unit of the held-out split (the document, or the record itself)
    url: str
    prompt: tuple[tuple[str, str], ...]  # the conversation before the reply: (role, content) turns
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred assistant reply
    kind: str  # corpus: the corruption that made ``rejected``; files/dataset: "external"

    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.prompt]


@dataclass
class PreferenceData:
    train: list[Pair]
    eval: list[Pair]
    counts: Counter = field(default_factory=Counter)  # docs_read, dropped_<reason>, corruption_<kind>

    def metrics(self) -> dict[str, float]:
        out = {f"data/{k}": float(v) for k, v in sorted(self.counts.items())}
        out["data/pairs_train"] = float(len(self.train))
        out["data/pairs_eval"] = float(len(self.eval))
        return out


# ---------------------------------------------------------------- building


def build_pairs(documents: Path | None, cfg: PreferenceDataConfig) -> PreferenceData:
    """The pairs of ``cfg.source``, split into train and held out.

    ``documents`` (a dir of Parquet shards with ``id``, ``url``, ``text``) is read for the corpus
    source only.
    """
    if cfg.source == "corpus":
        return corpus_pairs(documents, cfg)
    counts: Counter = Counter()
    records = _file_records(cfg) if cfg.source == "files" else _dataset_records(cfg)

    def usable() -> Iterator[Pair]:
        for key, record in records:
            counts["records_read"] += 1
            pair, problem = _record_pair(key, record)
            if problem:
                counts[f"dropped_{problem}"] += 1
            else:
                yield pair

    # A seeded subset that does not depend on file order (the first max_pairs records of UltraFeedback are
    # one corner of it), as sft's max_examples: the pairs with the smallest seeded hash of their content.
    pairs = heapq.nsmallest(cfg.max_pairs, usable(), key=lambda p: _subset_key(cfg.seed, p))
    counts["pairs_not_sampled"] = counts["records_read"] - sum(v for k, v in counts.items()
                                                               if k.startswith("dropped_")) - len(pairs)
    if not pairs:
        raise PreferenceDataError(f"{KEY}.source={cfg.source}: no usable (prompt, chosen, rejected) record in "
                                  f"{_source_name(cfg)} ({_reasons(counts)})")
    return _split(pairs, cfg, counts)


def _subset_key(seed: int, pair: Pair) -> str:
    return hashlib.sha256(f"{seed}\0subset\0{pair.prompt}\0{pair.chosen}\0{pair.rejected}".encode()).hexdigest()


def corpus_pairs(documents: Path, cfg: PreferenceDataConfig) -> PreferenceData:
    """Build the corpus pairs (the scheme in the module docstring) and split them."""
    counts: Counter = Counter()
    windows: list[tuple[str, str, int, list[str], list[str]]] = []  # doc_id, url, index, prompt, continuation
    for doc_id, url, text in _read_documents(documents, counts):
        new = _windows(doc_id, url, text, cfg)
        if not new:
            counts["dropped_too_short" if text is not None else "dropped_no_text"] += 1
            continue
        windows.extend(new[: cfg.max_pairs - len(windows)])
        if len(windows) >= cfg.max_pairs:
            break
    pairs = [p for p in _corrupt(windows, cfg, counts) if _usable(p, cfg, counts)]
    return _split(pairs, cfg, counts)


def _usable(pair: Pair, cfg: PreferenceDataConfig, counts: Counter) -> bool:
    """A text that spells a chat marker (a page quoting ``<|user|>``) would forge a turn: count and skip it."""
    problem = _pair_problem(pair)
    if problem:
        counts[f"dropped_{problem}"] += 1
    return problem is None


def _pair_problem(pair: Pair) -> str | None:
    """Why ``pair`` cannot be rendered with the chat template (stages.common.chat's checks), or None."""
    from stages.common.chat import message_problem

    conv = conversational(pair)
    return message_problem(conv["prompt"] + conv["chosen"]) or message_problem(conv["prompt"] + conv["rejected"])


def _read_documents(documents: Path, counts: Counter):
    """Yield (id, url, text) in shard order, rows in order; only the three columns are read."""
    import pyarrow.parquet as pq

    from stages.common.shards import list_parquet

    shards = list_parquet(documents)
    if not shards:
        raise PreferenceDataError(f"input pii.documents: no Parquet shards in {documents}")
    for shard in shards:
        names = pq.read_schema(shard).names
        missing = [c for c in ("id", "text") if c not in names]
        if missing:
            raise PreferenceDataError(f"input pii.documents: {shard} lacks column(s) {missing}; it has {names}")
        columns = ["id", "text"] + (["url"] if "url" in names else [])
        table = pq.read_table(shard, columns=columns).to_pydict()
        urls = table.get("url") or [""] * len(table["id"])
        for doc_id, url, text in zip(table["id"], urls, table["text"], strict=True):
            counts["docs_read"] += 1
            yield str(doc_id), url or "", text


def _windows(doc_id: str, url: str, text: str | None, cfg: PreferenceDataConfig):
    if not text:
        return []
    words = text.split()
    size = cfg.prompt_words + cfg.completion_words
    return [(doc_id, url, i, words[i * size: i * size + cfg.prompt_words],
             words[i * size + cfg.prompt_words: (i + 1) * size])
            for i in range(min(cfg.pairs_per_doc, len(words) // size))]


def _rng(cfg: PreferenceDataConfig, doc_id: str, index: int, purpose: str) -> random.Random:
    """A generator seeded by (seed, document, window, purpose): independent of reading order."""
    digest = hashlib.sha256(f"{cfg.seed}\0{doc_id}\0{index}\0{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _corrupt(windows, cfg: PreferenceDataConfig, counts: Counter) -> list[Pair]:
    """One pair per window; the rejected continuation made by a drawn corruption kind."""
    pairs = []
    for doc_id, url, index, prompt, true in windows:
        rng = _rng(cfg, doc_id, index, "corruption")
        kinds = list(cfg.corruptions)
        rng.shuffle(kinds)  # the first kind is the draw; the others are fallbacks, in a seeded order
        for kind in kinds:
            rejected = _make_rejected(kind, true, doc_id, windows, rng)
            if rejected is not None and rejected != true:
                break
        else:
            counts["dropped_no_corruption"] += 1
            continue
        counts[f"corruption_{kind}"] += 1
        user = f"{cfg.instruction}\n{' '.join(prompt)}"
        pairs.append(Pair(id=f"{doc_id}#{index}", doc_id=doc_id, url=url, prompt=(("user", user),),
                          chosen=" ".join(true), rejected=" ".join(rejected), kind=kind))
    return pairs


def _make_rejected(kind: str, true: list[str], doc_id: str, windows, rng: random.Random) -> list[str] | None:
    if kind == "shuffle":
        words = list(true)
        rng.shuffle(words)
        return words
    if kind == "repeat":
        return [rng.choice(true)] * len(true)
    if kind == "other_doc":
        # A few draws over all windows rather than a list of donors: O(1) per pair on a large corpus.
        for _ in range(16):
            donor = windows[rng.randrange(len(windows))]
            if donor[0] != doc_id:
                return list(donor[4])
        return None
    raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")


def _split(pairs: list[Pair], cfg: PreferenceDataConfig, counts: Counter) -> PreferenceData:
    docs = sorted({p.doc_id for p in pairs})
    if len(docs) < 2:
        need = (f"documents need >= {cfg.prompt_words + cfg.completion_words} words: {KEY}.prompt_words + "
                "completion_words" if cfg.source == "corpus" else f"from {_source_name(cfg)}")
        raise PreferenceDataError(f"{KEY}.source={cfg.source} gave pairs from {len(docs)} document(s)/record(s); at "
                                  f"least 2 are needed for a held-out split ({need})")
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{cfg.seed}\0split\0{d}".encode()).hexdigest())
    held_out = set(ranked[: max(1, round(cfg.eval_fraction * len(docs)))])
    counts["docs_used"] = len(docs)
    counts["docs_eval"] = len(held_out)
    return PreferenceData(train=[p for p in pairs if p.doc_id not in held_out],
                          eval=[p for p in pairs if p.doc_id in held_out], counts=counts)


# ---------------------------------------------------------------- files and datasets


def _source_name(cfg: PreferenceDataConfig) -> str:
    return f"{KEY}.files={list(cfg.files)}" if cfg.source == "files" else \
        f"{KEY}.dataset={cfg.dataset!r} split {cfg.dataset_split!r}"


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing read"


PREFERENCE_KEYS = ("chosen", "rejected")  # what every TRL preference format has (prompt may be implicit)


def _check_format(path: Path, where: str, keys: list[str] | None) -> None:
    """Raise unless the first record of a file (at ``where``; ``keys`` None: not an object) is in a preference
    format: a file of other data (SFT conversations, unpaired labels) would otherwise be dropped record by record."""
    if keys is not None and all(k in keys for k in PREFERENCE_KEYS):
        return
    found = "none (not a JSON object)" if keys is None else ", ".join(sorted(map(str, keys))) or "none"
    raise PreferenceDataError(
        f"{KEY}.files: {path}: its first record ({where}) is in no preference format: it needs 'chosen' and "
        f"'rejected' (with 'prompt' as text or as messages, or with no prompt when chosen and rejected are whole "
        f"conversations sharing their first turns); keys found: {found}")


def _file_records(cfg: PreferenceDataConfig) -> Iterator[tuple[str, Any]]:
    """(key, record) for every record of the files, in file order; a broken JSON line is a None record.
    The first record of each file (the first line that parses; a Parquet file's columns) must have
    ``chosen`` and ``rejected`` (``_check_format``); later records without them are dropped and counted."""
    from stages.common.training import INVALID_JSON, expand_files, file_suffix, jsonl_records

    for path in expand_files(cfg.files, f"{KEY}.files"):
        name = file_suffix(path)
        if name in (".jsonl", ".json", ".jsonl.gz"):
            checked = False
            for row, record in jsonl_records(path):
                if not checked and record is not INVALID_JSON:
                    _check_format(path, f"line {row + 1}", list(record) if isinstance(record, dict) else None)
                    checked = True
                yield f"{path.name}:{row}", None if record is INVALID_JSON else record
        elif name == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if pf.metadata.num_rows:
                _check_format(path, "row 1", pf.schema_arrow.names)
            row = 0
            for batch in pf.iter_batches(batch_size=1000):
                for record in batch.to_pylist():
                    yield f"{path.name}:{row}", record
                    row += 1
        else:
            raise PreferenceDataError(f"{KEY}.files: {path} has an unsupported type {name!r} "
                                      "(expected .jsonl, .jsonl.gz or .parquet)")


def _dataset_records(cfg: PreferenceDataConfig) -> Iterator[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(cfg.dataset, split=cfg.dataset_split)
    except Exception as exc:  # datasets raises many types (not found, offline, bad split...)
        raise PreferenceDataError(f"{KEY}.dataset={cfg.dataset!r} split {cfg.dataset_split!r} cannot be loaded: "
                                  f"{type(exc).__name__}: {exc}") from exc
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise PreferenceDataError(f"{KEY}.dataset={cfg.dataset!r}: no column(s) {missing} "
                                  f"(columns: {', '.join(ds.column_names)})")
    for row, record in enumerate(ds):
        yield f"{cfg.dataset}:{cfg.dataset_split}:{row}", record


def _record_pair(key: str, record: Any) -> tuple[Pair | None, str | None]:
    """A record in one of TRL's preference formats as a Pair, or (None, the reason it is unusable)."""
    from trl.data_utils import maybe_extract_prompt

    if not isinstance(record, dict):
        return None, "bad_record"
    if any(not isinstance(record.get(k), (str, list)) for k in ("chosen", "rejected")):
        return None, "missing_chosen_or_rejected"
    try:
        record = maybe_extract_prompt(record)
    except (KeyError, TypeError, ValueError, IndexError):
        return None, "bad_record"
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        return None, "no_prompt"
    chosen, rejected = _reply(record["chosen"]), _reply(record["rejected"])
    if chosen is None or rejected is None:
        return None, "reply_not_one_assistant_message"
    if chosen == rejected:
        return None, "chosen_equals_rejected"
    rid = str(record["id"]) if record.get("id") is not None else key
    pair = Pair(id=rid, doc_id=rid, url="", prompt=tuple((str(m.get("role")), m.get("content")) for m in prompt),
                chosen=chosen, rejected=rejected, kind=EXTERNAL)
    return (None, problem) if (problem := _pair_problem(pair)) else (pair, None)


def _reply(value: Any) -> str | None:
    """The text of a reply given as a string or as a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    return None


# ---------------------------------------------------------------- formats


def conversational(pair: Pair) -> dict[str, Any]:
    """The pair in TRL's conversational preference format: the tokenizer's chat template renders it."""
    return {"prompt": pair.prompt_messages(),
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}]}


def datasets_for(data: PreferenceData) -> tuple[Any, Any]:
    """Train and held-out pairs as ``datasets`` in TRL's conversational preference format."""
    from datasets import Dataset

    return (Dataset.from_list([conversational(p) for p in data.train]),
            Dataset.from_list([conversational(p) for p in data.eval]))


def write_pairs(data: PreferenceData, out_dir: Path) -> None:
    """``out_dir/train.parquet`` and ``out_dir/eval.parquet``: one row per pair; ``prompt`` as a list of
    {role, content} turns, the other columns text."""
    import pyarrow as pa

    from stages.common.shards import write_parquet_atomic

    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([(c, pa.list_(turn) if c == "prompt" else pa.string()) for c in PAIR_COLUMNS])
    for split, pairs in (("train", data.train), ("eval", data.eval)):
        columns = {c: [p.prompt_messages() if c == "prompt" else getattr(p, c) for p in pairs] for c in PAIR_COLUMNS}
        write_parquet_atomic(pa.table(columns, schema=schema), out_dir / f"{split}.parquet")


def read_pairs(out_dir: Path) -> PreferenceData:
    """The pairs :func:`write_pairs` wrote, in order (no counts): how launched ranks read the pairs the stage
    process built (building them again in every rank would cost time and could differ)."""
    import pyarrow.parquet as pq

    def pairs(split: str) -> list[Pair]:
        rows = pq.read_table(out_dir / f"{split}.parquet").to_pylist()
        return [Pair(**{**row, "prompt": tuple((t["role"], t["content"]) for t in row["prompt"])}) for row in rows]

    return PreferenceData(train=pairs("train"), eval=pairs("eval"))
