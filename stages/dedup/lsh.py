"""The disk-backed MinHash-LSH machinery of the dedup stage.

Four steps, each bounded in memory by one shard or one partition, never by the corpus:

1. ``signature_shard`` (per input shard, in parallel): normalise each text, hash it for exact
   dedup, compute its datasketch MinHash over word n-gram shingles, and *spill* two kinds of keys
   to ``spill/<kind>/<partition>/<shard>.parquet``: the exact hash, and one hash per LSH band.
   Signatures go to ``signatures/<shard>.npy`` (memory-mapped later); per-doc metadata (id,
   normalised length, exact hash) to ``meta/<shard>.parquet``.
2. ``group_partition`` (per partition, in parallel): read one partition's keys from every shard,
   sort them, and turn each bucket of equal keys into edges: exact buckets directly, LSH buckets
   after checking the estimated Jaccard of the stored signatures (``verify``).
3. ``resolve`` (once): union-find over the edges (only documents that have a duplicate), pick one
   survivor per cluster, write ``resolved/<shard>.parquet`` with what to drop and why.
4. The stage's final pass (in ``stages/dedup/stage.py``) applies ``resolved`` shard by shard.

A document is referenced by ``doc = shard_index << 32 | row``. Which documents end up in a
cluster depends only on the texts, never on how they are sharded: bucket members are ordered by
their content hash, not by their position.

Survivor rule: in each cluster keep the document with the longest normalised text (most content),
ties broken by the smallest ``id``, then by content hash. A removed document's ``reason`` is
``exact`` when a document with the same normalised text ranks before it, else ``near``.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.files import atomic_path
from stages.common.shards import ShardResult, ShardTask, list_parquet, shard_name, write_parquet_atomic

EXACT, BANDS = "exact", "bands"  # the two kinds of spilled keys
MINHASH_CHUNK = 20_000  # shingles hashed at once: 20k x 128 perms x 4 B = 10 MB
SPILL_COLUMNS = ("k0", "k1", "order", "doc")  # bucket key (k0, k1); order of members; document ref


class DedupInputError(ValueError):
    """An input shard of the dedup stage cannot be read as documents (missing column, bad file)."""


@dataclass(frozen=True)
class LshPlan:
    """What the worker processes need: the resolved LSH parameters and where the work files go."""

    work: Path  # the stage's scratch dir (signatures, spill, edges, resolution)
    threshold: float  # estimated Jaccard at which a verified candidate is linked (the config's minus its margin)
    ngram: int  # words per shingle
    num_perm: int  # MinHash permutations
    seed: int  # MinHash permutation seed
    hashfunc: str  # shingle hash fed to MinHash: "xxh32" or "sha1"
    bands: int  # LSH bands
    rows: int  # MinHash values per band
    partitions: int  # spill partitions (each grouped alone)
    verify: bool  # check LSH candidates by estimated Jaccard before linking them


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed to single spaces: the text compared for exact dups."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(normalized: str, n: int) -> list[bytes]:
    """The word n-grams of a normalised text (the whole text when it has fewer than n words)."""
    words = normalized.split(" ") if normalized else []
    if len(words) <= n:
        return [normalized.encode()] if words else []
    return [" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)]


def work_paths(work: Path) -> dict[str, Path]:
    return {name: work / name for name in ("signatures", "meta", "spill", "edges", "resolved")}


# ---------------------------------------------------------------- step 1: signatures and spill


def read_documents_schema(path: str, needed: tuple[str, ...]) -> Any:
    """The Parquet schema of an input shard, or a DedupInputError naming the file and column."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DedupInputError(f"dedup: cannot read input shard {path}: {exc}") from exc
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise DedupInputError(f"dedup: input shard {path} lacks column(s) {missing}; it has {schema.names}")
    return schema


def signature_shard(task: ShardTask) -> ShardResult:
    """Step 1 for one input shard: exact hashes, MinHash signatures, band keys spilled to disk."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from datasketch import MinHash

    plan: LshPlan = task.config
    paths = work_paths(plan.work)
    read_documents_schema(task.source, ("id", "text"))
    table = pq.read_table(task.source, columns=["id", "text"])
    n = table.num_rows
    result = ShardResult(docs_in=n, docs_out=n, bytes_in=pc.sum(pc.binary_length(table.column("text"))).as_py() or 0)

    # Null and blank texts are kept and left out of both dedup passes (quality filters judge them).
    norms = [normalize(t) if isinstance(t, str) else "" for t in table.column("text").to_pylist()]
    nonempty = np.array([bool(s) for s in norms], dtype=bool)
    result.counts["skipped_empty"] = int(n - nonempty.sum())
    digests = b"".join(hashlib.blake2b(s.encode(), digest_size=16).digest() for s in norms)
    exact = np.frombuffer(digests, dtype="<u8").reshape(n, 2)  # 128-bit hash of the normalised text: (hi, lo)
    proto = MinHash(num_perm=plan.num_perm, seed=plan.seed, hashfunc=shingle_hash(plan.hashfunc))
    sigs = np.empty((n, plan.num_perm), dtype=np.uint32)
    for i, s in enumerate(norms):
        sigs[i] = _signature(proto, shingles(s, plan.ngram))
    _save_npy_atomic(paths["signatures"] / f"{task.name}.npy", sigs)
    ids = ["" if i is None else str(i) for i in table.column("id").to_pylist()]
    meta = pa.table({"id": pa.array(ids, pa.string()), "norm_len": pa.array([len(s) for s in norms], pa.int64()),
                     "hi": pa.array(exact[:, 0]), "lo": pa.array(exact[:, 1])})
    write_parquet_atomic(meta, paths["meta"] / f"{task.name}.parquet")

    refs = (np.uint64(task.index) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    # A later copy of a text already seen in this shard adds nothing to the bands: its exact edge
    # joins it to the first copy. This keeps boilerplate pages from flooding the LSH buckets.
    banded = nonempty & _first_copies(exact)
    exact_keys = np.stack([exact[:, 0], exact[:, 1], exact[:, 1], refs], axis=1)[nonempty]
    band_keys = _band_keys(sigs[banded], refs[banded], exact[banded, 1], plan)
    result.counts["band_rows"] = len(band_keys)
    for kind, keys in ((EXACT, exact_keys), (BANDS, band_keys)):
        _spill(keys, paths["spill"] / kind, task.name, plan.partitions)
    return result


def _first_copies(exact: Any) -> Any:
    """True for the first row of each distinct (hi, lo) hash."""
    import numpy as np

    first = np.zeros(len(exact), dtype=bool)
    if len(exact):
        first[np.unique(exact, axis=0, return_index=True)[1]] = True
    return first


def shingle_hash(name: str) -> Any:
    """The 32-bit hash MinHash applies to each shingle. datasketch's default (SHA-1) costs most of
    the signature time; xxh32 gives the same estimates ~3.5x faster."""
    if name == "sha1":
        from datasketch.hashfunc import sha1_hash32

        return sha1_hash32
    import xxhash

    return xxhash.xxh32_intdigest


def _signature(proto: Any, items: list[bytes]) -> Any:
    """MinHash values of ``items``: a copy of the initialised ``proto`` (as MinHash.generator does),
    fed in chunks so that update_batch's (items x num_perm) matrix stays small for long documents."""
    mh = proto.copy()
    unique = list(dict.fromkeys(items))  # repeated shingles cannot change the minimum
    for start in range(0, len(unique), MINHASH_CHUNK):
        mh.update_batch(unique[start : start + MINHASH_CHUNK])
    return mh.hashvalues


def _band_keys(sigs: Any, refs: Any, order: Any, plan: LshPlan) -> Any:
    """Rows (band, hash of the band's MinHash values, content order, doc) for every doc and band."""
    import numpy as np

    rows = []
    width = plan.rows * 4  # bytes of one band of uint32 values
    for band in range(plan.bands):
        chunk = np.ascontiguousarray(sigs[:, band * plan.rows : (band + 1) * plan.rows]).tobytes()
        hashes = b"".join(hashlib.blake2b(chunk[i : i + width], digest_size=8).digest()
                          for i in range(0, len(chunk), width))
        rows.append(np.stack([np.full(len(refs), band, dtype=np.uint64),
                              np.frombuffer(hashes, dtype="<u8"), order, refs], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.uint64)


def _spill(keys: Any, root: Path, shard: str, partitions: int) -> None:
    """Write key rows to ``root/<partition>/<shard>.parquet``, partitioned by the key hash k1."""
    import numpy as np
    import pyarrow as pa

    part = keys[:, 1] % np.uint64(partitions)
    for p in np.unique(part):
        sel = keys[part == p]
        table = pa.table({name: pa.array(sel[:, j]) for j, name in enumerate(SPILL_COLUMNS)})
        write_parquet_atomic(table, root / shard_name(int(p)) / f"{shard}.parquet")


def _save_npy_atomic(path: Path, array: Any) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
        np.save(f, array)


# ---------------------------------------------------------------- step 2: buckets -> edges


class SignatureStore:
    """Random access to the stored signatures by doc ref; each shard file is memory-mapped while it is read.

    A file is unmapped as soon as its rows are copied out. Kept mapped, every page the reads had
    touched (with the kernel's fault-around, nearly all of them) stayed in the process's RSS: the
    process that resolves the clusters ended up holding all signature files, num_perm x 4 bytes per
    document (1 GB at 1M documents with 256 permutations). Page cache, reclaimable, but counted as the
    job's memory by RSS-based accounting. bench/scale.py, largest process at 50k, 100k, 200k documents:
    316, 368, 479 MB kept mapped (+1.1 KB a document); 314, 304, 312 MB unmapped after each read.
    """

    def __init__(self, work: Path):
        self.dir = work_paths(work)["signatures"]

    def get(self, refs: Any) -> Any:
        """Signatures of ``refs`` (uint64 array) as a (len(refs), num_perm) array, in that order."""
        import numpy as np

        shards, rows = (refs >> np.uint64(32)).astype(np.int64), (refs & np.uint64(0xFFFFFFFF)).astype(np.int64)
        out = None
        for shard in np.unique(shards):
            mapped = np.load(self.dir / f"{shard_name(int(shard))}.npy", mmap_mode="r")
            sel = shards == shard
            block = np.asarray(mapped[rows[sel]])  # fancy indexing copies the rows out of the map
            del mapped  # the last reference: the file is unmapped here
            if out is None:
                out = np.empty((len(refs), block.shape[1]), dtype=block.dtype)
            out[sel] = block
        return out


def _read_spill(root: Path) -> Any:
    import numpy as np
    import pyarrow.parquet as pq

    files = list_parquet(root) if root.is_dir() else []
    if not files:
        return np.zeros((0, 4), dtype=np.uint64)
    return np.concatenate([np.stack([pq.read_table(f).column(c).to_numpy() for c in SPILL_COLUMNS], axis=1)
                           for f in files])


def _buckets(keys: Any) -> tuple[Any, Any]:
    """Sort key rows by (k0, k1, order, doc); return them and the [start, end) of each bucket of 2+."""
    import numpy as np

    keys = keys[np.lexsort((keys[:, 3], keys[:, 2], keys[:, 1], keys[:, 0]))]
    if len(keys) == 0:
        return keys, np.zeros((0, 2), dtype=np.int64)
    change = (keys[1:, 0] != keys[:-1, 0]) | (keys[1:, 1] != keys[:-1, 1])
    starts = np.flatnonzero(np.r_[True, change])
    ends = np.r_[starts[1:], len(keys)]
    multi = ends - starts >= 2
    return keys, np.stack([starts[multi], ends[multi]], axis=1)


def group_partition(task: ShardTask) -> ShardResult:
    """Step 2 for one partition: exact buckets and LSH buckets become edges ``edges/<p>.parquet``."""
    import numpy as np
    import pyarrow as pa

    plan: LshPlan = task.config
    paths = work_paths(plan.work)
    result = ShardResult()
    edges_a, edges_b, kinds = [], [], []

    keys, spans = _buckets(_read_spill(paths["spill"] / EXACT / task.name))
    for start, end in spans:  # identical normalised text: link every copy to the first
        edges_a.append(np.full(end - start - 1, keys[start, 3]))
        edges_b.append(keys[start + 1 : end, 3])
    kinds.append(np.zeros(sum(len(b) for b in edges_b), dtype=np.uint8))

    band_rows = _read_spill(paths["spill"] / BANDS / task.name)
    result.counts["band_rows_grouped"] = len(band_rows)
    keys, spans = _buckets(band_rows)
    a, b, compared = _link_buckets(keys, spans, plan)
    edges_a.append(a)
    edges_b.append(b)
    kinds.append(np.ones(len(a), dtype=np.uint8))
    result.counts["candidate_pairs"] = compared

    # A pair that collides in several bands is linked once per partition.
    edges = np.unique(np.stack([np.concatenate(edges_a).astype(np.uint64), np.concatenate(edges_b).astype(np.uint64),
                                np.concatenate(kinds).astype(np.uint64)], axis=1), axis=0)
    result.counts["exact_edges"] = int((edges[:, 2] == 0).sum())
    result.counts["near_edges"] = int((edges[:, 2] == 1).sum())
    table = pa.table({"a": pa.array(edges[:, 0]), "b": pa.array(edges[:, 1]),
                      "kind": pa.array(edges[:, 2].astype(np.uint8))})
    write_parquet_atomic(table, paths["edges"] / f"{task.name}.parquet")
    return result


PAIRWISE_LIMIT = 512  # bucket members compared pairwise before falling back to representatives


def _link_buckets(keys: Any, spans: Any, plan: LshPlan) -> tuple[Any, Any, int]:
    """Edges inside LSH buckets, and how many candidate pairs were looked at.

    Without ``verify`` every member links to the bucket's first member. With it, members are
    clustered greedily: each is compared (estimated Jaccard from the signatures) with the earlier
    members of its bucket and linked to the most similar one at or above the threshold, or becomes
    a representative. Buckets larger than PAIRWISE_LIMIT compare with the representatives and the
    last PAIRWISE_LIMIT members only, bounding the cost; a false-positive collision links nothing.
    """
    import numpy as np

    if len(spans) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), 0
    if not plan.verify:
        a = np.concatenate([np.full(e - s - 1, keys[s, 3]) for s, e in spans])
        b = np.concatenate([keys[s + 1 : e, 3] for s, e in spans])
        return a, b, len(b)
    members = np.unique(np.concatenate([keys[s:e, 3] for s, e in spans]))
    sigs = SignatureStore(plan.work).get(members)
    index = np.searchsorted(members, keys[:, 3])  # only read for rows inside spans
    a, b, compared = [], [], 0
    for start, end in spans:
        reps, seen = [index[start]], [index[start]]
        for pos in range(start + 1, end):
            x = index[pos]
            # Every earlier member, not only the representatives: a copy may be near the base but not
            # near the copy that became the representative (bench/data.py found such misses).
            # Huge buckets compare with the representatives plus a window of recent members.
            cand = seen if len(seen) <= PAIRWISE_LIMIT else reps + seen[-PAIRWISE_LIMIT:]
            sims = (sigs[cand] == sigs[x]).mean(axis=1)
            compared += len(cand)
            best = int(np.argmax(sims))
            if sims[best] >= plan.threshold:
                a.append(members[cand[best]])
                b.append(members[x])
            else:
                reps.append(x)
            seen.append(x)
    return np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64), compared


# ---------------------------------------------------------------- step 3: clusters and survivors


class UnionFind:
    """Disjoint sets over 0..n-1 with union by size and path halving."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return
        if self.size[rx] < self.size[ry]:
            rx, ry = ry, rx
        self.parent[ry] = rx
        self.size[rx] += self.size[ry]


def resolve(plan: LshPlan, num_shards: int) -> dict[str, int]:
    """Step 3: connected components of all edges, one survivor each, ``resolved/<shard>.parquet``.

    Memory holds only the documents that have at least one duplicate (their refs, ids and
    lengths), plus one signature per cluster for the Jaccard-to-survivor column.
    """
    import numpy as np

    paths = work_paths(plan.work)
    done = paths["resolved"] / "_SUCCESS"
    if done.is_file():
        return json.loads(done.read_text())
    files = list_parquet(paths["edges"])
    nodes = np.zeros(0, dtype=np.uint64)
    for a, b in _read_edges(files):
        nodes = np.unique(np.concatenate([nodes, a, b]))
    stats = {"clusters": 0, "docs_in_clusters": len(nodes)}
    if len(nodes):
        stats["clusters"] = _write_clusters(plan, nodes, files, num_shards)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(stats))
    return stats


def _read_edges(files: list[Path]) -> Any:
    """(a, b) arrays of doc refs, one edge file at a time."""
    import pyarrow.parquet as pq

    for f in files:
        table = pq.read_table(f, columns=["a", "b"])
        yield table.column("a").to_numpy(), table.column("b").to_numpy()


def _write_clusters(plan: LshPlan, nodes: Any, edge_files: list[Path], num_shards: int) -> int:
    """Clusters of ``nodes`` joined by the edges; write the resolution per shard; return the cluster count."""
    import numpy as np

    paths = work_paths(plan.work)
    root = _components(nodes, edge_files)
    ids, neg_len, hi, lo = _node_meta(paths["meta"], nodes)
    survivor, repeat = _survivors(root, nodes, ids, neg_len, hi, lo)
    keep = survivor == np.arange(len(nodes))
    cluster_size = np.bincount(root, minlength=len(nodes))[root]

    store = SignatureStore(plan.work)
    surv_idx = np.unique(survivor)
    surv_sigs = store.get(nodes[surv_idx])  # one signature per cluster, for the Jaccard-to-survivor column
    shard_of = (nodes >> np.uint64(32)).astype(np.int64)
    ids_list = ids.to_pylist()
    for shard in range(num_shards):
        sel = np.flatnonzero(shard_of == shard)
        if len(sel) == 0:
            continue
        theirs = surv_sigs[np.searchsorted(surv_idx, survivor[sel])]
        jaccard = (store.get(nodes[sel]) == theirs).mean(axis=1).astype(np.float32)
        _write_resolved(paths["resolved"] / f"{shard_name(shard)}.parquet", sel, nodes, keep, repeat, survivor,
                        hi, lo, ids_list, jaccard, cluster_size)
    return len(surv_idx)


def _components(nodes: Any, edge_files: list[Path]) -> Any:
    """The root index of each node after union-find over the edges, streamed file by file."""
    import numpy as np

    uf = UnionFind(len(nodes))
    for a, b in _read_edges(edge_files):
        for x, y in zip(np.searchsorted(nodes, a).tolist(), np.searchsorted(nodes, b).tolist(), strict=True):
            uf.union(x, y)
    return np.array([uf.find(i) for i in range(len(nodes))], dtype=np.int64)


def _survivors(root: Any, nodes: Any, ids: Any, neg_len: Any, hi: Any, lo: Any) -> tuple[Any, Any]:
    """(index of each node's cluster survivor, whether the node repeats an earlier identical text).

    The survivor is the longest normalised text, then the smallest id, then the content hash,
    then the position (identical texts with identical ids only). The survivor is always the first
    of its identical-text group, so it is never a "repeat".
    """
    import numpy as np
    import pyarrow.compute as pc

    id_rank = pc.rank(ids, sort_keys="ascending", tiebreaker="dense").to_numpy()
    by_text = np.lexsort((nodes, id_rank, lo, hi, root))
    r, h, low = root[by_text], hi[by_text], lo[by_text]
    repeat = np.zeros(len(nodes), dtype=bool)
    repeat[by_text[1:][(r[1:] == r[:-1]) & (h[1:] == h[:-1]) & (low[1:] == low[:-1])]] = True
    by_rank = np.lexsort((nodes, lo, hi, id_rank, neg_len, root))
    first = by_rank[np.r_[True, root[by_rank][1:] != root[by_rank][:-1]]]
    survivor_of_root = np.zeros(len(nodes), dtype=np.int64)
    survivor_of_root[root[first]] = first
    return survivor_of_root[root], repeat


def _node_meta(meta_dir: Path, nodes: Any) -> tuple[Any, Any, Any, Any]:
    """(ids, -normalised length, hi, lo) of ``nodes`` (sorted refs), read shard by shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = (nodes >> np.uint64(32)).astype(np.int64)
    rows = (nodes & np.uint64(0xFFFFFFFF)).astype(np.int64)
    parts = []
    for shard in np.unique(shards):  # nodes are sorted, so shard blocks come out in node order
        meta = pq.read_table(meta_dir / f"{shard_name(int(shard))}.parquet")
        parts.append(meta.take(pa.array(rows[shards == shard])))
    meta = pa.concat_tables(parts).combine_chunks()
    return (meta.column("id").chunk(0), -meta.column("norm_len").to_numpy(),
            meta.column("hi").to_numpy(), meta.column("lo").to_numpy())


def resolved_schema() -> Any:
    """Columns of ``resolved/<shard>.parquet``: one row per document of the shard that is in a cluster."""
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("keep", pa.bool_()), ("reason", pa.string()), ("cluster", pa.string()),
                      ("survivor_id", pa.string()), ("jaccard", pa.float32()), ("cluster_size", pa.int64())])


def _write_resolved(path: Path, sel: Any, nodes: Any, keep: Any, repeat: Any, survivor: Any,
                    hi: Any, lo: Any, ids: list[str], jaccard: Any, cluster_size: Any) -> None:
    import numpy as np
    import pyarrow as pa

    surv = survivor[sel]
    reason = [None if k else ("exact" if r else "near") for k, r in zip(keep[sel], repeat[sel], strict=True)]
    table = pa.table({
        "row": pa.array((nodes[sel] & np.uint64(0xFFFFFFFF)).astype(np.int64)),
        "keep": pa.array(keep[sel]),
        "reason": pa.array(reason, pa.string()),
        # The cluster is named by its survivor's content hash: stable however the corpus is sharded.
        "cluster": pa.array([f"{int(hi[s]):016x}{int(lo[s]):016x}" for s in surv], pa.string()),
        "survivor_id": pa.array([ids[s] for s in surv], pa.string()),
        "jaccard": pa.array(jaccard),
        "cluster_size": pa.array(cluster_size[sel].astype(np.int64)),
    }, schema=resolved_schema())
    write_parquet_atomic(table, path)
