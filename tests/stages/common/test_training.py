"""The training toolkit that sft and align share (stages/common/training.py), without training anything:
checkpoint selection and resume (manifests, corrupt checkpoints set aside, a clean restart), atomic
saves, metric names, config blocks and their messages, one vocabulary in both stages' YAML. The real
Trainer runs are in tests/stages/{sft,align}."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmpipe.project import CONFIG_DIR, REPO, stage_config
from pipeline.errors import ConfigError
from pipeline.files import MANIFEST, write_manifest
from pipeline.schema import to_plain
from pipeline.stage import StageContext
from stages.common import training
from stages.common.chat import CHAT_TEMPLATE, END
from stages.common.training import (
    LoraSettings,
    Resume,
    TrainingDataError,
    TrainingError,
    TrainSettings,
    history_metrics,
    latest_checkpoint,
    rename_logs,
    train_or_resume,
    write_model,
)

# ---------------------------------------------------------------- fakes


def write_checkpoint(root: Path, step: int, max_steps: int, history: list[dict] | None = None,
                     complete: bool = True) -> Path:
    """A checkpoint dir as the Trainer and the manifest callback leave it: weights, trainer_state.json,
    then the manifest (``complete=False``: a save interrupted before the manifest)."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(2048))
    state = {"global_step": step, "max_steps": max_steps, "log_history": history or []}
    (path / "trainer_state.json").write_text(json.dumps(state))
    if complete:
        write_manifest(path)
    return path


def context(tmp_path: Path, attempt: int = 1) -> StageContext:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return StageContext(stage="sft", fingerprint="test", output_dir=out, inputs={}, attempt=attempt,
                        metrics_file=tmp_path / "metrics.jsonl")


def records(ctx: StageContext) -> list[dict]:
    if not ctx.metrics_file.exists():
        return []
    return [json.loads(line) for line in ctx.metrics_file.read_text().splitlines()]


class FakeTrainer:
    """What train_or_resume uses of a Trainer: args.output_dir, model.parameters(), add_callback, train()."""

    def __init__(self, checkpoints: Path, steps: int, history: list[dict]):
        self.args = SimpleNamespace(output_dir=str(checkpoints))
        param = SimpleNamespace(requires_grad=True, numel=lambda: 10)
        frozen = SimpleNamespace(requires_grad=False, numel=lambda: 30)
        self.model = SimpleNamespace(parameters=lambda: [param, frozen])
        self.checkpoints, self.steps, self.history = checkpoints, steps, history
        self.callbacks: list = []
        self.resumed_from: str | None = None

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        """Save the last step's checkpoint, then call the callbacks' on_save, as the Trainer does."""
        self.resumed_from = resume_from_checkpoint
        write_checkpoint(self.checkpoints, self.steps, self.steps, self.history, complete=False)
        state = SimpleNamespace(is_world_process_zero=True, global_step=self.steps, max_steps=self.steps)
        for callback in self.callbacks:
            callback.on_save(self.args, state, SimpleNamespace())


HISTORY = [{"eval_loss": 3.0, "eval_runtime": 0.1, "step": 0}, {"loss": 2.5, "learning_rate": 1e-3, "step": 1},
           {"loss": 1.5, "learning_rate": 5e-4, "step": 4},
           {"eval_loss": 1.25, "eval_rewards/accuracies": 0.75, "eval_runtime": 0.1, "epoch": 1.0, "step": 4},
           {"train_loss": 2.0, "train_runtime": 3.0, "step": 4}]


# ---------------------------------------------------------------- checkpoints and resume


def test_newest_complete_checkpoint_is_picked_and_incomplete_ones_are_dropped(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) == Resume(None, False)
    write_checkpoint(root, 5, 20)
    write_checkpoint(root, 10, 20)
    write_checkpoint(root, 15, 20, complete=False)  # a crash while saving: no manifest
    (root / "checkpoint-x").mkdir()  # not a checkpoint: left alone
    with caplog.at_level(logging.WARNING):
        found = latest_checkpoint(root, logging.getLogger("test"))
    assert found == Resume(root / "checkpoint-10", False)
    assert not (root / "checkpoint-15").exists() and (root / "checkpoint-x").exists()
    assert any("removing incomplete checkpoint" in r.getMessage() and "checkpoint-15" in r.getMessage()
               for r in caplog.records)
    write_checkpoint(root, 20, 20)
    assert latest_checkpoint(root) == Resume(root / "checkpoint-20", True)  # the last step: training is done


def test_a_corrupt_newest_checkpoint_is_set_aside_out_of_the_trainers_sight(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 5, 20)
    newest = write_checkpoint(root, 10, 20)
    os.truncate(newest / "model.safetensors", 10)
    with caplog.at_level(logging.WARNING):
        found = latest_checkpoint(root, logging.getLogger("test"))
    assert found.checkpoint == root / "checkpoint-5" and found.step == 5 and not found.finished
    [(moved, reason)] = found.corrupt
    # Not beside the others: the Trainer's rotation counts (and deletes) every "checkpoint-*" dir there.
    assert moved.parent == root / "set-aside" and moved.name.startswith("checkpoint-10.corrupt-")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-5", "set-aside"]
    assert "model.safetensors: 10 bytes on disk, 2048 in the manifest" in reason
    assert any(r.levelno == logging.WARNING and "checkpoint-10 is corrupt" in r.getMessage()
               and "model.safetensors" in r.getMessage() for r in caplog.records)


def test_the_manifest_is_written_after_the_trainers_save(tmp_path):
    ctx = context(tmp_path)
    checkpoints = ctx.output_dir / "checkpoints"
    final, _ = train_or_resume(lambda resume: FakeTrainer(checkpoints, 4, HISTORY), checkpoints, ctx)
    manifest = json.loads((final / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "trainer_state.json"]
    assert manifest["meta"] == {"step": 4}


def test_when_every_checkpoint_is_corrupt_the_phase_starts_over_and_says_so(tmp_path, caplog):
    ctx = context(tmp_path, attempt=2)
    checkpoints = ctx.output_dir / "checkpoints"
    only = write_checkpoint(checkpoints, 2, 4)
    (only / "model.safetensors").write_bytes(os.urandom(2048))  # same size, other bytes
    built: list[Resume] = []

    def build(resume: Resume) -> FakeTrainer:
        built.append(resume)
        return FakeTrainer(checkpoints, 4, HISTORY)

    with caplog.at_level(logging.INFO, logger="llmpipe.stage"):
        final, metrics = train_or_resume(build, checkpoints, ctx)
    assert built[0].checkpoint is None and len(built[0].corrupt) == 1
    assert "model.safetensors: its xxh3_128 hash differs" in built[0].corrupt[0][1]
    assert metrics["resumed_from_step"] == 0 and metrics["checkpoints_set_aside"] == 1 and metrics["steps"] == 4
    assert "no complete checkpoint is left (1 set aside): training starts over from step 0" in caplog.text
    assert records(ctx) == []  # no resume point on the curves
    assert final == checkpoints / "checkpoint-4" and len(list((checkpoints / "set-aside").iterdir())) == 1


def test_a_phase_trains_from_its_newest_checkpoint_and_reports_under_its_prefix(tmp_path):
    ctx = context(tmp_path)
    checkpoints = ctx.output_dir / "checkpoints" / "reward_model"
    write_checkpoint(checkpoints, 2, 4)
    built: list[Resume] = []

    def build(resume: Resume) -> FakeTrainer:
        built.append(resume)
        return FakeTrainer(checkpoints, 4, HISTORY)

    final, metrics = train_or_resume(build, checkpoints, ctx, prefix="reward_model/")
    assert final == checkpoints / "checkpoint-4"
    assert built == [Resume(checkpoints / "checkpoint-2", False)] and built[0].step == 2
    assert metrics["reward_model/resumed_from_step"] == 2 and metrics["reward_model/steps"] == 4
    assert metrics["reward_model/checkpoints_set_aside"] == 0
    assert metrics["reward_model/first_train_loss"] == 2.5 and metrics["reward_model/final_train_loss"] == 1.5
    assert metrics["reward_model/initial_eval_loss"] == 3.0 and metrics["reward_model/final_eval_loss"] == 1.25
    assert metrics["reward_model/final_eval_rewards/accuracies"] == 0.75
    assert (metrics["reward_model/trainable_params"], metrics["reward_model/total_params"]) == (10, 40)
    assert [r["metrics"] for r in records(ctx)] == [{"reward_model/resume_step": 2.0}]


def test_a_finished_phase_is_not_trained_again(tmp_path, caplog):
    ctx = context(tmp_path, attempt=3)
    checkpoints = ctx.output_dir / "checkpoints"
    write_checkpoint(checkpoints, 4, 4, HISTORY)

    def build(resume: Resume) -> FakeTrainer:
        raise AssertionError("a finished phase must not load its model again")

    with caplog.at_level(logging.INFO, logger="llmpipe.stage"):
        final, metrics = train_or_resume(build, checkpoints, ctx)
    assert final == checkpoints / "checkpoint-4"
    assert metrics["train_s"] == 0.0 and metrics["resumed_from_step"] == 4 and metrics["final_eval_loss"] == 1.25
    assert any("training finished in an earlier attempt" in r.getMessage() for r in caplog.records)


def test_training_that_ends_without_a_last_checkpoint_is_an_error(tmp_path):
    ctx = context(tmp_path)
    checkpoints = ctx.output_dir / "checkpoints"

    class NoSave(FakeTrainer):
        def train(self, resume_from_checkpoint=None):
            write_checkpoint(self.checkpoints, 2, 4)

    with pytest.raises(TrainingError, match="without a complete checkpoint of its last step"):
        train_or_resume(lambda resume: NoSave(checkpoints, 4, []), checkpoints, ctx)


def test_history_metrics_skip_an_initial_eval_loss_that_was_not_measured_at_step_0(tmp_path):
    ckpt = write_checkpoint(tmp_path, 4, 4, HISTORY[1:])
    metrics = history_metrics(ckpt)
    assert "initial_eval_loss" not in metrics and metrics["final_eval_loss"] == 1.25
    assert not any("runtime" in k or k == "final_epoch" for k in metrics)


# ---------------------------------------------------------------- metric names


def test_the_shared_quantities_get_one_name_and_the_rest_keep_trls():
    logs = {"loss": 2.0, "learning_rate": 1e-3, "grad_norm": 0.5, "eval_loss": 1.0, "rewards/margins": 0.2,
            "eval_rewards/accuracies": 0.7, "kl": 0.01, "epoch": 0.5, "eval_runtime": 1.0,
            "eval_samples_per_second": 9.0, "train_loss": 1.8, "train_runtime": 9.0, "total_flos": 1e9,
            "note": "text", "flag": True}
    assert rename_logs(logs) == {"train_loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "eval_loss": 1.0,
                                 "rewards/margins": 0.2, "eval_rewards/accuracies": 0.7, "kl": 0.01, "epoch": 0.5}
    assert set(rename_logs({"loss": 1.0, "grad_norm": 0.1}, "reward_model/")) == {
        "reward_model/train_loss", "reward_model/grad_norm"}


def test_metrics_callback_logs_curves_and_tokens_per_s_on_the_main_process_only(tmp_path, monkeypatch):
    ctx = context(tmp_path)
    callback = training.metrics_callback(ctx)
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    main, other = SimpleNamespace(is_world_process_zero=True, global_step=5, max_steps=10), \
        SimpleNamespace(is_world_process_zero=False, global_step=5, max_steps=10)
    callback.on_log(None, main, None, logs={"loss": 2.0, "learning_rate": 1e-3, "num_tokens": 1000.0})
    callback.on_log(None, other, None, logs={"loss": 9.0})
    main.global_step = 10
    callback.on_log(None, main, None, logs={"loss": 1.0, "learning_rate": 5e-4, "num_tokens": 3000.0})
    assert [(r["step"], r["metrics"]) for r in records(ctx)] == [
        (5, {"train_loss": 2.0, "lr": 1e-3, "num_tokens": 1000.0}),
        (10, {"train_loss": 1.0, "lr": 5e-4, "num_tokens": 3000.0, "tokens_per_s": 1000.0})]
    assert callback.tokens == 3000.0
    # An evaluation is asked for after the last step, so the final checkpoint holds it.
    control = SimpleNamespace(should_evaluate=False)
    assert callback.on_step_end(None, main, control).should_evaluate
    quiet = training.metrics_callback(ctx, evaluate_last_step=False)
    assert not quiet.on_step_end(None, main, SimpleNamespace(should_evaluate=False)).should_evaluate


def test_pretrain_logs_the_shared_names():
    from stages.pretrain import loop

    assert (loop.TRAIN_LOSS, loop.EVAL_LOSS, loop.LR, loop.GRAD_NORM, loop.TOKENS_PER_S) == (
        "train_loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")


# ---------------------------------------------------------------- atomic saves


class FakeModel:
    def __init__(self, fail: bool = False, generates: bool = True):
        self.config = SimpleNamespace(use_cache=False, pad_token_id=None)
        self.generation_config = SimpleNamespace(eos_token_id=None, pad_token_id=None, bos_token_id=None)
        self.fail, self.generates = fail, generates

    def can_generate(self) -> bool:
        return self.generates

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text("new")
        (Path(path) / "generation.json").write_text(json.dumps(vars(self.generation_config)))
        if self.fail:
            raise OSError("disk full")


class FakeTokenizer:
    eos_token_id, pad_token_id, bos_token_id = 0, 1, 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return {END: 5}[token]

    def save_pretrained(self, path: str) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


def test_write_model_publishes_a_whole_dir_or_leaves_the_old_one(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        write_model(FakeModel(fail=True), FakeTokenizer(), out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind
    assert (out / "model.safetensors").read_text() == "old"

    model = FakeModel()
    write_model(model, FakeTokenizer(), out)
    assert (out / "model.safetensors").read_text() == "new" and (out / "tokenizer.json").exists()
    assert json.loads((out / "generation.json").read_text()) == {"eos_token_id": [5, 0], "pad_token_id": 1,
                                                                  "bos_token_id": 0}  # stops on <|end|>, then EOS
    assert model.config.use_cache and model.config.pad_token_id == 1

    # The stop ids the base's generation config had stay, after the end-of-turn token and EOS.
    model = FakeModel()
    model.generation_config.eos_token_id = [0, 9]
    write_model(model, FakeTokenizer(), out)
    assert json.loads((out / "generation.json").read_text())["eos_token_id"] == [5, 0, 9]


def test_a_full_checkpoint_is_loaded_as_is_and_an_adapter_needs_its_base(tmp_path):
    full = write_checkpoint(tmp_path / "full", 4, 4)
    loaded: list[Path] = []
    assert training.merged_model(full, tmp_path / "base", lambda p: loaded.append(p) or "model") == "model"
    assert loaded == [full]


# ---------------------------------------------------------------- config blocks, through the shipped YAML


@pytest.mark.parametrize("stage", ["sft", "align"])
@pytest.mark.parametrize("override, message", [
    ("lora.r=0", "lora.r: must be at least 1, got 0"),
    ("lora.alpha=0", "lora.alpha: must be positive, got 0.0"),
    ("lora.dropout=1.0", "lora.dropout: must be in [0, 1), got 1.0"),
    ("lora.target_modules=[]", "lora.target_modules: is empty"),
    ("train.lr=0", "train.lr: must be positive, got 0.0"),
    ("train.max_steps=-2", "train.max_steps: must be positive, or -1"),
    ("train.save_total_limit=1", "train.save_total_limit: must be at least 2 (the one before the newest is the "
                                 "fallback when the newest is found corrupt), got 1"),
    ("train.warmup=-1", "train.warmup: must be >= 0"),
    ("train.lr_scheduler=cosin", "train.lr_scheduler: 'cosin' is not one of"),
])
def test_lora_and_train_messages_carry_the_full_key_once(stage, override, message):
    with pytest.raises(ConfigError) as err:
        stage_config(stage, f"stage.{stage}.{override}")
    text = str(err.value)
    assert f"stage.{stage}.{message}" in text
    key = message.split(":")[0]
    assert text.count(f"stage.{stage}.{key}") == 1, text  # never "stage.sft.lora: stage.sft.lora.r ..."


def test_sft_and_align_share_one_vocabulary():
    from omegaconf import OmegaConf

    sft, align = stage_config("sft"), stage_config("align")
    hints = {cls: typing.get_type_hints(cls) for cls in (type(sft), type(align))}
    for block, cls in (("lora", LoraSettings), ("train", TrainSettings)):
        assert hints[type(sft)][block] is cls and hints[type(align)][block] is cls
    for key in ("precision", "attn_implementation", "sample_max_new_tokens"):
        assert hints[type(sft)][key] == hints[type(align)][key], key
    assert typing.get_type_hints(type(sft.data))["source"] == typing.get_type_hints(type(align.data))["source"]
    assert sft.data.source == align.data.source == "corpus"
    # The shipped YAML spells the same keys, in the same order.
    yaml = {name: OmegaConf.load(CONFIG_DIR / "stage" / name / "default.yaml") for name in ("sft", "align")}
    for block in ("lora", "train"):
        assert list(yaml["sft"][block]) == list(yaml["align"][block]) == list(to_plain(sft)[block]), block


def test_execution_only_train_fields_are_unhashed_in_both_stages():
    from llmpipe.project import PROJECT

    for name in ("sft", "align"):
        assert set(training.UNHASHED_TRAIN) <= PROJECT.stage(name).unhashed, name


# ---------------------------------------------------------------- runtime, tokenizer, trainer arguments


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusals")
def test_runtime_on_cpu_is_fp32_and_refuses_what_needs_a_gpu():
    import torch

    rt = training.resolve_runtime("align", "auto", "sdpa", frozen_base=True)
    assert rt.use_cpu and not rt.bf16 and rt.dtype == torch.float32 and rt.export_dtype == torch.float32
    with pytest.raises(TrainingError, match="stage.sft.precision is 'bf16'"):
        training.resolve_runtime("sft", "bf16", "sdpa", frozen_base=True)
    with pytest.raises(TrainingError, match="stage.align.attn_implementation is 'flash_attention_2'"):
        training.resolve_runtime("align", "auto", "flash_attention_2", frozen_base=True)


def test_tokenizer_gets_the_chat_template_and_a_pad_token(tmp_path):
    from tests.stages.common.test_chat import EOS, MARKERS, build_tokenizer

    plain = build_tokenizer(special=[EOS, *MARKERS])
    plain.pad_token = None
    plain.save_pretrained(str(tmp_path / "ok"))
    tok = training.load_tokenizer(tmp_path / "ok", "input pretrain.model", padding_side="left")
    assert tok.chat_template == CHAT_TEMPLATE and tok.pad_token == EOS and tok.padding_side == "left"
    assert training.added_token_ids(tok) == []  # it has the markers: nothing added

    build_tokenizer(special=[EOS]).save_pretrained(str(tmp_path / "no_eos"))
    (tmp_path / "no_eos" / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "no_eos" / "tokenizer_config.json").read_text()), "eos_token": None}))
    with pytest.raises(TrainingError, match=r"input sft.model .*no_eos: the tokenizer has no eos_token"):
        training.load_tokenizer(tmp_path / "no_eos", "input sft.model")


def test_a_base_tokenizer_without_markers_or_template_gets_them_added(tmp_path, caplog):
    from tests.stages.common.test_chat import EOS, MARKERS, build_tokenizer

    base = build_tokenizer(special=[EOS, "<|pad|>"])
    size = len(base)
    base.save_pretrained(str(tmp_path / "base"))
    with caplog.at_level(logging.INFO, logger="llmpipe.training"):
        tok = training.load_tokenizer(tmp_path / "base", "input pretrain.model")
    added = list(range(size, size + len(MARKERS)))
    assert training.added_token_ids(tok) == added == [tok.convert_tokens_to_ids(m) for m in MARKERS]
    assert tok.chat_template == CHAT_TEMPLATE
    assert f"added {list(MARKERS)} as special tokens {added}" in caplog.text
    # Saved and loaded again (a resumed attempt, or align reading sft's output), nothing more is added.
    tok.save_pretrained(str(tmp_path / "saved"))
    again = training.load_tokenizer(tmp_path / "saved", "input sft.model")
    assert training.added_token_ids(again) == [] and len(again) == len(tok)


def save_with_template(tmp_path: Path, name: str, template: str, special: list[str]) -> Path:
    from tests.stages.common.test_chat import EOS, build_tokenizer

    tok = build_tokenizer(special=[EOS, "<|pad|>", *special])
    tok.chat_template = template
    tok.save_pretrained(str(tmp_path / name))
    return tmp_path / name


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
          "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_tokenizers_own_template_with_generation_markers_is_kept(tmp_path):
    from stages.common.chat import MARKERS, stop_token_ids

    tok = training.load_tokenizer(save_with_template(tmp_path, "own", CHATML, ["<|im_start|>", "<|im_end|>"]),
                                  "input pretrain.model")
    assert tok.chat_template == CHATML and training.added_token_ids(tok) == []
    assert not any(m in tok.get_vocab() for m in MARKERS)  # its own format needs no llmpipe marker
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]


def test_a_template_trl_knows_gets_its_training_version(tmp_path):
    from trl.chat_template_utils import qwen2_5_chat_template, qwen2_5_training_chat_template

    from stages.common.chat import stop_token_ids

    path = save_with_template(tmp_path, "qwen", qwen2_5_chat_template,
                              ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"])
    tok = training.load_tokenizer(path, "input pretrain.model")
    assert tok.chat_template == qwen2_5_training_chat_template and training.added_token_ids(tok) == []
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert "ok<|im_end|>" in tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])


def test_an_unknown_template_without_generation_markers_falls_back_to_llmpipes(tmp_path, caplog):
    from stages.common.chat import MARKERS, stop_token_ids

    unknown = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    path = save_with_template(tmp_path, "unknown", unknown, ["<|im_start|>", "<|im_end|>"])
    with caplog.at_level(logging.WARNING, logger="llmpipe.training"):
        tok = training.load_tokenizer(path, "input pretrain.model")
    assert "TRL has no training version of it" in caplog.text and "using llmpipe's chat template" in caplog.text
    assert tok.chat_template == CHAT_TEMPLATE
    assert training.added_token_ids(tok) == [tok.convert_tokens_to_ids(m) for m in MARKERS]
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(END), tok.eos_token_id]


def tiny_llama(vocab: int, tied: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [False, True])
def test_added_rows_grow_from_the_mean_and_train_under_lora(tmp_path, tied):
    import torch
    from peft import get_peft_model

    from tests.stages.common.test_chat import EOS, build_tokenizer

    build_tokenizer(special=[EOS, "<|pad|>"]).save_pretrained(str(tmp_path / "base"))
    tok = training.load_tokenizer(tmp_path / "base", "input pretrain.model")
    added = training.added_token_ids(tok)
    known = added[0]
    model = tiny_llama(known, tied)
    layers = (model.get_input_embeddings, model.get_output_embeddings)
    means = [layer().weight.detach().mean(0) for layer in layers]
    assert training.grow_embeddings(model, tok) == added
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    for layer, mean in zip(layers, means, strict=True):
        weight = layer().weight
        assert weight.shape[0] == len(tok) and torch.allclose(weight[added], mean.expand(len(added), -1)), layer
    assert training.grow_embeddings(model, SimpleNamespace()) == []  # a tokenizer with nothing added

    targets = training.trainable_token_targets(model, added)
    assert targets == ({"model.embed_tokens": added} if tied else {"model.embed_tokens": added, "lm_head": added})
    lora = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",))
    config = training.lora_config(lora, trainable_tokens=targets)
    assert config.trainable_token_indices == targets and training.lora_config(lora).trainable_token_indices is None
    peft_model = get_peft_model(model, config)
    training.expose_trained_output_rows(peft_model)
    # What TRL's fused LM head does: log-probs from lm_head.weight and lm_head.bias. The gradient reaches
    # the output rows of the added tokens (tied: through the embedding's), and no other row of the base.
    head = peft_model.get_output_embeddings()
    assert head.bias is None
    hidden = torch.randn(3, 32)
    torch.nn.functional.linear(hidden, head.weight, head.bias)[:, added[-1]].sum().backward()
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and "trainable_tokens" in n}
    delta = next(p for n, p in trained.items() if ("embed_tokens" if tied else "lm_head") in n)
    assert delta.shape == (len(added), 32) and delta.grad[-1].abs().sum() > 0 and delta.grad[:-1].abs().sum() == 0
    assert len(trained) == (1 if tied else 2)


def test_a_model_not_grown_to_the_added_markers_is_sent_to_sft(tmp_path):
    from tests.stages.common.test_chat import EOS, build_tokenizer

    build_tokenizer(special=[EOS, "<|pad|>"]).save_pretrained(str(tmp_path / "base"))
    tok = training.load_tokenizer(tmp_path / "base", "base model")
    model = tiny_llama(training.added_token_ids(tok)[0], tied=False)
    with pytest.raises(TrainingError, match=r"lacks llmpipe's chat markers .* the align stage does not train new "
                                            r"tokens; fine-tune the model with the sft stage first"):
        training.check_model(model, tok, tmp_path / "base", stage="align", source="base model", max_length=8)
    training.grow_embeddings(model, tok)
    training.check_model(model, tok, tmp_path / "base", stage="sft", source="base model", max_length=8)


def test_an_output_layer_with_a_bias_is_refused_for_trainable_rows():
    import torch

    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    assert training.trainable_token_targets(Biased(), []) is None
    with pytest.raises(TrainingError, match="output layer 'head' has a bias"):
        training.trainable_token_targets(Biased(), [6, 7])


def test_trainer_arguments_come_from_the_train_block():
    train = stage_config("align").train
    rt = training.Runtime(cuda=False, bf16=False, dtype=None, attn_implementation="sdpa")
    args = training.training_args(dict, train, rt, Path("/ckpt"), eval_on_start=True, beta=0.1, save_total_limit=9)
    assert (args["learning_rate"], args["max_steps"], args["warmup_steps"]) == (train.lr, train.max_steps, train.warmup)
    assert args["per_device_eval_batch_size"] == train.eval_batch_size and args["seed"] == args["data_seed"]
    assert args["use_cpu"] and not args["bf16"] and args["report_to"] == "none" and args["eval_on_start"]
    assert args["beta"] == 0.1 and args["save_total_limit"] == 9  # the method's own settings win
    no_eval = training.training_args(dict, train, rt, Path("/ckpt"), has_eval=False, eval_on_start=True)
    assert no_eval["eval_strategy"] == "no" and not no_eval["eval_on_start"]


# ---------------------------------------------------------------- data sources


def test_source_selection_problems_and_file_patterns(tmp_path):
    assert training.source_problems("corpus", (), None) == []
    assert [k for k, _ in training.source_problems("files", (), "x")] == ["files", "dataset"]
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n\nnot json\n')
    (tmp_path / "a.jsonl").write_text("")
    assert training.expand_files([str(tmp_path / "*.jsonl")], "k") == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with pytest.raises(TrainingDataError, match=r"stage.x.data.files: '.*none.jsonl' matches no file"):
        training.expand_files([str(tmp_path / "none.jsonl")], "stage.x.data.files")
    assert list(training.jsonl_records(tmp_path / "b.jsonl")) == [(0, {"a": 1}), (2, training.INVALID_JSON)]


def test_stage_modules_import_no_heavy_library():
    """``llmpipe plan`` imports every stage module: the training stages and their toolkit must stay light."""
    code = ("import sys, stages.common.training, stages.sft.stage, stages.sft.data, stages.align.stage, "
            "stages.align.rl, stages.align.data, stages.align.config, stages.pretrain.stage; "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'pyarrow', 'deepspeed') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_blocks_carry_no_defaults():
    """The shipped YAML is the only source of values (issue 10): no dataclass default can disagree with it."""
    from stages.align.config import AlignConfig
    from stages.pretrain.stage import PretrainConfig
    from stages.sft.stage import SftConfig

    seen, todo = set(), [SftConfig, AlignConfig, PretrainConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (cls, f.name)
        hints = typing.get_type_hints(cls)
        todo += [t for name in hints for t in (hints[name], *typing.get_args(hints[name]))
                 if dataclasses.is_dataclass(t)]
    assert LoraSettings in seen and TrainSettings in seen


# ---------------------------------------------------------------- a save request before the time limit (real Trainer)


def test_a_save_request_saves_the_next_step_and_stops_and_the_next_attempt_resumes_there(tmp_path, monkeypatch):
    """A real (tiny) transformers Trainer under train_or_resume: a save request (pipeline/save_request.py)
    that appears during step 3 gives a complete checkpoint of step 3, no later step and SavedOnRequest,
    so no model is exported; the next attempt, without the request, resumes from step 3 and finishes."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pipeline.save_request import ENV, SavedOnRequest

    request = tmp_path / "save-request"
    monkeypatch.setenv(ENV, str(request))

    class RequestAt(TrainerCallback):
        """What the Slurm executor does on the time-limit signal, here during a chosen step."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 3:
                request.write_text("{}")

    torch.manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 8))]

    def build(resume: Resume) -> Trainer:
        args = TrainingArguments(output_dir=str(checkpoints), max_steps=6, per_device_train_batch_size=2,
                                 learning_rate=1e-3, save_strategy="steps", save_steps=100, logging_steps=1,
                                 report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
        return Trainer(model=tiny_llama(64, tied=False), args=args, train_dataset=rows, callbacks=[RequestAt()])

    ctx = context(tmp_path)
    checkpoints = ctx.output_dir / "checkpoints"
    with pytest.raises(SavedOnRequest, match=r"saved at step 3 on the time-limit signal \(checkpoint-3 in .*\); "
                                             r"requeued to resume from that step") as saved:
        train_or_resume(build, checkpoints, ctx, has_eval=False)
    assert saved.value.step == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3"]
    assert json.loads((checkpoints / "checkpoint-3" / MANIFEST).read_text())["meta"] == {"step": 3}
    assert latest_checkpoint(checkpoints) == Resume(checkpoints / "checkpoint-3", False)

    request.unlink()  # the requeued job's attempt starts without one
    final, metrics = train_or_resume(build, checkpoints, context(tmp_path, attempt=2), has_eval=False)
    assert final == checkpoints / "checkpoint-6" and metrics["resumed_from_step"] == 3 and metrics["steps"] == 6
    trained = [r["step"] for r in records(ctx) if "train_loss" in r["metrics"]]
    assert trained == [1, 2, 3, 4, 5, 6]  # each step once: the resumed attempt starts after step 3
