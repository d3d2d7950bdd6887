"""bench/scale.py: its generated corpus, its memory sampler and its report arithmetic (fast), and one small
end-to-end run of every data stage on the generated input (integration: six stage processes, a few minutes)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench import data as bench_data
from bench import scale

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the corpus


def _jaccard(a: str, b: str) -> float:
    return bench_data.jaccard(bench_data.shingle_set(bench_data.norm_words(a)),
                              bench_data.shingle_set(bench_data.norm_words(b)))


def test_near_copy_lands_on_the_jaccard_it_reports():
    words = scale.Words(seed=3, size=20_000)
    rng = random.Random(5)
    for n_words in (150, 400, 900):
        original = scale.prose(words, rng, n_words)
        copy, j = scale.near_copy(original, rng, words.vocab[:5_000])
        assert 0.8 < j < 1.0
        assert _jaccard(scale.render(original), scale.render(copy)) == pytest.approx(j)
        assert [len(p) for p in copy] == [len(p) for p in original]  # words replaced, paragraphs kept


def test_prose_is_sentences_in_paragraphs_with_english_stop_words():
    words = scale.Words(seed=1, size=50_000)
    text = scale.render(scale.prose(words, random.Random(2), 2_000))
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 10
    assert all(p[0].isupper() and p.endswith(".") for p in paragraphs)
    tokens = text.split()
    assert len(tokens) == 2_000
    assert sum(t in ("the", "of", "and") for t in tokens) > 100  # the quality stage's English stop words


def test_generate_writes_every_size_as_a_prefix_of_one_stream(tmp_path):
    import pyarrow.parquet as pq

    from stages.common.shards import list_parquet
    from stages.ingest.stage import COLUMNS

    planted = scale.generate(tmp_path, [600, 1500], shard_docs=400, warc_share=0.1, warc_per_file=50)
    small, large = (list_parquet(tmp_path / f"docs-{n}") for n in (600, 1500))
    assert [p.name for p in small] == ["00000.parquet", "00001.parquet"]  # cut at 400 and at the size
    assert len(large) == 5 and all(a.samefile(b) for a, b in zip(small, large, strict=False))
    tables = [pq.read_table(p) for p in large]
    assert all(t.column_names == list(COLUMNS) for t in tables)
    assert sum(t.num_rows for t in tables) == planted[1500].docs == 1500
    assert planted[600].docs == 600 and planted[600].near_copies <= planted[1500].near_copies

    texts = {i: t for table in tables for i, t in zip(table.column("id").to_pylist(),
                                                       table.column("text").to_pylist(), strict=True)}
    p = planted[1500]
    assert p.near_copies > 0 and p.exact_copies > 0 and p.pii_docs > 0 and p.junk > 0
    assert p.exact_repeats >= p.exact_copies
    for copy, original in p.near_pairs:
        assert 0.8 < _jaccard(texts[original], texts[copy]) < 1.0
    evals = [json.loads(line)["text"] for line in (tmp_path / f"{scale.EVAL_TASK}.jsonl").read_text().splitlines()]
    assert len(evals) == scale.EVAL_TEXTS
    for doc_id in p.contaminated_ids:
        assert any(" ".join(e.split()) in " ".join(texts[doc_id].split()) for e in evals)

    assert p.warc_pages == 150 and p.warc_files == 4  # 60 pages: 50 + 10 (cut at the size), then 50 + 40
    assert p.warc_records == p.warc_pages + p.warc_files  # a warcinfo record per file
    assert sorted(f.name for f in (tmp_path / "warc-600").iterdir()) == ["scale-00000.warc.gz", "scale-00001.warc.gz"]

    again = scale.generate(tmp_path / "again", [600], shard_docs=400, warc_share=0.1, warc_per_file=50)
    assert again[600] == planted[600]
    assert pq.read_table(tmp_path / "again" / "docs-600" / "00001.parquet").equals(tables[1])


# ---------------------------------------------------------------- the memory sampler


HOLDER = """
import os, sys
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    block = b"x" * (200 << 20)  # written, so resident
    os.write(ready_w, b"1")
    sys.stdin.read()  # hold it until the test closes stdin
    os._exit(0)
os.read(ready_r, 1)
print("ready", flush=True)
sys.stdin.read()
os.wait()
"""


def test_the_sampler_counts_the_whole_process_tree():
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # the forked child holds its 200 MB now
        peak = scale.TreePeak()
        peak.sample(psutil.Process(proc.pid))
        root_only = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    mb = 2**20
    assert peak.processes == 2 and peak.samples == 1
    assert root_only < 150 * mb  # the parent alone does not hold the block...
    assert peak.rss_proc >= 200 * mb and peak.rss_tree >= 200 * mb + root_only  # ...the tree does
    assert peak.pss_tree >= 200 * mb  # private pages: all of them in the PSS sum


# ---------------------------------------------------------------- the report


def _run(stage: str, size: int, seconds: float, pss: float, proc: float) -> scale.Run:
    return scale.Run(stage, size, docs=size, seconds=seconds, cpu_seconds=seconds * 2, docs_per_s=size / seconds,
                     peak_rss_tree_mb=pss * 1.5, peak_pss_tree_mb=pss, peak_anon_tree_mb=pss, peak_rss_proc_mb=proc,
                     peak_anon_proc_mb=proc, maxrss_proc_mb=proc,
                     rss_before_mb=100, processes=3, samples=10, metrics={})


def test_growth_is_against_the_smallest_size_and_the_bound_is_a_fitted_line():
    runs = [_run("dedup", 200_000, 100.0, 700, 400), _run("dedup", 50_000, 20.0, 550, 300),
            _run("dedup", 100_000, 45.0, 600, 350)]
    g = scale.growth(runs)
    assert (g["from_size"], g["to_size"], g["docs_ratio"]) == (50_000, 200_000, 4.0)
    assert g["docs_per_s_ratio"] == pytest.approx(2000 / 2500)
    assert g["peak_pss_tree_ratio"] == pytest.approx(700 / 550)
    assert g["cpu_per_doc_ratio"] == pytest.approx((200 / 200_000) / (40 / 50_000))
    bound = scale.memory_bound(runs)["peak_pss_tree_mb"]
    assert bound["mb_per_100k_docs"] == pytest.approx(100.0)  # 500 MB + 100 MB per 100k docs, exactly
    assert bound["fixed_mb"] == pytest.approx(500.0) and bound["at_docs_mb"] == pytest.approx(1_500.0)
    assert scale.fit_line([(10, 3.0)]) == (3.0, 0.0)


def test_overrides_are_the_documented_ones(tmp_path):
    from llmpipe.project import stage_config

    work = tmp_path / "a work dir with spaces"
    cfgs = {s: stage_config(s, *scale.stage_overrides(s, work, 1000, 3, 0)) for s in scale.STAGES}
    assert all(c.workers == 3 for c in cfgs.values())
    assert cfgs["ingest"].input == (str(work / "warc-1000" / "*.warc.gz"),)
    assert cfgs["quality"].classifier.enabled is False
    assert cfgs["decontaminate"].files == (str(work / f"{scale.EVAL_TASK}.jsonl"),)
    assert cfgs["decontaminate"].tasks == ()
    assert cfgs["tokenize"].tokenizer_train_chars is None  # 0: the shipped null
    sampled = stage_config("tokenize", *scale.stage_overrides("tokenize", work, 1000, 1, 500))
    assert sampled.tokenizer_train_chars == 500


# ---------------------------------------------------------------- end to end


@pytest.mark.integration
def test_every_stage_runs_at_a_small_size_and_accepts_the_generated_input(tmp_path):
    import pyarrow.parquet as pq

    from stages.common.shards import list_parquet

    work, out = tmp_path / "work", tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--sizes", "1500", "--workers", "1",
                           "--shard-docs", "500", "--warc-pages-per-file", "60", "--keep", str(work),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True
    runs = {r["stage"]: r for r in result["runs"]}
    assert sorted(runs) == sorted(scale.STAGES)
    for stage, r in runs.items():
        assert r["size"] == 1500 and r["docs_per_s"] > 0 and r["samples"] >= 1, stage
        assert min(r["peak_rss_tree_mb"], r["peak_pss_tree_mb"], r["peak_anon_tree_mb"], r["maxrss_proc_mb"]) > 0, stage
        assert r["metrics"]["docs_out"] > 0, stage
    planted = json.loads((work / "planted-1500.json").read_text())
    assert runs["ingest"]["docs"] == planted["warc_records"]
    assert runs["ingest"]["metrics"]["docs_out"] == planted["warc_pages"] - planted["warc_pages"] // 40  # 404s

    dedup = runs["dedup"]["metrics"]
    assert dedup["dropped_exact"] == planted["exact_repeats"]  # every repeated text but one of each
    removed = {i for p in list_parquet(work / "out-dedup-1500" / "removed")
               for i in pq.read_table(p, columns=["id"]).column(0).to_pylist()}
    assert all(copy in removed or original in removed for copy, original in planted["near_pairs"])
    assert dedup["dropped_near"] >= planted["near_copies"]

    contaminated = {i for p in list_parquet(work / "out-decontaminate-1500" / "contaminated")
                    for i in pq.read_table(p, columns=["id"]).column(0).to_pylist()}
    assert planted["contaminated_ids"] and set(planted["contaminated_ids"]) <= contaminated
    assert runs["pii"]["metrics"]["docs_with_pii"] >= planted["pii_docs"]
    assert runs["quality"]["metrics"]["docs_dropped"] >= planted["junk"] // 2
    assert runs["tokenize"]["metrics"]["doc_tokens_train"] > 0
    assert "decontaminate_vs_quality" in result and "1500" in result["decontaminate_vs_quality"]
