"""What the dedup machinery keeps in memory (bench/scale.py measures the stage's peak as the corpus grows)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from stages.common.shards import shard_name
from stages.dedup.lsh import SignatureStore, work_paths


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_signature_store_leaves_no_file_mapped(tmp_path):
    """A file kept mapped after its rows were read stayed in the process's RSS, nearly whole (the kernel maps
    pages around each one touched): the resolving process came to hold every signature file, num_perm x 4
    bytes per document of the corpus. The store copies the rows out and unmaps the file."""
    folder = work_paths(tmp_path)["signatures"]
    folder.mkdir(parents=True)
    shards = [np.random.default_rng(s).integers(0, 2**32, (3_000, 64), dtype=np.uint32) for s in range(4)]
    for s, sigs in enumerate(shards):
        np.save(folder / f"{shard_name(s)}.npy", sigs)
    rows = [(s, r) for s in (0, 2, 3) for r in range(5, 3_000, 37)]
    refs = np.array([(s << 32) | r for s, r in rows], dtype=np.uint64)

    store = SignatureStore(tmp_path)
    out = store.get(refs)

    assert out.shape == (len(rows), 64)
    assert all((out[i] == shards[s][r]).all() for i, (s, r) in enumerate(rows))
    mapped = Path("/proc/self/maps").read_text()
    assert str(folder) not in mapped  # while the store is still alive
