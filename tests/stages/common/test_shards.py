"""stages/common/shards.py: shard in, shard out, resumable per shard."""

import json

import pytest

from stages.common.shards import ShardResult, ShardTask, done_marker, map_shards, shard_name


def count_shard(task: ShardTask) -> ShardResult:
    text = (task.output_dir / "in" / f"{task.source}.txt").read_text()
    (task.output_dir / "out").mkdir(exist_ok=True)
    (task.output_dir / "out" / f"{task.name}.txt").write_text(text.upper())
    words = text.split()
    result = ShardResult(docs_in=len(words), docs_out=len(words) - words.count("junk"), bytes_in=len(text))
    result.drops["junk"] = words.count("junk")
    return result


def _inputs(tmp_path, n=4):
    (tmp_path / "in").mkdir()
    for i in range(n):
        (tmp_path / "in" / f"s{i}.txt").write_text("a b junk c " * (i + 1))
    return [f"s{i}" for i in range(n)]


def test_map_shards_sums_results_and_writes_markers(tmp_path):
    sources = _inputs(tmp_path)
    total = map_shards(count_shard, sources, tmp_path, None, workers=2, desc="t")
    assert (total.docs_in, total.docs_out, total.drops["junk"]) == (40, 30, 10)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{shard_name(i)}.txt" for i in range(4)]
    assert json.loads(done_marker(tmp_path, "00002").read_text())["docs_in"] == 12
    metrics = total.metrics(seconds=2.0)
    assert metrics["dropped_junk"] == 10 and metrics["docs_per_s"] == 20.0


def test_resume_redoes_only_unfinished_shards_and_rates_count_only_new_work(tmp_path):
    sources = _inputs(tmp_path)
    map_shards(count_shard, sources, tmp_path, None, workers=1, desc="t")
    done_marker(tmp_path, "00001").unlink()
    (tmp_path / "out" / "00001.txt").unlink()
    (tmp_path / "out" / "00000.txt").write_text("kept")  # a finished shard is not redone
    total = map_shards(count_shard, sources, tmp_path, None, workers=1, desc="t")
    assert (tmp_path / "out" / "00000.txt").read_text() == "kept"
    assert (tmp_path / "out" / "00001.txt").exists()
    assert total.docs_in == 40  # everything, restored or redone
    assert total.metrics(seconds=1.0)["docs_per_s"] == 8  # only shard 1 (8 docs) was processed now


def test_in_an_array_task_only_the_named_phase_is_split(tmp_path, monkeypatch):
    """LLMPIPE_SHARD_SLICE=1/2@count: the map of phase 'count' takes shards 1 and 3 and ends the stage run;
    a map of another phase, or of none, runs over every shard."""
    from pipeline import sharding

    def folder(name):
        (tmp_path / name).mkdir()
        return tmp_path / name, _inputs(tmp_path / name)

    monkeypatch.setenv(sharding.ENV, "1/2@count")
    out, sources = folder("other")
    whole = map_shards(count_shard, sources, out, None, workers=1, desc="t", phase="other")
    assert whole.docs_in == 40 and sorted(p.stem for p in (out / "_shards").iterdir()) == [
        "00000", "00001", "00002", "00003"]
    out, sources = folder("none")
    assert map_shards(count_shard, sources, out, None, workers=1, desc="t").docs_in == 40
    out, sources = folder("count")
    with pytest.raises(sharding.SliceDone, match="array task 1 of 2 finished its 2 shard"):
        map_shards(count_shard, sources, out, None, workers=1, desc="t", phase="count")
    assert sorted(p.stem for p in (out / "_shards").iterdir()) == ["00001", "00003"]
