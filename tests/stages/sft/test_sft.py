"""The sft stage on CPU: a tiny random Llama and its BPE tokenizer (tests/stages/model_fixtures.py), a
generated corpus; real TRL training (LoRA, QLoRA with bitsandbytes, full), real merging, real loading.

Configs come from the shipped YAML (``stage_config``) with test-sized overrides. What the whole tiny
pipeline test already shows (the shipped config trains and its model generates) is not repeated here;
these tests cover what it does not run: resume, QLoRA, full fine-tuning with packing, the adapter
output, the failures that must name their flag. The shared toolkit has its own tests
(tests/stages/common/test_training.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.common.chat import CHAT_TEMPLATE, END, parse_chat
from stages.common.training import TrainingDataError, TrainingError, load_tokenizer
from stages.sft.data import Example, SftDataError, derive_conversations, load_instruction_data, sentence_spans
from stages.sft.stage import (
    ADAPTER_INFO,
    CHECKPOINTS,
    SftConfig,
    count_too_long,
    keep_4bit_layers_trainable_on_cpu,
    run,
)
from tests.stages.model_fixtures import EOS, build_tiny_model, torch_threads

SUBJECTS = ["The pipeline", "A shard", "The tokenizer", "Each model", "The adapter", "The trainer", "A document"]
VERBS = ["reads", "writes", "merges", "packs", "splits", "loads", "saves"]
OBJECTS = ["the data", "many tokens", "a checkpoint", "the weights", "every shard", "the corpus", "a new file"]
TOPICS = ["Training notes", "Data handling", "Model export", "Shard layout", "Evaluation", "Serving"]

# Test-sized: 12 steps of 8 conversations on a hidden-64 model, short derived prompts, a rank-8 adapter.
OVERRIDES = ("stage.sft.data.max_examples=160", "stage.sft.data.max_prompt_chars=200",
             "stage.sft.data.max_reply_chars=160", "stage.sft.lora.r=8", "stage.sft.lora.alpha=16",
             "stage.sft.lora.dropout=0.0", "stage.sft.train.max_steps=12", "stage.sft.train.max_length=128",
             "stage.sft.train.warmup=0", "stage.sft.train.lr_scheduler=constant", "stage.sft.train.eval_steps=5",
             "stage.sft.train.logging_steps=2", "stage.sft.train.save_steps=6", "stage.sft.sample_max_new_tokens=8")


def sft_config(*extra: str) -> SftConfig:
    return stage_config("sft", *OVERRIDES, *extra)


def with_train(cfg: SftConfig, **changes) -> SftConfig:
    return replace(cfg, train=replace(cfg.train, **changes))


CFG = sft_config()
DATA = CFG.data


def make_docs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Documents with a heading line and 3-8 simple sentences (learnable structure, all templates apply)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(rng.randint(3, 8))]
        text = f"{rng.choice(TOPICS)} {i}\n" + " ".join(sentences)
        docs.append({"id": f"doc-{i:04d}", "url": f"https://example.org/{i}", "text": text})
    return docs


def write_corpus(directory: Path, shards: list[list[dict[str, str]]]) -> Path:
    """A documents artifact with the given documents per shard (the shard layout is what some tests vary)."""
    directory.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("text", pa.string())])
    for i, docs in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(docs, schema=schema), directory / f"part-{i:03d}.parquet")
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    yield from torch_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    docs = make_docs(160)
    corpus = write_corpus(root / "documents", [docs[:70], docs[70:]])
    # The model as the pretrain stage hands it on: tokenizer files next to the weights.
    base = build_tiny_model(root / "base", hidden=64, intermediate=128, layers=2, heads=4, vocab_size=512,
                            texts=[d["text"] for d in docs])
    return {"root": root, "corpus": corpus, "base": base}


def run_stage(world: dict[str, Path], cfg: SftConfig, name: str) -> tuple[dict[str, float], StageContext]:
    out = world["root"] / name
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage="sft", fingerprint=name, output_dir=out, metrics_file=out / "metrics.jsonl",
                       inputs={"pretrain.model": world["base"], "pii.documents": world["corpus"]})
    return run(cfg, ctx), ctx


def curve(ctx: StageContext, key: str) -> list[tuple[int, float]]:
    points = []
    for line in ctx.metrics_file.read_text().splitlines():
        record = json.loads(line)
        if key in record["metrics"]:
            points.append((record["step"], record["metrics"][key]))
    return points


def chat_generate(model_dir: Path, max_new_tokens: int = 12) -> tuple[str, list[int]]:
    """Load the output model dir with plain transformers and answer a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    messages = [{"role": "user", "content": "Continue this text:\n\nThe pipeline reads the data."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tok.decode(out[0]), new


def assert_trained_and_usable(metrics: dict[str, float], ctx: StageContext, checkpoints_kept: bool = False) -> None:
    """What every method must deliver: a falling loss, curves, a loadable merged model that chats."""
    losses = curve(ctx, "train_loss")
    assert len(losses) >= 3
    assert losses[-1][1] < losses[0][1] - 0.1, losses
    assert metrics["final_train_loss"] < metrics["first_train_loss"]
    assert metrics["steps"] == CFG.train.max_steps
    for key in ("lr", "grad_norm", "tokens_per_s", "eval_loss"):
        assert curve(ctx, key), f"no {key} curve"
    evals = curve(ctx, "eval_loss")
    # measured before the first step, every eval_steps, and after the last step (12 is no multiple of 5)
    assert [step for step, _ in evals] == [0, 5, 10, CFG.train.max_steps]
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["train_examples"] > 0 and metrics["validation_examples"] > 0
    assert metrics["truncated_examples"] == 0  # the test's derived prompts fit max_length

    model_dir = ctx.output("model")
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    text, new_tokens = chat_generate(model_dir)
    assert text.startswith(f"{EOS}<|user|>\nContinue this text:") and "<|assistant|>\n" in text
    assert len(new_tokens) >= 1
    generation = json.loads((model_dir / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert generation["eos_token_id"] == [tok.convert_tokens_to_ids(END), tok.eos_token_id]
    assert tok.chat_template == CHAT_TEMPLATE
    assert (ctx.output_dir / CHECKPOINTS).exists() == checkpoints_kept  # removed unless keep_checkpoints
    train_lines = (ctx.output_dir / "data" / "train.jsonl").read_text().splitlines()
    assert len(train_lines) == metrics["train_examples"]
    sample = json.loads((ctx.output_dir / "sample.json").read_text())
    assert sample["conversation"][0]["role"] == "user" and isinstance(sample["reply"], str)
    assert "sample.json" in json.loads((ctx.output_dir / "_artifacts.json").read_text())


# ---------------------------------------------------------------- LoRA (the tiny default's method)


@pytest.fixture(scope="module")
def lora_run(world):
    return run_stage(world, with_train(CFG, keep_checkpoints=True), "lora")


def test_lora_trains_merges_and_chats(lora_run):
    metrics, ctx = lora_run
    assert_trained_and_usable(metrics, ctx, checkpoints_kept=True)  # kept for the resume test below
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 2


def test_lora_adapter_loads_with_peft_and_equals_the_merged_model(world, lora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, ctx = lora_run
    adapter = ctx.output("adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    info = json.loads((adapter / ADAPTER_INFO).read_text())
    assert info["has_adapter"] and info["method"] == "lora"
    # peft writes its set of target modules in hash order: sorted here, the same training saves the same bytes
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets) and len(targets) > 1
    base = AutoModelForCausalLM.from_pretrained(str(world["base"]), local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    merged = AutoModelForCausalLM.from_pretrained(str(ctx.output("model")), local_files_only=True)
    ids = torch.tensor([[0, 3, 40, 41, 42, 5, 4]])
    with torch.no_grad():
        a = peft_model(ids).logits
        b = merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(world["base"]), local_files_only=True)(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter changed the model


def attempt(first: StageContext, number: int) -> StageContext:
    """The next attempt of the same stage run: the runner hands a resumable stage the same output dir."""
    return StageContext(stage="sft", fingerprint=first.fingerprint, output_dir=first.output_dir, attempt=number,
                        metrics_file=first.metrics_file, inputs=dict(first.inputs))


def test_a_corrupt_only_checkpoint_is_set_aside_and_training_starts_over(world, lora_run, caplog):
    """The last step's checkpoint, alone in a new output dir, with its optimizer state changed on disk:
    the attempt sets it aside and trains from step 0, exactly as the first run did."""
    first_metrics, first = lora_run
    out = first.output_dir.parent / "lora-restart"
    ctx = StageContext(stage="sft", fingerprint="restart", output_dir=out, attempt=2,
                       metrics_file=out / "metrics.jsonl", inputs=dict(first.inputs))
    last = f"checkpoint-{CFG.train.max_steps}"
    shutil.copytree(first.output_dir / CHECKPOINTS / last, ctx.output_dir / CHECKPOINTS / last)
    optimizer = ctx.output_dir / CHECKPOINTS / last / "optimizer.pt"
    optimizer.write_bytes(os.urandom(optimizer.stat().st_size))  # same size, other bytes
    with caplog.at_level("INFO", logger="llmpipe.stage"):
        metrics = run(CFG, ctx)
    assert f"checkpoint {last} is corrupt: {optimizer}: its xxh3_128 hash differs" in caplog.text
    assert "no complete checkpoint is left (1 set aside): training starts over from step 0" in caplog.text
    assert metrics["resumed_from_step"] == 0 and metrics["checkpoints_set_aside"] == 1
    assert metrics["steps"] == CFG.train.max_steps and not curve(ctx, "resume_step")
    assert metrics["final_train_loss"] == pytest.approx(first_metrics["final_train_loss"])  # the same run again
    assert not (ctx.output_dir / CHECKPOINTS).exists()  # with the set-aside one: keep_checkpoints is false


def test_lora_resumes_mid_training_then_skips_finished_training(world, lora_run, caplog):
    _, first = lora_run
    checkpoints = first.output_dir / CHECKPOINTS
    half = CFG.train.max_steps // 2
    kept = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert kept == [f"checkpoint-{CFG.train.max_steps}", f"checkpoint-{half}"]
    # The newest checkpoint loses the end of its adapter weights (a full disk, a bad copy): it is set aside and
    # the one before it used; the Trainer kept two (train.save_total_limit) for this.
    adapter = checkpoints / f"checkpoint-{CFG.train.max_steps}" / "adapter_model.safetensors"
    os.truncate(adapter, 1000)
    evals_before = len(curve(first, "eval_loss"))
    with caplog.at_level("INFO", logger="llmpipe.stage"):
        metrics = run(with_train(CFG, keep_checkpoints=True), attempt(first, 2))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"checkpoint checkpoint-{CFG.train.max_steps} is corrupt: {adapter}: 1000 bytes on disk")
               for m in messages)
    [moved] = (checkpoints / "set-aside").iterdir()
    assert (moved / adapter.name).stat().st_size == 1000  # renamed as it was, not deleted
    assert any(f"resuming from {checkpoints / f'checkpoint-{half}'}" in m for m in messages)
    assert metrics["resumed_from_step"] == half and metrics["checkpoints_set_aside"] == 1
    assert metrics["steps"] == CFG.train.max_steps
    assert curve(first, "resume_step") == [(half, half)]  # the resume is a point on the MLflow curves
    # the resumed attempt trained steps half+1..max_steps (train-loss points logged past `half` again)
    attempt2 = [json.loads(line) for line in first.metrics_file.read_text().splitlines()]
    steps2 = [r["step"] for r in attempt2 if r["attempt"] == 2 and "train_loss" in r["metrics"]]
    assert steps2 and min(steps2) > half and max(steps2) == CFG.train.max_steps
    # no eval before the first resumed step; the evals after it: step 10 and the final one
    assert len(curve(first, "eval_loss")) == evals_before + 2
    assert metrics["first_train_loss"] == pytest.approx(lora_run[0]["first_train_loss"])  # history spans attempts
    # An attempt after training finished (say the export failed): no step is trained again.
    caplog.clear()
    with caplog.at_level("INFO", logger="llmpipe.stage"):
        metrics = run(CFG, attempt(first, 3))
    assert metrics["steps"] == CFG.train.max_steps and metrics["train_s"] == 0.0
    assert any("training finished in an earlier attempt" in r.getMessage() for r in caplog.records)
    assert not checkpoints.exists()
    text, _ = chat_generate(first.output("model"))
    assert parse_chat(text)[0]["role"] == "user"


# ---------------------------------------------------------------- full fine-tuning


def test_full_finetune_with_packing_trains_and_writes_no_adapter(world):
    # packing rides along here: BFD-packed rows, padding-free, with the assistant-only labels kept
    cfg = replace(with_train(sft_config("stage/sft=full"), lr=2e-3), packing=True)
    metrics, ctx = run_stage(world, cfg, "full")
    assert_trained_and_usable(metrics, ctx)
    assert metrics["trainable_params"] == metrics["total_params"]
    adapter = ctx.output("adapter")
    assert not (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / ADAPTER_INFO).read_text())["has_adapter"] is False
    assert (adapter / "README.md").read_text().startswith("# No adapter")


# ---------------------------------------------------------------- QLoRA (bitsandbytes NF4 on CPU)


def test_qlora_trains_and_merges_into_the_full_precision_base(world, lora_run):
    # ~5 s here (12 steps, 4-bit NF4 base via bitsandbytes' CPU kernels): fast enough for every run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    metrics, ctx = run_stage(world, sft_config("stage/sft=qlora"), "qlora")
    assert_trained_and_usable(metrics, ctx)
    # 4-bit weights are counted as weights, not as packed bytes: the same model and adapter as LoRA's
    assert (metrics["trainable_params"], metrics["total_params"]) == (lora_run[0]["trainable_params"],
                                                                       lora_run[0]["total_params"])
    base = AutoModelForCausalLM.from_pretrained(str(world["base"]), local_files_only=True)
    PeftModel.from_pretrained(base, str(ctx.output("adapter")))
    merged = json.loads((ctx.output("model") / "config.json").read_text())
    assert "quantization_config" not in merged  # a plain full-precision model, loadable anywhere


def test_4bit_layers_stay_trainable_after_an_eval_pass(world):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval forward; after that the
    layer has no autograd. The stage turns that off (see keep_4bit_layers_trainable_on_cpu)."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(world["base"]), quantization_config=quant,
                                                 dtype=torch.float32, local_files_only=True)
    keep_4bit_layers_trainable_on_cpu(model)
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[0, 3, 40, 41]]))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    # and gradients still flow through a frozen 4-bit layer to its input
    x = torch.randn(2, 64, requires_grad=True)
    layers[0].train()
    layers[0](x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- bad combinations fail fast


@pytest.mark.parametrize("overrides, message", [
    (["stage/sft=qlora", "stage.sft.method=full"], "stage.sft.quant: is set but method is 'full'"),
    (["stage.sft.method=qlora"], "stage.sft.quant: is null but method is 'qlora'"),
    (["stage.sft.data.source=files"], "stage.sft.data.files: is empty but source is 'files'"),
    (["stage.sft.data.files=[x.jsonl]"], "stage.sft.data.files: is set but source is 'corpus'"),
    (["stage.sft.data.source=dataset"], "stage.sft.data.dataset: is null but source is 'dataset'"),
    (["stage.sft.data.templates=[poem]"], "stage.sft.data.templates: unknown ['poem']"),
    (["stage.sft.train.max_steps=0"], "stage.sft.train.max_steps: must be positive"),
    (["stage.sft.method=dpo"], "stage.sft.method: 'dpo' is not one of 'lora', 'qlora', 'full'"),
    (["+stage.sft.lora_rank=8"], "stage.sft.lora_rank: unknown key"),
])
def test_bad_config_names_the_flag(overrides, message):
    with pytest.raises(ConfigError) as err:
        stage_config("sft", *overrides)
    assert message in str(err.value)


def test_unknown_lora_target_fails_before_training(world):
    cfg = replace(CFG, lora=replace(CFG.lora, target_modules=("q_proj", "qkv_proj")))
    with pytest.raises(TrainingError, match=r"stage.sft.lora.target_modules: \['qkv_proj'\] match no linear layer"):
        run_stage(world, cfg, "bad-target")


def test_conversations_longer_than_max_length_are_counted(world):
    tok = load_tokenizer(world["base"], "input pretrain.model")
    short = Example([{"role": "user", "content": "Go on."}, {"role": "assistant", "content": "The adapter."}], "a")
    long = Example([{"role": "user", "content": "Continue this text:\n\n" + "The pipeline reads the data. " * 30},
                    {"role": "assistant", "content": "A shard."}], "b")
    assert count_too_long(tok, [short, long, short], max_length=64) == 1
    assert count_too_long(tok, [short, long], max_length=256) == 0


def test_context_longer_than_the_model_fails(world):
    with pytest.raises(TrainingError, match="stage.sft.train.max_length=512 exceeds the model's context of 256"):
        run_stage(world, with_train(CFG, max_length=512), "bad-length")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_bf16_without_a_gpu_fails(world):
    with pytest.raises(TrainingError, match="stage.sft.precision is 'bf16'"):
        run_stage(world, replace(CFG, precision="bf16"), "bad-bf16")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_on_gpu_uses_bf16(world):
    metrics, ctx = run_stage(world, CFG, "gpu-lora")
    assert_trained_and_usable(metrics, ctx)


# ---------------------------------------------------------------- instruction data


def test_derived_data_is_deterministic_and_independent_of_sharding(tmp_path):
    docs = make_docs(60, seed=3)
    a = write_corpus(tmp_path / "a", [docs])
    b = write_corpus(tmp_path / "b", [docs[40:], docs[:15], docs[15:40]])
    cfg = replace(DATA, max_examples=40)

    def load(corpus: Path):
        data = load_instruction_data(cfg, sorted(corpus.glob("*.parquet")))
        return [e.messages for e in data.train], [e.messages for e in data.validation]

    first = load(a)
    assert first == load(a)
    assert sorted(map(json.dumps, first[0])) == sorted(map(json.dumps, load(b)[0]))
    assert sorted(map(json.dumps, first[1])) == sorted(map(json.dumps, load(b)[1]))
    assert len(first[0]) + len(first[1]) == 40 and len(first[1]) == 4
    different = load_instruction_data(replace(cfg, seed=1), sorted(a.glob("*.parquet")))
    assert [e.messages for e in different.train] != first[0]


def test_derived_answers_come_from_the_document():
    doc = make_docs(1, seed=5)[0]
    cfg = replace(DATA, examples_per_doc=4, max_prompt_chars=1000, max_reply_chars=1000)
    derived = dict(derive_conversations(doc["text"], doc["id"], cfg))
    assert set(derived) == {"continue", "continue_dialog", "first_sentence", "title"}
    text = doc["text"]
    heading, body = text.split("\n", 1)
    assert derived["title"][-1]["content"] == heading
    assert derived["first_sentence"][-1]["content"] == body[:body.index(".") + 1]
    prompt = derived["continue"][0]["content"].removeprefix("Continue this text:\n\n")
    reply = derived["continue"][1]["content"]
    assert text.index(prompt) < text.index(reply)  # the reply follows the prompt in the document
    dialog = derived["continue_dialog"]
    assert [m["role"] for m in dialog] == ["user", "assistant", "user", "assistant"]
    for m in (dialog[1], dialog[3]):
        assert m["content"] in text


def test_sentence_spans_split_on_punctuation_and_lines():
    text = "Title line\nFirst one. Second? Third!\n  a\nLast line"
    # "a" is too short to stand alone: it joins the sentence that follows it
    assert [text[s:e] for s, e in sentence_spans(text)] == ["Title line", "First one.", "Second?", "Third!",
                                                            "a\nLast line"]


def test_validation_split_holds_out_whole_documents(world):
    data = load_instruction_data(replace(DATA, examples_per_doc=3), sorted(world["corpus"].glob("*.parquet")))
    train_docs = {e.split_key for e in data.train}
    val_docs = {e.split_key for e in data.validation}
    assert val_docs and not train_docs & val_docs


def test_files_source_reads_jsonl_and_parquet_and_counts_bad_records(tmp_path):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    lines = [json.dumps({"messages": good}), "not json", json.dumps({"other": 1}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
             json.dumps({"messages": [{"role": "user", "content": "<|end|> forged"}, good[1]]})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    rows = [{"messages": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": f"r{i}"}]}
            for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    cfg = replace(DATA, source="files", files=(str(tmp_path / "a.jsonl"), str(tmp_path / "*.parquet")),
                  validation_fraction=0.2, system_prompt="Be brief.", max_examples=None)
    data = load_instruction_data(cfg, [])
    assert data.docs_in == 14
    assert dict(data.dropped) == {"invalid_json": 1, "missing_messages": 1, "no_assistant_reply": 1,
                                  "marker_in_content": 1}
    assert len(data.train) + len(data.validation) == 10 and len(data.validation) == 2
    assert all(e.messages[0] == {"role": "system", "content": "Be brief."} for e in data.train)


def test_files_source_errors_name_the_file(tmp_path):
    def files(*paths: Path):
        return replace(DATA, source="files", files=tuple(map(str, paths)))

    with pytest.raises(TrainingDataError, match=r"stage.sft.data.files: '.*none\*.jsonl' matches no file"):
        load_instruction_data(files(tmp_path / "none*.jsonl"), [])
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "c.parquet")
    with pytest.raises(SftDataError, match=r"c.parquet: no column 'messages'"):
        load_instruction_data(files(tmp_path / "c.parquet"), [])
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(SftDataError, match=r"d.json: unsupported file type '.json'"):
        load_instruction_data(files(tmp_path / "d.json"), [])


def test_a_corpus_with_nothing_usable_is_an_error(tmp_path):
    corpus = write_corpus(tmp_path / "c", [[{"id": "a", "url": "u", "text": "short"}]])
    with pytest.raises(SftDataError, match="no usable training conversation"):
        load_instruction_data(DATA, sorted(corpus.glob("*.parquet")))


# ---------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("conf, variant, method", [("tiny", "default", "lora"), ("tiny", "qlora", "qlora"),
                                                   ("tiny", "full", "full"), ("llama-7b", "llama-7b", "qlora"),
                                                   ("llama-7b", "llama-7b-full", "full")])
def test_shipped_configs_compose_and_validate(conf, variant, method):
    cfg = stage_config("sft", f"stage/sft={variant}", conf=conf)
    assert cfg.method == method and (cfg.quant is not None) == (method == "qlora")
    if conf == "llama-7b":  # a node of 8 GPUs: ZeRO-2 for the adapter, ZeRO-3 for every weight
        assert cfg.train.zero_stage == (3 if method == "full" else 2) and cfg.launch.gpus_per_node is None
        assert cfg.train.batch_size * cfg.train.grad_accum * 8 == (128 if method == "full" else 16)
