"""decontaminate: the n-gram hash, the stage end to end on Parquet shards (files of evaluation texts), the
lm-eval task path on a task built from local files, and its errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from llmpipe.project import stage_config
from pipeline.schema import Invalid
from pipeline.stage import StageContext
from stages.decontaminate import stage as decon
from stages.decontaminate.index import EvalTextError, build_index, file_texts, task_texts
from stages.decontaminate.ngrams import gram_hashes, word_hashes, words

DEFAULT = stage_config("decontaminate")  # conf/stage/decontaminate/default.yaml, as the tiny pipeline runs it

QUESTION = ("Which planet of the solar system has the longest day when measured against its own orbit "
            "around the sun, and by how many Earth days?")
SHORT = "What is the boiling point of pure water at sea level"  # 11 words: matched whole
TINY = "Name the capital city"  # 4 words: below min_words, skipped


def naive_hash(ws: list[str]) -> int:
    """The documented definition, in Python integers: sum(h(w_j) * BASE**(n-1-j)) mod 2**64."""
    base, total = 0x9E3779B97F4A7C15, 0
    for j, w in enumerate(ws):
        total += xxhash.xxh3_64_intdigest(w.encode()) * pow(base, len(ws) - 1 - j, 2**64)
    return total % 2**64


def test_gram_hashes_follow_the_documented_definition():
    ws = words("The Quick, brown fox -- jumps over the lazy dog; the QUICK brown fox!")
    assert ws[:3] == ["the", "quick", "brown"]
    grams = gram_hashes(word_hashes(ws), 3).tolist()
    assert grams == [naive_hash(ws[i:i + 3]) for i in range(len(ws) - 2)]
    assert grams[0] == grams[9]  # "the quick brown" twice, whatever the case and punctuation
    assert len(gram_hashes(word_hashes(ws[:2]), 3)) == 0


def write_shard(path: Path, texts: list[str | None]) -> None:
    ids = [f"doc{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "url": [f"https://x.test/{i}" for i in ids], "text": pa.array(texts, pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def run_stage(tmp_path: Path, cfg, shards: dict[str, list[str | None]]) -> tuple[dict, Path]:
    docs = tmp_path / "in"
    for name, texts in shards.items():
        write_shard(docs / f"{name}.parquet", texts)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="decontaminate", fingerprint="test", output_dir=out, inputs={decon.INPUT: docs})
    return decon.STAGE.run(cfg, ctx), out


def eval_file(tmp_path: Path, name: str, texts: list[str]) -> Path:
    path = tmp_path / "eval" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "answer": "x"}) + "\n" for t in texts))
    return path


def test_documents_sharing_an_ngram_are_moved_out_with_their_task_and_gram(tmp_path):
    quiz = eval_file(tmp_path, "planet_quiz", [QUESTION, SHORT, TINY])
    q = QUESTION.split()
    thirteen = " ".join(q[5:18])
    twelve = " ".join(q[5:17])
    shards = {
        "00000": [f"Intro text. {thirteen.upper()}!! More text after it.",  # 13 words in a row: contaminated
                  f"Intro text. {twelve} and then something else entirely.",  # 12 only: clean
                  None],  # no text: passes through
        "00001": [f"We ask: {SHORT.lower()}? Everyone knows it.",  # the short text whole: contaminated
                  f"{TINY}, please.",  # below min_words: never indexed
                  "Unrelated page about gardening and tomatoes."],
    }
    cfg = dataclasses.replace(DEFAULT, files=(str(quiz),), tasks=(), workers=1)
    metrics, out = run_stage(tmp_path, cfg, shards)

    assert metrics["docs_in"] == 6 and metrics["docs_out"] == 4 and metrics["contaminated_docs"] == 2
    assert metrics["contaminated.planet_quiz"] == 2
    assert metrics["eval_texts"] == 3 and metrics["eval_texts_too_short"] == 1
    removed = pa.concat_tables(pq.read_table(p) for p in sorted((out / "contaminated").glob("*.parquet")))
    assert removed.column("id").to_pylist() == ["doc0", "doc0"]  # the first of each shard
    assert removed.column(decon.TASK_COLUMN).to_pylist() == ["planet_quiz", "planet_quiz"]
    assert removed.column(decon.NGRAM_COLUMN).to_pylist() == [" ".join(words(thirteen)), " ".join(words(SHORT))]
    kept = pa.concat_tables(pq.read_table(p) for p in sorted((out / "documents").glob("*.parquet")))
    assert kept.num_rows == 4 and kept.column_names == ["id", "url", "text"]
    assert kept.column("text").to_pylist()[1] is None


def test_without_evaluation_texts_the_corpus_passes_unchanged(tmp_path, caplog):
    cfg = dataclasses.replace(DEFAULT, files=(), tasks=("heldout_ppl", "heldout_mc"), workers=1)
    assert cfg.standard_tasks == ()
    metrics, out = run_stage(tmp_path, cfg, {"00000": ["a b c", "d e f"]})
    assert metrics["docs_out"] == 2 and metrics["contaminated_docs"] == 0
    assert "no evaluation text" in caplog.text


LM_EVAL_TASK = """task: local_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_lm_eval_task_texts_are_the_prompt_and_the_gold_answer(tmp_path):
    data = tmp_path / "quiz.jsonl"
    records = [{"question": "Which gas do plants take in from the air to make their food during photosynthesis?",
                "choices": ["oxygen", "carbon dioxide", "nitrogen"], "label": 1}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_quiz.yaml").write_text(LM_EVAL_TASK.format(data=data))

    [(task, text)] = list(task_texts(["local_quiz"], include_path=tasks, include_defaults=False))
    assert task == "local_quiz"
    assert text.startswith("Question: Which gas") and text.endswith("Answer: carbon dioxide")
    index = build_index(iter([(task, text)]), ngram=13, min_words=8)
    page = "Quiz night! which gas do plants take in from the air to make their food during photosynthesis answer"
    assert index.match(words(page), {}) == ("local_quiz", " ".join(words(page)[2:15]))
    with pytest.raises(EvalTextError, match="does not know"):
        list(task_texts(["no_such_task_xyz"], include_path=tasks, include_defaults=False))


def test_bad_evaluation_files_and_settings_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"question": "no text here"}\n')
    with pytest.raises(EvalTextError, match=r"bad.jsonl line 2 has no string 'text' field \(keys: \['question'\]\)"):
        list(file_texts([str(bad)]))
    with pytest.raises(EvalTextError, match="stage.decontaminate.files: .*matches no file"):
        list(file_texts([str(tmp_path / "missing-*.jsonl")]))
    problems = decon.input_problems(dataclasses.replace(DEFAULT, files=(str(tmp_path / "nope.jsonl"),)))
    assert problems and problems[0][0] == "stage.decontaminate.files" and "nope.jsonl" in problems[0][1]
    with pytest.raises(Invalid, match="ngram"):
        dataclasses.replace(DEFAULT, ngram=0)
    with pytest.raises(Invalid, match="min_words"):
        dataclasses.replace(DEFAULT, min_words=20)


def test_the_evaluation_files_are_in_the_fingerprint(tmp_path):
    quiz = eval_file(tmp_path, "quiz", [QUESTION])
    cfg = dataclasses.replace(DEFAULT, files=(str(quiz),))
    before = decon.files_external(cfg)
    assert list(before) == [f"stage.decontaminate.files[{quiz}]"]
    eval_file(tmp_path, "quiz", [QUESTION, SHORT])
    assert decon.files_external(cfg) != before


def test_shipped_defaults_check_evaluates_tasks_with_13_grams():
    assert DEFAULT.ngram == 13 and DEFAULT.tasks == stage_config("evaluate").tasks
    assert DEFAULT.files == ("examples/data/eval-stdlib-quiz.jsonl",)  # conf/tiny.yaml; the default lists none
    assert stage_config("decontaminate", conf="llama-7b").files == ()
