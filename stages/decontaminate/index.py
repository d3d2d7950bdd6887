"""The evaluation texts and their n-gram index (built once, in the stage process; small next to the corpus).

Texts come from two places:

- ``stage.decontaminate.files``: JSONL files (``.jsonl``, ``.jsonl.gz``; paths or globs) with a string
  ``text`` per record. The task a text belongs to is the file's name without its suffix.
- the standard lm-eval tasks named in ``stage.decontaminate.tasks`` (by default the evaluate stage's
  ``tasks``; its local held-out tasks are skipped: they are built from documents held out of training
  already). Each task is built as evaluate builds it, from the datasets cache that ``llmpipe fetch``
  fills, with the hub offline. Its evaluation documents (``test_docs`` where it has them, else
  ``validation_docs``) each give one text: the prompt (``doc_to_text``) followed by the gold answer
  (``doc_to_target``, or the gold choice of a multiple-choice task), so n-grams across the question and its
  answer count too.

A text of at least ``ngram`` words adds every ``ngram``-gram; a shorter one of at least ``min_words`` words
adds its whole word sequence as one gram of its own length (a short question is still caught verbatim);
shorter texts are skipped and counted (too few words to tell a match from a common phrase).

The index is one sorted uint64 array of gram hashes per gram length, with the task of each, saved as an
``.npz`` the worker processes map read-only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import LlmpipeError
from pipeline.files import atomic_path
from stages.decontaminate.ngrams import gram_hashes, word_hashes, words

FILES_KEY = "stage.decontaminate.files"
TASKS_KEY = "stage.decontaminate.tasks"
FILE_SUFFIXES = (".jsonl", ".jsonl.gz")


class EvalTextError(LlmpipeError):
    """An evaluation file or task cannot be read: the message names the file and line, or the task."""


@dataclass
class EvalIndex:
    """Gram hashes by gram length (sorted), the task index of each, and the task names."""

    tasks: list[str]
    grams: dict[int, tuple[Any, Any]]  # length -> (sorted uint64 hashes, int32 task ids)
    counts: Counter = field(default_factory=Counter)  # texts, too_short, grams, per task texts

    @property
    def lengths(self) -> list[int]:
        """Gram lengths, longest first (the scan tries the configured n before the short texts' lengths)."""
        return sorted(self.grams, reverse=True)

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {"tasks": np.array(json.dumps(self.tasks)),
                                  "counts": np.array(json.dumps(dict(self.counts)))}
        for k, (hashes, task_ids) in self.grams.items():
            arrays[f"h{k}"], arrays[f"t{k}"] = hashes, task_ids
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> EvalIndex:
        with np.load(path) as data:
            tasks = json.loads(str(data["tasks"]))
            counts = Counter(json.loads(str(data["counts"])))
            grams = {int(name[1:]): (data[name], data[f"t{name[1:]}"]) for name in data.files if name[0] == "h"}
        return cls(tasks, grams, counts)

    def match(self, doc_words: Sequence[str], cache: dict[str, int]) -> tuple[str, str] | None:
        """``(task, n-gram text)`` of the first indexed gram found in a document's words, or None."""
        hashes = word_hashes(doc_words, cache)
        for k in self.lengths:
            index, task_ids = self.grams[k]
            grams = gram_hashes(hashes, k)
            if not len(grams) or not len(index):
                continue
            pos = np.searchsorted(index, grams)
            pos[pos == len(index)] = 0
            hit = np.flatnonzero(index[pos] == grams)
            if len(hit):
                first = int(hit[0])
                return self.tasks[int(task_ids[pos[first]])], " ".join(doc_words[first:first + k])
        return None


def build_index(texts: Iterator[tuple[str, str]], ngram: int, min_words: int) -> EvalIndex:
    """The index of ``(task, text)`` pairs. A gram found in several tasks keeps the first task."""
    tasks: list[str] = []
    task_id: dict[str, int] = {}
    by_length: dict[int, dict[int, int]] = {}
    counts: Counter = Counter()
    cache: dict[str, int] = {}
    for task, text in texts:
        if task not in task_id:
            task_id[task] = len(tasks)
            tasks.append(task)
        counts["texts"] += 1
        counts[f"texts.{task}"] += 1
        toks = words(text)
        if len(toks) < min_words:
            counts["too_short"] += 1
            continue
        k = min(ngram, len(toks))
        seen = by_length.setdefault(k, {})
        for h in gram_hashes(word_hashes(toks, cache), k).tolist():
            seen.setdefault(h, task_id[task])
    grams = {}
    for k, seen in by_length.items():
        hashes = np.fromiter(seen.keys(), dtype=np.uint64, count=len(seen))
        ids = np.fromiter(seen.values(), dtype=np.int32, count=len(seen))
        order = np.argsort(hashes)
        grams[k] = (hashes[order], ids[order])
        counts["grams"] += len(seen)
    return EvalIndex(tasks, grams, counts)


# ---------------------------------------------------------------- where the texts come from


def file_texts(patterns: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(task, text)`` of every record of the JSONL files; the task is the file name without suffix."""
    from stages.common.training import INVALID_JSON, TrainingDataError, expand_files, file_suffix, jsonl_records

    try:
        files = expand_files(patterns, FILES_KEY)
    except TrainingDataError as exc:
        raise EvalTextError(str(exc)) from None
    for path in files:
        suffix = file_suffix(path)
        if suffix not in FILE_SUFFIXES:
            raise EvalTextError(f"{FILES_KEY}: {path} is not JSONL ({', '.join(FILE_SUFFIXES)}), got {suffix!r}")
        task = path.name[: -len(suffix)]
        for row, record in jsonl_records(path):
            if record is INVALID_JSON or not isinstance(record, Mapping):
                raise EvalTextError(f"{FILES_KEY}: {path} line {row + 1} is not a JSON object")
            text = record.get("text")
            if not isinstance(text, str):
                raise EvalTextError(f"{FILES_KEY}: {path} line {row + 1} has no string 'text' field "
                                    f"(keys: {sorted(record)})")
            yield task, text


def task_texts(names: Sequence[str], include_path: Path | None = None,
               include_defaults: bool = True) -> Iterator[tuple[str, str]]:
    """``(task, text)`` of the evaluation documents of lm-eval tasks (groups expand to their tasks).

    ``include_path``: a folder of task YAMLs beside lm-eval's own (the tests build one from local files;
    ``include_defaults=False`` skips indexing lm-eval's thousands of YAMLs then). The datasets come from the
    cache: the caller switches the hub offline first.
    """
    if not names:
        return
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise EvalTextError(f"{TASKS_KEY}: lm-eval does not know {unknown}")
    try:
        tasks = manager.load(list(names))["tasks"]  # groups (mmlu) expand to their leaf tasks
    except Exception as exc:  # noqa: BLE001 - datasets and lm-eval raise many types
        raise EvalTextError(f"{TASKS_KEY}: cannot build the lm-eval tasks {list(names)} from the datasets cache "
                            f"({type(exc).__name__}: {exc}); run `llmpipe fetch` (make fetch) where the hub is "
                            f"reachable") from exc
    for name, task in tasks.items():
        for doc in _eval_docs(task):
            yield name, _doc_text(task, doc)


def _eval_docs(task: Any) -> Any:
    if task.has_test_docs():
        return task.test_docs()
    if task.has_validation_docs():
        return task.validation_docs()
    return []


def _doc_text(task: Any, doc: Any) -> str:
    """The prompt followed by the gold answer, as one text."""
    prompt = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, int) and isinstance(choices, list) and 0 <= target < len(choices):
            target = choices[target]
    parts = [p for p in (prompt, target) if isinstance(p, str | int | float)]
    return " ".join(str(p) for p in parts)
