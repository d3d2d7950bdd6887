"""The sft stage end to end on CPU: a tiny random Llama, a BPE tokenizer trained here, a generated
corpus; real TRL training (LoRA, QLoRA with bitsandbytes, full), real merging, real loading."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.schema import build
from pipeline.stage import StageContext
from stages.common.chat import CHAT_TEMPLATE, END, MARKERS, parse_chat
from stages.sft.data import (
    Example,
    SftDataConfig,
    SftDataError,
    derive_conversations,
    load_instruction_data,
    sentence_spans,
)
from stages.sft.stage import (
    ADAPTER_INFO,
    CHECKPOINTS,
    LoraSettings,
    QuantSettings,
    SftConfig,
    SftError,
    count_too_long,
    keep_4bit_layers_trainable_on_cpu,
    load_tokenizer,
    run,
)
from tests.stages.common.test_chat import EOS, PAD

REPO = Path(__file__).resolve().parents[3]
SUBJECTS = ["The pipeline", "A shard", "The tokenizer", "Each model", "The adapter", "The trainer", "A document"]
VERBS = ["reads", "writes", "merges", "packs", "splits", "loads", "saves"]
OBJECTS = ["the data", "many tokens", "a checkpoint", "the weights", "every shard", "the corpus", "a new file"]
TOPICS = ["Training notes", "Data handling", "Model export", "Shard layout", "Evaluation", "Serving"]


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
    directory.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("text", pa.string())])
    for i, docs in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(docs, schema=schema), directory / f"part-{i:03d}.parquet")
    return directory


def build_base_model(directory: Path, texts: list[str]) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) and a byte-level BPE trained on ``texts``, saved as
    an HF model dir the way the pretrain stage hands it on (tokenizer files next to the weights)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=2, special_tokens=[EOS, PAD, *MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                     additional_special_tokens=list(MARKERS), model_max_length=256,
                                     clean_up_tokenization_spaces=False)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory))
    hf_tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test models are tiny (hidden 64): a second intra-op thread barely helps them, and on a
    busy machine (CI jobs side by side) it costs a lot: measured here under load 3-7 on 2 cores,
    this module took ~4 min with torch's 2 threads and ~50 s with 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    docs = make_docs(160)
    corpus = write_corpus(root / "documents", [docs[:70], docs[70:]])
    base = build_base_model(root / "base", [d["text"] for d in docs])
    return {"root": root, "corpus": corpus, "base": base}


DATA = SftDataConfig(max_examples=160, validation_fraction=0.1, max_prompt_chars=200, max_reply_chars=160)
CFG = SftConfig(
    method="lora", data=DATA, lora=LoraSettings(rank=8, alpha=16, dropout=0.0), lr=5e-3, max_steps=12,
    batch_size=8, max_length=128, warmup_steps=0, lr_scheduler="constant", eval_steps=5, eval_batch_size=16,
    logging_steps=2, save_steps=6, sample_max_new_tokens=8,
)


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
    assert metrics["steps"] == CFG.max_steps
    for key in ("lr", "grad_norm", "tokens_per_s", "eval_loss"):
        assert curve(ctx, key), f"no {key} curve"
    evals = curve(ctx, "eval_loss")
    # measured before the first step, every eval_steps, and after the last step (12 is no multiple of 5)
    assert [step for step, _ in evals] == [0, 5, 10, CFG.max_steps]
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
    return run_stage(world, replace(CFG, keep_checkpoints=True), "lora")


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


def test_lora_resumes_mid_training_then_skips_finished_training(world, lora_run, caplog):
    _, first = lora_run
    checkpoints = first.output_dir / CHECKPOINTS
    half = CFG.max_steps // 2
    kept = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert kept == [f"checkpoint-{CFG.max_steps}", f"checkpoint-{half}"]
    # An attempt that died while saving its last step: that checkpoint has weights but no trainer state.
    (checkpoints / f"checkpoint-{CFG.max_steps}" / "trainer_state.json").unlink()
    evals_before = len(curve(first, "eval_loss"))
    with caplog.at_level("INFO", logger="llmpipe.stage"):
        metrics = run(replace(CFG, keep_checkpoints=True), attempt(first, 2))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("removing incomplete checkpoint") and f"checkpoint-{CFG.max_steps}" in m
               for m in messages)
    assert any(f"resuming from {checkpoints / f'checkpoint-{half}'}" in m for m in messages)
    assert metrics["resumed_from_step"] == half
    assert metrics["steps"] == CFG.max_steps
    assert curve(first, "resume_step") == [(half, half)]  # the resume is a point on the MLflow curves
    # the resumed attempt trained steps half+1..max_steps (train-loss points logged past `half` again)
    attempt2 = [json.loads(line) for line in first.metrics_file.read_text().splitlines()]
    steps2 = [r["step"] for r in attempt2 if r["attempt"] == 2 and "train_loss" in r["metrics"]]
    assert steps2 and min(steps2) > half and max(steps2) == CFG.max_steps
    # no eval before the first resumed step; the evals after it: step 10 and the final one
    assert len(curve(first, "eval_loss")) == evals_before + 2
    assert metrics["first_train_loss"] == pytest.approx(lora_run[0]["first_train_loss"])  # history spans attempts
    # An attempt after training finished (say the export failed): no step is trained again.
    caplog.clear()
    with caplog.at_level("INFO", logger="llmpipe.stage"):
        metrics = run(CFG, attempt(first, 3))
    assert metrics["steps"] == CFG.max_steps and metrics["train_s"] == 0.0
    assert any("training finished in an earlier attempt" in r.getMessage() for r in caplog.records)
    assert not checkpoints.exists()
    text, _ = chat_generate(first.output("model"))
    assert parse_chat(text)[0]["role"] == "user"


# ---------------------------------------------------------------- full fine-tuning


def test_full_finetune_with_packing_trains_and_writes_no_adapter(world):
    # packing rides along here: BFD-packed rows, padding-free, with the assistant-only labels kept
    metrics, ctx = run_stage(world, replace(CFG, method="full", lr=2e-3, packing=True), "full")
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

    metrics, ctx = run_stage(world, replace(CFG, method="qlora"), "qlora")
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


@pytest.mark.parametrize("data, message", [
    ({"method": "full", "quant": {"quant_type": "fp4"}}, "stage.sft.quant is set but stage.sft.method is 'full'"),
    ({"data": {"source": "files"}}, "stage.sft.data.source is 'files' but stage.sft.data.files is empty"),
    ({"data": {"files": ["x.jsonl"]}}, "stage.sft.data.files is set but stage.sft.data.source is"),
    ({"data": {"source": "dataset"}}, "stage.sft.data.dataset is null"),
    ({"data": {"templates": ["poem"]}}, "unknown ['poem']"),
    ({"lora": {"rank": 0}}, "stage.sft.lora.rank must be at least 1"),
    ({"max_steps": 0}, "stage.sft.max_steps must be positive"),
    ({"method": "dpo"}, "'dpo' is not one of 'lora', 'qlora', 'full'"),
    ({"lora_rank": 8}, "unknown key"),
])
def test_bad_config_names_the_flag(data, message):
    with pytest.raises(ConfigError) as err:
        build(SftConfig, data, path="stage.sft")
    assert message in str(err.value)


def test_unknown_lora_target_fails_before_training(world):
    cfg = replace(CFG, lora=LoraSettings(target_modules=("q_proj", "qkv_proj")))
    with pytest.raises(SftError, match=r"stage.sft.lora.target_modules: \['qkv_proj'\] match no linear layer"):
        run_stage(world, cfg, "bad-target")


def test_conversations_longer_than_max_length_are_counted(world):
    tok = load_tokenizer(world["base"])
    short = Example([{"role": "user", "content": "Go on."}, {"role": "assistant", "content": "The adapter."}], "a")
    long = Example([{"role": "user", "content": "Continue this text:\n\n" + "The pipeline reads the data. " * 30},
                    {"role": "assistant", "content": "A shard."}], "b")
    assert count_too_long(tok, [short, long, short], max_length=64) == 1
    assert count_too_long(tok, [short, long], max_length=256) == 0


def test_context_longer_than_the_model_fails(world):
    with pytest.raises(SftError, match="stage.sft.max_length=512 exceeds the model's context of 256"):
        run_stage(world, replace(CFG, max_length=512), "bad-length")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_bf16_without_a_gpu_fails(world):
    with pytest.raises(SftError, match="stage.sft.precision is 'bf16'"):
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
    cfg = SftDataConfig(examples_per_doc=4, max_prompt_chars=1000, max_reply_chars=1000)
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
    cfg = SftDataConfig(source="files", files=(str(tmp_path / "a.jsonl"), str(tmp_path / "*.parquet")),
                        validation_fraction=0.2, system_prompt="Be brief.")
    data = load_instruction_data(cfg, [])
    assert data.docs_in == 14
    assert dict(data.dropped) == {"invalid_json": 1, "missing_messages": 1, "no_assistant_reply": 1,
                                  "marker_in_content": 1}
    assert len(data.train) + len(data.validation) == 10 and len(data.validation) == 2
    assert all(e.messages[0] == {"role": "system", "content": "Be brief."} for e in data.train)


def test_files_source_errors_name_the_file(tmp_path):
    with pytest.raises(SftDataError, match="matches no file"):
        load_instruction_data(SftDataConfig(source="files", files=(str(tmp_path / "none*.jsonl"),)), [])
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "c.parquet")
    with pytest.raises(SftDataError, match=r"c.parquet: no column 'messages'"):
        load_instruction_data(SftDataConfig(source="files", files=(str(tmp_path / "c.parquet"),)), [])
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(SftDataError, match=r"d.json: unsupported file type '.json'"):
        load_instruction_data(SftDataConfig(source="files", files=(str(tmp_path / "d.json"),)), [])


def test_a_corpus_with_nothing_usable_is_an_error(tmp_path):
    corpus = write_corpus(tmp_path / "c", [[{"id": "a", "url": "u", "text": "short"}]])
    with pytest.raises(SftDataError, match="no usable training conversation"):
        load_instruction_data(DATA, sorted(corpus.glob("*.parquet")))


# ---------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("overrides", [[], ["stage/sft=qlora"], ["stage/sft=full"], ["stage/sft=llama-7b"]])
def test_shipped_configs_compose_and_validate(overrides):
    from pipeline.config import compose

    for top in ("tiny", "llama-7b"):
        data = compose(REPO / "conf", top, overrides)
        cfg = build(SftConfig, data["stage"]["sft"], path="stage.sft")
        assert cfg.method in ("lora", "qlora", "full")


def test_quant_settings_default_is_nf4_double_quant():
    assert QuantSettings() == QuantSettings(quant_type="nf4", double_quant=True, compute_dtype="auto")
