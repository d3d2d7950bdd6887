"""Fast checks of bench/data.py's helpers: the generated corpora and the scoring (not the timings)."""

from __future__ import annotations

import gzip
import io
import random

import pytest

from bench import data as bench


def _pool(n: int = 1500, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


# ---------------------------------------------------------------- ingest corpus


def test_vary_html_changes_text_words_only():
    html = '<p class="definition">Returns the definition&hellip; of something</p><a href="/documentation">x</a>'
    mapping = {"definition": "teapots", "something": "elsewhere", "hellip": "broken", "documentation": "nope"}
    out = bench.vary_html(html, mapping)
    assert out == '<p class="definition">Returns the teapots&hellip; of elsewhere</p><a href="/documentation">x</a>'
    assert bench.vary_html(html, {}) == html


def test_copy_mapping_is_deterministic_and_copy_zero_is_the_original():
    vocab = [f"word{c}abc" for c in "abcdefghijklmnopqrstuvwxyz"]
    assert bench.copy_mapping(vocab, 0) == {}
    one = bench.copy_mapping(vocab, 1)
    assert one == bench.copy_mapping(vocab, 1)
    assert 0 < len(one) < len(vocab)  # about half the words
    assert one != bench.copy_mapping(vocab, 2)


def _write_source_warc(path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    page = "<html><body><main><p>Something interesting happened yesterday afternoon.</p></main></body></html>"
    responses = [
        ("https://a.test/utf8.html", "200 OK", [("Content-Type", "text/html; charset=utf-8")], page.encode()),
        ("https://a.test/latin.html", "200 OK", [("Content-Type", "text/html; charset=iso-8859-1")],
         page.replace("Something", "Caf\xe9 something").encode("iso-8859-1")),
        ("https://a.test/gz.html", "200 OK", [("Content-Type", "text/html"), ("Content-Encoding", "gzip")],
         gzip.compress(page.encode(), mtime=0)),
        ("https://a.test/missing", "404 Not Found", [("Content-Type", "text/html")], b"<p>nothing here</p>"),
        ("https://a.test/logo.png", "200 OK", [("Content-Type", "image/png")], b"\x89PNG\r\n\x1a\nrest"),
    ]
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for url, status, headers, body in responses:
            request = writer.create_warc_record(url, "request", http_headers=StatusAndHeaders(
                "GET / HTTP/1.1", [("Host", "a.test")], is_http_request=True))
            response = writer.create_warc_record(
                url, "response", payload=io.BytesIO(body), length=len(body),
                http_headers=StatusAndHeaders(status, [*headers, ("Content-Length", str(len(body)))],
                                              protocol="HTTP/1.1"))
            writer.write_request_response_pair(request, response)


def test_build_bench_warcs_copies_and_varies_every_record(tmp_path):
    from warcio.archiveiterator import ArchiveIterator

    from stages.ingest.stage import Skip, read_page

    src = tmp_path / "src"
    src.mkdir()
    _write_source_warc(src / "s-00000.warc.gz")
    warcs = bench.build_bench_warcs(src, tmp_path / "out", copies=3, files=2)
    assert warcs.pages == 3 * 3  # three 2xx HTML pages per copy
    assert warcs.records == 2 + 3 * 10  # a warcinfo per file, then 5 request/response pairs per copy

    pages, urls = {}, []
    for path in warcs.files:
        with open(path, "rb") as fh:
            for record in ArchiveIterator(fh, no_record_parse=True, arc2warc=False):
                urls.append(record.rec_headers.get_header("WARC-Target-URI"))
                try:
                    page = read_page(record, 10**6)  # the ingest stage's own parser accepts every copy
                except Skip:
                    continue
                pages[page.url] = page.html
    assert len(pages) == 9
    assert "https://c2.a.test/gz.html" in pages and "https://c1.a.test/latin.html" in pages
    assert "Café" in pages["https://c1.a.test/latin.html"]  # re-encoded in its declared charset
    originals = [pages[u] for u in pages if "://a.test" in u]
    assert any(pages[u] != pages[u.replace("://c1.", "://")] for u in pages if "://c1." in u)
    assert all("interesting" in h for h in originals)
    assert len(set(urls)) == 3 * 5 + 1  # per copy 5 URLs (request and response share one); warcinfo has none

    again = bench.build_bench_warcs(src, tmp_path / "again", copies=3, files=2)
    assert [p.read_bytes() for p in again.files] == [p.read_bytes() for p in warcs.files]


# ---------------------------------------------------------------- dedup corpus and scoring


def test_edited_copy_lands_in_the_requested_jaccard_range():
    rng = random.Random(0)
    words = " ".join(_pool(60)).split()
    vocab = sorted(set(words))
    for lo, hi in ((0.85, 0.98), (0.5, 0.7)):
        edited, j = bench.edited_copy(words, lo, hi, rng, vocab)
        exact = bench.jaccard(bench.shingle_set(bench.norm_words(" ".join(words))),
                              bench.shingle_set(bench.norm_words(" ".join(edited))))
        assert lo <= j <= hi
        assert exact == pytest.approx(j)


def test_exact_variant_normalises_to_the_same_words():
    words = "The quick brown fox jumps over the lazy dog".split()
    variant = bench.exact_variant(words, random.Random(1))
    assert variant != " ".join(words)
    assert bench.norm_words(variant) == bench.norm_words(" ".join(words))


def test_dedup_corpus_ground_truth_links_planted_copies_and_not_decoys():
    corpus = bench.make_dedup_corpus(_pool(), 400, seed=5)
    assert len(corpus.docs) == 400
    assert len({d["id"] for d in corpus.docs}) == 400
    kinds = [corpus.kind[d["id"]] for d in corpus.docs]
    assert kinds.count("near") == 40 and kinds.count("exact") == 12 and kinds.count("decoy") == 16
    clusters = bench.true_clusters(corpus)
    clustered = set().union(*clusters)
    for doc_id, kind in corpus.kind.items():
        if kind in ("near", "exact"):
            assert doc_id in clustered, (kind, corpus.base_jaccard[doc_id])
            assert corpus.base_jaccard[doc_id] >= 0.85
        if kind == "decoy":
            assert 0.5 <= corpus.base_jaccard[doc_id] <= 0.7
    assert sum(kinds.count(k) for k in ("near", "exact")) == sum(len(c) - 1 for c in clusters)


def test_score_counts_any_survivor_and_penalises_over_removal():
    clusters = [{"a", "b", "c"}, {"d", "e"}]
    perfect = bench.score({"a", "b", "e"}, clusters)
    assert perfect["recall"] == 1.0 and perfect["precision"] == 1.0
    whole = bench.score({"a", "b", "c", "x"}, clusters)  # all of a cluster plus an unrelated document
    assert whole["true_positives"] == 2
    assert whole["recall"] == pytest.approx(2 / 3)
    assert whole["precision"] == pytest.approx(2 / 4)


def test_row_ratios_and_verdicts():
    row = bench.Row("ingest", "pages/s", 600.0, 100.0, 5.0, ours_cpu=2.0, base_cpu=30.0)
    assert row.ratio == pytest.approx(6.0) and row.verdict == "PASS" and row.cpu_ratio == pytest.approx(15.0)
    assert bench.Row("dedup", "docs/s", 100.0, 60.0, 2.0).verdict == "FAIL"
    assert bench.Row("tokenize", "tokens/s", None, None, 1.0).verdict == "-"
