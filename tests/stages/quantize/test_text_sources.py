"""quantize's text sources: calibration and the perplexity check read the pipeline's documents
(pii.documents, tokenize.heldout) or the user's JSONL / Parquet files (calibration.files,
perplexity.files), packed and scored the same way; which inputs each config needs, the plan-time
check of the files and their part in the fingerprint; one GPTQ run from files alone."""

from __future__ import annotations

import gzip
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.quantize.stage import (
    QuantizeError,
    build_calibration,
    document_files,
    external_state,
    heldout_windows,
    input_problems,
    needed_inputs,
    read_texts,
    run,
)
from tests.stages.model_fixtures import build_tiny_model, build_tokenizer, corpus_texts, write_documents

SHIPPED = stage_config("quantize")  # conf/stage/quantize/default.yaml


def with_sources(calibration: str = "corpus", perplexity: str = "heldout", files: tuple[str, ...] = ("t.jsonl",),
                 **perplexity_changes):
    """The shipped config with the given sources (``files`` for each block whose source is files)."""
    return replace(SHIPPED,
                   calibration=replace(SHIPPED.calibration, source=calibration,
                                       files=files if calibration == "files" else ()),
                   perplexity=replace(SHIPPED.perplexity, source=perplexity,
                                      files=files if perplexity == "files" else (), **perplexity_changes))


def write_jsonl(path: Path, records: list, gzipped: bool = False) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if gzipped:
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(corpus_texts(60))


# ---------------------------------------------------------------- inputs, config


@pytest.mark.parametrize("calibration, perplexity, needed", [
    ("corpus", "heldout", ("pii.documents", "tokenize.heldout")),
    ("files", "heldout", ("tokenize.heldout",)),
    ("corpus", "files", ("pii.documents",)),
    ("files", "files", ()),
])
def test_needed_inputs_follow_the_sources(calibration, perplexity, needed):
    assert needed_inputs(with_sources(calibration, perplexity)) == needed


def test_no_perplexity_check_needs_no_heldout_split():
    assert needed_inputs(with_sources("corpus", "heldout", max_tokens=0)) == ("pii.documents",)
    assert input_problems(with_sources("corpus", "files", files=("nowhere.jsonl",), max_tokens=0)) == []


def test_shipped_defaults_read_the_pipeline_documents():
    assert (SHIPPED.calibration.source, SHIPPED.calibration.files) == ("corpus", ())
    assert (SHIPPED.perplexity.source, SHIPPED.perplexity.files) == ("heldout", ())
    assert external_state(SHIPPED) is None, "configs without files keep their fingerprints"


@pytest.mark.parametrize("overrides, message", [
    (["calibration.source=files"], r"stage\.quantize\.calibration\.files: is empty but source is 'files'"),
    (["perplexity.source=files"], r"stage\.quantize\.perplexity\.files: is empty but source is 'files'"),
    (["calibration.files=[a.jsonl]"], r"stage\.quantize\.calibration\.files: is set but source is 'corpus'"),
    (["calibration.source=web"], r"stage\.quantize\.calibration\.source: 'web' is not one of"),
    (["perplexity.source=corpus"], r"stage\.quantize\.perplexity\.source: 'corpus' is not one of"),
])
def test_bad_source_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        stage_config("quantize", *(f"stage.quantize.{o}" for o in overrides))


def test_files_config_builds():
    cfg = stage_config("quantize", "stage.quantize.calibration.source=files",
                       "stage.quantize.calibration.files=[data/*.jsonl,more.parquet]")
    assert cfg.calibration.files == ("data/*.jsonl", "more.parquet")


# ---------------------------------------------------------------- reading and packing


def test_calibration_from_files_equals_calibration_from_shards_of_the_same_documents(tmp_path, tok):
    texts = corpus_texts(60, seed=4) + ["", "   "]
    shards = sorted(write_documents(tmp_path / "docs", texts, shards=3).glob("*.parquet"))
    # the same documents, split the same way, as JSONL, gzipped JSONL and Parquet files with only `text`
    per = -(-len(texts) // 3)
    parts = [texts[i * per:(i + 1) * per] for i in range(3)]
    files = [write_jsonl(tmp_path / "a.jsonl", [{"text": t, "source": "x"} for t in parts[0]]),
             write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in parts[1]], gzipped=True),
             tmp_path / "c.parquet"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": parts[2]}), files[2])

    for settings in (replace(SHIPPED.calibration, samples=1000, max_tokens=32, seed=1),
                     replace(SHIPPED.calibration, samples=3, max_tokens=48, seed=7)):
        from_shards = build_calibration(shards, tok, settings)
        from_files = build_calibration(files, tok, settings)
        assert from_files.samples == from_shards.samples and from_files.samples
        assert (from_files.tokens, from_files.documents, from_files.skipped_empty, from_files.shards_read) == (
            from_shards.tokens, from_shards.documents, from_shards.skipped_empty, from_shards.shards_read)
    assert from_files.samples == build_calibration(files, tok, settings).samples, "seeded: the same again"

    windows = heldout_windows(shards, tok, max_tokens=300, seq_len=64)
    assert heldout_windows(files, tok, max_tokens=300, seq_len=64) == windows and len(windows) == 5


def test_jsonl_records_without_text_are_counted_and_broken_lines_named(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "A document."}, {"title": "no text"}, {"text": None}])
    assert read_texts(path) == ["A document.", None, None]
    cal = build_calibration([path], tok, replace(SHIPPED.calibration, samples=4, max_tokens=8))
    assert (cal.documents, cal.skipped_empty) == (1, 2)

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n["a list"]\n')
    with pytest.raises(QuantizeError, match=r"bad\.jsonl, line 2: not a JSON object"):
        read_texts(tmp_path / "bad.jsonl")
    pq_path = tmp_path / "notext.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), pq_path)
    with pytest.raises(QuantizeError, match=r"notext\.parquet: no column 'text'"):
        read_texts(pq_path)


def test_document_files_expand_patterns_or_list_the_input_shards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("b.jsonl", "a.jsonl", "c.parquet"):
        (tmp_path / "data" / name).write_text("{}\n")
    shards = write_documents(tmp_path / "docs", ["x", "y"], shards=2)
    ctx = StageContext(stage="quantize", fingerprint="f", output_dir=tmp_path / "out",
                       inputs={"pii.documents": shards})
    cfg = with_sources("files", "files", files=("data/*.jsonl", "data/c.parquet"))
    expected = [tmp_path / "data" / n for n in ("a.jsonl", "b.jsonl", "c.parquet")]
    assert document_files(cfg.calibration, "calibration", ctx) == expected  # absolute: GPTQ runs elsewhere
    assert document_files(SHIPPED.calibration, "calibration", ctx) == sorted(shards.glob("*.parquet"))
    missing = with_sources("files", files=("data/*.txt",))
    with pytest.raises(QuantizeError, match=r"stage\.quantize\.calibration\.files: 'data/\*\.txt' matches no file"):
        document_files(missing.calibration, "calibration", ctx)


# ---------------------------------------------------------------- preflight and fingerprint


def test_preflight_names_missing_and_unreadable_files(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "x"}])
    (tmp_path / "notes.txt").write_text("plain text\n")
    (tmp_path / "broken.jsonl").write_text("not json\n")
    cfg = with_sources("files", "files", files=(str(good),))
    assert input_problems(cfg) == []
    assert input_problems(SHIPPED) == []

    cfg = replace(cfg, calibration=replace(cfg.calibration, files=(str(tmp_path / "gone.jsonl"), str(good))),
                  perplexity=replace(cfg.perplexity, files=(str(tmp_path / "*.txt"), str(tmp_path / "broken.jsonl"))))
    problems = input_problems(cfg)
    assert [key for key, _ in problems] == ["calibration.files", "perplexity.files", "perplexity.files"]
    assert "gone.jsonl' matches no file" in problems[0][1]
    assert "notes.txt' has an unsupported type '.txt'" in problems[1][1]
    assert "broken.jsonl' is not a JSON Lines file" in problems[2][1]


def test_external_state_follows_the_file_contents(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "first"}])
    cfg = with_sources("files", "heldout", files=(str(tmp_path / "*.jsonl"),))
    state = external_state(cfg)
    assert list(state) == [f"calibration.files[{path}]"]
    assert external_state(cfg) == state, "the same bytes, the same state"
    path.touch()
    assert external_state(cfg) == state, "touching a file changes nothing"
    write_jsonl(path, [{"text": "second"}])
    assert external_state(cfg) != state

    both = with_sources("files", "files", files=(str(path),))
    assert set(external_state(both)) == {f"calibration.files[{path}]", f"perplexity.files[{path}]"}
    gone = with_sources("corpus", "files", files=(str(tmp_path / "gone.jsonl"),))
    assert external_state(gone) == {f"perplexity.files[{tmp_path / 'gone.jsonl'}]": "missing"}


# ---------------------------------------------------------------- end to end


def test_gptq_from_files_alone(tmp_path, caplog):
    """Calibration and the perplexity check from files: the stage reads no pipeline documents at all."""
    texts = corpus_texts(160, seed=2)
    model = build_tiny_model(tmp_path / "model", train_steps=10, texts=texts)
    write_jsonl(tmp_path / "cal.jsonl", [{"text": t} for t in texts[:120]])
    write_jsonl(tmp_path / "held.jsonl.gz", [{"text": t} for t in texts[120:]], gzipped=True)
    cfg = replace(SHIPPED, formats=("gptq",), group_size=64, cpu_workers=2,
                  calibration=replace(SHIPPED.calibration, source="files", files=(str(tmp_path / "cal.jsonl"),),
                                      samples=8, max_tokens=64),
                  perplexity=replace(SHIPPED.perplexity, source="files", files=(str(tmp_path / "held.jsonl.gz"),),
                                     max_tokens=512, seq_len=64))
    assert needed_inputs(cfg) == ()
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="quantize", fingerprint="files", output_dir=out, metrics_file=out / "metrics.jsonl",
                       inputs={"align.model": model}, log=logging.getLogger("test.quantize"))
    with caplog.at_level(logging.INFO, logger="test.quantize"):
        metrics = run(cfg, ctx)
    assert metrics["calibration/samples"] == 8 and metrics["calibration/tokens"] == 8 * 64
    assert metrics["calibration/shards_read"] == 1
    assert 0 < metrics["perplexity/tokens"] <= 512
    assert all(math.isfinite(metrics[k]) for k in ("perplexity/fp", "perplexity/quantized"))
    assert "documents in 1 files" in caplog.text
    qc = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 64)
