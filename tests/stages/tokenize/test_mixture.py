"""Source mixtures: the planned epochs, the stream's shares, and TokenDataset reading through the stream."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.token_shards import FORMAT_VERSION, META_FILE, TokenDataset, read_meta, stream_sequences
from stages.tokenize.mixture import MIXED, MixtureError, plan, shard_source, stream, write_mixture


def test_a_small_source_is_repeated_and_a_large_one_subsampled_to_the_weights():
    plans = plan({"web": 1000, "code": 50}, {"web": 3.0, "code": 1.0}, tail_rows=2)
    assert plans["web"].weight == 0.75 and plans["code"].weight == 0.25
    assert plans["web"].stream_rows == 788 and plans["code"].stream_rows == 262  # of 1050 rows
    assert plans["code"].epochs == pytest.approx(5.24) and plans["web"].epochs == pytest.approx(0.788)
    assert plans[MIXED].stream_rows == 2

    groups = {"web": np.arange(0, 1000), "code": np.arange(1000, 1050), MIXED: np.array([1050, 1051])}
    rows = stream(groups, plans, seed=0)
    assert len(rows) == 788 + 262 + 2 and np.all(np.diff(rows) >= 0)
    counts = Counter(rows.tolist())
    assert {counts[r] for r in range(1000, 1050)} <= {5, 6}  # every code row 5 times, 12 of them a 6th
    assert sum(counts[r] for r in range(1000, 1050)) == 262
    assert max(counts[r] for r in range(1000)) == 1 and sum(r < 1000 for r in rows) == 788  # no web row twice
    assert np.array_equal(stream(groups, plans, seed=0), rows)
    assert not np.array_equal(stream(groups, plans, seed=1), rows)


def test_weights_must_cover_the_sources_and_every_weighted_source_needs_rows():
    with pytest.raises(MixtureError, match=r"source\(s\) \['forum'\] .* no weight"):
        plan({"web": 10, "forum": 5}, {"web": 1.0})
    with pytest.raises(MixtureError, match=r"\['code'\] left no training tokens"):
        plan({"web": 10}, {"web": 1.0, "code": 1.0})


def write_tokens(tmp_path, rows_by_shard: dict[str, int], seq_len: int = 4):
    """A tokens artifact whose row r holds the tokens r*10 .. r*10+seq_len-1 (rows numbered across shards)."""
    tokens = tmp_path / "tokens"
    (tokens / "train").mkdir(parents=True)
    (tokens / "val").mkdir()
    shards, start = [], 0
    for name, rows in rows_by_shard.items():
        data = (np.arange(start, start + rows)[:, None] * 10 + np.arange(seq_len)).astype(np.uint16)
        data.tofile(tokens / "train" / f"{name}.bin")
        shards.append({"path": f"train/{name}.bin", "sequences": rows})
        start += rows
    np.zeros((1, seq_len), np.uint16).tofile(tokens / "val" / "00000.bin")
    meta = {"format": FORMAT_VERSION, "dtype": "uint16", "seq_len": seq_len, "vocab_size": 65535, "eos_id": 0,
            "pad_id": None, "splits": {"train": {"sequences": start, "shards": shards},
                                       "val": {"sequences": 1, "shards": [{"path": "val/00000.bin", "sequences": 1}]}}}
    return tokens, meta


def test_the_dataset_reads_the_stream_and_the_shares_follow_the_weights(tmp_path):
    tokens, meta = write_tokens(tmp_path, {"00000": 30, "00001": 6, "00002": 24, "tail": 1})
    sources = {"00000": "web", "00001": "code", "00002": "web"}
    metrics = write_mixture(tokens, meta, sources, {"web": 1.0, "code": 1.0}, seed=7)
    (tokens / META_FILE).write_text(json.dumps(meta))

    assert metrics["source.code.epochs"] == 5.0 and metrics["source.web.epochs"] == pytest.approx(30 / 54)
    assert metrics["source.code.tokens_train"] == metrics["source.web.tokens_train"] == 30 * 4
    assert metrics[f"source.{MIXED}.tokens_train"] == 4
    meta = read_meta(tokens)
    assert stream_sequences(meta, "train") == 61 and stream_sequences(meta, "val") == 1
    data = TokenDataset(tokens, "train")
    assert len(data) == 61 and data.rows == 61  # the corpus's size kept: 60 weighted rows + the tail
    firsts = [int(data[i][0]) // 10 for i in range(len(data))]
    code = [r for r in firsts if 30 <= r < 36]
    assert len(code) == 30 and Counter(code) == dict.fromkeys(range(30, 36), 5)
    assert np.array_equal(data[0], np.arange(4) + firsts[0] * 10)
    assert len(TokenDataset(tokens, "val")) == 1


def test_a_shard_knows_its_one_source(tmp_path):
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "source": ["web", "web"]}), one)
    assert shard_source(str(one)) == "web"
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "none.parquet")
    assert shard_source(str(tmp_path / "none.parquet")) is None
    pq.write_table(pa.table({"text": ["a", "b"], "source": ["web", "code"]}), tmp_path / "two.parquet")
    with pytest.raises(MixtureError, match=r"several sources \['code', 'web'\] in one shard"):
        shard_source(str(tmp_path / "two.parquet"))


def test_the_tokenize_stage_weights_its_sources_and_pretrain_counts_the_stream(tmp_path):
    """Real BPE and packing on three shards of two sources (as ingest tags them), weights 1:1."""
    from dataclasses import replace

    from stages.common.config import SourceConfig
    from tests.stages.tokenize.test_tokenize import CFG, make_docs, run_stage

    docs = make_docs(400)
    shards = [docs[:150], docs[150:300], docs[300:]]  # "web": the first two shards, "code": the small last one
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (part, source) in enumerate(zip(shards, ("web", "web", "code"), strict=True)):
        pq.write_table(pa.Table.from_pylist([{**d, "source": source} for d in part]), inputs / f"{i:05d}.parquet")
    sources = {"web": SourceConfig(input=("w",), weight=1.0), "code": SourceConfig(input=("c",), weight=1.0)}
    metrics = run_stage(inputs, tmp_path / "out", replace(CFG, sources=sources))

    web, code = (metrics[f"source.{s}.tokens_train"] for s in ("web", "code"))
    assert abs(web - code) <= 32  # equal shares, within a row of rounding
    assert metrics["source.code.epochs"] > 2 > 1 > metrics["source.web.epochs"]  # repeated / subsampled
    assert metrics["source.code.tokens_unique"] < metrics["source.web.tokens_unique"]
    tokens = tmp_path / "out" / "tokens"
    meta = read_meta(tokens)
    assert len(TokenDataset(tokens, "train")) == stream_sequences(meta, "train") == metrics["tokens_train_stream"] // 32
    # one source: no stream, every row once
    single = run_stage(inputs, tmp_path / "one", replace(CFG, sources={"web": sources["web"]}))
    assert not any(k.startswith("source.") for k in single) and "mixture" not in read_meta(
        tmp_path / "one" / "tokens")["splits"]["train"]


def test_the_weights_are_in_tokenizes_fingerprint_the_inputs_are_not():
    from dataclasses import replace

    from pipeline.plan import hashed_config
    from stages.common.config import SourceConfig
    from stages.tokenize.stage import STAGE
    from tests.stages.tokenize.test_tokenize import CFG

    def payload(weight: float, inputs: tuple[str, ...]) -> dict:
        sources = {"web": SourceConfig(input=inputs, weight=weight), "code": SourceConfig(input=("c",), weight=1.0)}
        return hashed_config(STAGE, replace(CFG, sources=sources))

    assert payload(1.0, ("a",)) == payload(1.0, ("b", "c")) != payload(2.0, ("a",))
