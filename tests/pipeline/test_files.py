"""pipeline/files.py: a file or directory appears complete under its final name, or not at all; a
directory with a manifest counts as complete only while its files match it."""

import json
import os

import pytest

from pipeline.files import (
    HASHES,
    MANIFEST,
    ManifestMismatch,
    atomic_path,
    hash_files,
    list_files,
    publish,
    read_manifest,
    set_aside,
    temp_sibling,
    verify_manifest,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kwargs", [{}, {"indent": 2}, {"indent": 2, "sort_keys": True, "default": str},
                                    {"ensure_ascii": False}])
def test_write_json_atomic_writes_exactly_what_json_writes(tmp_path, kwargs):
    data = {"b": [1, 2.5, None], "a": "é", "when": tmp_path}
    path = tmp_path / "sub" / "x.json"
    if "default" not in kwargs:
        data.pop("when")
    write_json_atomic(path, data, newline=True, **kwargs)
    assert path.read_text(encoding="utf-8") == json.dumps(data, **kwargs) + "\n"
    write_json_atomic(path, [1], fsync=False)
    assert path.read_bytes() == b"[1]" and not leftovers(path.parent)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert path.read_text() == "old" and not leftovers(tmp_path)


def test_a_directory_replaces_the_old_one_whole(tmp_path):
    dest = tmp_path / "model"
    for version in ("1", "2"):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / f"weights-{version}").write_text(version)
    assert sorted(p.name for p in dest.iterdir()) == ["weights-2"] and not leftovers(tmp_path)


def test_a_streamed_file_is_published_when_finished(tmp_path):
    dest = tmp_path / "deep" / "rows.bin"
    tmp = temp_sibling(dest)
    with open(tmp, "wb") as f:
        f.write(b"12")
        assert not dest.exists()
        f.write(b"34")
    publish(tmp, dest)
    assert dest.read_bytes() == b"1234" and not leftovers(dest.parent)


# ---------------------------------------------------------------- manifests


def a_checkpoint(folder):
    """A directory as a library's save leaves it: a few files, one in a subfolder."""
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(os.urandom(100_000))
    (folder / "state.json").write_text('{"step": 4}')
    (folder / "shards").mkdir()
    (folder / "shards" / "rank1.pt").write_bytes(b"x" * 5000)
    return folder


@pytest.mark.parametrize("algorithm", HASHES)
def test_a_manifest_lists_every_file_and_verifies_what_is_on_disk(tmp_path, algorithm):
    ckpt = a_checkpoint(tmp_path / "step4")
    assert read_manifest(ckpt) is None  # the save has not finished
    with pytest.raises(ManifestMismatch, match="no manifest: the save did not finish"):
        verify_manifest(ckpt)
    manifest = write_manifest(ckpt, meta={"step": 4}, algorithm=algorithm)
    assert list(manifest["files"]) == ["model.pt", "shards/rank1.pt", "state.json"] == list_files(ckpt)
    assert manifest["files"]["model.pt"]["size"] == 100_000 and manifest["hash"] == algorithm
    assert verify_manifest(ckpt) == read_manifest(ckpt) == manifest and manifest["meta"] == {"step": 4}
    (ckpt / "added later.txt").write_text("not covered, not a fault")
    verify_manifest(ckpt)


def test_hashes_split_among_processes_make_the_same_manifest(tmp_path):
    ckpt = a_checkpoint(tmp_path / "step4")
    whole = write_manifest(ckpt)
    names = list_files(ckpt)
    parts = [hash_files(ckpt, names[rank::2]) for rank in range(2)]  # as two ranks would
    assert write_manifest(ckpt, {**parts[1], **parts[0]}) == whole


@pytest.mark.parametrize("damage, message", [
    (lambda c: os.truncate(c / "model.pt", 4096), r"model.pt: 4096 bytes on disk, 100000 in the manifest"),
    (lambda c: (c / "shards" / "rank1.pt").unlink(), r"shards/rank1.pt: missing"),
    (lambda c: (c / "state.json").write_text('{"step": 5}'), r"state.json: its xxh3_128 hash differs"),
    (lambda c: (c / MANIFEST).write_text('{"version": 1, "files": {'), r"llmpipe_manifest.json: unreadable manifest"),
])
def test_a_damaged_directory_names_the_file_at_fault(tmp_path, damage, message):
    ckpt = a_checkpoint(tmp_path / "step4")
    write_manifest(ckpt)
    damage(ckpt)
    with pytest.raises(ManifestMismatch, match=message) as err:
        verify_manifest(ckpt)
    assert str(err.value.path).startswith(str(ckpt))


def test_sizes_alone_catch_a_truncation_without_reading(tmp_path):
    ckpt = a_checkpoint(tmp_path / "step4")
    write_manifest(ckpt)
    (ckpt / "state.json").write_text('{"step": 5}')  # same size, other bytes: only the hash sees it
    verify_manifest(ckpt, hashes=False)
    os.truncate(ckpt / "model.pt", 0)
    with pytest.raises(ManifestMismatch, match="0 bytes on disk"):
        verify_manifest(ckpt, hashes=False)


def test_a_directory_is_set_aside_not_deleted(tmp_path):
    ckpt = a_checkpoint(tmp_path / "step4")
    first = set_aside(ckpt)
    assert not ckpt.exists() and first.parent == tmp_path and first.name.startswith("step4.corrupt-")
    assert (first / "model.pt").stat().st_size == 100_000
    again = set_aside(a_checkpoint(tmp_path / "step4"), reason="incompatible", folder=tmp_path / "aside")
    assert again.parent == tmp_path / "aside" and again.name.startswith("step4.incompatible-")
    third = set_aside(a_checkpoint(tmp_path / "step4"))  # often within the first's second: a name of its own
    assert third != first and first.exists() and third.exists()
