"""The tokenize stage on a generated corpus: real BPE training, real packing, real memmap reading."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.common.shards import done_marker
from stages.common.token_shards import TokenDataset, TokenShardError, open_split, read_meta, token_dtype
from stages.tokenize.stage import (
    CHAT_TOKENS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    HeldoutRule,
    TokenizeConfig,
    TokenizeInputError,
    run,
    tokenizer_state,
)

WORDS = ["data", "model", "token", "the", "of", "and", "pipeline", "train", "shard", "packing", "café", "naïve",
         "über", "日本語", "Ελληνικά", "emoji🙂", "π", "zürich", "résumé", "x=1;"]
# The shipped config (conf/stage/tokenize/default.yaml), small enough for test corpora.
CFG = replace(stage_config("tokenize"), vocab_size=600, seq_len=32, validation_fraction=0.1, batch_size=16, workers=1)


def make_docs(n: int, seed: int = 0, prefix: str = "d") -> list[dict[str, str]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
        sep = rng.choice([" ", "  ", "\n", ", "])
        docs.append({"id": f"{prefix}{i:04d}", "url": f"https://example.org/{prefix}/{i}", "text": sep.join(words)})
    return docs


def write_shards(directory: Path, shards: list[list[dict[str, str]]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("text", pa.string())])
    for i, docs in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(docs, schema=schema), directory / f"part-{i:03d}.parquet")
    return directory


def run_stage(inputs: Path, out: Path, cfg: TokenizeConfig = CFG) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage="tokenize", fingerprint="test", output_dir=out, inputs={"decontaminate.documents": inputs})
    return run(cfg, ctx)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict[str, str]]]:
    docs = make_docs(300)
    return [docs[:120], docs[120:200], docs[200:]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus) -> tuple[Path, Path, dict[str, float]]:
    root = tmp_path_factory.mktemp("trained")
    inputs = write_shards(root / "in", corpus)
    metrics = run_stage(inputs, root / "out")
    return inputs, root / "out", metrics


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def heldout_ids(out: Path) -> set[str]:
    return {i for p in sorted((out / "heldout").glob("*.parquet")) for i in pq.read_table(p)["id"].to_pylist()}


def bin_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "tokens").rglob("*.bin"))}


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_has_special_tokens_and_loads_with_autotokenizer(trained):
    _, out, metrics = trained
    tok = hf_tokenizer(out / "tokenizer")
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (EOS, EOS, PAD)
    assert tok.model_max_length == CFG.seq_len
    assert len(tok) <= CFG.vocab_size and metrics["vocab_size"] == len(tok)
    assert len(tok) > 256 + len(SPECIAL_TOKENS)  # merges were learned
    special_map = json.loads((out / "tokenizer" / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == EOS and special_map["additional_special_tokens"] == list(CHAT_TOKENS)
    # A chat marker is one token when the sft stage encodes it through transformers.
    assert tok.encode("<|user|>", add_special_tokens=False) == [SPECIAL_TOKENS.index("<|user|>")]
    assert metrics["tokenizer_train_s"] > 0


@pytest.mark.parametrize("text", [
    "The pipeline trains a model on data.",
    "  leading spaces,\ttabs\nand newlines  ",
    "café naïve über 日本語 Ελληνικά emoji🙂 — “quotes” ½",
    "never seen: ǅ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
])
def test_trained_tokenizer_round_trips(trained, text):
    tok = hf_tokenizer(trained[1] / "tokenizer")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids or tok.unk_token_id is None
    assert tok.decode(ids) == text


def test_heldout_documents_are_not_trained_on(tmp_path):
    """A word that only held-out documents contain does not become a token; the same in train does."""
    docs = make_docs(200)
    rule = HeldoutRule(CFG.validation_fraction, CFG.validation_seed)
    val = [d for d in docs if rule(d["id"])]
    train = [d for d in docs if not rule(d["id"])]
    assert len(val) >= 3
    for d in val:
        d["text"] += " qqvalword" * 20
    for d in train[: len(val)]:
        d["text"] += " qqtrainword" * 20
    run_stage(write_shards(tmp_path / "in", [docs]), tmp_path / "out")
    tok = hf_tokenizer(tmp_path / "out" / "tokenizer")
    assert len(tok.tokenize(" qqtrainword")) == 1
    assert len(tok.tokenize(" qqvalword")) > 1


# ---------------------------------------------------------------- packed shards


def test_packed_shards_have_full_rows_and_counts_match_meta(trained):
    _, out, metrics = trained
    meta = read_meta(out / "tokens")
    assert meta["dtype"] == "uint16" and meta["seq_len"] == CFG.seq_len and meta["eos_id"] == 0
    row_bytes = CFG.seq_len * 2
    for split in ("train", "val"):
        m = meta["splits"][split]
        sizes = [(out / "tokens" / s["path"]).stat().st_size for s in m["shards"]]
        assert all(size % row_bytes == 0 for size in sizes)
        assert [size // row_bytes for size in sizes] == [s["sequences"] for s in m["shards"]]
        assert sum(sizes) // 2 == m["tokens"] == m["sequences"] * CFG.seq_len == metrics[f"tokens_{split}"]
        assert m["sequences"] == metrics[f"sequences_{split}"] > 0
        assert 0 <= m["dropped_tokens"] < CFG.seq_len  # only the end of the tail is dropped
        arrays = open_split(out / "tokens", split)
        assert all(a.shape[1] == CFG.seq_len for a in arrays)
    assert [s["path"] for s in meta["splits"]["train"]["shards"]] == [
        "train/00000.bin", "train/00001.bin", "train/00002.bin", "train/tail.bin"]
    assert metrics["docs_in"] == 300 and metrics["docs_train"] + metrics["docs_val"] == 300
    assert metrics["tokens_per_s"] > 0


def test_reader_returns_the_tokens_of_a_direct_encode(trained, corpus):
    """Shard 0's rows are exactly the start of its train documents, encoded one by one, each followed by EOS."""
    _, out, _ = trained
    tok = hf_tokenizer(out / "tokenizer")
    rule = HeldoutRule(CFG.validation_fraction, CFG.validation_seed)
    stream: list[int] = []
    for doc in corpus[0]:
        if not rule(doc["id"]):
            stream += tok.encode(doc["text"], add_special_tokens=False) + [tok.eos_token_id]
    # The same as encoding the concatenation: EOS in the text is the separator token.
    joined = tok.encode(EOS.join(d["text"] for d in corpus[0] if not rule(d["id"])) + EOS, add_special_tokens=False)
    assert joined == stream
    dataset = TokenDataset(out / "tokens", "train")
    n_rows = read_meta(out / "tokens")["splits"]["train"]["shards"][0]["sequences"]
    read = np.concatenate([dataset[i] for i in range(n_rows)])
    assert dataset[0].dtype == np.int64 and dataset[0].shape == (CFG.seq_len,)
    assert read.tolist() == stream[: n_rows * CFG.seq_len]
    assert len(stream) - len(read) < CFG.seq_len  # the rest went to the tail
    assert len(dataset) == sum(len(a) for a in open_split(out / "tokens", "train"))
    assert dataset[-1].tolist() == open_split(out / "tokens", "train")[-1][-1].tolist()
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_eos_separates_every_document_and_keep_partial_pads_only_the_end(tmp_path, corpus):
    cfg = replace(CFG, keep_partial=True)
    metrics = run_stage(write_shards(tmp_path / "in", corpus), tmp_path / "out", cfg)
    meta = read_meta(tmp_path / "out" / "tokens")
    for split in ("train", "val"):
        tokens = np.concatenate([a.reshape(-1) for a in open_split(tmp_path / "out" / "tokens", split)])
        m = meta["splits"][split]
        assert int((tokens == meta["eos_id"]).sum()) == m["docs"] == metrics[f"docs_{split}"]
        assert m["dropped_tokens"] == 0
        pads = int((tokens == meta["pad_id"]).sum())
        assert pads == m["pad_tokens"] < cfg.seq_len
        assert (tokens[len(tokens) - pads:] == meta["pad_id"]).all()
        assert tokens[len(tokens) - pads - 1] == meta["eos_id"]


def test_token_dtype_is_uint16_up_to_65535_ids():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(128256) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_dataset_pickles_without_its_maps(trained):
    import pickle

    dataset = TokenDataset(trained[1] / "tokens", "val")
    first = dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._maps is None and clone[0].tolist() == first.tolist()


def test_reader_rejects_a_truncated_shard(trained, tmp_path):
    tokens = tmp_path / "tokens"
    shutil.copytree(trained[1] / "tokens", tokens)
    with open(tokens / "train" / "00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(TokenShardError, match="00000.bin"):
        open_split(tokens, "train")
    with pytest.raises(TokenShardError, match="meta.json"):
        read_meta(tmp_path)


# ---------------------------------------------------------------- held-out split


def test_heldout_split_is_by_id_and_stable_across_workers_and_sharding(trained, corpus, tmp_path):
    inputs, out, metrics = trained
    rule = HeldoutRule(CFG.validation_fraction, CFG.validation_seed)
    expected = {d["id"] for shard in corpus for d in shard if rule(d["id"])}
    assert heldout_ids(out) == expected and len(expected) == metrics["docs_val"] > 0
    table = pq.read_table(out / "heldout" / "00000.parquet")
    assert table.column_names == ["id", "url", "text"]

    two_workers = run_stage(inputs, tmp_path / "w2", replace(CFG, workers=2))
    assert bin_bytes(tmp_path / "w2") == bin_bytes(out)
    assert heldout_ids(tmp_path / "w2") == expected
    assert two_workers["tokens_train"] == metrics["tokens_train"]

    docs = [d for shard in corpus for d in shard]
    random.Random(1).shuffle(docs)
    resharded = write_shards(tmp_path / "in5", [docs[i::5] for i in range(5)])
    run_stage(resharded, tmp_path / "r5", replace(CFG, batch_size=7))
    assert heldout_ids(tmp_path / "r5") == expected


def test_at_least_one_document_is_held_out(tmp_path):
    docs = make_docs(3)
    cfg = replace(CFG, validation_fraction=0.001)
    assert not any(HeldoutRule(0.001, 0)(d["id"]) for d in docs)
    metrics = run_stage(write_shards(tmp_path / "in", [docs]), tmp_path / "out", cfg)
    assert metrics["docs_val"] == 1 and len(heldout_ids(tmp_path / "out")) == 1
    no_split = run_stage(tmp_path / "in", tmp_path / "none", replace(cfg, validation_fraction=0.0))
    assert no_split["docs_val"] == 0


# ---------------------------------------------------------------- configured tokenizer, resume, bad input


def test_configured_tokenizer_dir_is_loaded_and_copied(trained, tmp_path):
    inputs, out, metrics = trained
    cfg = replace(CFG, tokenizer=str(out / "tokenizer"))
    loaded = run_stage(inputs, tmp_path / "out", cfg)
    assert hf_tokenizer(tmp_path / "out" / "tokenizer").get_vocab() == hf_tokenizer(out / "tokenizer").get_vocab()
    assert bin_bytes(tmp_path / "out") == bin_bytes(out)
    assert loaded["tokens_train"] == metrics["tokens_train"]

    with pytest.raises(TokenizeInputError, match="vocab_size"):
        run_stage(inputs, tmp_path / "small", replace(cfg, vocab_size=300))
    with pytest.raises(TokenizeInputError, match="not a local directory"):
        run_stage(inputs, tmp_path / "missing", replace(cfg, tokenizer=str(tmp_path / "nope")))


def save_plain_tokenizer(directory: Path, **special: str) -> Path:
    """A byte-level BPE dir with only the given special tokens, as a third-party tokenizer might be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special.values()), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d["text"] for d in make_docs(50)], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(directory))
    return directory


def test_configured_tokenizer_without_pad_or_eos(corpus, tmp_path):
    inputs = write_shards(tmp_path / "in", corpus[:1])
    cfg = replace(CFG, tokenizer=str(save_plain_tokenizer(tmp_path / "eos_only", eos_token="</s>")))
    run_stage(inputs, tmp_path / "out", cfg)
    meta = read_meta(tmp_path / "out" / "tokens")
    assert meta["pad_id"] is None and TokenDataset(tmp_path / "out" / "tokens").pad_id is None
    assert meta["eos_id"] == 0
    with pytest.raises(TokenizeInputError, match="no pad token"):
        run_stage(inputs, tmp_path / "pad", replace(cfg, keep_partial=True))
    no_eos = replace(CFG, tokenizer=str(save_plain_tokenizer(tmp_path / "no_eos", pad_token="<pad>")))
    with pytest.raises(TokenizeInputError, match="no eos_token"):
        run_stage(inputs, tmp_path / "no", no_eos)


def test_configured_tokenizer_content_is_fingerprinted(trained, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(trained[1] / "tokenizer", copy)
    cfg = replace(CFG, tokenizer=str(copy))
    before = tokenizer_state(cfg)
    assert before == tokenizer_state(cfg) and tokenizer_state(CFG) is None
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("32", "33"))
    assert tokenizer_state(cfg) != before


def test_resume_skips_done_shards_and_reuses_the_tokenizer(trained, tmp_path):
    inputs, out, metrics = trained
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    # As if the attempt died while shard 00001 was in progress.
    done_marker(resumed, "00001").unlink()
    (resumed / "tokens" / "train" / "00001.bin").unlink()
    kept = (resumed / "tokens" / "train" / "00000.bin").stat().st_mtime_ns
    tokenizer_json = (resumed / "tokenizer" / "tokenizer.json").read_bytes()

    again = run_stage(inputs, resumed)
    assert again["tokenizer_train_s"] == 0
    assert (resumed / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer_json
    assert (resumed / "tokens" / "train" / "00000.bin").stat().st_mtime_ns == kept
    assert bin_bytes(resumed) == bin_bytes(out)
    assert (resumed / "tokens" / "meta.json").read_text() == (out / "tokens" / "meta.json").read_text()
    assert again["docs_in"] == metrics["docs_in"]


def test_empty_input_dir_gives_empty_outputs(tmp_path):
    (tmp_path / "in").mkdir()
    metrics = run_stage(tmp_path / "in", tmp_path / "out")
    assert metrics["docs_in"] == 0 and metrics["tokens_train"] == 0
    assert len(TokenDataset(tmp_path / "out" / "tokens", "train")) == 0
    assert hf_tokenizer(tmp_path / "out" / "tokenizer").eos_token == EOS
    assert list((tmp_path / "out" / "heldout").iterdir()) == []


def test_empty_shards_and_bad_records_are_counted_not_fatal(tmp_path):
    docs = make_docs(60)
    docs[3]["text"] = ""
    docs[5]["text"] = None
    docs[7]["id"] = None
    inputs = write_shards(tmp_path / "in", [[], docs, []])
    metrics = run_stage(inputs, tmp_path / "out")
    assert metrics["docs_in"] == 60 and metrics["docs_out"] == 57
    assert metrics["dropped_empty_text"] == metrics["dropped_missing_text"] == metrics["dropped_missing_id"] == 1
    meta = read_meta(tmp_path / "out" / "tokens")
    assert meta["splits"]["train"]["shards"][0]["sequences"] == 0
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 57
    assert pq.read_table(tmp_path / "out" / "heldout" / "00000.parquet").num_rows == 0


def test_shard_without_text_column_is_a_named_error(tmp_path):
    directory = tmp_path / "in"
    directory.mkdir()
    pq.write_table(pa.table({"id": ["a"], "url": ["u"], "body": ["x"]}), directory / "bad.parquet")
    with pytest.raises(TokenizeInputError, match=r"bad\.parquet: no column 'text'"):
        run_stage(directory, tmp_path / "out")


def test_config_rejects_bad_values_by_key():
    with pytest.raises(ConfigError, match=r"stage\.tokenize\.validation_fraction: must be in \[0, 1\), got 1\.0"):
        stage_config("tokenize", "stage.tokenize.validation_fraction=1.0")
    with pytest.raises(ConfigError, match=r"stage\.tokenize\.vocab_size: 100 is too small for a byte-level BPE"):
        stage_config("tokenize", "stage.tokenize.vocab_size=100")
    given = stage_config("tokenize", "stage.tokenize.vocab_size=100", "stage.tokenize.tokenizer=some/dir")
    assert given.vocab_size == 100  # an upper bound for a given tokenizer, not a BPE to train


def test_the_tokenizer_phase_task_trains_the_tokenizer_ends_there_and_the_rest_reuses_it(corpus, tmp_path,
                                                                                          monkeypatch):
    """On a cluster the tokenizer has a job of its own (phase 'tokenizer', one task): that task draws the
    sample, trains and saves the tokenizer and ends; the later tasks and the final job reuse it, and the
    output is the one a whole run gives."""
    from pipeline import sharding
    from stages.tokenize.stage import STAGE, TOKENIZER_PHASE

    assert STAGE.shard_phases == (TOKENIZER_PHASE, "encode")
    assert [sharding.tasks_of(phase, 32) for phase in STAGE.shard_phases] == [1, 32]
    inputs = write_shards(tmp_path / "in", corpus)
    cfg = replace(CFG, tokenizer_train_chars=20_000)  # the sampled path, as the cluster recipe has it
    out = tmp_path / "out"
    monkeypatch.setenv(sharding.ENV, sharding.ShardSlice(0, 1, TOKENIZER_PHASE).encode())
    with pytest.raises(sharding.PhaseDone, match="the task of phase 'tokenizer' did the stage's work up to the end"):
        run_stage(inputs, out, cfg)
    trained_json = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert not list(out.rglob("*.bin")) and not (out / "tokens" / "meta.json").exists()
    assert not list((out / "_sample").glob("*.parquet"))  # the sample's texts go once the tokenizer is saved

    monkeypatch.delenv(sharding.ENV)
    metrics = run_stage(inputs, out, cfg)
    assert metrics["tokenizer_train_s"] == 0 and (out / "tokenizer" / "tokenizer.json").read_bytes() == trained_json
    whole = run_stage(inputs, tmp_path / "whole", cfg)
    assert bin_bytes(out) == bin_bytes(tmp_path / "whole") and metrics["tokens_train"] == whole["tokens_train"]
