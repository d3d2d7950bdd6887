"""The pretrain stage: config checks, DeepSpeed config, data order and schedule arithmetic (fast), and
real training under the DeepSpeed launcher with 2 CPU ranks (integration): loss falls, the exported
model loads and generates, a killed run resumes from its checkpoint, or from the one before when the
newest is corrupt. Checkpoint selection (manifests, set-aside, a clean restart) also runs on real
files without DeepSpeed.

Configs come from the shipped YAML (``stage_config``) with test-sized values; the curves carry the
names every training stage uses (stages/common/training.py)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.files import MANIFEST, write_manifest
from pipeline.stage import StageContext
from stages.common.launch import record_rank_error
from stages.common.modeling import VocabSizeError, llama_config, matmul_params, peak_tflops, train_flops_per_token
from stages.pretrain.checkpoints import (
    CheckpointLayoutError,
    check_layout,
    checkpoint_meta,
    choose_resume,
    prune_checkpoints,
)
from stages.pretrain.loop import StepSampler, eval_indices, eval_rows, step_batch
from stages.pretrain.stage import (
    STAGE,
    PretrainConfig,
    PretrainInputError,
    choose_bf16,
    deepspeed_config,
    failure_message,
    inspect_inputs,
    make_schedule,
    run,
)

REPO = Path(__file__).resolve().parents[3]
EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY = stage_config("pretrain")  # the shipped tiny config: the base of every test config
SMALL_MODEL = replace(TINY.model, name="test-llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, vocab_size=512, max_seq_len=64)

# ---------------------------------------------------------------- fixtures: a tokenizer and token shards

NOUNS = ["cat", "dog", "model", "river", "token", "engine", "garden", "shard", "city", "robot"]
ADJS = ["small", "green", "quick", "quiet", "large", "bright"]
VERBS = ["sees", "trains", "follows", "finds", "builds", "likes"]


def synthetic_docs(n: int, seed: int) -> list[str]:
    """Documents from a tiny grammar: plenty of structure for a small model to learn in a few steps."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            a, b = rng.choice(NOUNS), rng.choice(NOUNS)
            sentences.append(f"the {rng.choice(ADJS)} {a} {rng.choice(VERBS)} the {b}.")
        docs.append(" ".join(sentences))
    return docs


def write_tokenizer(directory: Path, texts: list[str], vocab_size: int = 320) -> None:
    """A byte-level BPE with the tokenize stage's special tokens, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, *CHAT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=CHAT)
    fast.save_pretrained(str(directory))


def write_tokens(directory: Path, tokenizer_dir: Path, splits: dict[str, list[str]], seq_len: int) -> dict:
    """Pack documents into the tokenize stage's layout (stages/common/token_shards.py), one shard per split."""
    from transformers import AutoTokenizer

    from stages.common.token_shards import FORMAT_VERSION, META_FILE, token_dtype

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    id_space = max(tok.get_vocab().values()) + 1
    dtype = token_dtype(id_space)
    meta = {"format": FORMAT_VERSION, "dtype": dtype.name, "seq_len": seq_len, "vocab_size": id_space,
            "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "splits": {}}
    for split, docs in splits.items():
        stream = [t for doc in docs for t in [*tok(doc)["input_ids"], tok.eos_token_id]]
        rows = len(stream) // seq_len
        array = np.asarray(stream[:rows * seq_len], dtype=dtype).reshape(rows, seq_len)
        (directory / split).mkdir(parents=True, exist_ok=True)
        array.tofile(directory / split / "00000.bin")
        meta["splits"][split] = {"docs": len(docs), "doc_tokens": len(stream), "sequences": rows,
                                 "tokens": rows * seq_len, "pad_tokens": 0,
                                 "dropped_tokens": len(stream) - rows * seq_len,
                                 "shards": [{"path": f"{split}/00000.bin", "sequences": rows}]}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def make_corpus(root: Path, seq_len: int = 64, train_docs: int = 600, val_docs: int = 60,
                vocab_size: int = 320) -> tuple[Path, Path]:
    """A tokenizer dir and a tokens dir, as the tokenize stage would hand them over."""
    tokenizer_dir, tokens_dir = root / "tokenizer", root / "tokens"
    train, val = synthetic_docs(train_docs, seed=1), synthetic_docs(val_docs, seed=2)
    write_tokenizer(tokenizer_dir, train, vocab_size)
    write_tokens(tokens_dir, tokenizer_dir, {"train": train, "val": val}, seq_len)
    return tokenizer_dir, tokens_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def small_cfg(**overrides) -> PretrainConfig:
    base = dict(model=SMALL_MODEL, seed=0, global_batch_size=8, micro_batch_size=2, max_steps=20, lr=3e-3,
                warmup_steps=3, eval_every=10, eval_sequences=16, checkpoint_every=10, keep_checkpoints=2,
                log_every=1, zero_stage=2)
    return replace(TINY, **{**base, **overrides})


def context(out: Path, tokenizer_dir: Path, tokens_dir: Path, attempt: int = 1) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage="pretrain", fingerprint="test", output_dir=out, attempt=attempt,
                        inputs={"tokenize.tokenizer": tokenizer_dir, "tokenize.tokens": tokens_dir},
                        metrics_file=out / "metrics.jsonl")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- config and declaration


def test_shipped_configs_compose_into_the_typed_config():
    tiny = TINY
    big = stage_config("pretrain", "model=llama-7b", "stage/pretrain=llama-7b")
    assert isinstance(tiny, PretrainConfig) and tiny.model.hidden_size == 256 and tiny.zero_stage == 2
    assert big.zero_stage == 3 and big.precision == "bf16" and big.gradient_checkpointing
    assert big.max_tokens == 140_000_000_000 and big.launch.gpus_per_node == 8
    # 7B: the global batch splits evenly over 1..16 nodes of 8 GPUs at micro batch 4.
    for nodes in (1, 2, 4, 8, 16):
        assert make_schedule(big, nodes * 8, 4096).grad_accum == 512 // (4 * 8 * nodes)
    assert make_schedule(big, 32, 4096).steps == 66_758  # ceil(140e9 / (512 * 4096))


@pytest.mark.parametrize("overrides, message", [
    (["zero_stage=4"], "stage.pretrain.zero_stage: must be 0, 1, 2 or 3, got 4"),
    (["offload_param=cpu"], "stage.pretrain.offload_param: cpu needs zero_stage 3"),
    (["zero_stage=0", "offload_optimizer=cpu"], "stage.pretrain.offload_optimizer: cpu needs zero_stage >= 1"),
    (["zero_stage=3", "offload_optimizer=nvme"], "stage.pretrain.nvme_path: nvme offload needs nvme_path"),
    (["micro_batch_size=0"], "stage.pretrain.micro_batch_size: must be at least 1, got 0"),
    (["min_lr_ratio=1.5"], "stage.pretrain.min_lr_ratio: must be in [0, 1], got 1.5"),
    (["lr=0"], "stage.pretrain.lr: must be positive"),
    (["launch.cpu_ranks=0"], "stage.pretrain.launch.cpu_ranks: must be at least 1, got 0"),
    (["launch.hosts=[a,a]"], "stage.pretrain.launch.hosts: ['a', 'a'] names a host twice"),
    (['zero_stage="3"'], "stage.pretrain.zero_stage: expected an integer"),
    (["+stage.pretrain.max_step=3"], "did you mean 'max_steps'"),
])
def test_bad_config_is_a_named_error(overrides, message):
    overrides = [o if o.startswith("+") else f"stage.pretrain.{o}" for o in overrides]
    with pytest.raises(ConfigError) as err:
        stage_config("pretrain", *overrides)
    assert message in str(err.value)


def test_layout_fields_are_execution_only_and_training_fields_are_not():
    from pipeline.fingerprint import canonical_json, without
    from pipeline.schema import to_plain

    def key(cfg):
        return canonical_json(without(to_plain(cfg), STAGE.unhashed))

    base = small_cfg()
    same = [replace(base, micro_batch_size=4, zero_stage=3, log_every=7, eval_every=3, checkpoint_every=2,
                    gradient_checkpointing=True, attention="eager", loader_workers=2),
            replace(base, launch=replace(base.launch, cpu_ranks=4, master_port=1234))]
    different = [replace(base, lr=1e-3), replace(base, global_batch_size=16), replace(base, seed=1),
                 replace(base, max_steps=21), replace(base, precision="fp32"), replace(base, eval_sequences=8),
                 replace(base, model=replace(SMALL_MODEL, num_layers=3))]
    assert all(key(c) == key(base) for c in same)
    assert all(key(c) != key(base) for c in different)
    assert STAGE.resumable and STAGE.outputs == ("model",)


# ---------------------------------------------------------------- schedule, precision, DeepSpeed config


def test_schedule_derives_accumulation_and_steps_from_tokens():
    s = make_schedule(small_cfg(global_batch_size=16, micro_batch_size=2), world_size=2, seq_len=64)
    assert (s.grad_accum, s.steps, s.tokens_per_step) == (4, 20, 16 * 64)
    s = make_schedule(small_cfg(max_tokens=10_000), world_size=2, seq_len=64)
    assert s.steps == 20  # ceil(10000 / (8 * 64)) = 20 steps; max_steps is not used
    with pytest.raises(PretrainInputError, match=r"global_batch_size=8 is not a multiple of micro_batch_size \(2\) "
                                                 r"x ranks \(3\) = 6"):
        make_schedule(small_cfg(), world_size=3, seq_len=64)
    with pytest.raises(PretrainInputError, match="warmup_steps=20 is not below the 20 training steps"):
        make_schedule(small_cfg(warmup_steps=20), world_size=2, seq_len=64)


def test_precision_is_bf16_only_on_a_gpu_that_has_it():
    assert choose_bf16("auto", "cuda", True) and choose_bf16("bf16", "cuda", True)
    assert not choose_bf16("auto", "cpu", False) and not choose_bf16("auto", "cuda", False)
    assert not choose_bf16("fp32", "cuda", True)
    with pytest.raises(PretrainInputError, match="precision=bf16 needs a GPU"):
        choose_bf16("bf16", "cpu", False)


def test_deepspeed_config_for_cpu_and_for_zero3_offload_on_gpu():
    cfg = small_cfg()
    cpu = deepspeed_config(cfg, make_schedule(cfg, 2, 64), bf16=False, accelerator="cpu")
    assert cpu["train_batch_size"] == 8 and cpu["train_micro_batch_size_per_gpu"] == 2
    assert cpu["gradient_accumulation_steps"] == 2 and cpu["gradient_clipping"] == 1.0
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # FusedAdam is CUDA-only
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"]["stage"] == 2
    big = small_cfg(zero_stage=3, offload_optimizer="cpu", offload_param="nvme", nvme_path="/nvme")
    gpu = deepspeed_config(big, make_schedule(big, 4, 64), bf16=True, accelerator="cuda")
    zero = gpu["zero_optimization"]
    assert gpu["bf16"] == {"enabled": True} and "torch_adam" not in gpu["optimizer"]["params"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    assert gpu["gradient_accumulation_steps"] == 1


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    from stages.pretrain.loop import lr_ratio

    ratios = [lr_ratio(s, warmup=4, total=20, min_ratio=0.1) for s in range(25)]
    assert ratios[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(ratios[3:], ratios[4:], strict=False))
    assert ratios[19] == pytest.approx(0.1) and ratios[24] == pytest.approx(0.1)
    assert ratios[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 8 / 16)))


# ---------------------------------------------------------------- data order


def test_a_steps_sequences_do_not_depend_on_the_number_of_ranks():
    n, g = 100, 8
    for step in (0, 5, 11, 12, 30):
        expected = set(step_batch(step, n, g, seed=3).tolist())
        for world in (1, 2, 4, 8):
            shares = [list(StepSampler(n, g, r, world, 3, step, step + 1)) for r in range(world)]
            assert sorted(i for s in shares for i in s) == sorted(expected)
            assert len({len(s) for s in shares}) == 1


def test_each_epoch_visits_every_full_batch_once_in_a_new_order():
    n, g = 50, 8  # 6 steps per epoch, 2 sequences left out each epoch
    epoch0 = np.concatenate([step_batch(s, n, g, seed=0) for s in range(6)])
    epoch1 = np.concatenate([step_batch(s, n, g, seed=0) for s in range(6, 12)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert epoch0.tolist() != epoch1.tolist()
    assert step_batch(0, n, g, seed=1).tolist() != step_batch(0, n, g, seed=0).tolist()


def test_a_resumed_sampler_continues_exactly_where_the_full_run_was():
    full = list(StepSampler(64, 8, 1, 2, 7, 0, 20))
    resumed = list(StepSampler(64, 8, 1, 2, 7, 9, 20))
    assert resumed == full[9 * 4:] and len(StepSampler(64, 8, 1, 2, 7, 9, 20)) == 11 * 4


def test_eval_shares_cover_the_eval_rows_once_with_equal_lengths():
    for n, limit, world in ((10, 64, 4), (3, 64, 4), (100, 16, 2), (1, 5, 2)):
        shares = [eval_indices(n, limit, r, world, seed=7) for r in range(world)]
        real = sorted(i for idx, ok in shares for i, flag in zip(idx, ok, strict=True) if flag)
        assert real == eval_rows(n, limit, 7) and len(real) == min(n, limit)
        assert len({len(idx) for idx, _ in shares}) == 1


def test_eval_rows_are_seeded_and_drawn_across_the_whole_split():
    assert eval_rows(10, 64, 0) == list(range(10))  # all of a small split
    rows = eval_rows(10_000, 32, 0)
    assert rows == sorted(set(rows)) and len(rows) == 32 and rows == eval_rows(10_000, 32, 0)
    assert rows[-1] > 5_000 and rows != list(range(32))  # not the first rows: across the split
    assert eval_rows(10_000, 32, 1) != rows


# ---------------------------------------------------------------- inputs, model arithmetic, checkpoints


def test_inputs_are_checked_against_the_model(corpus, tmp_path):
    tokenizer_dir, tokens_dir = corpus
    info = inspect_inputs(small_cfg(), tokenizer_dir, tokens_dir)
    assert info.vocab_size == 320 and info.seq_len == 64 and info.eos_id == 0 and info.pad_id == 1
    with pytest.raises(VocabSizeError, match=r"has 320 tokens, more than model.vocab_size=300"):
        inspect_inputs(small_cfg(model=replace(SMALL_MODEL, vocab_size=300)), tokenizer_dir, tokens_dir)
    with pytest.raises(PretrainInputError, match="seq_len=64 is longer than model.max_seq_len=32"):
        inspect_inputs(small_cfg(model=replace(SMALL_MODEL, max_seq_len=32)), tokenizer_dir, tokens_dir)
    with pytest.raises(PretrainInputError, match="fewer than one global batch"):
        inspect_inputs(small_cfg(global_batch_size=100_000), tokenizer_dir, tokens_dir)
    empty_val = tmp_path / "tokens"
    write_tokens(empty_val, tokenizer_dir, {"train": synthetic_docs(50, 0), "val": []}, 64)
    with pytest.raises(PretrainInputError, match="the val split has no sequence"):
        inspect_inputs(small_cfg(), tokenizer_dir, empty_val)


def test_llama_config_shape_and_flops_estimate():
    from transformers import AutoModelForCausalLM

    from stages.common.modeling import SpecialIds

    config = llama_config(SMALL_MODEL, 320, SpecialIds(0, 0, 1))
    model = AutoModelForCausalLM.from_config(config)
    assert (config.num_key_value_heads, config.vocab_size, config.max_position_embeddings) == (2, 320, 64)
    assert config.rope_parameters["rope_theta"] == SMALL_MODEL.rope_theta and not config.tie_word_embeddings
    matmuls = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in name)
    assert matmul_params(config) == matmuls
    assert train_flops_per_token(config, 64) == 6 * matmuls + 12 * 2 * 64 * 64
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Some GPU") is None and peak_tflops("NVIDIA H100", configured=500.0) == 500.0


def fake_checkpoint(root: Path, step: int, world: int = 2, zero_stage: int = 2, complete: bool = True) -> Path:
    """A checkpoint dir as DeepSpeed and rank 0 leave it: the ranks' files, then (complete) the manifest."""
    ckpt = root / f"step{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    for rank in range(world):
        (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(8192))
    if complete:
        write_manifest(ckpt, meta=checkpoint_meta(step, world, zero_stage))
    return ckpt


def test_checkpoint_layout_guard_and_pruning(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 25, complete=False)  # a save cut short: older than the newest complete one
    fake_checkpoint(tmp_path, 40, complete=False)  # a save cut short after it: overwritten by the next save
    (tmp_path / "step00000005.corrupt-20260101T000000Z").mkdir()  # set aside: never pruned
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000005.corrupt-20260101T000000Z", "step00000020",
                                                          "step00000030", "step00000040"]
    check_layout({"world_size": 2, "zero_stage": 2}, tmp_path / "step00000030", 2, 2)
    with pytest.raises(CheckpointLayoutError, match="written by 2 ranks with ZeRO stage 2; this attempt has 4 ranks "
                                                    "with ZeRO stage 3"):
        check_layout({"world_size": 2, "zero_stage": 2}, tmp_path / "step00000030", 4, 3)
    with pytest.raises(CheckpointLayoutError, match="written by 2 ranks"):  # checked before any rank starts
        choose_resume(tmp_path, 4, 3, logging.getLogger("test"))


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_one_before_is_used(tmp_path, caplog):
    log = logging.getLogger("test.pretrain")
    older, newest = fake_checkpoint(tmp_path, 10), fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # a save cut short: not a candidate, not corrupt
    os.truncate(newest / "mp_rank_00_model_states.pt", 100)
    with caplog.at_level(logging.INFO, logger=log.name):
        resume = choose_resume(tmp_path, 2, 2, log)
    assert (resume.checkpoint, resume.step) == (older, 10)
    [(moved, reason)] = resume.corrupt
    assert not newest.exists() and moved.name.startswith("step00000020.corrupt-") and (moved / MANIFEST).is_file()
    assert "mp_rank_00_model_states.pt: 100 bytes on disk, 4096 in the manifest" in reason
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "checkpoint step00000020 is corrupt" in warning and "mp_rank_00_model_states.pt" in warning
    assert "resuming from" in caplog.text and (tmp_path / "step00000030").exists()
    # The same checkpoint verified again: nothing more is set aside.
    assert choose_resume(tmp_path, 2, 2, log).corrupt == []


def test_when_every_checkpoint_is_corrupt_training_starts_over_and_says_so(tmp_path, caplog):
    only = fake_checkpoint(tmp_path, 10)
    (only / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(os.urandom(8192))  # same size, other bytes
    with caplog.at_level(logging.INFO, logger="test.pretrain"):
        resume = choose_resume(tmp_path, 2, 2, logging.getLogger("test.pretrain"))
    assert resume.checkpoint is None and resume.step == 0 and len(resume.corrupt) == 1
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: its xxh3_128 hash differs" in resume.corrupt[0][1]
    assert "no complete checkpoint is left (1 set aside): training starts over from step 0" in caplog.text
    assert [p.name.split(".")[0] for p in tmp_path.iterdir()] == ["step00000010"]  # renamed, not deleted
    assert choose_resume(tmp_path / "none", 2, 2, logging.getLogger("test")).checkpoint is None


def test_a_failed_launch_names_the_first_failing_ranks_exception(tmp_path):
    out = tmp_path / "out"
    assert "no checkpoint is complete yet: the next attempt starts from step 0" in failure_message(1, out)
    fake_checkpoint(out / "checkpoints", 10)
    for rank, message in ((0, "PytorchStreamReader failed reading zip archive: failed finding central directory"),
                          (1, "Connection closed by peer")):
        try:
            raise RuntimeError(message)
        except RuntimeError as exc:
            record_rank_error(out, rank, exc)
        time.sleep(0.01)
    (out / "rank_errors" / "rank2.json").write_text('{"rank": 2, "t"')  # cut short as its rank died
    message = failure_message(1, out)
    assert message.startswith("the DeepSpeed launcher exited with status 1 (rank 0: RuntimeError: PytorchStreamReader "
                              "failed reading zip archive")
    assert "the next attempt checks step00000010 against its manifest" in message


# ---------------------------------------------------------------- real training (DeepSpeed launcher, 2 CPU ranks)


def exported_val_loss(model_dir: Path, tokens_dir: Path, sequences: int, seed: int) -> float:
    """The mean val loss of the exported model over the stage's eval rows, with plain transformers (no DeepSpeed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.common.token_shards import TokenDataset

    val = TokenDataset(tokens_dir, "val")
    ids = torch.from_numpy(np.stack([val[i] for i in eval_rows(len(val), sequences, seed)]))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def assert_loads_and_generates(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    prompt = tok("the small cat sees", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:]).strip()


STAGE_IN_SUBPROCESS = """
import json, sys
from pathlib import Path
from pipeline.schema import build
from pipeline.stage import StageContext
from stages.pretrain.stage import PretrainConfig, run
cfg = build(PretrainConfig, json.loads(sys.argv[1]), path="stage.pretrain")
out, tokenizer, tokens = map(Path, sys.argv[2:5])
run(cfg, StageContext(stage="pretrain", fingerprint="test", output_dir=out, attempt=1,
                      inputs={"tokenize.tokenizer": tokenizer, "tokenize.tokens": tokens},
                      metrics_file=out / "metrics.jsonl"))
"""


def processes_mentioning(text: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.integration
def test_a_stopped_run_resumes_under_zero3_learns_and_exports_a_loadable_model(corpus, tmp_path, caplog):
    """The one real DeepSpeed run of this module (the whole tiny pipeline test trains ZeRO-2 end to end):
    attempt 1 is stopped after its second checkpoint; a file of its newest checkpoint is then cut
    short; attempt 2 sets that one aside, resumes from the one before, learns and exports; attempt 3
    finds the finished output and trains nothing."""
    from pipeline.schema import to_plain

    tokenizer_dir, tokens_dir = corpus
    out = tmp_path / "out"
    out.mkdir()
    cfg = small_cfg(zero_stage=3, max_steps=40, checkpoint_every=5, eval_every=20)
    # Attempt 1 runs like a stage worker: its own process group, stopped the way the worker is (SIGTERM to
    # the group) as soon as two checkpoints are complete (keep_checkpoints=2).
    proc = subprocess.Popen([sys.executable, "-c", STAGE_IN_SUBPROCESS, json.dumps(to_plain(cfg)), str(out),
                             str(tokenizer_dir), str(tokens_dir)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 600
    while len(list((out / "checkpoints").glob(f"step*/{MANIFEST}"))) < 2 and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "attempt 1 ended before its second checkpoint"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    for _ in range(100):  # the launcher and both ranks went down with the group
        if not processes_mentioning(str(out)):
            break
        time.sleep(0.2)
    assert not processes_mentioning(str(out))
    assert not (out / "model").exists()
    first = records(out / "metrics.jsonl")
    trained_before = max(r["step"] for r in first if "train_loss" in r["metrics"])
    # The newest complete checkpoint loses the end of its model states (as a full disk or a bad copy would).
    *_, older, newest = sorted(p.parent for p in (out / "checkpoints").glob(f"step*/{MANIFEST}"))
    states = newest / "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: each rank's; ZeRO-2: mp_rank_00_...
    cut = states.stat().st_size // 2
    os.truncate(states, cut)

    with caplog.at_level(logging.INFO, logger="llmpipe.stage"):
        metrics = run(cfg, context(out, tokenizer_dir, tokens_dir, attempt=2))

    assert f"checkpoint {newest.name} is corrupt: {states}: {cut} bytes on disk" in caplog.text
    [moved] = (out / "checkpoints").glob(f"{newest.name}.corrupt-*")
    assert (moved / states.name).stat().st_size == cut  # set aside as it was, not deleted
    resumed = int(metrics["resumed_from_step"])
    assert resumed == int(older.name[4:]) and metrics["checkpoints_set_aside"] == 1
    assert 5 <= resumed <= trained_before and resumed % 5 == 0 and metrics["steps"] == 40
    assert metrics["tokens"] == 40 * 8 * 64 and metrics["world_size"] == 2 and metrics["mean_tokens_per_s"] > 0
    recs = records(out / "metrics.jsonl")
    second = [r for r in recs if r["attempt"] == 2]
    assert second[0] == {**second[0], "step": resumed, "metrics": {"resume_step": resumed}}
    assert min(r["step"] for r in second if "train_loss" in r["metrics"]) == resumed + 1
    # A record per step (log_every 1), under the curve names of every training stage (stages/common/training.py).
    train = {r["step"]: r["metrics"] for r in recs if "train_loss" in r["metrics"]}
    assert set(train) == set(range(1, 41))
    assert all({"train_loss", "lr", "tokens_per_s", "grad_norm"} <= set(m) for m in train.values())
    assert train[3]["lr"] == pytest.approx(cfg.lr)  # the lr for the step after warmup's last
    assert train[40]["train_loss"] < train[1]["train_loss"] - 1.5
    assert sorted(r["step"] for r in recs if "eval_loss" in r["metrics"]) == [0, 20, 40]
    assert metrics["initial_eval_loss"] == next(r["metrics"]["eval_loss"] for r in first if r["step"] == 0)
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"] - 1.5
    assert metrics["final_perplexity"] == pytest.approx(np.exp(metrics["final_eval_loss"]))
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == sorted([
        "step00000035", "step00000040", moved.name])  # the set-aside one is never pruned
    # ZeRO-3 shards were consolidated into a whole model: plain transformers gets the loss the ranks measured.
    assert_loads_and_generates(out / "model")
    assert exported_val_loss(out / "model", tokens_dir, cfg.eval_sequences, cfg.seed) == pytest.approx(
        metrics["final_eval_loss"], abs=1e-3)
    # A finished output is reused by a later attempt, not trained again.
    started = time.time()
    assert run(cfg, context(out, tokenizer_dir, tokens_dir, attempt=3)) == metrics
    assert time.time() - started < 30


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_bf16_training_on_one_gpu_reports_memory_and_mfu(corpus, tmp_path):
    tokenizer_dir, tokens_dir = corpus
    out = tmp_path / "out"
    cfg = small_cfg(micro_batch_size=8, zero_stage=3, gradient_checkpointing=True, peak_tflops=100.0,
                    launch=replace(TINY.launch, accelerator="cuda", gpus_per_node=1))
    metrics = run(cfg, context(out, tokenizer_dir, tokens_dir))
    assert json.loads((out / "ds_config.json").read_text())["bf16"] == {"enabled": True}
    assert metrics["peak_gpu_mem_gb"] > 0 and metrics["final_eval_loss"] < metrics["initial_eval_loss"] - 1.0
    assert 0 < metrics["mean_mfu"] < 1
    steps = [r["metrics"] for r in records(out / "metrics.jsonl") if "train_loss" in r["metrics"]]
    assert all(0 < m["mfu"] < 1 and m["gpu_mem_gb"] > 0 for m in steps)
    assert_loads_and_generates(out / "model")


@pytest.mark.integration
def test_a_save_request_saves_that_step_on_every_rank_stops_and_the_next_attempt_resumes_there(corpus, tmp_path,
                                                                                               monkeypatch):
    """The time limit's save request (pipeline/save_request.py) under the real launcher with 2 CPU ranks:
    the request is there before the ranks start, so both agree at the first step boundary, save step 1
    (not a periodic checkpoint step) and exit without exporting; the stage fails with SavedOnRequest.
    The next attempt, without the request, resumes from exactly that checkpoint and finishes."""
    from pipeline.save_request import ENV, SavedOnRequest

    tokenizer_dir, tokens_dir = corpus
    out = tmp_path / "out"
    request = tmp_path / "save-request"
    request.write_text("{}")
    monkeypatch.setenv(ENV, str(request))
    cfg = small_cfg(max_steps=3, warmup_steps=1, eval_every=10, checkpoint_every=10, eval_sequences=8)
    with pytest.raises(SavedOnRequest, match=r"saved at step 1 on the time-limit signal \(checkpoint step00000001 in "):
        run(cfg, context(out, tokenizer_dir, tokens_dir))
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step00000001"]
    assert (out / "checkpoints" / "step00000001" / MANIFEST).is_file() and not (out / "model").exists()
    assert json.loads((out / "pretrain_job.json").read_text())["save_request"] == str(request)
    first = records(out / "metrics.jsonl")
    assert [r["step"] for r in first if "train_loss" in r["metrics"]] == [1]

    request.unlink()  # the requeued job's attempt starts without one
    metrics = run(cfg, context(out, tokenizer_dir, tokens_dir, attempt=2))
    assert metrics["resumed_from_step"] == 1 and metrics["steps"] == 3
    second = [r for r in records(out / "metrics.jsonl") if r["attempt"] == 2]
    assert second[0]["metrics"] == {"resume_step": 1} and second[0]["step"] == 1
    assert [r["step"] for r in second if "train_loss" in r["metrics"]] == [2, 3]
    assert (out / "model" / "config.json").is_file() and not (out / "saved_on_request.json").exists()
