"""Local lm-evaluation-harness tasks built from the held-out documents (no download).

The evaluate stage runs standard lm-eval tasks by name on clusters; the tiny pipeline, which has no
network, evaluates on two tasks built here from ``tokenize.heldout`` (Parquet shards with columns
id, url, text) and written as an lm-eval ``include_path`` folder:

``heldout_ppl`` (``output_type: loglikelihood_rolling``)
    Perplexity of whole held-out documents: word_perplexity, byte_perplexity, bits_per_byte, the
    metrics lm-eval's wikitext task reports. Data file ``heldout_ppl.jsonl``, one JSON object a line:
    ``{"id": str, "url": str, "text": str}``; ``text`` is the document cut at a word boundary to at
    most ``max_chars`` characters.

``heldout_mc`` (``output_type: multiple_choice``)
    Which continuation follows a passage: the context is the document's first ``context_words``
    words, the choices are its next ``continuation_words`` words and the continuations taken at the
    same position from ``choices - 1`` other sampled documents. A model that learned the language
    prefers the true one (acc, acc_norm); chance is 1 / choices. Data file ``heldout_mc.jsonl``:
    ``{"id": str, "context": str, "choices": [str, ...], "label": int}`` where ``choices[label]`` is
    the true continuation. Words are whitespace-separated and re-joined with single spaces, so the
    context never ends in whitespace and lm-eval's target delimiter " " joins it to a choice.

Each task is a YAML file next to its data (``dataset_path: json`` with ``dataset_kwargs.data_files``
naming the JSONL by absolute path, split ``test``); pass the folder to
``lm_eval.tasks.TaskManager(include_path=...)``. The datasets library resolves a relative
``data_files`` against the working directory, not the YAML's folder, hence the absolute path; it is
the path at build time (the stage's in-progress dir, renamed when the stage commits), so to rerun the
tasks from a finished output, rebuild them there with :func:`build_local_tasks` (the same documents).

Which documents: every document with at least ``context_words + continuation_words`` words is
eligible (shorter ones are counted as ``too_short``); they are ranked by a hash of (seed, id) and the
first ``docs`` are used by both tasks. The choice order and the distractors of each passage come
from a random generator seeded by (seed, id). So the tasks depend only on the held-out documents
and the config, not on shard layout or reading order, and rebuilding gives the same bytes.

With ``heldout.source: files`` the documents are the records of ``heldout.files`` instead (JSONL or
Parquet, paths or globs; a ``text`` field per record, ``id`` and ``url`` optional): a fine-tuning run
without the data stages evaluates on the user's own text. A record without a string ``id`` is named
by a digest of its text, so the sample still does not depend on how the files are split or ordered.

Few-shot: :data:`PUBLISHED_FEWSHOT` holds the published few-shot count of the standard tasks the
recipes run, and :func:`fewshot_plan` says how many examples each configured task gets (the local
tasks none: a document or passage alone is the whole prompt).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import Invalid, LlmpipeError
from pipeline.files import write_text_atomic
from stages.common.benchmarks import LOCAL_TASKS, MC_TASK, PPL_TASK
from stages.common.training import TrainingDataError, expand_files, file_suffix, jsonl_records, source_problems

REQUIRED_COLUMNS = ("id", "url", "text")
FILES_KEY = "stage.evaluate.heldout.files"
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # heldout.files: one document per record, in a text field


# Few-shot examples per prompt of the standard tasks, as the Llama 2 paper evaluates its base models
# (Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv:2307.09288,
# section 2.3 and table 3): MMLU 5-shot; GSM8K 8-shot; the commonsense benchmarks 0-shot ("7-shot
# results for CommonSenseQA and 0-shot results for all other benchmarks": HellaSwag, WinoGrande, ARC
# easy and challenge...). The llama-7b recipe's figures are thus read against that paper's tables.
# The Open LLM Leaderboard (v1) counts differently (ARC-challenge 25, HellaSwag 10, WinoGrande 5,
# GSM8K 5, MMLU 5, TruthfulQA 0); lm-eval ships them as its `openllm` group
# (lm_eval/tasks/benchmarks/openllm.yaml), which keeps its own counts when named in `tasks` with
# num_fewshot null, since only the names below are looked up.
PUBLISHED_FEWSHOT: dict[str, int] = {
    "mmlu": 5,
    "gsm8k": 8,  # lm-eval's own gsm8k default is 5 (the leaderboard's)
    "hellaswag": 0,
    "arc_easy": 0,
    "arc_challenge": 0,
    "winogrande": 0,
    "truthfulqa_mc2": 0,  # not in the paper's base-model table: the leaderboard's, and lm-eval's pinned 0
}


def fewshot_plan(tasks: tuple[str, ...], num_fewshot: int | None,
                 published: dict[str, int] = PUBLISHED_FEWSHOT) -> dict[str, int | None]:
    """Few-shot examples per prompt for each task, in order: 0 for the local tasks; for a standard task
    ``num_fewshot`` when set, else its published count (``published``), else None: lm-eval's own
    default (the task config's ``num_fewshot``; 0 where it has none). A group (mmlu) gives its count
    to every member task."""
    return {task: 0 if task in LOCAL_TASKS else num_fewshot if num_fewshot is not None else published.get(task)
            for task in tasks}


class HeldoutDataError(LlmpipeError):
    """The held-out documents cannot make the local tasks (missing column, too few usable documents...)."""


@dataclass(frozen=True, kw_only=True)
class HeldoutTasksConfig:
    source: Literal["corpus", "files"]  # corpus: the held-out split (tokenize.heldout) | files: the documents of files
    files: tuple[str, ...]  # source=files: JSONL (.jsonl, .jsonl.gz) or Parquet paths or globs, a text field per record
    docs: int  # held-out documents sampled for both local tasks (bounds evaluation time)
    max_chars: int  # heldout_ppl: each document is cut at a word boundary to at most this many characters
    context_words: int  # heldout_mc: words of passage shown as the context
    continuation_words: int  # heldout_mc: words in each choice
    choices: int  # heldout_mc: choices per passage (the true continuation + choices-1 from other documents)
    seed: int  # salt of the document ranking and of the distractor / choice-order draws

    def __post_init__(self) -> None:
        problems = source_problems(self.source, self.files, None)
        problems += [(name, f"must be at least 1, got {getattr(self, name)}")
                     for name in ("docs", "max_chars", "context_words", "continuation_words")
                     if getattr(self, name) < 1]
        if self.choices < 2:
            problems.append(("choices", f"must be at least 2 (the true continuation and a distractor), "
                                        f"got {self.choices}"))
        elif self.docs < self.choices:
            problems.append(("docs", f"{self.docs} must be at least choices ({self.choices}): distractors come "
                                     "from the other sampled documents"))
        Invalid.check(problems)


@dataclass(frozen=True)
class Passage:
    """One sampled held-out document, already split into words."""

    id: str
    url: str
    text: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class LocalTasks:
    """What build_local_tasks wrote: the include_path folder, task names and document counts."""

    include_path: Path
    tasks: tuple[str, ...]
    docs_in: int  # held-out documents read
    docs_used: int  # documents in each task
    dropped: dict[str, int]  # reason -> documents not eligible

    def metrics(self) -> dict[str, float]:
        out = {"heldout.docs_in": float(self.docs_in), "heldout.docs_used": float(self.docs_used)}
        out.update({f"heldout.dropped_{reason}": float(n) for reason, n in self.dropped.items()})
        return out


def _rank(seed: int, doc_id: str) -> int:
    """A stable pseudo-random rank of a document: depends only on the seed and the id."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest(), "big")


def _rng(seed: int, doc_id: str) -> random.Random:
    return random.Random(_rank(seed + 1, doc_id))


def shard_records(heldout_dir: Path) -> Iterator[tuple[Any, Any, Any]]:
    """(id, url, text) of every row of the held-out shards (tokenize.heldout), streamed in batches."""
    import pyarrow.parquet as pq

    from stages.common.shards import list_parquet

    shards = list_parquet(heldout_dir)
    if not shards:
        raise HeldoutDataError(f"no Parquet shards in the held-out documents {heldout_dir}")
    for shard in shards:
        pf = pq.ParquetFile(shard)
        missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise HeldoutDataError(f"held-out shard {shard} lacks column(s) {missing}; it has {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=list(REQUIRED_COLUMNS), batch_size=4096):
            yield from zip(*(batch.column(c).to_pylist() for c in REQUIRED_COLUMNS), strict=True)


def _file_record(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(id, url, text) of a record of a documents file: its own ``id`` and ``url`` when they are strings;
    else the id is a digest of the text (so the sample does not depend on how the files are split or
    ordered, and a repeated document counts as a duplicate) and the url is empty."""
    text, doc_id, url = record.get("text"), record.get("id"), record.get("url")
    if not isinstance(doc_id, str):
        doc_id = "text-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest() if isinstance(text, str) else None
    return doc_id, url if isinstance(url, str) else "", text


def file_records(patterns: tuple[str, ...]) -> Iterator[tuple[Any, Any, Any]]:
    """(id, url, text) of every record of ``heldout.files`` (JSONL or Parquet with a ``text`` field or
    column; ``id`` and ``url`` optional: :func:`_file_record`)."""
    import pyarrow.parquet as pq

    try:
        paths = expand_files(patterns, FILES_KEY)
    except TrainingDataError as exc:
        raise HeldoutDataError(str(exc)) from exc
    for path in paths:
        suffix = file_suffix(path)
        if suffix in (".jsonl", ".jsonl.gz"):
            for row, record in jsonl_records(path):
                if not isinstance(record, dict):
                    raise HeldoutDataError(f"{FILES_KEY}: {path}, line {row + 1}: not a JSON object; documents "
                                           'files hold one {"text": ...} object a line')
                yield _file_record(record)
        elif suffix == ".parquet":
            pf = pq.ParquetFile(path)
            columns = [c for c in REQUIRED_COLUMNS if c in pf.schema_arrow.names]
            if "text" not in columns:
                raise HeldoutDataError(f"{FILES_KEY}: {path} has no column 'text' (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=columns, batch_size=4096):
                yield from map(_file_record, batch.to_pylist())
        else:
            raise HeldoutDataError(f"{FILES_KEY}: {path} has an unsupported type {suffix!r} "
                                   f"(expected {', '.join(TEXT_SUFFIXES)})")


def sample_passages(heldout_dir: Path | None, cfg: HeldoutTasksConfig) -> tuple[list[Passage], int, Counter]:
    """The ``cfg.docs`` eligible documents of lowest rank, in rank order; also docs read and drops.
    The documents are the held-out shards in ``heldout_dir`` (``source: corpus``) or those of ``cfg.files``.

    Streams the documents in batches and keeps only a bounded heap, so a large held-out split costs
    reading it once, not holding it in memory.
    """
    if cfg.source == "files":
        records = file_records(cfg.files)
    elif heldout_dir is None:
        raise HeldoutDataError("heldout.source is corpus but no held-out documents (tokenize.heldout) were given")
    else:
        records = shard_records(heldout_dir)
    need = cfg.context_words + cfg.continuation_words
    heap: list[tuple[int, str, str, str]] = []  # (-rank, id, url, text): the kept docs of lowest rank
    seen: set[str] = set()
    docs_in, dropped = 0, Counter()
    for doc_id, url, text in records:
        docs_in += 1
        if not isinstance(text, str) or not isinstance(doc_id, str):
            dropped["null"] += 1
        elif doc_id in seen:
            dropped["duplicate_id"] += 1
        elif len(text.split(None, need)) < need:
            dropped["too_short"] += 1
        else:
            seen.add(doc_id)
            item = (-_rank(cfg.seed, doc_id), doc_id, url or "", text)
            if len(heap) < cfg.docs:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    kept = sorted(heap, reverse=True)  # lowest rank first
    passages = [Passage(doc_id, url, text, tuple(text.split())) for _, doc_id, url, text in kept]
    return passages, docs_in, dropped


def cut_at_word(text: str, max_chars: int) -> str:
    """``text`` if it fits, else its longest prefix of at most ``max_chars`` characters ending at a word end."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return (head[:cut] if cut > 0 else text[:max_chars]).rstrip()


def ppl_records(passages: list[Passage], cfg: HeldoutTasksConfig) -> list[dict[str, Any]]:
    return [{"id": p.id, "url": p.url, "text": cut_at_word(p.text, cfg.max_chars)} for p in passages]


def mc_records(passages: list[Passage], cfg: HeldoutTasksConfig) -> list[dict[str, Any]]:
    """One multiple-choice item per passage (see the module docstring).

    Distractors are drawn from the other passages' continuations that differ from the true one;
    a passage with too few distinct ones (a corpus of near-identical pages) gets fewer choices, and
    one with none is left out.
    """
    c, n = cfg.context_words, cfg.continuation_words
    continuation = {p.id: " ".join(p.words[c:c + n]) for p in passages}
    records = []
    for p in passages:
        rng = _rng(cfg.seed, p.id)
        true = continuation[p.id]
        pool = sorted({continuation[q.id] for q in passages if q.id != p.id} - {true})
        if not pool:  # every other passage continues the same way: nothing to choose between
            continue
        choices = [true, *rng.sample(pool, min(cfg.choices - 1, len(pool)))]
        rng.shuffle(choices)
        records.append({"id": p.id, "context": " ".join(p.words[:c]), "choices": choices,
                        "label": choices.index(true)})
    return records


def _task_yaml(name: str, data_file: Path, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        **body,
        "metadata": {"version": 1.0},
    }


PPL_BODY = {
    "output_type": "loglikelihood_rolling",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
}
MC_BODY = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{context}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{label}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}


def _write_task(folder: Path, name: str, records: list[dict[str, Any]], body: dict[str, Any]) -> None:
    import yaml

    data_file = folder / f"{name}.jsonl"
    write_text_atomic(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text_atomic(folder / f"{name}.yaml", yaml.safe_dump(_task_yaml(name, data_file, body), sort_keys=False))


def build_local_tasks(heldout_dir: Path | None, folder: Path, cfg: HeldoutTasksConfig,
                      tasks: tuple[str, ...] = LOCAL_TASKS) -> LocalTasks:
    """Write the requested local tasks (a subset of LOCAL_TASKS) into ``folder``; see the module docstring.
    The documents: the held-out shards in ``heldout_dir`` (``cfg.source: corpus``), or the records of
    ``cfg.files`` (``source: files``; ``heldout_dir`` is not read and may be None).

    Raises HeldoutDataError when fewer than two documents are eligible: no multiple choice can be
    made and a perplexity on one document says nothing.
    """
    unknown = sorted(set(tasks) - set(LOCAL_TASKS))
    if unknown:
        raise HeldoutDataError(f"unknown local task(s) {unknown}; the local tasks are {list(LOCAL_TASKS)}")
    passages, docs_in, dropped = sample_passages(heldout_dir, cfg)
    if len(passages) < 2:
        where = f"{FILES_KEY} {list(cfg.files)}" if cfg.source == "files" else heldout_dir
        raise HeldoutDataError(
            f"the held-out documents in {where} give {len(passages)} usable document(s) of {docs_in} "
            f"(dropped: {dict(dropped)}); the local tasks need at least 2 documents of at least "
            f"{cfg.context_words + cfg.continuation_words} words (stage.evaluate.heldout.context_words + "
            f"continuation_words)")
    folder.mkdir(parents=True, exist_ok=True)
    if PPL_TASK in tasks:
        _write_task(folder, PPL_TASK, ppl_records(passages, cfg), PPL_BODY)
    if MC_TASK in tasks:
        _write_task(folder, MC_TASK, mc_records(passages, cfg), MC_BODY)
    return LocalTasks(folder, tuple(t for t in LOCAL_TASKS if t in tasks), docs_in, len(passages), dict(dropped))
