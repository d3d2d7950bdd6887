"""Every file in conf/ composes and validates; bad configs fail before anything runs; the shipped YAML is
the one source of default values."""

import dataclasses
import typing
from pathlib import Path

import pytest

from llmpipe.project import PROJECT
from pipeline import config
from pipeline.errors import ConfigError
from pipeline.fingerprint import fingerprint
from pipeline.plan import make_plan
from pipeline.schema import build, field_paths, key_of, to_plain

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
    # `phases` (per-phase resources) exists only per stage
    assert {key_of(f) for f in dataclasses.fields(config.SlurmResources)} - {"phases"} <= set(slurm["slurm"])


def test_llama_7b_resolves_on_a_cpu_machine():
    cfg = load("llama-7b")
    assert cfg.shared["model"].hidden_size == 4096
    assert cfg.stages["pretrain"].model.num_layers == 32  # interpolated from the model group


def test_unknown_stage_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=r"stage\.dedup\.treshold: unknown key \(did you mean 'threshold'\?\)"):
        load("tiny", "+stage.dedup.treshold=0.5")


def test_typo_without_plus_gets_the_same_error_as_with_it():
    """Hydra would advise "+stage.dedup.treshold=0.5", adding the typo; the schema names the right key."""
    with pytest.raises(ConfigError) as with_plus:
        load("tiny", "+stage.dedup.treshold=0.5")
    with pytest.raises(ConfigError) as without:
        load("tiny", "stage.dedup.treshold=0.5")
    assert str(without.value) == str(with_plus.value)
    assert "To append" not in str(without.value)


@pytest.mark.parametrize(("override", "expected"), [
    ("stage.dedup.threshold.x=1", "stage.dedup.threshold.x: unknown key (stage.dedup.threshold is a float value, "
                                  "not a block of keys)"),
    ("stage.dedup.lsh_weights.x=1", "stage.dedup.lsh_weights.x: unknown key (stage.dedup.lsh_weights is a "),
    ("stage.quantize.calibraton.samples=4", "stage.quantize.calibraton: unknown key (did you mean 'calibration'?)"),
    ("stage.dedp.threshold=0.5", "stage.dedp: unknown stage (did you mean 'dedup'?)"),
    ("modle.hidden_size=64", "modle: unknown top-level key (did you mean 'model'?)"),
    ("~stage.dedup.treshold", "stage.dedup.treshold: unknown key (did you mean 'threshold'?)"),
])
def test_override_of_a_key_the_schema_lacks_is_named(override, expected):
    with pytest.raises(ConfigError) as err:
        load("tiny", override)
    assert expected in str(err.value)


def test_every_unknown_override_key_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load("tiny", "stage.dedup.treshold=0.5", "stage.tokenize.seq_length=64")
    assert "stage.dedup.treshold: unknown key" in str(err.value)
    assert "stage.tokenize.seq_length: unknown key (did you mean 'seq_len'?)" in str(err.value)


def test_override_of_a_known_key_the_config_lacks_keeps_hydras_advice():
    """Inside a free-form mapping the key is fine: `+` is the right advice there."""
    with pytest.raises(ConfigError, match=r"To append to your config use \+cluster\.env\.FOO=bar"):
        load("tiny", "cluster.env.FOO=bar")
    assert load("tiny", "+cluster.env.FOO=bar").cluster.env["FOO"] == "bar"


def test_unknown_stage_and_top_level_key():
    with pytest.raises(ConfigError, match=r"stage\.dedp: unknown stage \(did you mean 'dedup'\?\)"):
        load("tiny", "+stage.dedp.threshold=1")
    with pytest.raises(ConfigError, match=r"trackin: unknown top-level key \(did you mean 'tracking'\?\)"):
        load("tiny", "+trackin.uri=x")


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"stage\.dedup\.threshold: expected a number, got 'fast'"):
        load("tiny", "stage.dedup.threshold=fast")
    with pytest.raises(ConfigError, match=r"stage\.dedup\.hashfunc: 'md5' is not one of"):
        load("tiny", "stage.dedup.hashfunc=md5")


def test_override_of_missing_key_and_unknown_config_name():
    with pytest.raises(ConfigError, match="run.nope"):
        load("tiny", "run.nope=1")
    with pytest.raises(ConfigError, match="no top-level config 'tinyy'.*did you mean 'tiny'"):
        load("tinyy")


@pytest.mark.parametrize(("override", "line"), [
    ("stage.ingest.max_record_bytes=0", "stage.ingest.max_record_bytes: must be positive, got 0"),
    ("stage.dedup.threshold=1.5", "stage.dedup.threshold: must be in (0, 1], got 1.5"),
    ("stage.dedup.bands=4", "stage.dedup: bands (4) and rows (None) must both be set or both be null"),
    ("stage.quality.gopher.max_bullet_lines_ratio=2", "stage.quality.gopher.max_bullet_lines_ratio: must be a "
                                                      "fraction in [0, 1], got 2.0"),
    ("stage.quality.classifier.threshold=1.5", "stage.quality.classifier.threshold: must be a probability in [0, 1], "
                                               "got 1.5"),
    ("stage.pii.secret.min_length=0", "stage.pii.secret.min_length: must be >= 1, got 0"),
    ("stage.pii.phone.regions=[XX]", "stage.pii.phone.regions: 'XX' is not a region libphonenumber knows"),
    ("stage.tokenize.validation_fraction=1.0", "stage.tokenize.validation_fraction: must be in [0, 1), got 1.0"),
    ("stage.quantize.calibration.samples=0", "stage.quantize.calibration.samples: must be at least 1, got 0"),
    ("stage.quantize.perplexity.seq_len=1", "stage.quantize.perplexity.seq_len: must be at least 2, got 1"),
    ("stage.quantize.bits=5", "stage.quantize.bits: must be one of "),
    ("stage.serve.bench.concurrency=0", "stage.serve.bench.concurrency: must be >= 1, got 0"),
    ("stage.serve.port=70000", "stage.serve.port: 70000 is not a TCP port (1-65535)"),
    ("stage.evaluate.heldout.choices=1", "stage.evaluate.heldout.choices: must be at least 2"),
    ("stage.evaluate.batch_size=0", "stage.evaluate.batch_size: must be at least 1, got 0"),
    ("model.num_kv_heads=3", "model.num_heads: 8 is not a multiple of num_kv_heads (3)"),
])
def test_value_errors_name_their_key_path_once(override, line):
    """The schema walker prefixes the key path; the config classes write only their own field names."""
    with pytest.raises(ConfigError) as err:
        load("tiny", override)
    lines = str(err.value).split("\n  ")[1:]
    ours = [x for x in lines if x.startswith(line)]
    assert ours, f"no line starts with {line!r} in:\n{err.value}"
    key = line.partition(":")[0]
    assert ours[0].count(key.split(".")[0] + ".") == 1, f"the key path is repeated: {ours[0]}"


@pytest.mark.parametrize(("override", "expected"), [
    ("stage.ingest.input=/data/crawl/*.warc.gz", ("/data/crawl/*.warc.gz",)),
    ("stage.ingest.input=[a.warc.gz,b.warc.gz]", ("a.warc.gz", "b.warc.gz")),
    ("data.warc=/data/crawl/*.warc.gz", ("/data/crawl/*.warc.gz",)),
])
def test_input_globs_take_one_string_or_a_list(override, expected):
    cfg = load("tiny", override)
    assert cfg.stages["ingest"].input == expected
    if override.startswith("data."):
        assert cfg.shared["data"].warc == expected


def test_one_string_input_has_the_fingerprint_of_its_one_item_list(tmp_path):
    """The opt-in is in the schema: the validated value, and so the fingerprint, is the same tuple."""
    one = make_plan(load("tiny", f"run.root={tmp_path}", "stage.ingest.input=x/*.warc.gz"), PROJECT)
    listed = make_plan(load("tiny", f"run.root={tmp_path}", "stage.ingest.input=[x/*.warc.gz]"), PROJECT)
    assert one.stages["ingest"].fingerprint == listed.stages["ingest"].fingerprint
    assert fingerprint(one.stages["ingest"].payload) == fingerprint(listed.stages["ingest"].payload)


def test_other_lists_still_reject_a_string():
    with pytest.raises(ConfigError, match=r"stage\.pii\.phone\.regions: expected a list, got 'US'"):
        load("tiny", "stage.pii.phone.regions=US")


# --- one source of defaults -----------------------------------------------------------------------------------


def _schema_classes(tp, key, seen):
    """(dataclass, key path) for ``tp`` and every dataclass reachable through its field types."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if tp in seen:
            return
        seen[tp] = key
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            _schema_classes(hints[f.name], f"{key}.{key_of(f)}", seen)
    elif origin is not None:
        for arg in args:
            _schema_classes(arg, key, seen)


def project_config_classes():
    seen = {}
    for group, cls in PROJECT.shared.items():  # first, so that ModelConfig's fields read model.x
        _schema_classes(cls, group, seen)
    for stage in PROJECT.stages:
        _schema_classes(stage.config, f"stage.{stage.name}", seen)
    return seen


def test_project_configs_declare_no_defaults():
    """conf/ is the only source of default values: a project config dataclass declares none (kw_only, so
    that a field without a default may follow any other). Configs built in Python start from the YAML:
    ``llmpipe.project.stage_config("dedup", "stage.dedup.threshold=0.7")``, then ``dataclasses.replace``."""
    problems = []
    for cls, key in project_config_classes().items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                problems.append(f"{key}.{key_of(f)} ({cls.__module__}.{cls.__qualname__}.{f.name}) has a default")
            elif f.init and not f.kw_only:
                problems.append(f"{key}.{key_of(f)} ({cls.__module__}.{cls.__qualname__}.{f.name}) is not kw_only")
    assert problems == [], "\n".join(problems)


# The orchestrator's own sections keep defaults (the toy test projects rely on them), so they must equal what
# the shipped YAML gives: run from base.yaml, tracking and cluster from the options base picks (local), and the
# Slurm block from cluster/slurm.yaml, the option that sets it. SlurmResources (cluster.slurm.stages.<stage>)
# defaults to null, "take cluster.slurm's value", and no shipped YAML gives it other values.
ORCHESTRATOR_YAML = [("run", config.RunConfig, ()), ("tracking", config.TrackingConfig, ()),
                     ("cluster", config.ClusterConfig, ()), ("cluster.slurm", config.SlurmConfig, ("cluster=slurm",))]


def _default_mismatches(cls, data, key):
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        name = key_of(f)
        if name not in data or dataclasses.is_dataclass(hints[f.name]):
            continue  # a nested block is compared as its own row of ORCHESTRATOR_YAML
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        shipped = to_plain(build(hints[f.name], data[name], path=f"{key}.{name}"))
        if to_plain(default) != shipped or type(to_plain(default)) is not type(shipped):
            out.append(f"{key}.{name}: the dataclass says {default!r}, the shipped YAML {data[name]!r}")
    return out


@pytest.mark.parametrize("name", ["base", "tiny"])
def test_orchestrator_defaults_equal_the_shipped_yaml(name):
    mismatches = []
    for key, cls, overrides in ORCHESTRATOR_YAML:
        data = config.compose(CONF, name, list(overrides))
        for part in key.split("."):
            data = data[part]
        mismatches += _default_mismatches(cls, data, key)
    assert mismatches == [], "\n".join(mismatches)


def test_orchestrator_default_comparison_reports_every_mismatch_with_its_key():
    data = {"root": "runs", "only": [], "from": "sft", "force": [], "lock_wait_s": 60, "keep_going": True}
    assert _default_mismatches(config.RunConfig, data, "run") == [
        "run.from: the dataclass says None, the shipped YAML 'sft'",
        "run.lock_wait_s: the dataclass says 86400.0, the shipped YAML 60",
    ]


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
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 250 is not divisible by num_heads \(8\)"):
        load("tiny", "model.hidden_size=250")
