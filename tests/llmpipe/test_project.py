"""The project definition: the registry, and configs built from the shipped YAML for tests and benchmarks."""

import dataclasses

import pytest

from llmpipe.project import PROJECT, load_config, stage_config
from pipeline.errors import ConfigError


def test_registry_lists_the_stages_in_lifecycle_order():
    assert PROJECT.stage_names == ("ingest", "dedup", "quality", "pii", "decontaminate", "tokenize", "pretrain",
                                   "sft", "align", "quantize", "serve", "evaluate")
    assert set(PROJECT.shared) == {"model", "data"}


def test_stage_config_is_what_the_pipeline_runs():
    assert stage_config("dedup") == load_config("tiny").stages["dedup"]
    assert stage_config("dedup").threshold == 0.8  # conf/stage/dedup/default.yaml
    assert stage_config("dedup", "stage.dedup.threshold=0.7").threshold == 0.7
    # tiny.yaml relaxes quality rules for the embedded corpus; base keeps the published values
    assert stage_config("quality").c4.min_sentences is None
    assert stage_config("quality", conf="base").c4.min_sentences == 3


def test_stage_config_changes_go_through_the_config_checks():
    cfg = stage_config("dedup")
    assert dataclasses.replace(cfg, workers=1).workers == 1
    with pytest.raises(ValueError, match="threshold: must be in"):
        dataclasses.replace(cfg, threshold=2.0)


def test_unknown_stage_is_named():
    with pytest.raises(ConfigError, match=r"no stage 'dedupe' \(did you mean 'dedup'\?\)"):
        stage_config("dedupe")
