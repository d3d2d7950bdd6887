"""Every file in conf/ composes and validates; bad configs fail before anything runs."""

import dataclasses
from pathlib import Path

import pytest

from llmpipe.project import PROJECT
from pipeline import config
from pipeline.errors import ConfigError
from pipeline.schema import field_paths, key_of

CONF = Path(__file__).resolve().parents[2] / "conf"
TOP_LEVEL = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_FILES = sorted(p.relative_to(CONF) for p in CONF.glob("*/**/*.yaml"))


def load(name="tiny", *overrides):
    return config.load(PROJECT, CONF, name, list(overrides))


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_every_top_level_config_composes_and_validates(name):
    cfg = load(name)
    assert set(cfg.stages) == set(PROJECT.stage_names)


@pytest.mark.parametrize("path", GROUP_FILES, ids=str)
def test_every_group_option_composes_into_tiny(path):
    group, option = str(path.parent), path.stem
    cfg = load("tiny", f"{group}={option}")
    assert cfg.resolved  # validated against its schema inside load()


def _yaml_keys(data, prefix=""):
    keys = set()
    for k, v in data.items():
        p = f"{prefix}.{k}" if prefix else k
        keys.add(p)
        if isinstance(v, dict) and v:
            keys |= _yaml_keys(v, p)
    return keys


@pytest.mark.parametrize("path", sorted((CONF / "stage").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_yaml_lists_every_field_of_its_schema(path):
    """No defaults hidden in code: every field is visible (and overridable) in the YAML."""
    from omegaconf import OmegaConf

    stage = PROJECT.stage(path.parent.name)
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if "defaults" in data:  # a variant that extends another option of the group, which lists every field
        assert all((path.parent / f"{base}.yaml").is_file() for base in data["defaults"] if base != "_self_")
        return
    top = {key_of(f) for f in dataclasses.fields(stage.config)}
    assert top - set(data) == set(), f"{path} does not list {sorted(top - set(data))}"


def test_base_yaml_lists_every_orchestrator_field():
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(CONF / "base.yaml"), resolve=False)
    assert field_paths(config.RunConfig) <= _yaml_keys(base["run"])
    for group, cls in (("tracking", config.TrackingConfig), ("cluster", config.ClusterConfig)):
        data = OmegaConf.to_container(OmegaConf.load(CONF / group / "local.yaml"), resolve=False)
        assert {key_of(f) for f in dataclasses.fields(cls)} - {"slurm"} <= set(data)
    # The Slurm option lists every Slurm setting, and the per-stage override takes the same names.
    slurm = OmegaConf.to_container(OmegaConf.load(CONF / "cluster" / "slurm.yaml"), resolve=False)
    assert {key_of(f) for f in dataclasses.fields(config.ClusterConfig)} <= set(slurm)
    assert {key_of(f) for f in dataclasses.fields(config.SlurmConfig)} <= set(slurm["slurm"])
    assert {key_of(f) for f in dataclasses.fields(config.SlurmResources)} <= set(slurm["slurm"])


def test_llama_7b_resolves_on_a_cpu_machine():
    cfg = load("llama-7b")
    assert cfg.shared["model"].hidden_size == 4096
    assert cfg.stages["pretrain"].model.num_layers == 32  # interpolated from the model group


def test_unknown_stage_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=r"stage\.sft\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load("tiny", "+stage.sft.lrr=1e-4")


def test_unknown_stage_and_top_level_key():
    with pytest.raises(ConfigError, match=r"stage\.sftt: unknown stage \(did you mean 'sft'\?\)"):
        load("tiny", "+stage.sftt.lr=1")
    with pytest.raises(ConfigError, match=r"trackin: unknown top-level key \(did you mean 'tracking'\?\)"):
        load("tiny", "+trackin.uri=x")


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"stage\.sft\.lr: expected a number, got 'fast'"):
        load("tiny", "stage.sft.lr=fast")
    with pytest.raises(ConfigError, match=r"stage\.sft\.method: 'lorra' is not one of"):
        load("tiny", "stage.sft.method=lorra")


def test_override_of_missing_key_and_unknown_config_name():
    with pytest.raises(ConfigError, match="run.nope"):
        load("tiny", "run.nope=1")
    with pytest.raises(ConfigError, match="no top-level config 'tinyy'.*did you mean 'tiny'"):
        load("tinyy")


def test_run_root_is_relative_to_the_project_folder(tmp_path):
    cfg = load("tiny")
    assert cfg.root == (CONF.parent / "runs").resolve()
    assert load("tiny", f"run.root={tmp_path}").root == tmp_path


def test_execution_only_field_must_exist_in_schema():
    from tests.pipeline.toy import PROJECT as TOY

    bad = dataclasses.replace(TOY, stages=(dataclasses.replace(TOY.stages[0], unhashed=frozenset({"wokers"})),))
    with pytest.raises(ConfigError, match="'wokers'.*did you mean 'workers'"):
        config.check_project(bad)


def test_model_cross_field_check():
    with pytest.raises(ConfigError, match="hidden_size 250 is not divisible by model.num_heads 8"):
        load("tiny", "model.hidden_size=250")
