"""Plan-time input checks that several stages share (their ``Stage.preflight``; the helpers are in
pipeline/inputs.py): fastText models (ingest's language id, quality's classifier) and the training
data files and local datasets of sft and align.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from pipeline.inputs import GZIP_JSON_LINES, JSON_LINES, PARQUET, Problem, file_problem, starts_with

# fastText's FASTTEXT_FILEFORMAT_MAGIC_INT32 (793712314), the first 4 bytes of every .bin and .ftz model.
FASTTEXT_MODEL = starts_with("a fastText model", struct.pack("<i", 793712314))

KEY = "data.files"
# How the training stages read a data file, by its suffix (stages/common/training.py: file_suffix).
DATA_KINDS = {".jsonl": JSON_LINES, ".jsonl.gz": GZIP_JSON_LINES, ".json": JSON_LINES, ".parquet": PARQUET}


def data_file_problems(patterns: Sequence[str], suffixes: Sequence[str]) -> list[Problem]:
    """``data.files`` of sft or align: every pattern matches (as the stage expands it), every file has
    one of the ``suffixes`` the stage reads and starts like one (a JSON first line, Parquet's magic)."""
    from stages.common.training import TrainingDataError, expand_files, file_suffix

    problems: list[Problem] = []
    for pattern in patterns:
        try:
            files = expand_files([pattern], KEY)
        except TrainingDataError:  # its message names the pattern, as ours does
            problems.append((KEY, f"{pattern!r} matches no file"))
            continue
        for path in files:
            suffix = file_suffix(path)
            if suffix not in suffixes:
                problems.append((KEY, f"{str(path)!r} has an unsupported type {suffix!r} "
                                      f"(expected {', '.join(suffixes)})"))
            elif problem := file_problem(path, DATA_KINDS[suffix]):
                problems.append((KEY, problem))
    return problems


def dataset_problems(name: str | None) -> list[Problem]:
    """``data.dataset`` when it is written as a local path (absolute, ./, ../ or ~): it must exist
    (load_dataset reads a dataset folder or script there). Anything else is a hub name, which
    planning does not look up."""
    if name is None or not name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name)):
        return []
    return [("data.dataset", f"{name!r} does not exist (a local path; hub names do not start with / . or ~)")]


def training_data_problems(data: Any, suffixes: Sequence[str]) -> list[Problem]:
    """The ``preflight`` of sft and align, on their ``data`` block (source, files, dataset): the data files
    (source=files, read by suffix, one of ``suffixes``) or a local dataset path (source=dataset)."""
    if data.source == "files":
        return data_file_problems(data.files, suffixes)
    if data.source == "dataset":
        return dataset_problems(data.dataset)
    return []  # corpus: the pipeline's own pii.documents


def files_state(patterns: Sequence[str], key: str) -> dict[str, str]:
    """``{"<key>[<path>]": digest}`` for every file the patterns name, expanded as the stages expand them
    (training.expand_files), content digests from pipeline/content.py (cached by stat): one entry per
    file, so ``llmpipe why`` names the file that changed. A pattern matching nothing is ``missing``."""
    from pipeline.content import MISSING, content_digest
    from stages.common.training import TrainingDataError, expand_files

    state: dict[str, str] = {}
    for pattern in patterns:
        try:
            files = expand_files([pattern], key)
        except TrainingDataError:
            state[f"{key}[{pattern}]"] = MISSING
            continue
        state.update({f"{key}[{path}]": content_digest(path) for path in files})
    return state


def training_data_state(data: Any) -> dict[str, str]:
    """The fingerprint's view of sft's or align's outside data: ``{"data.files[<path>]": digest}`` per file
    (as the stage expands the patterns; one key per file, so ``llmpipe why`` names the file that
    changed), or ``{"data.dataset": <revision or digest>}``. Empty for the corpus source."""
    state: dict[str, str] = {}
    if data.source == "files":
        state.update(files_state(data.files, KEY))
    elif data.source == "dataset" and data.dataset:
        state["data.dataset"] = dataset_state(data.dataset, getattr(data, "dataset_split", None))
    return state


def dataset_state(name: str, split: str | None = None) -> str:
    """A dataset's identity: the digest of a local dataset dir or file, else the hub commit it resolves to
    (``unresolved`` when neither the cache nor the hub knows it: ``llmpipe fetch`` fills the cache)."""
    from pipeline.content import content_digest
    from stages.common.hub import HubError, parse_hub_id, resolve_revision

    if os.path.exists(os.path.expanduser(name)):
        return content_digest(os.path.expanduser(name))
    ref = parse_hub_id(name, kind="dataset")
    if ref is None:
        return "unresolved"
    try:
        return f"{ref.repo}@{resolve_revision(ref)}"
    except HubError:
        return "unresolved"


def log_training_data(ctx: Any, data: Any, prepared: dict[str, tuple[Any, int]]) -> None:
    """sft's or align's data in MLflow lineage (``StageContext.log_dataset``), identified as the fingerprint
    identifies it (:func:`training_data_state`): each data file by its content digest, a dataset by its hub
    commit or digest, pii's documents by their fingerprint; and what the stage prepared from it for training
    (``prepared``: context -> (path under the output dir, rows), e.g. ``{"training": (train_file, 1200)}``)."""
    if data.source == "corpus":
        ctx.log_dataset("pii.documents", ctx.input("pii.documents"))
    for key, state in training_data_state(data).items():
        if key == "data.dataset":
            local = os.path.expanduser(data.dataset)
            source = local if os.path.exists(local) else f"hf://datasets/{data.dataset}"
            ctx.log_dataset(data.dataset, source, digest=state.rpartition("@")[2])
        else:  # data.files[<path>]
            path = key[len(KEY) + 1:-1]
            ctx.log_dataset(os.path.basename(path), path, digest=state)
    for context, (path, rows) in prepared.items():
        ctx.log_dataset(f"{ctx.stage}.{context}", path, rows=rows, context=context)
