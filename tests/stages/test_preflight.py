"""Every stage's plan-time input check (``Stage.preflight``), on the shipped YAML's config with the
paths pointed at good and bad files. The checks must agree with what the stage itself accepts."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest

from llmpipe.project import PROJECT, stage_config
from pipeline.inputs import file_problem
from stages.ingest.stage import WARC, NotAWarcError, check_is_warc
from tests.stages.ingest.warc_fixtures import build_fixture_set


def _check(stage: str, cfg) -> list[tuple[str, str]]:
    return list(PROJECT.stage(stage).preflight(cfg))


def test_every_stage_that_reads_outside_files_checks_them():
    # Every stage that takes a model (base_model, evaluate's name=<dir|hub id>) checks it; dedup and pii read
    # only upstream outputs.
    assert {s.name for s in PROJECT.stages if s.preflight} == {
        "ingest", "quality", "decontaminate", "tokenize", "sft", "align", "quantize", "serve", "evaluate"}


def test_plan_time_warc_check_agrees_with_the_stage(tmp_path):
    fx = build_fixture_set(tmp_path)
    for path in (fx.mixed, fx.plain, fx.truncated, fx.empty, fx.not_warc):
        try:
            check_is_warc(str(path))
            stage_accepts = True
        except NotAWarcError:
            stage_accepts = False
        assert (file_problem(path, WARC) is None) == stage_accepts, path
    (tmp_path / "gz-text.warc.gz").write_bytes(gzip.compress(b"just text, gzipped\n"))
    assert "is gzipped, but its content starts with b'just '" in file_problem(tmp_path / "gz-text.warc.gz", WARC)


def test_ingest_reports_every_bad_input_and_skips_urls(tmp_path):
    fx = build_fixture_set(tmp_path)
    base = stage_config("ingest")
    cfg = dataclasses.replace(base, input=(f"{tmp_path}/crawl/*.warc*", f"{tmp_path}/crawl", str(fx.not_warc),
                                           f"{tmp_path}/nothing/*.warc.gz", "s3://bucket/crawl/*.warc.gz"),
                              language_model=str(fx.plain))
    assert _check("ingest", cfg) == [
        ("input", f"'{fx.not_warc}' is not a WARC file: it starts with b'These', not with b'WARC/' or gzip's magic"),
        ("input", f"'{tmp_path}/nothing/*.warc.gz' matches no file"),
        ("language_model", f"'{fx.plain}' is not a fastText model: it starts with b'WARC/1.0\\r\\nWARC-T'"),
    ]
    assert _check("ingest", dataclasses.replace(base, input=(str(fx.mixed),))) == []


def test_quality_checks_the_files_it_would_read(tmp_path):
    (tmp_path / "pos.txt").write_text("a good sample\n")
    (tmp_path / "neg.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    cfg = stage_config("quality")
    c = dataclasses.replace(cfg.classifier, positive=str(tmp_path / "pos.txt"), negative=str(tmp_path / "neg.txt"))
    c4 = dataclasses.replace(cfg.c4, bad_words_file=str(tmp_path / "words.txt"))
    assert _check("quality", dataclasses.replace(cfg, classifier=c, c4=c4)) == [
        ("c4.bad_words_file", f"'{tmp_path}/words.txt' does not exist"),
        ("classifier.negative", f"'{tmp_path}/neg.txt' is not a UTF-8 text file: it does not decode as UTF-8 "
                                "(invalid continuation byte at byte 3)"),
    ]
    # A given model replaces the samples (they are not read, so not checked) and must be a fastText model.
    given = dataclasses.replace(c, model_path=str(tmp_path / "pos.txt"), negative=str(tmp_path / "gone.txt"))
    assert _check("quality", dataclasses.replace(cfg, classifier=given)) == [
        ("classifier.model_path", f"'{tmp_path}/pos.txt' is not a fastText model: it starts with b'a good sample\\n'")]
    off = dataclasses.replace(given, enabled=False)
    assert _check("quality", dataclasses.replace(cfg, classifier=off)) == []


def test_tokenize_needs_a_tokenizer_json_in_a_given_dir(tmp_path):
    cfg = stage_config("tokenize")
    assert _check("tokenize", cfg) == []  # tokenizer: null, trained by the stage
    assert _check("tokenize", dataclasses.replace(cfg, tokenizer=str(tmp_path))) == [
        ("tokenizer", f"'{tmp_path}' has no tokenizer.json")]
    (tmp_path / "tokenizer.json").write_text("{}")
    assert _check("tokenize", dataclasses.replace(cfg, tokenizer=str(tmp_path))) == []


@pytest.mark.parametrize("stage", ["sft", "align"])
def test_training_data_files_and_local_datasets(stage, tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "chosen": "a", "rejected": "b"}
    (tmp_path / "good.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "good.jsonl.gz").write_bytes(gzip.compress(json.dumps(record).encode() + b"\n"))
    (tmp_path / "bad.parquet").write_text("prompt,chosen\n")
    (tmp_path / "pairs.json").write_text(json.dumps(record) + "\n")
    cfg = stage_config(stage)
    data = dataclasses.replace(cfg.data, source="files", files=(f"{tmp_path}/good.*", f"{tmp_path}/bad.parquet",
                                                                f"{tmp_path}/pairs.json", f"{tmp_path}/none*.jsonl"))
    problems = _check(stage, dataclasses.replace(cfg, data=data))
    expected = [("data.files", f"'{tmp_path}/bad.parquet' is not a Parquet file: it starts with b'prompt,chosen\\n'")]
    if stage == "sft":  # sft reads .jsonl, .jsonl.gz and .parquet; align also .json
        expected.append(("data.files", f"'{tmp_path}/pairs.json' has an unsupported type '.json' "
                                       "(expected .jsonl, .jsonl.gz, .parquet)"))
    expected.append(("data.files", f"'{tmp_path}/none*.jsonl' matches no file"))
    assert problems == expected
    local = dataclasses.replace(cfg.data, source="dataset", dataset=f"{tmp_path}/prefs")
    assert _check(stage, dataclasses.replace(cfg, data=local)) == [
        ("data.dataset", f"'{tmp_path}/prefs' does not exist (a local path; hub names do not start with / . or ~)")]
    hub = dataclasses.replace(cfg.data, source="dataset", dataset="org/prefs")
    assert _check(stage, dataclasses.replace(cfg, data=hub)) == []
