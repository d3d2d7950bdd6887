"""pipeline/files.py: a file or directory appears complete under its final name, or not at all."""

import json

import pytest

from pipeline.files import atomic_path, publish, temp_sibling, write_json_atomic, write_text_atomic


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
