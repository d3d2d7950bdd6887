"""Data stages' ``workers``: a number, or null for the CPUs of the allocation or of the machine
(stages/common/shards.py)."""

from __future__ import annotations

import os

import pytest

from llmpipe.project import load_config, stage_config
from pipeline.errors import ConfigError
from stages.common.shards import ALLOCATION_ENV, available_cpus, map_shards, resolve_workers
from tests.stages.common.test_shards import _inputs, count_shard

DATA_STAGES = ("ingest", "dedup", "quality", "pii", "decontaminate", "tokenize")


def test_null_takes_the_allocation_then_the_machine(monkeypatch):
    monkeypatch.setenv(ALLOCATION_ENV, "16")
    assert available_cpus() == (16, ALLOCATION_ENV) and resolve_workers(None) == 16
    assert resolve_workers(3) == 3  # a number is taken as given
    monkeypatch.delenv(ALLOCATION_ENV)
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert resolve_workers(None) == mine >= 1
    for junk in ("", "0", "two"):  # not a CPU count: the machine's
        monkeypatch.setenv(ALLOCATION_ENV, junk)
        assert resolve_workers(None) == mine


def test_map_shards_with_null_workers_counts_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOCATION_ENV, "2")
    totals = []
    for name, workers in (("null", None), ("one", 1)):
        (tmp_path / name).mkdir()
        sources = _inputs(tmp_path / name)
        totals.append(map_shards(count_shard, sources, tmp_path / name, None, workers=workers, desc="t").to_json())
    assert totals[0] == totals[1]


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_every_data_stage_takes_null_and_rejects_zero(stage):
    assert stage_config(stage, f"stage.{stage}.workers=null").workers is None
    with pytest.raises(ConfigError, match=rf"stage\.{stage}\.workers: must be at least 1, or null"):
        stage_config(stage, f"stage.{stage}.workers=0")


def test_workers_stay_execution_only_and_the_recipe_sizes_pools_from_the_allocation():
    from llmpipe.project import PROJECT

    assert all("workers" in PROJECT.stage(s).unhashed for s in DATA_STAGES)
    cluster = load_config("llama-7b")
    assert {s: cluster.stages[s].workers for s in DATA_STAGES} == dict.fromkeys(DATA_STAGES)
    tiny = load_config("tiny")
    assert {s: tiny.stages[s].workers for s in DATA_STAGES} == dict.fromkeys(DATA_STAGES, 2)
