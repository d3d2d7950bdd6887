"""A seeded corpus with planted duplicates, and the exact ground truth to score dedup against.

Texts are random sequences of words from a synthetic vocabulary, so unrelated documents share
(almost) no word 5-grams. Planted on top of them:

- ``near``: edited copies (word substitutions, insertions, deletions) of a base document whose
  exact 5-shingle Jaccard to it is drawn in [0.8, 1.0);
- ``decoy``: edited copies whose Jaccard to the base lies in [0.5, 0.7] (must be kept);
- ``exact``: copies that differ only in case, spacing or Unicode compatibility forms.

The ground truth is computed exactly here, independently of the stage: the graph of pairs with
Jaccard >= threshold (or identical normalised text), its connected components, and in each the
survivor by the stage's documented rule (longest normalised text, then smallest id).
"""

from __future__ import annotations

import random
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Corpus:
    docs: list[dict[str, str]]  # id, url, text
    kind: dict[str, str] = field(default_factory=dict)  # id -> unique | near | decoy | exact
    base_jaccard: dict[str, float] = field(default_factory=dict)  # planted id -> Jaccard to its base


def norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingle_set(text: str, n: int = 5) -> frozenset[str]:
    words = norm(text).split()
    if len(words) <= n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    return sorted(words)


def _edit(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    words = list(words)
    pos = rng.randrange(len(words))
    op = rng.random()
    if op < 0.5:
        words[pos] = rng.choice(vocab)
    elif op < 0.75:
        words.insert(pos, rng.choice(vocab))
    elif len(words) > 10:
        del words[pos]
    return words


def _edited_copy(base: list[str], lo: float, hi: float, rng: random.Random, vocab: list[str]) -> tuple[str, float]:
    """Edit ``base`` one word at a time until its Jaccard to ``base`` falls in [lo, hi]."""
    target = frozenset(shingle_set(" ".join(base)))
    while True:
        words, j = list(base), 1.0
        stop = rng.uniform(lo, hi)  # edit while the next state stays above this
        while True:
            nxt = _edit(words, rng, vocab)
            jn = jaccard(target, shingle_set(" ".join(nxt)))
            if jn < stop:
                break
            words, j = nxt, jn
        if lo <= j <= hi and j < 1.0:
            return " ".join(words), j


def _variant(text: str, rng: random.Random) -> str:
    """Same normalised text: random case, doubled spaces, newlines, a fullwidth letter (NFKC)."""
    out = []
    for w in text.split(" "):
        r = rng.random()
        w = w.upper() if r < 0.2 else w.capitalize() if r < 0.4 else w
        if rng.random() < 0.05:
            w = chr(ord("Ａ") + ord(w[0].upper()) - ord("A")) + w[1:]  # NFKC maps it back
        out.append(w)
    return rng.choice(["  ", "\n", " ", " \t "]).join(out[:3]) + " " + " ".join(out[3:]) + "\n"


def make_corpus(seed: int = 0, n_unique: int = 400, n_near_bases: int = 110, n_decoys: int = 60,
                n_exact: int = 30, min_words: int = 120, max_words: int = 320,
                near: tuple[float, float] = (0.85, 0.999), decoy: tuple[float, float] = (0.5, 0.7)) -> Corpus:
    rng = random.Random(seed)
    vocab = _vocabulary(rng, 4000)
    ids = rng.sample(range(10**7), n_unique * 4)  # random ids: the survivor is not always the base
    next_id = iter(f"d{i:07d}" for i in ids)
    corpus = Corpus(docs=[])

    def add(text: str, kind: str, base_j: float | None = None) -> None:
        doc_id = next(next_id)
        corpus.docs.append({"id": doc_id, "url": f"https://example.test/{doc_id}", "text": text})
        corpus.kind[doc_id] = kind
        if base_j is not None:
            corpus.base_jaccard[doc_id] = base_j

    bases = [[rng.choice(vocab) for _ in range(rng.randint(min_words, max_words))] for _ in range(n_unique)]
    for words in bases:
        add(" ".join(words), "unique")
    for words in rng.sample(bases, n_near_bases):
        for _ in range(rng.choice([1, 1, 2, 3])):
            text, j = _edited_copy(words, *near, rng, vocab)
            add(text, "near", base_j=j)
    for words in rng.sample(bases, n_decoys):
        text, j = _edited_copy(words, *decoy, rng, vocab)
        add(text, "decoy", base_j=j)
    for doc in rng.sample(corpus.docs[:n_unique], n_exact):
        add(_variant(doc["text"], rng), "exact", base_j=1.0)
    rng.shuffle(corpus.docs)
    return corpus


def true_pairs(docs: list[dict[str, str]], threshold: float, n: int = 5) -> dict[tuple[str, str], float]:
    """Every pair of ids with exact shingle Jaccard >= threshold or equal normalised text."""
    sets = {d["id"]: shingle_set(d["text"], n) for d in docs}
    norms = {d["id"]: norm(d["text"]) for d in docs}
    index: dict[str, list[str]] = defaultdict(list)
    for doc_id, s in sets.items():
        for sh in s:
            index[sh].append(doc_id)
    seen: set[tuple[str, str]] = set()
    pairs: dict[tuple[str, str], float] = {}
    for members in index.values():  # only pairs sharing a shingle can reach the threshold
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                key = (a, b) if a < b else (b, a)
                if key in seen:
                    continue
                seen.add(key)
                j = jaccard(sets[a], sets[b])
                if j >= threshold or norms[a] == norms[b]:
                    pairs[key] = j
    return pairs


def true_removed(docs: list[dict[str, str]], threshold: float, n: int = 5) -> set[str]:
    """Ids the ideal dedup removes: all but the survivor of each connected component."""
    parent = {d["id"]: d["id"] for d in docs}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in true_pairs(docs, threshold, n):
        parent[find(a)] = find(b)
    components: dict[str, list[str]] = defaultdict(list)
    for d in docs:
        components[find(d["id"])].append(d["id"])
    length = {d["id"]: len(norm(d["text"])) for d in docs}
    removed: set[str] = set()
    for members in components.values():
        survivor = min(members, key=lambda i: (-length[i], i))
        removed.update(m for m in members if m != survivor)
    return removed


def write_shards(docs: list[dict[str, str]], directory: Path, num_shards: int, empty: tuple[int, ...] = ()) -> Path:
    """Write ``docs`` round-robin into ``num_shards`` Parquet shards; shards in ``empty`` get no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    full = [i for i in range(num_shards) if i not in empty]
    buckets: dict[int, list[dict[str, str]]] = {i: [] for i in range(num_shards)}
    for k, doc in enumerate(docs):
        buckets[full[k % len(full)]].append(doc)
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("text", pa.string()), ("language", pa.string())])
    for i, rows in buckets.items():
        table = pa.table({"id": [d["id"] for d in rows], "url": [d["url"] for d in rows],
                          "text": [d["text"] for d in rows], "language": ["en"] * len(rows)}, schema=schema)
        pq.write_table(table, directory / f"{i:05d}.parquet")
    return directory
