"""The tokenizer sample (bounded, seeded, drawn from every shard) and the held-out size in tokens
(stages/tokenize/split.py), through the tokenize stage on generated corpora."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from stages.common.shards import done_marker, shard_name
from stages.tokenize.split import (
    HELDOUT_FILE,
    SAMPLE_DIR,
    HeldoutRule,
    ShardStats,
    heldout_bound,
)
from tests.stages.tokenize.test_tokenize import (
    CFG,
    bin_bytes,
    heldout_ids,
    hf_tokenizer,
    make_docs,
    run_stage,
    write_shards,
)

TOKENS = replace(CFG, validation_fraction=None, heldout_tokens=3000)  # held-out size in tokens


def chars(docs) -> int:
    return sum(len(d["text"]) for d in docs)


def sample_counts(out: Path, shards: int) -> list[dict[str, int]]:
    return [json.loads(done_marker(out / SAMPLE_DIR, shard_name(i)).read_text())["counts"] for i in range(shards)]


@pytest.fixture(scope="module")
def shards() -> list[list[dict[str, str]]]:
    """Four shards of 500 documents; only the last one's documents say 'qqlastword'."""
    docs = make_docs(2000)
    parts = [docs[i::4] for i in range(4)]
    for d in parts[3]:
        d["text"] += " qqlastword" * 3
    return parts


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, shards) -> tuple[Path, Path, dict[str, float], int]:
    root = tmp_path_factory.mktemp("sampled")
    inputs = write_shards(root / "in", shards)
    budget = chars([d for s in shards for d in s]) // 3
    metrics = run_stage(inputs, root / "out", replace(TOKENS, tokenizer_train_chars=budget))
    return inputs, root / "out", metrics, budget


# ---------------------------------------------------------------- the sample


def test_sample_is_bounded_and_every_shard_gives_its_share(sampled, shards):
    inputs, out, metrics, budget = sampled
    longest = max(len(d["text"]) for s in shards for d in s)
    assert budget - 4 * longest < metrics["tokenizer_sample_chars"] <= budget
    stats = ShardStats.read(sorted(inputs.glob("*.parquet")))
    for size, counts in zip(stats.sizes, sample_counts(out, 4), strict=True):
        share = budget * size // sum(stats.sizes)
        assert share - longest < counts["sample_chars"] <= share
    # The last shard's word was trained on: a prefix of a third of the corpus would not have seen it.
    assert len(hf_tokenizer(out / "tokenizer").tokenize(" qqlastword")) == 1
    # The sample's texts are gone once the tokenizer is saved; the done markers and the held-out fraction stay.
    assert sorted(p.name for p in (out / SAMPLE_DIR).iterdir()) == ["_shards", HELDOUT_FILE]


def test_sample_does_not_depend_on_workers_or_batch_size(sampled, tmp_path):
    inputs, out, _, budget = sampled
    run_stage(inputs, tmp_path / "w2", replace(TOKENS, tokenizer_train_chars=budget, workers=2, batch_size=7))
    assert (tmp_path / "w2" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert bin_bytes(tmp_path / "w2") == bin_bytes(out)
    assert heldout_ids(tmp_path / "w2") == heldout_ids(out)


def test_a_sample_as_large_as_the_corpus_is_the_whole_train_split(tmp_path, shards):
    inputs = write_shards(tmp_path / "in", shards)
    whole = run_stage(inputs, tmp_path / "all", CFG)  # tokenizer_train_chars: null
    big = run_stage(inputs, tmp_path / "big", replace(CFG, tokenizer_train_chars=10**9))
    assert big["tokenizer_sample_chars"] == chars(d for s in shards for d in s if not
                                                  HeldoutRule(CFG.validation_fraction, 0)(d["id"]))
    vocab = {name: hf_tokenizer(tmp_path / name / "tokenizer").get_vocab() for name in ("big", "all")}
    assert vocab["big"] == vocab["all"]
    assert "tokenizer_sample_chars" not in whole


def test_sample_is_seeded(sampled, tmp_path):
    inputs, out, _, budget = sampled
    run_stage(inputs, tmp_path / "s1", replace(TOKENS, tokenizer_train_chars=budget, tokenizer_train_seed=1))
    assert sample_counts(tmp_path / "s1", 4) != sample_counts(out, 4)


# ---------------------------------------------------------------- held-out size in tokens


def test_heldout_tokens_holds_out_about_that_many_tokens(sampled):
    _, out, metrics, _ = sampled
    split = json.loads((out / SAMPLE_DIR / HELDOUT_FILE).read_text())
    assert split["fraction"] == metrics["heldout_fraction"] < split["bound"]
    total = metrics["doc_tokens_train"] + metrics["doc_tokens_val"]
    assert split["estimated_tokens"] == pytest.approx(total, rel=0.05)
    assert metrics["doc_tokens_val"] == pytest.approx(TOKENS.heldout_tokens, rel=0.35)  # ~50 random documents
    assert heldout_ids(out) == {i for i in heldout_ids(out) if HeldoutRule(split["fraction"], 0)(i)}


def test_documents_that_may_be_held_out_are_not_trained_on(tmp_path):
    """Before the tokenizer exists the fraction is unknown: every document under its bound stays out of training."""
    docs = make_docs(600)

    def bound_of(directory: Path) -> HeldoutRule:
        size = sum(ShardStats.read(sorted(directory.glob("*.parquet"))).sizes)
        return HeldoutRule(heldout_bound(TOKENS.heldout_tokens, size), TOKENS.validation_seed)

    first = bound_of(write_shards(tmp_path / "probe", [docs]))
    # The planted words make the text longer and so the bound lower: plant well under it, and train words above it.
    val = [d for d in docs if first.score(d["id"]) < first.fraction / 2]
    train = [d for d in docs if not first(d["id"])][: len(val)]
    assert len(val) >= 10
    for d in val:
        d["text"] += " qqvalword" * 20
    for d in train:
        d["text"] += " qqtrainword" * 20
    inputs = write_shards(tmp_path / "in", [docs])
    bound = bound_of(inputs)
    assert all(bound(d["id"]) for d in val) and 0 < bound.fraction < 0.5
    for name, cfg in (("all", TOKENS), ("sampled", replace(TOKENS, tokenizer_train_chars=10**9))):
        run_stage(inputs, tmp_path / name, cfg)
        tok = hf_tokenizer(tmp_path / name / "tokenizer")
        assert len(tok.tokenize(" qqtrainword")) == 1 and len(tok.tokenize(" qqvalword")) > 1, name
        assert all(bound(i) for i in heldout_ids(tmp_path / name))


def test_heldout_tokens_with_a_given_tokenizer(sampled, tmp_path):
    inputs, out, metrics, _ = sampled
    given = run_stage(inputs, tmp_path / "given", replace(TOKENS, tokenizer=str(out / "tokenizer")))
    assert given["doc_tokens_val"] == pytest.approx(TOKENS.heldout_tokens, rel=0.35)
    assert given["heldout_fraction"] == pytest.approx(metrics["heldout_fraction"], rel=0.05)


def test_resume_reuses_the_saved_fraction_without_the_sample(sampled, tmp_path):
    inputs, out, metrics, budget = sampled
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    done_marker(resumed, "00002").unlink()  # as if the attempt died while packing shard 00002
    (resumed / "tokens" / "train" / "00002.bin").unlink()
    again = run_stage(inputs, resumed, replace(TOKENS, tokenizer_train_chars=budget))
    assert again["tokenizer_train_s"] == 0 and again["heldout_fraction"] == metrics["heldout_fraction"]
    assert bin_bytes(resumed) == bin_bytes(out)
    assert (resumed / "tokens" / "meta.json").read_text() == (out / "tokens" / "meta.json").read_text()


def test_heldout_tokens_on_an_empty_input(tmp_path):
    (tmp_path / "in").mkdir()
    metrics = run_stage(tmp_path / "in", tmp_path / "out", replace(TOKENS, tokenizer_train_chars=1000))
    assert metrics["docs_in"] == 0 and metrics["heldout_fraction"] == 0


def test_config_takes_one_heldout_size():
    with pytest.raises(ConfigError, match=r"stage\.tokenize: set one of validation_fraction .* heldout_tokens"):
        stage_config("tokenize", "stage.tokenize.heldout_tokens=1000")
    with pytest.raises(ConfigError, match=r"stage\.tokenize: set one of validation_fraction"):
        stage_config("tokenize", "stage.tokenize.validation_fraction=null")
    with pytest.raises(ConfigError, match=r"stage\.tokenize\.heldout_tokens: must be 0 or more, got -1"):
        stage_config("tokenize", "stage.tokenize.validation_fraction=null", "stage.tokenize.heldout_tokens=-1")
    cfg = stage_config("tokenize", "stage.tokenize.validation_fraction=null", "stage.tokenize.heldout_tokens=1000")
    assert (cfg.validation_fraction, cfg.heldout_tokens) == (None, 1000)


def test_llama_7b_recipe_samples_the_crawl_and_holds_out_tokens():
    cfg = stage_config("tokenize", conf="llama-7b")
    assert cfg.tokenizer_train_chars == 2_000_000_000 and cfg.validation_fraction is None
    assert cfg.heldout_tokens == 50_000_000
    tiny = stage_config("tokenize")  # the tiny pipeline trains on its whole train split, 5% held out
    assert (tiny.tokenizer_train_chars, tiny.validation_fraction, tiny.heldout_tokens) == (None, 0.05, None)


def test_array_tasks_then_the_final_job_give_the_local_output(sampled, tmp_path, monkeypatch):
    """On a cluster each encode task runs the prelude (sample, tokenizer, fraction) or finds it done."""
    from pipeline import sharding

    inputs, out, _, budget = sampled
    cfg = replace(TOKENS, tokenizer_train_chars=budget)
    for task in (0, 1):
        monkeypatch.setenv(sharding.ENV, sharding.ShardSlice(task, 2, "encode").encode())
        with pytest.raises(sharding.SliceDone):
            run_stage(inputs, tmp_path / "array", cfg)
    monkeypatch.delenv(sharding.ENV)
    final = run_stage(inputs, tmp_path / "array", cfg)
    assert final["tokenizer_train_s"] == 0
    assert bin_bytes(tmp_path / "array") == bin_bytes(out) and heldout_ids(tmp_path / "array") == heldout_ids(out)
