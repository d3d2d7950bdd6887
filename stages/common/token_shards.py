"""The packed token shards written by the tokenize stage, and a reader for the training stages.

Layout of a ``tokens`` artifact::

    tokens/meta.json            dtype, seq_len, vocab_size, eos_id, pad_id (null: the tokenizer has none),
                                per-split counts and shard list
    tokens/train/<shard>.bin    raw C-order array of shape (sequences, seq_len), no header
    tokens/val/<shard>.bin      the same for the held-out documents

    tokens/train/mixture.npy    with ``data.sources``: the training stream, int64 row indices into the train
                                split (rows of a small source repeated, of a large one subsampled; see
                                stages/tokenize/mixture.py); meta.json's ``splits.train.mixture`` names it

Every row is exactly ``seq_len`` tokens of the document stream ``doc, EOS, doc, EOS, ...``; a
document may continue from one row into the next. Rows hold no padding unless the stage ran with
``keep_partial: true``, in which case the very last row of a split may end in ``pad_id`` tokens
(``splits.<split>.pad_tokens`` says how many) and a trainer should mask them out of the loss.

Raw files rather than ``.npy`` so that any reader (numpy, torch.from_file, a C loader) can map
them with the dtype and shape from meta.json alone. numpy is the only dependency here; torch is
not imported, so this module is safe to use in DataLoader worker processes.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import LlmpipeError

META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


class TokenShardError(LlmpipeError):
    """A tokens artifact is missing, incomplete or inconsistent with its meta.json."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype for token ids of a vocabulary: uint16 up to 65535 tokens, else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def read_meta(tokens_dir: str | Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of a tokens artifact."""
    path = Path(tokens_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise TokenShardError(f"{path} not found: is {tokens_dir} the 'tokens' output of the tokenize stage?") from None
    if meta.get("format") != FORMAT_VERSION:
        raise TokenShardError(f"{path}: format {meta.get('format')!r} is not {FORMAT_VERSION}")
    return meta


def open_split(tokens_dir: str | Path, split: str) -> list[np.memmap]:
    """Read-only memory maps of one split's shards, each of shape (sequences, seq_len).

    Shards with no sequences are left out (numpy cannot map an empty file). The file sizes are
    checked against meta.json, so a truncated shard fails here rather than mid-training.
    """
    meta = read_meta(tokens_dir)
    if split not in meta["splits"]:
        raise TokenShardError(f"{tokens_dir}: no split {split!r} (has {sorted(meta['splits'])})")
    dtype, seq_len = np.dtype(meta["dtype"]), int(meta["seq_len"])
    maps = []
    for shard in meta["splits"][split]["shards"]:
        path = Path(tokens_dir) / shard["path"]
        rows = int(shard["sequences"])
        expected = rows * seq_len * dtype.itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            raise TokenShardError(f"{path}: {size} bytes on disk, meta.json says {rows} x {seq_len} {dtype} "
                                  f"= {expected} bytes")
        if rows:
            maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(rows, seq_len)))
    return maps


def stream_rows(tokens_dir: str | Path, meta: dict[str, Any], split: str) -> np.ndarray | None:
    """The row indices of a split's training stream when the tokenize stage mixed sources (None: every row once)."""
    mixture = meta["splits"][split].get("mixture")
    if not mixture:
        return None
    path = Path(tokens_dir) / mixture["file"]
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise TokenShardError(f"{path}: cannot read the mixture index: {exc}") from exc
    if len(rows) != int(mixture["sequences"]):
        raise TokenShardError(f"{path}: {len(rows)} rows, meta.json says {mixture['sequences']}")
    return rows


def stream_sequences(meta: dict[str, Any], split: str) -> int:
    """How many sequences a trainer sees per epoch of a split: the mixture's length, else the split's rows."""
    mixture = meta["splits"][split].get("mixture")
    return int(mixture["sequences"]) if mixture else int(meta["splits"][split]["sequences"])


class TokenDataset:
    """One split of a tokens artifact as a map-style dataset of int64 arrays of ``seq_len`` tokens.

    Works as a ``torch.utils.data.Dataset`` (the default collate stacks the arrays into a
    LongTensor). The memory maps open lazily and are not pickled, so DataLoader worker processes
    each map the files themselves instead of receiving a copy of the data. A split with a mixture
    index (``data.sources``) is read through it: item ``i`` is row ``mixture[i]``.
    """

    def __init__(self, tokens_dir: str | Path, split: str = "train"):
        self.tokens_dir = Path(tokens_dir)
        self.split = split
        meta = read_meta(self.tokens_dir)
        if split not in meta["splits"]:
            raise TokenShardError(f"{tokens_dir}: no split {split!r} (has {sorted(meta['splits'])})")
        self.seq_len: int = int(meta["seq_len"])
        self.vocab_size: int = int(meta["vocab_size"])
        self.eos_id: int = int(meta["eos_id"])
        self.pad_id: int | None = None if meta["pad_id"] is None else int(meta["pad_id"])  # null: no pad token
        self.dtype = np.dtype(meta["dtype"])
        rows = [int(s["sequences"]) for s in meta["splits"][split]["shards"] if int(s["sequences"])]
        self._ends = np.cumsum(rows).tolist()  # row i lives in the first shard whose end exceeds i
        self._maps: list[np.memmap] | None = None
        self._meta = meta
        stream = stream_rows(self.tokens_dir, meta, split)
        self._stream_len = None if stream is None else len(stream)
        if stream is not None and len(stream) and int(stream.max()) >= self.rows:
            raise TokenShardError(f"{self.tokens_dir}/{meta['splits'][split]['mixture']['file']}: row "
                                  f"{int(stream.max())} is past the {self.rows} rows of the {split} split")
        self._stream = stream

    @property
    def rows(self) -> int:
        """The split's packed rows (without the mixture's repeats)."""
        return self._ends[-1] if self._ends else 0

    def __len__(self) -> int:
        return self.rows if self._stream_len is None else self._stream_len

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} sequences in {self.tokens_dir}/{self.split}")
        if self._maps is None:
            self._maps = open_split(self.tokens_dir, self.split)
        if self._stream_len is not None:
            if self._stream is None:
                self._stream = stream_rows(self.tokens_dir, self._meta, self.split)
            index = int(self._stream[index])
        shard = bisect.bisect_right(self._ends, index)
        start = self._ends[shard - 1] if shard else 0
        return np.asarray(self._maps[shard][index - start], dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = state["_stream"] = None  # each worker process maps the files itself
        return state
