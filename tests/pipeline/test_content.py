import os

import pytest

from pipeline import content


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPIPE_CACHE_DIR", str(tmp_path / "cache"))


def test_a_file_is_known_by_its_bytes_not_its_name_or_date(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"x": 1}\n')
    b.write_text('{"x": 1}\n')
    first = content.content_digest(a)
    assert first.startswith("xxh3_128:") and content.content_digest(b) == first
    os.utime(a, ns=(1, 1))  # touched: same bytes
    assert content.content_digest(a) == first
    with a.open("a") as f:
        f.write('{"x": 2}\n')
    assert content.content_digest(a) != first
    assert content.content_digest(tmp_path / "none") == content.MISSING


def test_a_dir_digest_covers_names_and_bytes_and_skips_hidden_entries(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"\0" * 100)
    first = content.content_digest(model)
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")
    assert content.content_digest(model) == first
    (model / "sub" / "w.bin").rename(model / "sub" / "v.bin")
    assert content.content_digest(model) != first


def test_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"1" * 1000)
    first = content.content_digest(path)
    reads = []
    monkeypatch.setattr(content, "file_hash", lambda *a: reads.append(a) or "x")
    assert content.content_digest(path) == first and reads == []  # from the cache
    path.write_bytes(b"2" * 1000)  # same size, new mtime
    assert content.content_digest(path) == "xxh3_128:x" and len(reads) == 1


def test_an_unusable_cache_costs_speed_not_correctness(tmp_path, monkeypatch):
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("LLMPIPE_CACHE_DIR", str(tmp_path / "blocked"))
    path = tmp_path / "f.txt"
    path.write_text("hello")
    assert content.content_digest(path).startswith("xxh3_128:")
