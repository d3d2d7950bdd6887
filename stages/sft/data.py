"""Instruction data for the sft stage: conversations in, a train/validation split out.

Three sources (``stage.sft.data.source``), all ending as lists of chat conversations
(``[{"role", "content"}, ...]``, see stages/common/chat.py):

``corpus`` (the tiny default: no download)
    Instruction pairs made from the cleaned corpus (``pii.documents``). Each document's text is cut
    into sentences (a sentence ends at ``.``, ``!`` or ``?`` followed by whitespace, or at a line
    break); the templates that the document is long enough for are eligible, and a generator seeded
    with ``(data.seed, document id)`` picks ``examples_per_doc`` of them:

    - ``continue``: "Continue this text:" + the first sentences -> the sentences that follow.
    - ``continue_dialog``: the same, then a second user turn "Go on." -> the next sentences
      (two assistant turns, so the multi-turn assistant mask is exercised).
    - ``first_sentence``: "Quote the first sentence of this text:" + the opening passage -> its first
      sentence (when it plainly is one: capitalised, ending in . ! or ?).
    - ``title``: "Give a title for this text:" + the body -> the document's first line, when that
      line looks like a heading (short, no closing punctuation) and a body follows.

    Prompts and replies are cut at sentence ends to stay within ``max_prompt_chars`` /
    ``max_reply_chars`` (so they fit the model's context). Every answer is text of the document
    itself: nothing is invented. The result depends only on the documents, the config and the
    seed, not on shard layout or reading order.

``files``
    Local JSONL (.jsonl, .jsonl.gz) or Parquet files (globs allowed), each in one of three formats,
    detected per file (one run may mix them) from the keys of its first record (the first line that
    parses, for JSONL; the columns, for Parquet), checked in this order:

    - ``messages`` (OpenAI): the column ``data.messages_column`` holds a list of ``{role, content}``.
    - ``sharegpt``: ``conversations`` holds a list of ``{from, value}`` (``from``: human/user,
      gpt/assistant/bot/chatgpt, system) or of ``{role, content}``; an optional ``system`` string
      becomes the system message when the conversation has none.
    - ``alpaca``: ``instruction`` and ``output`` (``input`` and ``system`` optional): the user says
      the instruction, followed by a blank line and the input when there is one; the assistant
      replies the output.

    A file whose first record fits no format is an ``SftDataError`` naming the file, the line (or
    row) and the keys found; a later record lacking its file's keys is counted
    (``dropped_missing_messages``, ``dropped_missing_conversations``,
    ``dropped_missing_instruction_or_output``) and skipped. ``format_<name>`` in the metrics counts
    the conversations kept from each format.

``dataset``
    A ``datasets`` name loaded with ``load_dataset(name, split=...)`` (for clusters with a hub or a
    local mirror; never used by the tiny config or the tests).

Bad records are counted per reason (``dropped_<reason>``: see ``chat.message_problem``, plus
``invalid_json`` and ``missing_messages`` for files) and skipped.
With ``max_examples`` a seeded, order-independent subset is kept (the examples with the smallest
seeded hashes). The validation split holds the ``validation_fraction`` of examples with the
smallest seeded hash of their *split key*: the document id for derived data (all examples of a
document fall on the same side), the conversation itself for loaded data (duplicates too).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.files import atomic_path
from pipeline.schema import Invalid
from stages.common.chat import message_problem, normalize_messages
from stages.common.training import (
    INVALID_JSON,
    DataSource,
    TrainingDataError,
    file_suffix,
    jsonl_records,
    source_problems,
)

TEMPLATES = ("continue", "continue_dialog", "first_sentence", "title")

# A sentence ends at . ! or ? followed by whitespace, or at a line break (headings, list items).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
MIN_SENTENCE_CHARS = 3  # shorter fragments ("1.", "a)") are merged into the next sentence
TITLE_MAX_CHARS, TITLE_MAX_WORDS = 80, 12

FORMATS = ("messages", "sharegpt", "alpaca")  # the formats of a data file, in the order they are detected
SHAREGPT_COLUMN = "conversations"
ALPACA_KEYS = ("instruction", "output")  # required; "input" and "system" are optional
# ShareGPT speaker names (lower-cased) -> chat roles; any other name is left as is and dropped as unknown_role.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "chatgpt": "assistant", "system": "system"}


class SftDataError(TrainingDataError):
    """Instruction data cannot be read (missing file, column, unreadable format) or is empty."""


@dataclass(frozen=True, kw_only=True)
class SftDataConfig:
    source: DataSource  # corpus: conversations derived from pii.documents | files | dataset
    files: tuple[str, ...]  # source=files: JSONL/Parquet paths or globs with a messages column
    dataset: str | None  # source=dataset: a `datasets` name for load_dataset (clusters only)
    dataset_split: str  # source=dataset: the split to load
    messages_column: str  # column holding the conversation (list of {role, content})
    templates: tuple[str, ...]  # source=corpus: instruction templates to use
    examples_per_doc: int  # source=corpus: templates drawn per document (at most)
    max_prompt_chars: int  # source=corpus: cap on the passage quoted in a prompt (~110 tokens of prose at 400)
    max_reply_chars: int  # source=corpus: cap on a reply
    system_prompt: str | None  # prepended as a system message to every conversation lacking one
    max_examples: int | None  # keep a seeded subset of at most this many conversations; null: all
    validation_fraction: float  # share of conversations held out for eval loss (by split-key hash)
    seed: int  # seeds template choice, subsetting and the split

    def __post_init__(self) -> None:
        problems = source_problems(self.source, self.files, self.dataset)
        unknown = [t for t in self.templates if t not in TEMPLATES]
        if unknown:
            problems.append(("templates", f"unknown {unknown}; choose from {list(TEMPLATES)}"))
        if self.source == "corpus" and not self.templates:
            problems.append(("templates", "is empty: source corpus needs at least one template"))
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}"))
        for name in ("examples_per_doc", "max_prompt_chars", "max_reply_chars"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be at least 1, got {getattr(self, name)}"))
        if self.max_examples is not None and self.max_examples < 1:
            problems.append(("max_examples", f"must be positive or null, got {self.max_examples}"))
        Invalid.check(problems)


@dataclass
class Example:
    """One conversation and the key that decides its split (document id, or the conversation's digest)."""

    messages: list[dict[str, str]]
    split_key: str
    template: str = ""  # which derivation template made it ("" for loaded data)
    format: str = ""  # loaded data: the format it was read in (FORMATS); "" for derived data


@dataclass
class InstructionData:
    """The two splits and what happened on the way."""

    train: list[Example]
    validation: list[Example]
    docs_in: int = 0  # documents read (corpus) or records read (files, dataset)
    dropped: Counter = field(default_factory=Counter)  # reason -> records skipped
    templates: Counter = field(default_factory=Counter)  # template -> examples derived
    formats: Counter = field(default_factory=Counter)  # loaded data: format -> conversations kept (both splits)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"records_in": self.docs_in, "train_examples": len(self.train),
                                 "validation_examples": len(self.validation)}
        out.update({f"dropped_{reason}": n for reason, n in sorted(self.dropped.items())})
        out.update({f"template_{name}": n for name, n in sorted(self.templates.items())})
        out.update({f"format_{name}": n for name, n in sorted(self.formats.items())})
        return out


def seeded_score(seed: int, purpose: str, key: str) -> float:
    """A uniform number in [0, 1) from a seed, a purpose and a key (stable across runs and machines)."""
    digest = hashlib.blake2b(f"{seed}\0{purpose}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# ---------------------------------------------------------------- deriving from the corpus


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``, whitespace between them excluded."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.start()
        if end - start >= MIN_SENTENCE_CHARS:
            spans.append((start, end))
            start = match.end()
    rest = text[start:].rstrip()
    if len(rest) >= MIN_SENTENCE_CHARS:
        spans.append((start, start + len(rest)))
    elif spans and rest:  # a short trailing fragment stays with the last sentence
        spans[-1] = (spans[-1][0], start + len(rest))
    return spans


def _cut(chunk: str, limit: int, keep_end: bool = False) -> str:
    """``chunk`` within ``limit`` chars, cut at a word boundary (its end kept with ``keep_end``)."""
    if len(chunk) <= limit:
        return chunk
    if keep_end:
        tail = chunk[-limit:]
        return tail.split(None, 1)[-1] if " " in tail else tail
    head = chunk[:limit]
    return head.rsplit(None, 1)[0] if " " in head else head


def _forward(text: str, spans: Sequence[tuple[int, int]], first: int, limit: int,
             stop: int | None = None) -> tuple[str, int]:
    """The sentences from ``first`` (before ``stop``) that fit ``limit`` chars (one at least, cut if
    too long); returns the text and the index of the first sentence not taken."""
    stop = len(spans) if stop is None else stop
    last = first + 1
    while last < stop and spans[last][1] - spans[first][0] <= limit:
        last += 1
    return _cut(text[spans[first][0]:spans[last - 1][1]], limit), last


def _backward(text: str, spans: Sequence[tuple[int, int]], end: int, limit: int) -> str:
    """The sentences just before sentence ``end`` that fit ``limit`` chars (one at least, its end kept)."""
    first = end - 1
    while first > 0 and spans[end - 1][1] - spans[first - 1][0] <= limit:
        first -= 1
    return _cut(text[spans[first][0]:spans[end - 1][1]], limit, keep_end=True)


def _continue(text: str, spans: Sequence[tuple[int, int]], cfg: SftDataConfig, turns: int,
              rng: random.Random) -> list[dict] | None:
    """The sentences before a seeded cut point as the prompt, what follows as ``turns`` replies."""
    if len(spans) < 1 + turns:
        return None
    cut = rng.randint(1, len(spans) - turns)
    prompt = _backward(text, spans, cut, cfg.max_prompt_chars)
    messages = [{"role": "user", "content": f"Continue this text:\n\n{prompt}"}]
    nxt = cut
    for turn in range(turns):
        if nxt >= len(spans):
            return None
        # Leave at least one sentence for each later turn.
        reply, nxt = _forward(text, spans, nxt, cfg.max_reply_chars, stop=len(spans) - (turns - 1 - turn))
        if turn:
            messages.append({"role": "user", "content": "Go on."})
        messages.append({"role": "assistant", "content": reply})
    return messages


def _first_sentence(text: str, spans: Sequence[tuple[int, int]], cfg: SftDataConfig) -> list[dict] | None:
    """The opening passage (after a heading line, if any) as the prompt, its first sentence as the
    reply. Only when that sentence is plainly one: it starts with a capital or digit and ends with
    . ! or ? (a hard-wrapped line is not a sentence); needs two sentences within ``max_prompt_chars``."""
    start = 1 if spans and _is_heading(text[spans[0][0]:spans[0][1]]) else 0
    if start + 1 >= len(spans) or spans[start + 1][1] - spans[start][0] > cfg.max_prompt_chars:
        return None
    candidate = text[spans[start][0]:spans[start][1]]
    if not (candidate[0].isupper() or candidate[0].isdigit()) or candidate[-1] not in ".!?":
        return None
    if len(candidate) > cfg.max_reply_chars:
        return None
    passage, _ = _forward(text, spans, start, cfg.max_prompt_chars)
    return [{"role": "user", "content": f"Quote the first sentence of this text:\n\n{passage}"},
            {"role": "assistant", "content": candidate}]


def _is_heading(line: str) -> bool:
    """A short line with letters and no closing punctuation: a title, not a sentence."""
    line = line.strip()
    return (2 <= len(line) <= TITLE_MAX_CHARS and len(line.split()) <= TITLE_MAX_WORDS
            and line[-1] not in ".,;:!?" and any(c.isalpha() for c in line))


def _title(text: str, cfg: SftDataConfig) -> list[dict] | None:
    """The first line as the reply when it looks like a heading; the body after it as the prompt."""
    line, _, body = text.strip().partition("\n")
    line, body = line.strip(), body.strip()
    body_spans = sentence_spans(body)
    if not _is_heading(line) or not body_spans or body_spans[0][1] - body_spans[0][0] < 20:
        return None
    passage, _ = _forward(body, body_spans, 0, cfg.max_prompt_chars)
    return [{"role": "user", "content": f"Give a title for this text:\n\n{passage}"},
            {"role": "assistant", "content": line}]


def derive_conversations(text: str, doc_id: str, cfg: SftDataConfig) -> list[tuple[str, list[dict[str, str]]]]:
    """The (template, conversation) pairs derived from one document (see the module doc)."""
    spans = sentence_spans(text)
    # One generator per document, seeded by its id: the result does not depend on reading order.
    rng = random.Random(f"{cfg.seed}:{doc_id}")
    builders = {
        "continue": lambda: _continue(text, spans, cfg, 1, rng),
        "continue_dialog": lambda: _continue(text, spans, cfg, 2, rng),
        "first_sentence": lambda: _first_sentence(text, spans, cfg),
        "title": lambda: _title(text, cfg),
    }
    eligible = []
    for name in cfg.templates:
        conversation = builders[name]()
        if conversation is not None and message_problem(conversation) is None:
            eligible.append((name, conversation))
    rng.shuffle(eligible)
    return eligible[:cfg.examples_per_doc]


def read_documents(shards: Sequence[Path]) -> Iterator[tuple[str | None, str | None]]:
    """(id, text) of every document of a documents artifact, shard by shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in shards:
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise SftDataError(f"{path}: cannot read as Parquet: {exc}") from exc
        missing = [c for c in ("id", "text") if c not in pf.schema_arrow.names]
        if missing:
            raise SftDataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["id", "text"], batch_size=1000):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def examples_from_corpus(shards: Sequence[Path], cfg: SftDataConfig, data: InstructionData) -> Iterator[Example]:
    for doc_id, text in read_documents(shards):
        data.docs_in += 1
        if doc_id is None or not text:
            data.dropped["missing_id" if doc_id is None else "empty_text"] += 1
            continue
        derived = derive_conversations(text, doc_id, cfg)
        if not derived:
            data.dropped["too_short"] += 1
        for template, messages in derived:
            yield Example(messages, split_key=doc_id, template=template)


# ---------------------------------------------------------------- loading conversations


@dataclass(frozen=True)
class _Missing:
    """A record that lacks its file format's keys: counted as ``dropped_<reason>`` and skipped."""

    reason: str


_MISSING_COLUMN = _Missing("missing_messages")  # a record without the messages column


def detect_format(keys: Collection[str], column: str) -> str | None:
    """The format (one of FORMATS) of a record with these keys: the first that fits, or None.

    ``column`` is ``data.messages_column``. Set to ``conversations``, it names ShareGPT's column, and
    the file is read as ShareGPT (which takes ``{role, content}`` turns too)."""
    if column in keys and column != SHAREGPT_COLUMN:
        return "messages"
    if SHAREGPT_COLUMN in keys:
        return "sharegpt"
    if all(k in keys for k in ALPACA_KEYS):
        return "alpaca"
    return None


def _format_columns(fmt: str, column: str) -> tuple[str, ...]:
    """The keys a record of ``fmt`` is read from (the Parquet columns to read)."""
    return {"messages": (column,), "sharegpt": (SHAREGPT_COLUMN, "system"),
            "alpaca": ("system", "instruction", "input", "output")}[fmt]


def _format_error(path: Path, where: str, keys: Collection[str] | None, column: str) -> SftDataError:
    """The error for a file whose first record (at ``where``) has ``keys`` (None: not an object): no format fits."""
    needs = [] if column == SHAREGPT_COLUMN else [f"{column!r} (messages: a list of {{role, content}})"]
    needs += [f"{SHAREGPT_COLUMN!r} (ShareGPT: a list of {{from, value}})",
              f"{' and '.join(map(repr, ALPACA_KEYS))} (Alpaca; 'input' and 'system' optional)"]
    found = "none (not a JSON object)" if keys is None else ", ".join(sorted(map(str, keys))) or "none"
    return SftDataError(f"{path}: no column {', '.join(needs[:-1])} or {needs[-1]} in its first record ({where}); "
                        f"keys found: {found}. Convert the file to one of these formats, or set "
                        f"stage.sft.data.messages_column to the key holding its conversations")


def record_conversation(record: Any, fmt: str, column: str) -> Any:
    """The conversation of one record of a ``fmt`` file as a list of ``{role, content}`` (checked later by
    ``message_problem``, which names what is wrong), or a ``_Missing`` when it lacks the format's keys.

    A key present with a null or malformed value is not "missing": it goes on to ``message_problem``."""
    if fmt == "messages":
        return record[column] if isinstance(record, Mapping) and column in record else _MISSING_COLUMN
    if fmt == "sharegpt":
        if not isinstance(record, Mapping) or SHAREGPT_COLUMN not in record:
            return _Missing("missing_conversations")
        turns = record[SHAREGPT_COLUMN]
        if not isinstance(turns, list):
            return turns
        messages = [_sharegpt_turn(t) for t in turns]
    else:
        if not isinstance(record, Mapping) or any(k not in record for k in ALPACA_KEYS):
            return _Missing("missing_instruction_or_output")
        user, extra = record["instruction"], record.get("input")
        if extra is not None and not isinstance(extra, str):
            user = extra  # an input that is not text: the conversation is dropped as non_text_content
        elif extra and extra.strip() and isinstance(user, str):
            user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    # An optional top-level system prompt (Alpaca, and ShareGPT variants), unless the conversation has one.
    system = record.get("system")
    first = messages[0] if messages and isinstance(messages[0], Mapping) else {}
    if isinstance(system, str) and system.strip() and first.get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _sharegpt_turn(turn: Any) -> Any:
    """A ShareGPT turn (``{from, value}``, or ``{role, content}``) as ``{role, content}``, speaker names mapped
    to roles (SHAREGPT_ROLES); a turn without a speaker or a text is returned as is (malformed_message)."""
    if not isinstance(turn, Mapping):
        return turn
    # A Parquet struct column holding both spellings has all four keys, the unused ones null.
    role_key = "role" if turn.get("role") is not None else "from"
    content_key = "content" if turn.get("content") is not None else "value"
    if role_key not in turn or content_key not in turn:
        return turn
    role = turn[role_key]
    return {"role": SHAREGPT_ROLES.get(role.lower(), role) if isinstance(role, str) else role,
            "content": turn[content_key]}


def read_records(path: Path, column: str) -> tuple[str, Iterator[Any]]:
    """The format of a JSONL or Parquet file (detected from its first record: ``detect_format``) and the
    conversation of each of its records (``record_conversation``), read lazily; markers stand for broken
    JSON lines and records that lack the format's keys, which the caller counts.

    A file whose first record fits no format is an SftDataError naming the file, the line (JSONL, from 1)
    or row (Parquet, from 1), the keys found and the keys each format needs. A file with no record
    that parses reads as "messages" (nothing to detect; its broken lines are still counted)."""
    suffix = file_suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        rows = jsonl_records(path)  # blank lines are skipped
        head: list[Any] = []  # the broken lines before the first record that parses
        for row, first in rows:
            if first is INVALID_JSON:
                head.append(INVALID_JSON)
                continue
            keys = list(first) if isinstance(first, Mapping) else None
            fmt = detect_format(keys or (), column)
            if fmt is None:
                raise _format_error(path, f"line {row + 1}", keys, column)
            rest = (r if r is INVALID_JSON else record_conversation(r, fmt, column) for _, r in rows)
            return fmt, itertools.chain(head, [record_conversation(first, fmt, column)], rest)
        return FORMATS[0], iter(head)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise SftDataError(f"{path}: cannot read as Parquet: {exc}") from exc
        names = pf.schema_arrow.names
        if pf.metadata.num_rows == 0:
            return FORMATS[0], iter(())
        # Every row of a Parquet file has the same keys (its columns): the first row's are the schema's.
        fmt = detect_format(names, column)
        if fmt is None:
            raise _format_error(path, "row 1", names, column)
        wanted = _format_columns(fmt, column)
        columns = [c for c in names if c in wanted]

        def parquet_rows() -> Iterator[Any]:
            for batch in pf.iter_batches(columns=columns, batch_size=1000):
                for record in batch.to_pylist():
                    yield record_conversation(record, fmt, column)

        return fmt, parquet_rows()
    raise SftDataError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .jsonl.gz or .parquet)")


def examples_from_files(paths: Iterable[Path], column: str, data: InstructionData) -> Iterator[Example]:
    """The valid conversations of the data files, file by file, each read in its own detected format."""
    for path in paths:
        fmt, records = read_records(path, column)
        yield from examples_from_records(records, data, fmt)


def examples_from_records(records: Iterable[Any], data: InstructionData, fmt: str = "messages") -> Iterator[Example]:
    """Valid conversations of ``records`` (lists of {role, content}: values of the messages column, or the
    records of a ``fmt`` file as ``record_conversation`` gives them); the rest counted and skipped."""
    for value in records:
        data.docs_in += 1
        if value is INVALID_JSON or isinstance(value, _Missing):
            data.dropped["invalid_json" if value is INVALID_JSON else value.reason] += 1
            continue
        problem = message_problem(value)
        if problem:
            data.dropped[problem] += 1
            continue
        messages = normalize_messages(value)
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        yield Example(messages, split_key=key, format=fmt)


def dataset_records(cfg: SftDataConfig) -> Iterator[Any]:
    """The messages column of a `datasets` dataset (cluster use; may download into the HF cache)."""
    from datasets import load_dataset

    ds = load_dataset(cfg.dataset, split=cfg.dataset_split)
    if cfg.messages_column not in ds.column_names:
        raise SftDataError(f"stage.sft.data.dataset {cfg.dataset!r} has no column {cfg.messages_column!r} "
                           f"(columns: {ds.column_names}); set stage.sft.data.messages_column")
    for row in ds.select_columns([cfg.messages_column]):
        yield row[cfg.messages_column]


# ---------------------------------------------------------------- split


def with_system_prompt(example: Example, prompt: str | None) -> Example:
    if prompt is None or example.messages[0]["role"] == "system":
        return example
    return replace(example, messages=[{"role": "system", "content": prompt}, *example.messages])


def split_examples(examples: Iterable[Example], cfg: SftDataConfig, data: InstructionData) -> None:
    """Subset (``max_examples``) and split into ``data.train`` / ``data.validation`` (see the module doc)."""
    pool: Iterable[Example] = examples
    if cfg.max_examples is not None:
        # nsmallest keeps only max_examples items in memory, whatever the corpus size.
        pool = heapq.nsmallest(cfg.max_examples, examples, key=lambda e: _subset_key(cfg.seed, e))
    pool = [with_system_prompt(e, cfg.system_prompt) for e in pool]
    for e in pool:
        data.templates[e.template or "loaded"] += 1
        if e.format:
            data.formats[e.format] += 1
    keys = sorted({e.split_key for e in pool}, key=lambda k: (seeded_score(cfg.seed, "validation", k), k))
    n_val = 0
    if cfg.validation_fraction > 0 and len(keys) >= 2:
        n_val = min(len(keys) - 1, max(1, math.floor(cfg.validation_fraction * len(keys) + 0.5)))
    held_out = set(keys[:n_val])
    data.train = [e for e in pool if e.split_key not in held_out]
    data.validation = [e for e in pool if e.split_key in held_out]


def _subset_key(seed: int, example: Example) -> tuple[float, str, str]:
    return seeded_score(seed, "subset", f"{example.split_key}\0{example.template}"), example.split_key, example.template


def load_instruction_data(cfg: SftDataConfig, corpus_shards: Sequence[Path]) -> InstructionData:
    """Read or derive the conversations and split them (the one entry point of this module)."""
    from stages.common.training import expand_files

    data = InstructionData(train=[], validation=[])
    if cfg.source == "corpus":
        examples = examples_from_corpus(corpus_shards, cfg, data)
    elif cfg.source == "files":
        files = expand_files(cfg.files, "stage.sft.data.files")
        examples = examples_from_files(files, cfg.messages_column, data)
    else:
        examples = examples_from_records(dataset_records(cfg), data)
    split_examples(examples, cfg, data)
    if not data.train:
        raise SftDataError(f"no usable training conversation from data.source={cfg.source!r} "
                           f"({data.docs_in} records read; dropped: {dict(data.dropped) or 'none'})")
    return data


def write_jsonl(examples: Sequence[Example], path: Path) -> None:
    """The conversations as JSONL (``{"messages": [...]}`` per line), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"messages": e.messages, "template": e.template}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Example]:
    """The conversations :func:`write_jsonl` wrote, in order: how launched ranks read the data the stage
    process prepared (deriving or loading it again in every rank would cost time and could differ)."""
    with open(path, encoding="utf-8") as f:
        return [Example(record["messages"], split_key="", template=record.get("template", ""))
                for record in map(json.loads, f) if record]
