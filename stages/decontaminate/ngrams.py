"""Word n-grams as 64-bit hashes: the evaluation index and the corpus scan share this one definition.

Words are the runs of ``\\w`` characters of the lower-cased, NFKC-normalised text (Unicode-aware:
accented letters and digits are word characters; punctuation and whitespace separate words; a run of
CJK characters counts as one word). Each distinct word gets the 64-bit xxh3 hash of its UTF-8 bytes; the hash of the
n-gram starting at word ``i`` is the polynomial ``sum(word_hash[i + j] * BASE**(n - 1 - j))`` in
arithmetic mod 2**64, computed for every position at once with numpy (a sliding window times the
powers; unsigned integer overflow wraps). Equal word sequences give equal hashes whatever the
document; a collision between two different 13-grams has probability about 2**-64 per pair.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

WORD = re.compile(r"\w+")
BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplying by it is a bijection mod 2**64


def words(text: str) -> list[str]:
    """The words of ``text`` as the index and the scan both see them."""
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def word_hashes(tokens: Sequence[str], cache: dict[str, int] | None = None) -> Any:
    """One uint64 per word (``cache`` keeps the hashes of words seen before, within one shard)."""
    cache = {} if cache is None else cache
    out = np.empty(len(tokens), dtype=np.uint64)
    for i, w in enumerate(tokens):
        h = cache.get(w)
        if h is None:
            h = cache[w] = xxhash.xxh3_64_intdigest(w.encode())
        out[i] = h
    return out


def powers(n: int) -> Any:
    """``BASE**(n-1), ..., BASE, 1`` mod 2**64."""
    out = np.ones(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n - 2, -1, -1):
            out[i] = out[i + 1] * BASE
    return out


def gram_hashes(hashes: Any, n: int) -> Any:
    """The hash of every n-gram of a document, in order (empty when it has fewer than ``n`` words)."""
    if len(hashes) < n:
        return np.empty(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(hashes, n)
    with np.errstate(over="ignore"):
        return windows @ powers(n)
