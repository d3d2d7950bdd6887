"""The ingest stage, run through its real ``run(cfg, ctx)`` on WARC files written by warc_fixtures."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.schema import build, to_plain
from pipeline.stage import StageContext
from stages.common.shards import ShardResult, done_marker
from stages.ingest import stage as ingest
from stages.ingest.stage import (
    IngestConfig,
    InputNotFoundError,
    LanguageModelNotFoundError,
    NotAWarcError,
    RemoteInputError,
    detect_language,
    extract_text,
    input_state,
    normalize_text,
)
from tests.stages.ingest.warc_fixtures import (
    ARTICLE,
    FOOTER,
    NAV_ITEMS,
    build_fixture_set,
    html_page,
    html_response,
    write_warc,
)


@pytest.fixture
def fx(tmp_path):
    return build_fixture_set(tmp_path / "warcs")


def config(*inputs: str | Path, **changes) -> IngestConfig:
    """The shipped config (conf/stage/ingest/default.yaml) reading ``inputs``, with ``changes``."""
    return dataclasses.replace(stage_config("ingest"), input=tuple(str(i) for i in inputs), **changes)


def run_stage(tmp_path: Path, *inputs: str | Path, out: str = "out", **overrides) -> tuple[dict, StageContext]:
    ctx = StageContext(stage="ingest", fingerprint="test", output_dir=tmp_path / out, inputs={},
                       metrics_file=tmp_path / f"{out}-metrics.jsonl")
    cfg = config(*inputs, **{"workers": 1, **overrides})
    return ingest.run(cfg, ctx), ctx


def rows(ctx: StageContext) -> list[dict]:
    return [r for f in sorted(ctx.output("documents").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_every_record_is_counted_kept_or_dropped_with_its_reason(tmp_path, fx):
    metrics, ctx = run_stage(tmp_path, fx.mixed)
    expected = Counter(r.expect for r in fx.mixed_records if r.expect)
    kept = sum(r.expect is None for r in fx.mixed_records)
    assert metrics["docs_in"] == len(fx.mixed_records)
    assert metrics["docs_out"] == kept == 6
    assert {k.removeprefix("dropped_"): v for k, v in metrics.items() if k.startswith("dropped_")} == expected
    assert metrics["docs_per_s"] > 0 and metrics["bytes_per_s"] > 0 and metrics["shards"] == 1

    docs = {r["url"]: r for r in rows(ctx)}
    assert set(docs) == {r.url for r in fx.mixed_records if r.expect is None}
    # charsets: meta-only latin-1, a lying utf-8 header and an unknown label all decode correctly
    for url in ("https://example.com/cafe-meta", "https://example.com/cafe-lie"):
        assert "crème brûlée à côté" in docs[url]["text"]
    assert "semiaquatic mammal" in docs["https://example.com/bogus-charset"]["text"]
    assert "semiaquatic mammal" in docs["https://example.com/gzipped"]["text"]  # Content-Encoding undone


def test_columns_ids_and_hashes(tmp_path, fx):
    _, ctx = run_stage(tmp_path, fx.mixed)
    table = pq.read_table(ctx.output("documents") / "00000.parquet")
    assert table.column_names == list(ingest.COLUMNS)
    assert str(table.schema.field("language_score").type) == "double"
    for row in table.to_pylist():
        assert row["content_hash"] == hashlib.sha256(row["text"].encode()).hexdigest()
        assert re.fullmatch(r"[0-9a-f]{40}", row["id"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["date"])
        assert row["warc_file"] == str(fx.mixed)
        assert "\xa0" not in row["text"] and row["text"] == row["text"].strip()
    ids = [r["id"] for r in table.to_pylist()]
    assert len(set(ids)) == len(ids)
    # stable: a second run over the same file gives the same ids and texts
    _, again = run_stage(tmp_path, fx.mixed, out="again")
    assert [(r["id"], r["text"]) for r in rows(again)] == [(r["id"], r["text"]) for r in table.to_pylist()]


def test_truncated_gzip_keeps_the_records_before_the_cut(tmp_path, fx):
    metrics, ctx = run_stage(tmp_path, fx.truncated)
    assert metrics["docs_out"] == fx.truncated_kept == 3
    assert metrics["dropped_truncated"] == 1
    assert [r["url"] for r in rows(ctx)] == [f"https://trunc.example.com/{i}" for i in range(3)]


def test_garbage_record_header_keeps_the_records_before_it(tmp_path, fx):
    metrics, ctx = run_stage(tmp_path, fx.plain)
    assert metrics["docs_out"] == 2 and metrics["dropped_malformed"] == 1
    assert "https://plain.example.com/lost" not in {r["url"] for r in rows(ctx)}


def test_empty_file_is_an_empty_shard(tmp_path, fx):
    metrics, ctx = run_stage(tmp_path, fx.empty)
    assert metrics["docs_in"] == 0 and metrics["docs_out"] == 0
    table = pq.read_table(ctx.output("documents") / "00000.parquet")
    assert table.num_rows == 0 and table.column_names == list(ingest.COLUMNS)


def test_oversized_bodies_are_dropped(tmp_path, fx):
    def size(rec):  # what the stage sees: the body after Content-Encoding is undone
        return len(gzip.decompress(rec.body)) if ("Content-Encoding", "gzip") in rec.headers else len(rec.body)

    kept = [r for r in fx.mixed_records if r.expect is None]
    small = [r for r in kept if size(r) <= 1000]
    assert 0 < len(small) < len(kept)
    metrics, _ = run_stage(tmp_path, fx.mixed, max_record_bytes=1000)
    assert metrics["docs_out"] == len(small)
    assert metrics["dropped_too_large"] >= len(kept) - len(small)
    assert metrics["docs_in"] == len(fx.mixed_records)


def test_a_file_that_is_not_a_warc_fails_before_any_shard_runs(tmp_path, fx):
    with pytest.raises(NotAWarcError, match=re.escape(str(fx.not_warc))):
        run_stage(tmp_path, fx.folder / "crawl" / "*", fx.not_warc)
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_a_glob_matching_nothing_is_a_named_error(tmp_path, fx):
    pattern = str(fx.folder / "nowhere" / "*.warc.gz")
    with pytest.raises(InputNotFoundError, match=re.escape(pattern)):
        run_stage(tmp_path, fx.mixed, pattern)
    with pytest.raises(InputNotFoundError, match="missing.warc"):
        run_stage(tmp_path, fx.folder / "missing.warc")
    # planning must still work: the missing pattern shows up in the fingerprinted state
    assert [pattern, "missing"] in input_state(config(pattern))


def test_relative_inputs_resolve_against_the_working_directory(tmp_path, fx, monkeypatch):
    monkeypatch.chdir(fx.folder)
    metrics, ctx = run_stage(tmp_path, "crawl/*.warc.gz")
    assert metrics["shards"] == 3  # a-mixed, c-truncated, d-empty (b-plain is .warc)
    assert {r["warc_file"] for r in rows(ctx)} == {"crawl/a-mixed.warc.gz", "crawl/c-truncated.warc.gz"}


def test_a_folder_contributes_its_warc_files(tmp_path, fx):
    (fx.folder / "crawl" / "README.txt").write_text("not a WARC, not picked up")
    metrics, _ = run_stage(tmp_path, fx.folder / "crawl")
    assert metrics["shards"] == 4


def test_fsspec_urls_are_read(tmp_path, fx):
    metrics, ctx = run_stage(tmp_path, f"file://{fx.folder}/crawl/a-*.warc.gz")
    assert metrics["docs_out"] == 6
    assert all(r["warc_file"].startswith("file://") for r in rows(ctx))
    with pytest.raises(RemoteInputError, match="nosuchproto://bucket/x.warc.gz"):
        run_stage(tmp_path, "nosuchproto://bucket/x.warc.gz")


def test_external_state_follows_the_files(tmp_path, fx):
    cfg = config(fx.folder / "crawl" / "*.warc.gz", "s3://bucket/crawl/*.warc.gz")
    before = input_state(cfg)
    assert ["s3://bucket/crawl/*.warc.gz"] in before  # URLs: the URL only, no network
    assert [str(fx.mixed), fx.mixed.stat().st_size, fx.mixed.stat().st_mtime_ns] in before
    write_warc(fx.mixed, fx.mixed_records[:3])
    assert input_state(cfg) != before
    assert ingest.STAGE.external is input_state


def test_resume_skips_shards_marked_done(tmp_path, fx):
    out = tmp_path / "out"
    inputs = (fx.folder / "crawl" / "*",)
    # shard 00000 (a-mixed) is marked done by an earlier attempt: it must not be redone
    marker = done_marker(out, "00000")
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps(ShardResult(docs_in=1000, docs_out=900).to_json()))
    metrics, ctx = run_stage(tmp_path, *inputs)
    assert not (ctx.output("documents") / "00000.parquet").exists()
    assert metrics["docs_in"] == 1000 + 3 + 4  # done shard's counts + b-plain (2 + garbage) + c-truncated
    assert sorted(p.name for p in ctx.output("documents").glob("*.parquet")) == [
        "00001.parquet", "00002.parquet", "00003.parquet"]


def test_resume_redoes_only_unfinished_shards(tmp_path, fx):
    first, ctx = run_stage(tmp_path, fx.folder / "crawl" / "*")
    shards = sorted(ctx.output("documents").glob("*.parquet"))
    assert len(shards) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    # an attempt killed while shard 00002 was running: no output, no marker
    (ctx.output("documents") / "00002.parquet").unlink()
    done_marker(ctx.output_dir, "00002").unlink()
    second, _ = run_stage(tmp_path, fx.folder / "crawl" / "*")
    after = {p.name: p.stat().st_mtime_ns for p in ctx.output("documents").glob("*.parquet")}
    assert {n for n in after if after[n] != stamps.get(n)} == {"00002.parquet"}
    for key in ("docs_in", "docs_out", "dropped_truncated", "dropped_malformed"):
        assert second[key] == first[key]


def test_workers_give_the_same_documents(tmp_path, fx):
    _, one = run_stage(tmp_path, fx.folder / "crawl" / "*", out="one")
    metrics, two = run_stage(tmp_path, fx.folder / "crawl" / "*", out="two", workers=2)
    assert rows(one) == rows(two)
    progress = [json.loads(line) for line in (tmp_path / "two-metrics.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert progress[-1]["metrics"]["docs_in"] == metrics["docs_in"]


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_extraction_keeps_the_article_and_drops_the_navigation(extractor):
    html = html_page("River otters", ARTICLE)
    text = normalize_text(extract_text(html, extractor))
    for paragraph in ARTICLE:
        assert paragraph in text
    for boilerplate in (*NAV_ITEMS, FOOTER, "Related link"):
        assert boilerplate not in text


def test_extractor_is_configurable_through_the_stage(tmp_path, fx):
    metrics, ctx = run_stage(tmp_path, fx.mixed, extractor="trafilatura")
    assert metrics["docs_out"] == 6
    otters = next(r for r in rows(ctx) if r["url"] == "https://example.com/otters")
    assert ARTICLE[0] in otters["text"] and "Careers" not in otters["text"]


def test_normalize_text():
    assert normalize_text("a\xa0b  \n\n\n\n    indented\u2009x\t \n") == "a b\n\n    indented x"
    assert normalize_text("cafe\u0301") == "café"


@pytest.mark.parametrize("lang, text", [
    ("en", "The dog runs down the street and the cat sits on the roof, because it is not raining today."),
    ("de", "Der Hund läuft über die Straße und die Katze sitzt auf dem Dach, weil es nicht regnet."),
    ("fr", "Le chien court dans la rue et le chat est assis sur le toit, parce que il ne pleut pas."),
    ("es", "El perro corre por la calle y el gato está sentado en el tejado, porque no llueve con los amigos."),
    ("it", "Il cane corre per la strada e il gatto è seduto sul tetto, perché non piove con gli amici della casa."),
    ("nl", "De hond rent over de straat en de kat zit op het dak, omdat het niet regent en zij in de zon wil."),
    ("pt", "O cão corre pela rua e o gato está sentado no telhado, porque não chove e ele quer tomar sol."),
    ("ru", "Собака бежит по улице, а кошка сидит на крыше, потому что сегодня нет дождя."),
    ("zh", "狗在街上跑，猫坐在屋顶上，因为今天没有下雨。"),
    ("ja", "犬は通りを走り、猫は屋根の上に座っています。今日は雨が降っていないからです。"),
])
def test_language_detector(lang, text):
    detected, score = detect_language(text, None)
    assert detected == lang and 0.5 <= score <= 1.0


@pytest.mark.parametrize("text", ["Welcome!", "def f(x): return x * 2 + y ** 3 if a else b", "### $$$ @@@ !!! *** >>>",
                                  "1234 5678 9012 3456 7890 1234 5678 9012 3456 7890 1111"])
def test_language_detector_says_und_when_unsure(text):
    detected, score = detect_language(text, None)
    assert detected == "und" and 0.0 <= score < ingest.MIN_LANG_SCORE


# Per language, the share of tests/fixtures/multilingual's pages that must be recognised (measured: all).
LANGUAGE_ID_FLOOR = 0.95


def test_language_id_on_translated_documentation():
    """Man pages and gettext catalogs translated by people (tests/fixtures/multilingual), and English
    originals: each language is recognised on at least LANGUAGE_ID_FLOOR of its pages. The stop-word counter
    this replaced got 54% overall: 7 of 42 Spanish pages, none of ru, zh, ja, pl, ko."""
    from tests.fixtures.multilingual import load_pages

    pages = load_pages()
    docs = [(p["lang"], p["text"]) for p in pages] + [("en", p["en"]) for p in pages if p["locale"] == "de"]
    right: Counter = Counter()
    total: Counter = Counter()
    for lang, text in docs:
        total[lang] += 1
        right[lang] += detect_language(text, None)[0] == lang
    assert len(total) == 12 and min(total.values()) >= 30
    low = {lang: f"{right[lang]}/{n}" for lang, n in total.items() if right[lang] / n < LANGUAGE_ID_FLOOR}
    assert low == {}, low


def test_missing_language_model_is_a_named_error(tmp_path, fx):
    with pytest.raises(LanguageModelNotFoundError, match="no/such/lid.176.bin"):
        run_stage(tmp_path, fx.mixed, language_model=str(tmp_path / "no/such/lid.176.bin"))
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_a_fasttext_language_model_is_used_when_configured(tmp_path, fx):
    import fasttext

    german = "Der Hund läuft über die Straße und die Katze sitzt auf dem Dach weil es nicht regnet"
    lines = []
    for i in range(60):  # a toy language-id model, trained here: two labels, lid.176 style
        lines.append(f"__label__en {ARTICLE[i % 3]}")
        lines.append(f"__label__de {german} {i}")
    train = tmp_path / "lid.train"
    train.write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(train), epoch=20, minCount=1, thread=1, seed=1, verbose=0)
    model_path = tmp_path / "lid.toy.bin"
    model.save_model(str(model_path))
    _, ctx = run_stage(tmp_path, fx.truncated, language_model=str(model_path))
    docs = rows(ctx)
    assert docs and all(r["language"] == "en" and 0.5 < r["language_score"] <= 1.0 for r in docs)


def test_config_is_checked():
    shipped = to_plain(stage_config("ingest"))
    with pytest.raises(ConfigError, match=r"stage\.ingest\.extractor: 'lynx' is not one of"):
        build(IngestConfig, {**shipped, "extractor": "lynx"}, path="stage.ingest")
    with pytest.raises(ConfigError, match=r"stage\.ingest\.input: is empty: give at least one WARC path"):
        build(IngestConfig, {**shipped, "input": []}, path="stage.ingest")
    with pytest.raises(ConfigError, match=r"stage\.ingest\.extractr: unknown key \(did you mean 'extractor'\?\)"):
        build(IngestConfig, {**shipped, "extractr": "resiliparse"}, path="stage.ingest")
    cfg = stage_config("ingest")
    assert cfg.extractor == "resiliparse" and cfg.language_model is None


def test_input_takes_one_path_glob_or_url_as_well_as_a_list():
    shipped = to_plain(stage_config("ingest"))
    one = build(IngestConfig, {**shipped, "input": "s3://bucket/crawl/*.warc.gz"})
    assert one.input == ("s3://bucket/crawl/*.warc.gz",)
    assert one == build(IngestConfig, {**shipped, "input": ["s3://bucket/crawl/*.warc.gz"]})


def test_stage_declaration():
    stage = ingest.STAGE
    assert stage.inputs == () and stage.outputs == ("documents",)
    # the sources' weights are tokenize's business: changing one does not re-run the data stages
    assert stage.resumable and stage.unhashed == frozenset({"workers", "sources.*.weight"})


def test_one_input_is_one_source_named_after_the_data(tmp_path, fx):
    _, ctx = run_stage(tmp_path, fx.mixed)
    assert {r["source"] for r in rows(ctx)} == {stage_config("ingest").source} == {"embedded"}


def test_sources_tag_their_documents_and_go_source_by_source(tmp_path, fx):
    from stages.common.config import SourceConfig

    sources = {"web": SourceConfig(input=(str(fx.truncated), str(fx.mixed)), weight=3.0),
               "docs": SourceConfig(input=(str(fx.plain),), weight=1.0)}
    metrics, ctx = run_stage(tmp_path, sources=sources)
    by_shard = {f.stem: {r["source"] for r in pq.read_table(f).to_pylist()}
                for f in sorted(ctx.output("documents").glob("*.parquet"))}
    assert by_shard == {"00000": {"web"}, "00001": {"web"}, "00002": {"docs"}}  # web's files sorted, then docs'
    assert metrics["shards"] == 3
    [mixed] = [r["warc_file"] for r in rows(ctx) if r["url"].startswith("https://plain.")][:1]
    assert mixed == str(fx.plain)
    # the weights are not in ingest's fingerprint, the source names and inputs are
    heavier = {**sources, "docs": SourceConfig(input=(str(fx.plain),), weight=9.0)}
    renamed = {"web": sources["web"], "manuals": sources["docs"]}
    plans = [plan_payload(config(sources=s)) for s in (sources, heavier, renamed)]
    assert plans[0] == plans[1] != plans[2]


def plan_payload(cfg: IngestConfig) -> dict:
    from pipeline.plan import hashed_config

    return hashed_config(ingest.STAGE, cfg)


def test_sources_and_input_together_or_a_file_in_two_sources_are_errors(tmp_path, fx):
    from pipeline.schema import Invalid
    from stages.common.config import SourceConfig

    web = SourceConfig(input=(str(fx.mixed),), weight=1.0)
    with pytest.raises(Invalid, match="either input .* or sources"):
        config(fx.plain, sources={"web": web})
    twice = {"web": web, "copy": SourceConfig(input=(str(fx.folder / "crawl" / "a-*.warc.gz"),), weight=1.0)}
    with pytest.raises(InputNotFoundError, match=r"data.sources.copy.input: .*a-mixed.warc.gz is an input of source "
                                                 r"'web' too"):
        run_stage(tmp_path, sources=twice)
    problems = ingest.input_problems(config(sources={"web": SourceConfig(input=("/nope/*.warc",), weight=1.0)}))
    assert [key for key, _ in problems] == ["data.sources.web.input"]


def test_a_page_in_an_unusual_charset(tmp_path):
    page = html_page("Привет", ["Съешь же ещё этих мягких французских булок, да выпей чаю. " * 3], charset_meta=None)
    path = write_warc(tmp_path / "ru.warc.gz", [html_response("https://ru.example.com/", page,
                                                              charset_header="windows-1251", encoding="cp1251")])
    _, ctx = run_stage(tmp_path, path)
    (doc,) = rows(ctx)
    assert "французских булок" in doc["text"] and doc["language"] == "ru" and doc["language_score"] > 0.9


def test_heavy_libraries_are_not_imported_at_module_level():
    code = ("import sys, stages.ingest.stage; heavy = {'warcio', 'resiliparse', 'trafilatura', 'fasttext', 'pyarrow', "
            "'fsspec', 'py3langid'}; print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(ingest.__file__).parents[2])
    assert out.stdout.strip() == "[]"
