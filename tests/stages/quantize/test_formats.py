"""quantize's formats: GPTQ, GGUF (llama.cpp's converter and quantizer) and AWQ (gptqmodel) of one tiny
Llama built here, each loaded back and generating, each within the perplexity bound of the fp model;
the manifest and its reader (stages/common/quantized.py); a resumed attempt that redoes nothing; the
named errors of a bad ``formats`` list, a bad GGUF type and a missing llama.cpp converter."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from stages.common.quantized import QuantizedFormatsError, find_format, read_formats
from stages.quantize.stage import (
    GGUF_TYPES,
    PerplexityCheck,
    QuantizeFormatError,
    QuantizePerplexityError,
    input_problems,
    run,
)
from tests.stages.model_fixtures import corpus_texts, torch_threads
from tests.stages.quantize.world import context, make_world

SHIPPED = stage_config("quantize")  # conf/stage/quantize/default.yaml
ALL = ("gptq", "gguf", "awq")
CFG = replace(SHIPPED, formats=ALL, group_size=64, cpu_workers=2, keep_checkpoint=True,
              calibration=replace(SHIPPED.calibration, samples=16, max_tokens=128),
              perplexity=replace(SHIPPED.perplexity, max_tokens=2048, seq_len=128, batch_size=8),
              gguf=replace(SHIPPED.gguf, threads=1), awq=replace(SHIPPED.awq, group_size=64))
PROMPT = "Training notes 3\nThe pipeline"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    yield from torch_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def quantized(world):
    ctx = context(world, "all")
    return run(CFG, ctx), ctx


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("formats, message", [
    ("[gptq,ggml]", r"stage\.quantize\.formats: 'ggml' is not a quantized format; choose from gptq, gguf, awq"),
    ("[]", r"stage\.quantize\.formats: is empty"),
    ("[gguf,gptq,gguf]", r"stage\.quantize\.formats: lists 'gguf' more than once"),
])
def test_a_bad_formats_list_is_a_named_error(formats, message):
    with pytest.raises(ConfigError, match=message):  # composed: at config time, before anything runs
        stage_config("quantize", f"stage.quantize.formats={formats}")
    with pytest.raises(QuantizeFormatError, match=message):  # built in code
        replace(SHIPPED, formats=tuple(formats.strip("[]").split(",")) if formats != "[]" else ())


@pytest.mark.parametrize("override, message", [
    ("gguf.type=q4_k_m", r"stage\.quantize\.gguf\.type: 'q4_k_m' is not a llama\.cpp quantization type .*"
                         r"did you mean 'Q4_K_M'"),
    ("gguf.outtype=q8_0", r"stage\.quantize\.gguf\.outtype: 'q8_0' is not one of"),
    ("awq.bits=8", r"stage\.quantize\.awq\.bits: must be one of \(4,\)"),
    ("perplexity.max_ratio=0.9", r"stage\.quantize\.perplexity\.max_ratio: must be at least 1\.0"),
])
def test_bad_format_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        stage_config("quantize", f"stage.quantize.{override}")


def test_the_tiny_default_writes_gptq_and_gguf_and_llama_7b_all_three():
    from pipeline.config import compose
    from pipeline.schema import build
    from stages.quantize.stage import QuantizeConfig

    assert SHIPPED.formats == ("gptq", "gguf") and SHIPPED.gguf.type == "Q4_K_M"
    repo = Path(__file__).resolve().parents[3]
    data = compose(repo / "conf", "llama-7b", ["stage/quantize=llama-7b"])
    assert build(QuantizeConfig, data["stage"]["quantize"], path="stage.quantize").formats == ALL


def test_every_offered_gguf_type_is_a_llama_cpp_file_type():
    import llama_cpp

    for name in GGUF_TYPES:
        assert isinstance(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}"), int), name


# ---------------------------------------------------------------- the manifest reader


def test_the_manifest_reader_resolves_paths_and_keeps_skipped_entries(tmp_path):
    out = tmp_path / "quantize-abc"
    (out / "model").mkdir(parents=True)
    (out / "formats" / "gguf").mkdir(parents=True)
    (out / "formats" / "gguf" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    entries = [{"format": "gptq", "path": "model", "bytes": 10, "perplexity": 2.5, "tokenizer": "model"},
               {"format": "gguf", "path": "formats/gguf/model-Q4_K_M.gguf", "bytes": 4, "quant_type": "Q4_K_M",
                "tokenizer": "formats/gguf"},
               {"format": "awq", "skipped": "no GPU"}]
    (out / "formats" / "manifest.json").write_text(json.dumps({"formats": entries}))
    for where in (out, out / "formats"):  # the stage dir, or the `formats` artifact a stage gets as input
        gptq, gguf, awq = read_formats(where)
        assert (gptq.format, gptq.path, gptq.bytes, gptq.tokenizer) == ("gptq", out / "model", 10, out / "model")
        assert gptq.details == {"perplexity": 2.5} and gptq.produced
        assert (gguf.path, gguf.details["quant_type"]) == (out / "formats/gguf/model-Q4_K_M.gguf", "Q4_K_M")
        assert gguf.tokenizer == out / "formats" / "gguf"
        assert (awq.path, awq.bytes, awq.skipped, awq.produced) == (None, None, "no GPU", False)
    assert find_format(out, "gguf") == gguf
    with pytest.raises(QuantizedFormatsError, match="skipped awq: no GPU"):
        find_format(out, "awq")
    (out / "formats" / "manifest.json").write_text(json.dumps({"formats": entries[:1]}))
    with pytest.raises(QuantizedFormatsError, match=r"has no gguf model: stage\.quantize\.formats was \['gptq'\]"):
        find_format(out, "gguf")


def test_the_manifest_reader_names_what_is_wrong(tmp_path):
    with pytest.raises(QuantizedFormatsError, match=r"formats/manifest\.json: no formats manifest"):
        read_formats(tmp_path)
    (tmp_path / "formats").mkdir()
    manifest = tmp_path / "formats" / "manifest.json"
    for content, message in [("[1]", "not a formats manifest"),
                             ('{"formats": [{"format": "exl2", "path": "model"}]}', "entry 0 is not a format"),
                             ('{"formats": [{"format": "gptq"}]}', "has neither a path nor a skipped reason"),
                             ('{"formats": [{"format": "gptq", "path": "model"}]}', r"gptq model .*model is missing")]:
        manifest.write_text(content)
        with pytest.raises(QuantizedFormatsError, match=message):
            read_formats(tmp_path)


# ---------------------------------------------------------------- the perplexity bound


def test_a_format_over_the_perplexity_bound_fails_the_stage_naming_it():
    settings = replace(SHIPPED.perplexity, max_ratio=1.2)
    check = PerplexityCheck(Path("unused"), [], None, settings, logging.getLogger("test.quantize.bound"))
    check._windows, check._fp = [[1, 2, 3]], 10.0  # the fp model's figure, as if measured
    assert check.measure("gptq", lambda windows: 11.0)["gptq.perplexity_ratio"] == pytest.approx(1.1)
    check.check()  # within the bound
    assert check.measure("gguf", lambda windows: 13.0)["gguf.perplexity_ratio"] == pytest.approx(1.3)
    check.measure("awq", lambda windows: float("nan"))
    with pytest.raises(QuantizePerplexityError, match=r"max_ratio=1\.2 .*gguf: 13 vs 10 .*ratio 1\.300\); awq: nan"):
        check.check()


# ---------------------------------------------------------------- all three formats of one model


def test_the_manifest_lists_every_format_in_order_with_the_primary_as_model(quantized):
    metrics, ctx = quantized
    out = ctx.output_dir.resolve()
    manifest = json.loads((out / "formats" / "manifest.json").read_text())["formats"]
    assert [e["format"] for e in manifest] == list(ALL)
    assert [e["path"] for e in manifest] == ["model", "formats/gguf/model-Q4_K_M.gguf", "formats/awq"]
    gptq, gguf, awq = read_formats(ctx.output("formats"))
    assert gptq.path == ctx.output("model").resolve()
    for found in (gptq, gguf, awq):
        assert found.produced and found.bytes == metrics[f"{found.format}.bytes"] > 0
        assert found.details["perplexity_fp"] == metrics["perplexity/fp"]
        assert found.details["perplexity"] == metrics[f"{found.format}.perplexity"]
    assert gguf.bytes == gguf.path.stat().st_size and gguf.details["quant_type"] == "Q4_K_M"
    fp_bytes = metrics["size/fp_bytes"]
    assert all(metrics[f"{f}.bytes"] < 0.5 * fp_bytes for f in ALL), "4-bit formats are under half the fp size"
    # GPTQ keeps its metric names from before there were formats
    assert metrics["size/quantized_bytes"] == metrics["gptq.bytes"]
    assert metrics["perplexity/quantized"] == metrics["gptq.perplexity"]
    qc = json.loads((out / "formats" / "awq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"]) == ("awq", 4, 64, True)


def test_every_format_is_within_the_perplexity_bound_of_the_fp_model(quantized, world):
    metrics, _ = quantized
    fp = metrics["perplexity/fp"]
    vocab = json.loads((world["model"] / "config.json").read_text())["vocab_size"]
    assert 1.0 < fp < vocab / 4, "the fixture model was trained: far better than uniform"
    for fmt in ALL:
        ratio = metrics[f"{fmt}.perplexity_ratio"]
        assert math.isfinite(ratio) and ratio == pytest.approx(metrics[f"{fmt}.perplexity"] / fp)
        assert ratio <= CFG.perplexity.max_ratio, (fmt, ratio)


def test_the_gguf_loads_in_llama_cpp_tokenizes_like_transformers_and_generates(quantized, world):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    _, ctx = quantized
    gguf = find_format(ctx.output_dir, "gguf")
    tok = AutoTokenizer.from_pretrained(gguf.tokenizer)  # the tokenizer files travel beside the GGUF
    llm = Llama(model_path=str(gguf.path), n_ctx=128, n_threads=1, verbose=False)
    try:
        # the pre-tokenizer bridge (llama.cpp's gpt-2 split) gives transformers' tokens
        for text in corpus_texts(20, seed=5):
            assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False)["input_ids"]
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip()
    finally:
        llm.close()


def test_the_awq_model_loads_in_transformers_and_generates(quantized):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ctx = quantized
    awq = find_format(ctx.output_dir, "awq")
    tok = AutoTokenizer.from_pretrained(awq.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(awq.path, dtype=torch.float32, device_map="cpu")
    assert hasattr(model.model.layers[0].mlp.down_proj, "qweight")  # an AWQ kernel, not a dense Linear
    out = model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0]).startswith(PROMPT) and out.shape[1] > len(tok(PROMPT)["input_ids"])


def test_a_resumed_attempt_redoes_no_finished_format(quantized, world, caplog):
    """An attempt that finds every format finished (an earlier one died after them) only measures."""
    _, first = quantized
    ctx = context(world, "resumed")
    shutil.copytree(first.output_dir, ctx.output_dir, dirs_exist_ok=True)
    cfg = replace(CFG, perplexity=replace(CFG.perplexity, max_tokens=0))
    with caplog.at_level(logging.INFO, logger=ctx.log.name):
        metrics = run(cfg, ctx)
    for fmt in ALL:
        assert f"{fmt}: the model of an earlier attempt is complete" in caplog.text
    assert "calibrating on" not in caplog.text and (ctx.output_dir / "llama.cpp" / "llama.cpp.log").read_text() == (
        first.output_dir / "llama.cpp" / "llama.cpp.log").read_text(), "llama.cpp did not run again"
    assert metrics["gguf.bytes"] == find_format(first.output_dir, "gguf").bytes


def test_a_gguf_primary_is_the_model_output_and_reuses_the_unquantized_gguf(quantized, world, caplog):
    """formats: [gguf]: the quantized file is in model/; the unquantized GGUF an earlier attempt left is
    quantized again (Q8_0 this time) without converting, and removed after success."""
    _, first = quantized
    ctx = context(world, "gguf_primary")
    shutil.copytree(first.output_dir / "llama.cpp", ctx.output_dir / "llama.cpp")
    cfg = replace(CFG, formats=("gguf",), keep_checkpoint=False, gguf=replace(CFG.gguf, type="Q8_0"),
                  perplexity=replace(CFG.perplexity, max_tokens=512))
    with caplog.at_level(logging.INFO, logger=ctx.log.name):
        metrics = run(cfg, ctx)
    assert "reusing the unquantized GGUF" in caplog.text
    [gguf] = read_formats(ctx.output_dir)
    assert gguf.path == (ctx.output_dir / "model" / "model-Q8_0.gguf").resolve() and gguf.path.is_file()
    assert gguf.tokenizer == ctx.output("model").resolve() and (gguf.tokenizer / "tokenizer.json").is_file()
    assert metrics["gguf.bytes"] > find_format(first.output_dir, "gguf").bytes, "8-bit is bigger than Q4_K_M"
    assert metrics["gguf.perplexity_ratio"] <= cfg.perplexity.max_ratio
    assert not list((ctx.output_dir / "llama.cpp").glob("*.gguf")), "the unquantized GGUF goes after success"


def test_without_llama_cpp_s_converter_gguf_is_a_named_error_before_anything_runs(world, tmp_path, monkeypatch):
    from stages.quantize.gguf import LlamaCppMissingError

    monkeypatch.setenv("LLMPIPE_LLAMA_CPP_DIR", str(tmp_path / "nowhere"))
    [(key, message)] = input_problems(replace(SHIPPED, formats=("gguf",)))
    assert key == "formats" and "convert_hf_to_gguf.py" in message and "make setup" in message
    assert input_problems(replace(SHIPPED, formats=("gptq",))) == []
    ctx = context(world, "no_converter")
    with pytest.raises(LlamaCppMissingError, match=r"stage\.quantize\.formats lists gguf: llama\.cpp's converter "
                                                   r"is not in .*nowhere"):
        run(replace(CFG, formats=("gptq", "gguf")), ctx)
    assert not ctx.output("model").exists(), "checked before GPTQ ran"
