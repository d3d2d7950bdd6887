"""Source mixtures: the training stream in which each source's share of training tokens equals its weight.

With ``data.sources: {<name>: {input: [...], weight: <float>}}`` ingest tags every document with its
``source``. One WARC file is one shard and belongs to one source, and every data stage keeps shard
``i`` in shard ``i``, so each packed train shard of the tokenize stage holds one source's rows (the
``tail`` shard, packed from the few leftover tokens of all shards, is counted as its own ``mixed``
group and kept once).

The stream keeps the corpus's size: ``N`` packed train rows in, ``N`` rows in the stream (give or take
rounding). Source ``s`` with ``n_s`` rows and normalised weight ``w_s`` gets ``w_s * (N - tail)`` rows:
``epochs_s = w_s * (N - tail) / n_s``. Its rows appear ``floor(epochs_s)`` times each, plus a seeded
sample without replacement of ``round(frac(epochs_s) * n_s)`` of them: a small source is repeated, a
large one subsampled, never a row invented. The stream is written as sorted row indices
(``tokens/train/mixture.npy``, read by stages/common/token_shards.py ``TokenDataset``); the trainer
shuffles it like any split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from pipeline import LlmpipeError

MIXED = "mixed"  # the tail shard's rows: leftovers of every source
SOURCE_COLUMN = "source"


class MixtureError(LlmpipeError):
    """The sources and the weights do not make a training stream (a weighted source has no rows, a shard
    mixes sources, a source no weight)."""


@dataclass(frozen=True)
class SourcePlan:
    rows: int  # packed train rows of the source
    weight: float  # normalised weight (the shares sum to 1 over the weighted sources)
    epochs: float  # rows in the stream / rows of the source
    stream_rows: int  # rows of the source in the stream


def plan(rows: Mapping[str, int], weights: Mapping[str, float], tail_rows: int = 0) -> dict[str, SourcePlan]:
    """Epochs per source so that the stream's shares equal the weights (see the module doc)."""
    missing = sorted(set(rows) - set(weights) - {MIXED})
    if missing:
        raise MixtureError(f"documents of source(s) {missing} reached tokenize, but data.sources has no weight for "
                           f"them (it has {sorted(weights)})")
    empty = sorted(name for name in weights if not rows.get(name))
    if empty:
        raise MixtureError(f"data.sources: {empty} left no training tokens after the data stages (every document "
                           f"dropped or held out): remove them or give them input")
    total_weight = sum(weights.values())
    body = sum(rows[name] for name in weights)
    out = {}
    for name, weight in weights.items():
        share = weight / total_weight
        target = share * body
        count = round(target)
        out[name] = SourcePlan(rows[name], share, count / rows[name], count)
    if tail_rows:
        out[MIXED] = SourcePlan(tail_rows, 0.0, 1.0, tail_rows)
    return out


def stream(groups: Mapping[str, Sequence[int] | np.ndarray], plans: Mapping[str, SourcePlan], seed: int) -> np.ndarray:
    """The sorted row indices of the stream: each group's rows repeated and sampled as its plan says."""
    parts = []
    for name, rows in groups.items():
        rows = np.asarray(rows, dtype=np.int64)
        p = plans[name]
        whole = math.floor(p.stream_rows / len(rows)) if len(rows) else 0
        extra = p.stream_rows - whole * len(rows)
        parts.append(np.tile(rows, whole))
        if extra:
            rng = np.random.default_rng([seed, xxhash.xxh32_intdigest(name.encode())])
            parts.append(rng.choice(rows, size=extra, replace=False))
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def shard_source(path: str, column: str = SOURCE_COLUMN) -> str | None:
    """The one source of an input shard (its ``source`` column), None for a shard without that column or
    rows; a shard holding two sources is an error (one WARC file is one shard of one source)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if column not in pq.read_schema(path).names:
        return None
    values = pc.unique(pq.read_table(path, columns=[column]).column(column)).to_pylist()
    if len(values) > 1:
        raise MixtureError(f"{path}: documents of several sources {sorted(map(str, values))} in one shard")
    return values[0] if values else None


def write_mixture(tokens_dir: Path, meta: dict[str, Any], sources: Mapping[str, str | None],
                  weights: Mapping[str, float], seed: int) -> dict[str, float]:
    """Add the train split's stream to a tokens artifact: ``train/mixture.npy`` and ``splits.train.mixture`` in
    meta.json (written by the caller). ``sources``: the source of each shard by name (``00003``); the tail
    is the ``mixed`` group. Returns the metrics ``source.<name>.tokens_train``, ``.epochs`` and ``.rows``."""
    from pipeline.files import atomic_path

    groups: dict[str, list[np.ndarray]] = {}
    start = 0
    tail_rows = 0
    for shard in meta["splits"]["train"]["shards"]:
        rows = int(shard["sequences"])
        name = Path(shard["path"]).stem
        group = sources[name] if name in sources else MIXED
        if group is None:
            raise MixtureError(f"train shard {name}: its documents carry no {SOURCE_COLUMN!r} column, so it cannot be "
                               f"weighted: run the data stages again from ingest with data.sources")
        if group == MIXED:
            tail_rows += rows
        groups.setdefault(group, []).append(np.arange(start, start + rows, dtype=np.int64))
        start += rows
    rows_by = {name: int(sum(len(a) for a in parts)) for name, parts in groups.items()}
    plans = plan(rows_by, weights, tail_rows)
    merged = {name: np.concatenate(parts) for name, parts in groups.items()}
    index = stream(merged, plans, seed)
    rel = "train/mixture.npy"
    with atomic_path(tokens_dir / rel) as tmp, open(tmp, "wb") as f:
        np.save(f, index)
    seq_len = int(meta["seq_len"])
    meta["splits"]["train"]["mixture"] = {
        "file": rel, "sequences": len(index), "seed": seed,
        "sources": {name: {"rows": p.rows, "weight": p.weight, "epochs": p.epochs, "stream_rows": p.stream_rows}
                    for name, p in plans.items()}}
    metrics: dict[str, float] = {}
    for name, p in plans.items():
        metrics[f"source.{name}.tokens_train"] = p.stream_rows * seq_len
        metrics[f"source.{name}.epochs"] = p.epochs
        metrics[f"source.{name}.tokens_unique"] = p.rows * seq_len
    metrics["tokens_train_stream"] = len(index) * seq_len
    return metrics
