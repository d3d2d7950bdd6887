"""The embedded corpus builder: what it plants, that ingest reads it, that it is deterministic."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmpipe import corpus
from llmpipe.corpus import CorpusError, build_corpus, digest, iban_valid, jaccard, luhn_valid, shingles
from llmpipe.project import stage_config
from pipeline.stage import StageContext
from stages.ingest import stage as ingest

REPO = Path(corpus.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "embedded"
    stats = build_corpus(folder)
    return folder, stats


@pytest.fixture(scope="module")
def manifest(built):
    return json.loads((built[0] / "manifest.json").read_text())


@pytest.fixture(scope="module")
def ingested(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    ctx = StageContext(stage="ingest", fingerprint="test", output_dir=out, inputs={})
    cfg = stage_config("ingest", f"stage.ingest.input={built[0] / '*.warc.gz'}", "stage.ingest.workers=2")
    metrics = ingest.run(cfg, ctx)
    shards = sorted(ctx.output("documents").glob("*.parquet"))
    docs = {r["url"]: r for f in shards for r in pq.read_table(f).to_pylist()}
    return metrics, docs


def payloads(folder: Path) -> dict[str, bytes]:
    """url -> raw HTTP payload of every response record (Content-Encoding left as is)."""
    from warcio.archiveiterator import ArchiveIterator

    out = {}
    for path in sorted(folder.glob("*.warc.gz")):
        with open(path, "rb") as fh:
            for rec in ArchiveIterator(fh):
                if rec.rec_type == "response":
                    out[rec.rec_headers.get_header("WARC-Target-URI")] = rec.raw_stream.read()
    return out


def test_layout_and_figures(built, manifest):
    folder, stats = built
    assert sorted(p.name for p in folder.glob("*.warc.gz")) == [f"embedded-0000{i}.warc.gz" for i in range(4)]
    assert corpus.is_complete(folder)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert 300 <= stats["html_pages"] <= 600
    kinds = Counter(r["kind"] for r in manifest["records"])
    assert kinds["module"] > 150 and kinds["topic"] > 50
    assert kinds["junk"] == 40 and kinds["http_404"] == 10 and kinds["http_301"] == 3 and kinds["non_html"] >= 10
    assert len(manifest["records"]) == stats["records"]


def test_ingest_reads_the_corpus(manifest, ingested):
    metrics, docs = ingested
    kinds = Counter(r["kind"] for r in manifest["records"])
    assert metrics["shards"] == 4
    assert metrics["dropped_http_error"] == kinds["http_404"]
    assert metrics["dropped_http_redirect"] == kinds["http_301"]
    assert metrics["dropped_non_html"] == kinds["non_html"]
    assert metrics["dropped_non_response"] == len(manifest["records"]) + 4  # requests + one warcinfo a shard
    html_ok = [r for r in manifest["records"] if r["status"] == 200 and r["kind"] != "non_html"]
    assert len(docs) == len(html_ok)
    assert sum(len(d["text"]) for d in docs.values()) > 1_500_000
    latin1 = [r for r in manifest["records"] if r.get("encoding") == "iso-8859-1"]
    gzipped = [r for r in manifest["records"] if r.get("content_encoding") == "gzip"]
    assert latin1 and gzipped and all(docs[r["url"]]["text"] for r in latin1 + gzipped)
    # the site's navigation and footer are boilerplate: the extractor removes them
    assert not [u for u, d in docs.items() if "Cookie settings" in d["text"] or "Report a bug" in d["text"]]
    langs = Counter(d["language"] for u, d in docs.items() if not u.startswith("https://spam"))
    assert langs["en"] > 0.8 * len(docs) - 40


def test_exact_duplicates_are_byte_identical(built, manifest, ingested):
    bodies = payloads(built[0])
    dups = [r for r in manifest["records"] if r["kind"] == "exact_duplicate"]
    assert len(dups) >= 10
    for r in dups:
        assert r["url"] != r["duplicate_of"] and bodies[r["url"]] == bodies[r["duplicate_of"]]
        docs = ingested[1]
        assert docs[r["url"]]["content_hash"] == docs[r["duplicate_of"]]["content_hash"]


def test_near_duplicates_are_near(manifest, ingested):
    docs = ingested[1]
    near = [r for r in manifest["records"] if r["kind"] == "near_duplicate"]
    assert len(near) >= 10
    for r in near:
        a, b = docs[r["url"]]["text"], docs[r["near_duplicate_of"]]["text"]
        assert a != b
        assert 0.85 <= jaccard(shingles(a), shingles(b)) <= 0.95


def test_low_quality_pages_are_planted(manifest, ingested):
    docs = ingested[1]
    junk = [r for r in manifest["records"] if r["kind"] == "junk"]
    assert Counter(r["junk"] for r in junk) == {k: 8 for k in corpus.JUNK_KINDS}
    texts = {kind: [docs[r["url"]]["text"] for r in junk if r["junk"] == kind and r["url"] in docs]
             for kind in corpus.JUNK_KINDS}
    assert all(len(t.split()) <= 12 for t in texts["short"])
    for text in texts["repeated"]:
        lines = [line for line in text.splitlines() if line.strip()]
        assert Counter(lines).most_common(1)[0][1] >= 20
    for text in texts["symbols"]:
        assert sum(not c.isalnum() and not c.isspace() for c in text) > 0.5 * len(text.replace(" ", ""))
    for text in texts["keyword_stuffing"]:
        words = text.split()
        assert len(set(words)) < 0.2 * len(words)


def test_pii_is_planted_and_valid(manifest, ingested):
    docs = ingested[1]
    planted = [r for r in manifest["records"] if "pii" in r]
    assert len(planted) >= 20
    found = Counter()
    for r in planted:
        for kind, values in r["pii"].items():
            for value in values:
                assert value in docs[r["url"]]["text"], (kind, value)
                found[kind] += 1
                if kind == "credit_card":
                    assert luhn_valid(value) and len(re.sub(r"\D", "", value)) == 16
                elif kind == "iban":
                    assert iban_valid(value)
                elif kind == "email":
                    assert re.fullmatch(r"[\w.]+@[\w.-]+\.\w+", value)
                elif kind == "api_key":
                    assert value.startswith(("sk-", "AKIA", "ghp_"))
    assert set(found) == set(corpus.PII_KINDS)
    phones = [v for r in planted for v in r["pii"].get("phone", [])]
    assert len({re.sub(r"\d", "9", p) for p in phones}) >= 3  # several formats


def test_quality_samples(built, manifest):
    folder = built[0]
    pos = (folder / "quality" / "positive.txt").read_text().splitlines()
    neg = (folder / "quality" / "negative.txt").read_text().splitlines()
    assert len(pos) >= 300 and len(neg) >= 300
    assert all(line.strip() and "\t" not in line for line in pos + neg)
    assert len(set(pos)) == len(pos)
    page_modules, sample_modules = corpus.split_modules()
    assert not set(page_modules) & set(sample_modules)
    # length alone must not separate the classes
    mean = lambda lines: sum(len(x.split()) for x in lines) / len(lines)
    assert 0.3 < mean(neg) / mean(pos) < 3


def test_nothing_of_the_building_machine_leaks(built):
    leaks = [sys.prefix, sys.base_prefix, str(REPO)]
    home = os.path.expanduser("~")
    if len(home) > 5:
        leaks.append(home)
    host = socket.gethostname()
    if len(host) >= 8:
        leaks.append(host)
    for path in built[0].glob("*.warc.gz"):
        data = gzip.decompress(path.read_bytes())
        for leak in leaks:
            assert leak.encode() not in data, (path.name, leak)
        assert not re.search(rb"at(\s|&nbsp;)0x[0-9a-f]{6,}", data)


def test_building_again_is_a_no_op(built):
    folder, _ = built
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    stats = build_corpus(folder)
    assert stats["version"] == corpus.CORPUS_VERSION
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps


def test_a_folder_holding_other_files_is_not_overwritten(tmp_path):
    folder = tmp_path / "embedded"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a corpus"):
        build_corpus(folder)
    assert (folder / "precious.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_planted_value_generators():
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83WEST12345698765432")
    assert iban_valid(corpus.iban("DE", "370400440532013000"))


@pytest.mark.integration
def test_two_builds_are_byte_identical(built, tmp_path):
    """A second build, in another process with another hash seed and working directory."""
    other = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "llmpipe.corpus", str(other)], check=True, cwd=tmp_path, env=env,
                   capture_output=True)
    assert digest(other) == digest(built[0])
