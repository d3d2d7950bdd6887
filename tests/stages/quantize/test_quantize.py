"""The quantize stage on CPU: real GPTQ (gptqmodel) of a tiny Llama built here, loaded back with
transformers (and with vLLM in the integration test), perplexity before/after on a held-out split;
resumed from gptqmodel's layer checkpoint, and started over when that checkpoint is damaged."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.schema import build
from stages.quantize.stage import (
    INFO_FILE,
    STAGE,
    CalibrationError,
    QuantizeConfig,
    QuantizeError,
    QuantizeShapeError,
    build_calibration,
    heldout_windows,
    inspect_gptq_checkpoint,
    run,
)
from tests.stages.model_fixtures import build_tiny_model, corpus_texts, write_documents
from tests.stages.quantize.world import context, make_world

REPO = Path(__file__).resolve().parents[3]
GROUP = 64
SHIPPED = stage_config("quantize")  # conf/stage/quantize/default.yaml, as the tiny pipeline runs it
# GPTQ alone here: the other formats and the manifest are tested in test_formats.py
CFG = replace(SHIPPED, formats=("gptq",), bits=4, group_size=GROUP, cpu_workers=2,
              calibration=replace(SHIPPED.calibration, samples=32, max_tokens=128),
              perplexity=replace(SHIPPED.perplexity, max_tokens=2048, seq_len=128, batch_size=8))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("quantize"))


@pytest.fixture(scope="module")
def quantized(world):
    ctx = context(world, "out")
    metrics = run(replace(CFG, keep_checkpoint=True), ctx)
    return metrics, ctx


def test_output_is_gptq_4bit_and_smaller(quantized, world):
    metrics, ctx = quantized
    model_dir = ctx.output("model")
    qc = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", 4, GROUP, True,
                                                                                               False)
    fp_bytes = (world["model"] / "model.safetensors").stat().st_size
    q_bytes = (model_dir / "model.safetensors").stat().st_size
    assert metrics["size/fp_bytes"] == fp_bytes and metrics["size/quantized_bytes"] == q_bytes
    assert metrics["size/ratio"] == pytest.approx(q_bytes / fp_bytes) and metrics["size/ratio"] < 0.5
    assert metrics["calibration/samples"] == 32 and metrics["calibration/tokens"] == 32 * 128
    # the tokenizer and chat template travel unchanged; the info file is attached to the run
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (model_dir / name).read_bytes() == (world["model"] / name).read_bytes()
    assert json.loads((ctx.output_dir / INFO_FILE).read_text())["calibration/samples"] == 32
    assert INFO_FILE in json.loads((ctx.output_dir / "_artifacts.json").read_text())
    assert list((ctx.output_dir / "gptq" / "logs").iterdir()), "gptqmodel's ./logs/ belongs in the output dir"


def test_every_linear_is_packed_with_sequential_groups(quantized):
    """No act-order: kernels that ignore g_idx (vLLM's fast paths) compute the right thing only if
    column i is in group i // group_size, also with gptqmodel's group-aware reordering on."""
    import torch
    from safetensors import safe_open

    _, ctx = quantized
    with safe_open(str(ctx.output("model") / "model.safetensors"), "pt") as f:
        g_idx = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".g_idx")}
        assert not any(k.endswith("proj.weight") for k in f.keys()), "a linear layer was left unquantized"
    assert len(g_idx) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    for name, g in g_idx.items():
        assert torch.equal(g, torch.arange(len(g), dtype=g.dtype) // GROUP), name


def test_loads_in_transformers_and_generates(quantized, world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ctx = quantized
    model_dir = ctx.output("model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu")
    assert hasattr(model.model.layers[0].mlp.down_proj, "qweight")  # a GPTQ kernel, not a dense Linear
    prompt = tok.apply_chat_template([{"role": "user", "content": "The pipeline"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    assert len(new) > 0 and tok.decode(new, skip_special_tokens=True).strip()
    text = model.generate(**tok("Training notes 3\nThe pipeline", return_tensors="pt"), max_new_tokens=8,
                          do_sample=False)
    assert tok.decode(text[0]).startswith("Training notes 3\nThe pipeline")


def test_perplexity_before_and_after_is_finite_and_close(quantized, world):
    metrics, ctx = quantized
    fp, q = metrics["perplexity/fp"], metrics["perplexity/quantized"]
    assert all(math.isfinite(v) for v in (fp, q, metrics["perplexity/delta"]))
    vocab = json.loads((world["model"] / "config.json").read_text())["vocab_size"]
    assert 1.0 < fp < vocab / 4, "the fixture model was trained: far better than uniform"
    assert metrics["perplexity/delta"] == pytest.approx(q - fp)
    assert q < 1.5 * fp, "4-bit GPTQ of a trained model must stay close to it"
    assert 0 < metrics["perplexity/tokens"] <= 2048
    logged = [json.loads(line)["metrics"] for line in ctx.metrics_file.read_text().splitlines()]
    assert logged and logged[-1]["perplexity/quantized"] == pytest.approx(q)


def test_a_restarted_attempt_resumes_from_the_layer_checkpoint(quantized, world, caplog):
    """An attempt that died after GPTQ finished layers (here: all) resumes from gptqmodel's layer
    checkpoint instead of starting over, and writes the same weights."""
    from safetensors.torch import load_file

    _, first = quantized
    ctx = context(world, "resumed")
    shutil.copytree(first.output_dir / "gptq" / "checkpoint", ctx.output_dir / "gptq" / "checkpoint")
    with caplog.at_level("INFO", logger=ctx.log.name):
        metrics = run(replace(CFG, perplexity=replace(CFG.perplexity, max_tokens=0)), ctx)
    assert "resuming GPTQ from the layer checkpoint" in caplog.text
    a = load_file(str(first.output("model") / "model.safetensors"))
    b = load_file(str(ctx.output("model") / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert "perplexity/fp" not in metrics
    assert metrics["quantize/resumed_after_layers"] == 2 and metrics["quantize/checkpoints_set_aside"] == 0
    assert not (ctx.output_dir / "gptq" / "checkpoint").exists(), "the checkpoint is removed after success"
    # a further attempt finds the finished model and only measures
    caplog.clear()
    with caplog.at_level("INFO", logger=ctx.log.name):
        again = run(replace(CFG, perplexity=replace(CFG.perplexity, max_tokens=0)), ctx)
    assert "only measuring" in caplog.text and again["size/quantized_bytes"] == metrics["size/quantized_bytes"]


def generations(checkpoint: Path) -> list[dict]:
    """gptqmodel's published generations in ``checkpoint``, newest first (CURRENT, then each one's object)."""
    refs = json.loads((checkpoint / "CURRENT").read_text())["generations"]
    return [json.loads((checkpoint / "objects" / ref).read_text()) for ref in refs]


def test_a_damaged_newest_generation_is_named_and_the_one_before_offered(quantized, tmp_path):
    """A file only the newest generation uses (layer 1's weights) is damaged: the check names it, and
    the older generation (layer 0 done), which gptqmodel resumes from, is still whole."""
    _, first = quantized
    checkpoint = shutil.copytree(first.output_dir / "gptq" / "checkpoint", tmp_path / "checkpoint")
    newest, older = generations(checkpoint)
    assert inspect_gptq_checkpoint(checkpoint).whole == [newest["cursor"], older["cursor"]] == [2, 1]
    only_newest = sorted(set(newest["artifacts"].values()) - set(older["artifacts"].values()))[0]
    os.truncate(checkpoint / "objects" / only_newest, 10)
    found = inspect_gptq_checkpoint(checkpoint)
    assert found.whole == [1] and found.problems == [f"{checkpoint / 'objects' / only_newest}: its sha256 differs "
                                                     f"from its name (the bytes changed)"]
    assert inspect_gptq_checkpoint(tmp_path / "none").whole == []


def test_a_corrupt_layer_checkpoint_is_set_aside_and_gptq_starts_over(quantized, world, caplog):
    """Layer 0's weights, which every generation needs, are damaged: nothing whole is left, so the
    checkpoint is set aside (kept, renamed) and GPTQ starts over, writing the same weights."""
    from safetensors.torch import load_file

    _, first = quantized
    ctx = context(world, "corrupt_checkpoint")
    checkpoint = shutil.copytree(first.output_dir / "gptq" / "checkpoint", ctx.output_dir / "gptq" / "checkpoint")
    layer0 = checkpoint / "objects" / generations(checkpoint)[-1]["artifacts"]["model.layers.0.mlp.down_proj"]
    damaged = os.urandom(layer0.stat().st_size)
    layer0.write_bytes(damaged)
    with caplog.at_level(logging.INFO, logger=ctx.log.name):
        metrics = run(replace(CFG, keep_checkpoint=True, perplexity=replace(CFG.perplexity, max_tokens=0)), ctx)
    assert f"GPTQ layer checkpoint: {layer0}: its sha256 differs from its name" in caplog.text
    assert "no whole generation is left in the GPTQ layer checkpoint: set aside" in caplog.text
    [moved] = (ctx.output_dir / "gptq").glob("checkpoint.corrupt-*")
    assert (moved / "objects" / layer0.name).read_bytes() == damaged  # renamed as it was, not deleted
    assert inspect_gptq_checkpoint(checkpoint).whole == [2, 1]  # the new attempt's own, whole
    assert metrics["quantize/resumed_after_layers"] == 0 and metrics["quantize/checkpoints_set_aside"] == 1
    a = load_file(str(first.output("model") / "model.safetensors"))
    b = load_file(str(ctx.output("model") / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_checkpoint_of_another_config_is_discarded(quantized, world, caplog):
    """gptqmodel refuses a checkpoint whose identity differs (here: another group size; in practice an
    attempt on another machine): the stage says so, drops it and quantizes from the first layer."""
    _, first = quantized
    ctx = context(world, "other_config")
    shutil.copytree(first.output_dir / "gptq" / "checkpoint", ctx.output_dir / "gptq" / "checkpoint")
    with caplog.at_level("INFO", logger=ctx.log.name):
        run(replace(CFG, group_size=32, perplexity=replace(CFG.perplexity, max_tokens=0)), ctx)
    assert "discarding the GPTQ checkpoint" in caplog.text
    assert json.loads((ctx.output("model") / "config.json").read_text())["quantization_config"]["group_size"] == 32


def test_a_group_size_that_does_not_divide_a_layer_fails_clearly(world, tmp_path):
    ctx = context(world, "bad_group")
    with pytest.raises(QuantizeShapeError, match=r"group_size=96 .* layer 'model\.layers\.0\.self_attn\.q_proj' "
                                                  r"\(in_features=128, out_features=128\).*\[32, 64, 128\]"):
        run(replace(CFG, group_size=96), ctx)
    assert not ctx.output("model").exists()


def test_a_layer_width_off_the_kernel_multiple_fails_clearly(tmp_path, world):
    model = build_tiny_model(tmp_path / "odd", intermediate=240, texts=corpus_texts(40))
    ctx = context({**world, "model": model}, "odd")
    with pytest.raises(QuantizeShapeError, match=r"group_size=64 .*'model\.layers\.0\.mlp\.down_proj' "
                                                  r"\(in_features=240"):
        run(CFG, ctx)
    with pytest.raises(QuantizeShapeError, match=r"'model\.layers\.0\.mlp\.gate_proj' of .* has out_features=240"):
        run(replace(CFG, group_size=16), ctx)


def test_windows_longer_than_the_model_context_fail(world):
    bad = replace(CFG, perplexity=replace(CFG.perplexity, seq_len=512))
    with pytest.raises(QuantizeError, match=r"perplexity.seq_len=512 is longer than the context"):
        run(bad, context(world, "long"))


def test_calibration_packs_documents_seeded_and_bounded(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", texts=corpus_texts(40)))
    texts = corpus_texts(60)
    shards = sorted(write_documents(tmp_path / "docs", texts + ["", "   "], shards=3).glob("*.parquet"))
    docs = [tok(t)["input_ids"] for t in texts]
    settings = replace(SHIPPED.calibration, samples=1000, max_tokens=32, seed=1)
    full = build_calibration(shards, tok, settings)
    assert (full.documents, full.skipped_empty, full.shards_read) == (60, 2, 3)
    lengths = [len(s["input_ids"]) for s in full.samples]
    assert set(lengths[:-1]) == {32} and 2 <= lengths[-1] <= 32, "full-length sequences, then the corpus's tail"
    assert full.tokens == sum(lengths) == sum(len(d) + 1 for d in docs)
    # the pretraining layout: every document once, whole, followed by EOS
    flat = [i for s in full.samples for i in s["input_ids"]]
    pieces, current = [], []
    for i in flat:
        if i == tok.eos_token_id:
            pieces.append(current)
            current = []
        else:
            current.append(i)
    assert current == [] and sorted(pieces) == sorted(docs)

    small = build_calibration(shards, tok, replace(settings, samples=3))
    assert [len(s["input_ids"]) for s in small.samples] == [32] * 3
    assert small.shards_read == 1, "reading stops once the samples are full"
    assert small.samples == build_calibration(shards, tok, replace(settings, samples=3)).samples
    assert small.samples != build_calibration(shards, tok, replace(settings, samples=3, seed=2)).samples


def test_a_corpus_without_text_is_a_calibration_error(tmp_path, world):
    ctx = context({**world, "documents": write_documents(tmp_path / "empty", ["", "  "])}, "no_text")
    with pytest.raises(CalibrationError, match=r"no calibration text in .*empty \(1 shards, 2 rows without text\)"):
        run(CFG, ctx)


def test_heldout_windows_are_eos_separated_and_bounded(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", texts=corpus_texts(40)))
    shards = sorted(write_documents(tmp_path / "h", corpus_texts(30), shards=2).glob("*.parquet"))
    windows = heldout_windows(shards, tok, max_tokens=300, seq_len=64)
    flat = [i for w in windows for i in w]
    assert len(flat) == 300 and [len(w) for w in windows] == [64] * 4 + [44]
    first = tok(corpus_texts(30)[0], add_special_tokens=False)["input_ids"]
    assert flat[:len(first) + 1] == [*first, tok.eos_token_id]


@pytest.mark.parametrize("override, message", [
    ("bits=5", r"stage\.quantize\.bits: must be one of"),
    ("group_size=0", r"stage\.quantize\.group_size: must be positive or -1"),
    ("desc_act=true", r"stage\.quantize: desc_act and act_group_aware are both true"),
    ("damp_percent=1.5", r"stage\.quantize\.damp_percent: must be in"),
    ("calibration.max_tokens=1", r"stage\.quantize\.calibration\.max_tokens: must be at least 2"),
    ("perplexity.dtype=int8", r"stage\.quantize\.perplexity\.dtype: 'int8' is not one of"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        stage_config("quantize", f"stage.quantize.{override}")


@pytest.mark.parametrize("top, overrides", [("tiny", []), ("llama-7b", []), ("llama-7b", ["stage/quantize=llama-7b"])])
def test_shipped_configs_compose_and_fit_their_model(top, overrides):
    """A shipped config's group size divides its model's layer widths and its token lengths fit the context."""
    from pipeline.config import compose
    from stages.common.config import ModelConfig

    data = compose(REPO / "conf", top, overrides)
    cfg = build(QuantizeConfig, data["stage"]["quantize"], path="stage.quantize")
    model = build(ModelConfig, data["model"], path="model")
    head_dim = model.hidden_size // model.num_heads
    widths = (model.hidden_size, model.intermediate_size, model.num_heads * head_dim, model.num_kv_heads * head_dim)
    assert all(w % cfg.group_size == 0 and w % 32 == 0 for w in widths), (cfg.group_size, widths)
    assert max(cfg.calibration.max_tokens, cfg.perplexity.seq_len) <= model.max_seq_len


def test_stage_declares_heldout_input_and_is_resumable():
    assert STAGE.inputs == ("align.model", "sft.model", "pretrain.model", "pii.documents", "tokenize.heldout")
    assert STAGE.needed_inputs(SHIPPED) == ("align.model", "pii.documents", "tokenize.heldout")  # base_model: align
    assert STAGE.outputs == ("model", "formats") and STAGE.resumable
    assert {"cpu_workers", "keep_checkpoint", "perplexity.batch_size", "gguf.threads"} <= STAGE.unhashed


def test_the_saved_config_names_the_configured_offload_folder_not_the_attempts_scratch(tmp_path):
    from stages.quantize.stage import name_scratch_as_configured

    scratch, configured = "/tmp/attempt-3f9a/offload", str(tmp_path / "work" / "offload")
    meta = {"offload_to_disk_path": scratch}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"meta": meta}}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"meta": {"offload_to_disk_path": scratch}, "bits": 4}))
    name_scratch_as_configured(tmp_path, scratch, configured)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["meta"] == {
        "offload_to_disk_path": configured}
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == {
        "meta": {"offload_to_disk_path": configured}, "bits": 4}
