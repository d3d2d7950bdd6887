"""evaluate's local tasks from the user's files (heldout.source: files) instead of tokenize.heldout:
the same sampling, which input the config needs, the plan-time check of the files and their part in
the fingerprint; the stage end to end with no held-out split at all."""

from __future__ import annotations

import gzip
import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.common.benchmarks import MC_TASK, PPL_TASK
from stages.evaluate.stage import external_state, input_problems, needed_heldout, run
from stages.evaluate.tasks import HeldoutDataError, build_local_tasks
from tests.stages.model_fixtures import build_tiny_model, corpus_texts, write_documents

SHIPPED = stage_config("evaluate")  # conf/stage/evaluate/default.yaml
SMALL = replace(SHIPPED.heldout, docs=8, max_chars=400, context_words=12, continuation_words=4, choices=4, seed=0)


def from_files(*files: str | Path, **changes):
    return replace(SMALL, source="files", files=tuple(map(str, files)), **changes)


def evaluate_config(heldout=SMALL, **changes):
    return replace(SHIPPED, heldout=heldout, **changes)


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Documents of random words, so every continuation differs from every other."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 80))) for _ in range(n)]


def write_jsonl(path: Path, records: list[dict], gzipped: bool = False) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if gzipped:
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


def task_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / f"{name}.jsonl").read_bytes() for name in (PPL_TASK, MC_TASK)}


# ---------------------------------------------------------------- inputs, config


def test_needed_heldout_follows_the_source_and_the_tasks():
    assert needed_heldout(evaluate_config()) == ("tokenize.heldout",)
    assert needed_heldout(evaluate_config(tasks=("heldout_mc", "mmlu"))) == ("tokenize.heldout",)
    assert needed_heldout(evaluate_config(from_files("t.jsonl"))) == ()
    assert needed_heldout(evaluate_config(tasks=("mmlu", "hellaswag"))) == (), "no local task reads documents"


def test_shipped_default_reads_the_heldout_split():
    assert (SHIPPED.heldout.source, SHIPPED.heldout.files) == ("corpus", ())
    assert external_state(SHIPPED) is None and input_problems(SHIPPED) == []


@pytest.mark.parametrize("overrides, message", [
    (["heldout.source=files"], r"stage\.evaluate\.heldout\.files: is empty but source is 'files'"),
    (["heldout.files=[a.jsonl]"], r"stage\.evaluate\.heldout\.files: is set but source is 'corpus'"),
    (["heldout.source=heldout"], r"stage\.evaluate\.heldout\.source: 'heldout' is not one of"),
])
def test_bad_source_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        stage_config("evaluate", *(f"stage.evaluate.{o}" for o in overrides))


# ---------------------------------------------------------------- building the tasks from files


def test_files_with_ids_give_the_tasks_of_shards_with_the_same_documents(tmp_path):
    texts = varied_texts(30, seed=5)
    shards = write_documents(tmp_path / "shards", texts, shards=3)
    records = [{"id": f"doc-{i:05d}", "url": f"https://example.org/doc/{i}", "text": t} for i, t in enumerate(texts)]
    write_jsonl(tmp_path / "a.jsonl", records[:10])
    write_jsonl(tmp_path / "b.jsonl.gz", records[10:], gzipped=True)

    a = build_local_tasks(shards, tmp_path / "ta", SMALL)
    b = build_local_tasks(None, tmp_path / "tb", from_files(tmp_path / "*.jsonl*"))
    assert (b.docs_in, b.docs_used, b.dropped) == (a.docs_in, a.docs_used, a.dropped) == (30, SMALL.docs, {})
    assert task_bytes(b.include_path) == task_bytes(a.include_path)


def test_text_only_files_sample_independently_of_layout(tmp_path):
    texts = varied_texts(30, seed=6)
    write_jsonl(tmp_path / "one.jsonl", [{"text": t} for t in texts])
    (tmp_path / "split").mkdir()
    write_jsonl(tmp_path / "split" / "x.jsonl", [{"text": t} for t in texts[20:][::-1]])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[:20]}), tmp_path / "split" / "y.parquet")

    one = build_local_tasks(None, tmp_path / "t1", from_files(tmp_path / "one.jsonl"))
    split = build_local_tasks(None, tmp_path / "t2", from_files(tmp_path / "split" / "*"))
    assert one.docs_used == split.docs_used == SMALL.docs
    assert task_bytes(one.include_path) == task_bytes(split.include_path)
    ppl = [json.loads(line) for line in task_bytes(one.include_path)[PPL_TASK].decode().splitlines()]
    assert all(r["id"].startswith("text-") and r["url"] == "" for r in ppl)
    assert all(any(t.startswith(r["text"]) for t in texts) for r in ppl)
    # the sample follows the seed, as with shards
    reseeded = build_local_tasks(None, tmp_path / "t3", from_files(tmp_path / "one.jsonl", seed=1))
    assert task_bytes(reseeded.include_path)[MC_TASK] != task_bytes(one.include_path)[MC_TASK]


def test_repeated_short_and_textless_records_are_counted(tmp_path):
    texts = varied_texts(6, seed=7)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]
                       + [{"text": texts[0]}, {"text": "too short"}, {"title": "no text"}, {"text": 3}])
    built = build_local_tasks(None, tmp_path / "t", from_files(path))
    assert built.docs_in == 10 and built.docs_used == 6
    assert built.dropped == {"duplicate_id": 1, "too_short": 1, "null": 2}


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(HeldoutDataError, match=r"stage\.evaluate\.heldout\.files: '.*gone\.jsonl' matches no file"):
        build_local_tasks(None, tmp_path / "t", from_files(tmp_path / "gone.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(HeldoutDataError, match=r"bad\.jsonl, line 2: not a JSON object"):
        build_local_tasks(None, tmp_path / "t", from_files(tmp_path / "bad.jsonl"))
    write_jsonl(tmp_path / "few.jsonl", [{"text": varied_texts(1)[0]}])
    with pytest.raises(HeldoutDataError, match=r"heldout\.files \[.*few\.jsonl'\] give 1 usable document"):
        build_local_tasks(None, tmp_path / "t", from_files(tmp_path / "few.jsonl"))


# ---------------------------------------------------------------- preflight and fingerprint


def test_preflight_names_missing_and_unreadable_files(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "x"}])
    (tmp_path / "notes.txt").write_text("plain\n")
    assert input_problems(evaluate_config(from_files(good))) == []
    problems = input_problems(evaluate_config(from_files(tmp_path / "gone.jsonl", tmp_path / "notes.txt", good)))
    assert [key for key, _ in problems] == ["heldout.files", "heldout.files"]
    assert "gone.jsonl' matches no file" in problems[0][1]
    assert "notes.txt' has an unsupported type '.txt'" in problems[1][1]
    # no local task: the files are not read, so not checked
    assert input_problems(evaluate_config(from_files(tmp_path / "gone.jsonl"), tasks=("mmlu",))) == []


def test_external_state_follows_the_file_contents(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "first"}])
    cfg = evaluate_config(from_files(tmp_path / "*.jsonl"))
    state = external_state(cfg)
    assert list(state) == [f"heldout.files[{path}]"]
    path.touch()
    assert external_state(cfg) == state
    write_jsonl(path, [{"text": "second"}])
    assert external_state(cfg) != state
    assert external_state(evaluate_config(from_files(tmp_path / "gone.jsonl"))) == {
        f"heldout.files[{tmp_path / 'gone.jsonl'}]": "missing"}
    assert external_state(evaluate_config(from_files(path), tasks=("mmlu",))) is None


# ---------------------------------------------------------------- end to end


def test_stage_builds_its_local_tasks_from_files_without_a_heldout_split(tmp_path):
    model = build_tiny_model(tmp_path / "model", texts=corpus_texts(60))
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in varied_texts(12, seed=8)])
    cfg = evaluate_config(from_files(path), models=("pretrain",), bootstrap_iters=0)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="evaluate", fingerprint="files", output_dir=out, inputs={"pretrain.model": model},
                       log=logging.getLogger("test.evaluate"), metrics_file=out / "metrics.jsonl")
    metrics = run(cfg, ctx)
    assert metrics["heldout.docs_in"] == 12 and metrics["heldout.docs_used"] == SMALL.docs
    assert metrics["pretrain.heldout_ppl.word_perplexity"] > 1
    assert 0 <= metrics["pretrain.heldout_mc.acc"] <= 1
