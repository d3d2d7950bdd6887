"""Compose the Hydra configuration and validate it into typed dataclasses before anything runs.

Top-level keys: ``run``, ``tracking`` and ``cluster`` belong to the orchestrator; ``stage.<name>``
to each registered stage; any group the project declares as shared (e.g. ``model``) to the
project. Anything else is an unknown key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import secrets
from pipeline.errors import ConfigError
from pipeline.schema import Invalid, build, field_paths, suggest, unknown_key
from pipeline.stage import FINAL_PHASE, Project


@dataclass(frozen=True)
class RunConfig:
    root: str = "runs"  # where stage outputs and the embedded MLflow store live; relative to the project folder
    only: tuple[str, ...] = ()  # run just these stages (and whatever they need that is not cached)
    from_: str | None = field(default=None, metadata={"key": "from"})  # force this stage and all its descendants
    force: tuple[str, ...] = ()  # re-run these stages even if their output exists
    lock_wait_s: float = 86400.0  # how long to wait for another run producing the same output
    keep_going: bool = True  # after a failure, still run stages that do not depend on it


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log runs to MLflow
    uri: str | None = None  # MLflow tracking URI; null: sqlite store under run.root; MLFLOW_TRACKING_URI wins
    experiment: str = "llmpipe"  # MLflow experiment name
    artifact_location: str | None = None  # for a new experiment; null: <run.root>/mlartifacts with the embedded store
    ui_host: str = "127.0.0.1"  # `llmpipe ui` binds here
    ui_port: int = 5000  # and on this port
    ui_workers: int = 2  # server processes of `llmpipe ui` (MLflow's default of 4 is heavy on a laptop)
    copy_models: bool = False  # copy a stage's logged model files into MLflow's artifact store (false: a reference)
    # logged model name -> registered model name: each new logged model of that name (a stage's, e.g. quantize)
    # gets a version of the registered model; {}: nothing is registered
    register_models: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlurmResources:
    """One stage's Slurm settings (``cluster.slurm.stages.<stage>``); null or empty: cluster.slurm's."""

    partition: str | None = None  # sbatch --partition
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    time_min: int | None = None  # wall-clock limit of each job, minutes
    nodes: int | None = None  # nodes per job; more than 1: the stage starts its ranks with srun (launch.py)
    gpus_per_node: int | None = None  # sbatch --gpus-per-node; 0: none
    cpus_per_task: int | None = None  # CPUs for the stage process (one task per node)
    mem_gb: float | None = None  # memory per node, GB
    array_tasks: int | None = None  # tasks of each job array of a stage with shard_phases; 1: no array
    container_image: str | None = None  # pyxis/enroot image for this stage's jobs
    signal_lead_s: int | None = None  # seconds between the time-limit signal and the limit (see SlurmConfig)
    sbatch: Mapping[str, str | int | bool] = field(default_factory=dict)  # extra sbatch options, over cluster.slurm's
    # Per phase of the stage (a name of its shard_phases, or "final": the job that commits): these settings over
    # the stage's, e.g. tokenize: {phases: {tokenizer: {cpus_per_task: 32, mem_gb: 256}}}.
    phases: Mapping[str, SlurmResources] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _resource_problems(self)
        problems += [(f"phases.{name}.phases", "a phase has no phases of its own")
                     for name, own in self.phases.items() if own.phases]
        Invalid.check(problems)


def _resource_problems(res: SlurmResources | SlurmConfig) -> list[tuple[str, str]]:
    """Bad values among the resource fields SlurmResources and SlurmConfig share (None: not set)."""
    problems = []
    for name in ("time_min", "nodes", "cpus_per_task", "array_tasks", "signal_lead_s"):
        value = getattr(res, name)
        if value is not None and value < 1:
            problems.append((name, f"must be at least 1, got {value}"))
    if res.gpus_per_node is not None and res.gpus_per_node < 0:
        problems.append(("gpus_per_node", f"must be 0 or more, got {res.gpus_per_node}"))
    if res.mem_gb is not None and res.mem_gb <= 0:
        problems.append(("mem_gb", f"must be positive, got {res.mem_gb}"))
    return problems


@dataclass(frozen=True)
class SlurmConfig:
    """How stages become Slurm jobs (cluster.executor=slurm). Never part of a stage's fingerprint."""

    partition: str | None = None  # sbatch --partition; null: the cluster's default partition
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    time_min: int = 60  # wall-clock limit of each job, minutes
    nodes: int = 1  # nodes per job
    gpus_per_node: int = 0  # sbatch --gpus-per-node; 0: none
    cpus_per_task: int = 2  # CPUs for the stage process (one task per node; data stages: also their pool)
    mem_gb: float | None = None  # memory per node, GB; null: the partition's default
    array_tasks: int = 4  # tasks of each job array of a stage with shard_phases; 1: run such stages as one job
    array_parallelism: int = 64  # at most this many tasks of one array run at once
    container_image: str | None = None  # pyxis/enroot image (sbatch --container-image); null: no container
    container_mounts: tuple[str, ...] = ()  # SRC:DST bind mounts into the container (the run root must be one)
    container_workdir: str | None = None  # working directory inside the container
    python: str | None = None  # interpreter on the nodes; null: the orchestrator's own (a shared venv)
    setup: tuple[str, ...] = ()  # shell lines run before the stage in every job (module load ..., source ...)
    sbatch: Mapping[str, str | int | bool] = field(default_factory=dict)  # extra sbatch options: {constraint: h100}
    requeue_timeouts: int = 3  # a resumable stage that hits its time limit is requeued (and resumes) this often
    # Slurm signals the job this long before its time limit (sbatch --signal=B:USR2@...): a training stage saves
    # at its next step boundary and stops, then the job is requeued and resumes from that step. Must hold a step
    # and a checkpoint save; Slurm may signal up to 60 s earlier.
    signal_lead_s: int = 600
    poll_s: float = 2.0  # seconds between two looks at the queue (one squeue for every job)
    stages: Mapping[str, SlurmResources] = field(default_factory=dict)  # per-stage overrides, by stage name

    def __post_init__(self) -> None:
        problems = _resource_problems(self)
        if self.array_parallelism < 1:
            problems.append(("array_parallelism", f"must be at least 1, got {self.array_parallelism}"))
        if self.requeue_timeouts < 0:
            problems.append(("requeue_timeouts", f"must be 0 or more, got {self.requeue_timeouts}"))
        if self.poll_s <= 0:
            problems.append(("poll_s", f"must be positive, got {self.poll_s}"))
        if not problems:
            problems += self._lead_problems()
        Invalid.check(problems)

    def _lead_problems(self) -> list[tuple[str, str]]:
        """signal_lead_s must fall inside the job's time limit, wherever either is set (cluster, stage, phase)."""
        places: list[tuple[str, SlurmResources | SlurmConfig, SlurmResources | SlurmConfig]] = [("", self, self)]
        for name, own in self.stages.items():
            places.append((f"stages.{name}.", own, self.for_stage(name)))
            places += [(f"stages.{name}.phases.{phase}.", mine, self.for_stage(name, phase))
                       for phase, mine in own.phases.items()]
        problems = []
        for key, own, res in places:
            if own is not self and own.signal_lead_s is None and own.time_min is None:
                continue  # the values it inherits were checked where they are set
            if res.signal_lead_s >= res.time_min * 60:
                problems.append((f"{key}signal_lead_s", f"{res.signal_lead_s} s is not below the job's time limit "
                                                        f"(time_min={res.time_min}: {res.time_min * 60} s); lower it "
                                                        "or raise time_min"))
        return problems

    def for_stage(self, name: str, phase: str | None = None) -> SlurmResources:
        """The effective settings of one stage, or of one phase's jobs: the phase's overrides over the
        stage's, over the cluster-wide values."""
        own = self.stages.get(name, SlurmResources())
        layers = [own.phases.get(phase, SlurmResources()), own] if phase else [own]

        def pick(key: str):
            return next((v for layer in layers if (v := getattr(layer, key)) is not None), getattr(self, key))

        keys = ("partition", "account", "qos", "time_min", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb",
                "array_tasks", "container_image", "signal_lead_s")
        sbatch = {**self.sbatch, **own.sbatch, **(own.phases[phase].sbatch if phase in own.phases else {})}
        return SlurmResources(**{k: pick(k) for k in keys}, sbatch=sbatch)


@dataclass(frozen=True)
class ClusterConfig:
    executor: Literal["local", "slurm"] = "local"  # where stages run: processes here, or Slurm jobs
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for stage processes; all values secret
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # used with executor=slurm (conf/cluster/slurm.yaml)


@dataclass(frozen=True)
class PipelineConfig:
    name: str  # the top-level config it was composed from
    project_dir: Path
    run: RunConfig
    tracking: TrackingConfig
    cluster: ClusterConfig
    stages: Mapping[str, Any]  # stage name -> typed stage config
    shared: Mapping[str, Any]  # shared group -> typed config
    resolved: Mapping[str, Any]  # the whole resolved config as plain data
    overrides: tuple[str, ...] = ()

    @property
    def root(self) -> Path:
        root = Path(os.path.expanduser(self.run.root))
        return root if root.is_absolute() else (self.project_dir / root).resolve()


_ORCHESTRATOR_SECTIONS = {"run": RunConfig, "tracking": TrackingConfig, "cluster": ClusterConfig}


def compose(config_dir: Path, config_name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Hydra-compose ``config_name`` with command-line style overrides; return resolved plain data."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir).resolve()
    if not (config_dir / f"{config_name}.yaml").exists():
        names = sorted(p.stem for p in config_dir.glob("*.yaml"))
        raise ConfigError(f"no top-level config '{config_name}' in {config_dir}" + suggest(config_name, names))
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="llmpipe"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # ValueError: OmegaConf's `list.x=1`
        raise ConfigError(f"cannot compose config '{config_name}' from {config_dir}: {exc}") from None
    assert isinstance(data, dict)
    return data


def validate(
    data: Mapping[str, Any],
    project: Project,
    *,
    name: str,
    project_dir: Path,
    overrides: Sequence[str] = (),
) -> PipelineConfig:
    """Check every key of the resolved config against its schema; collect all problems."""
    problems: list[str] = []
    source = f"config '{name}'"
    for key in data:
        if key not in _top_level_keys(project):
            problems.append(_unknown_top_level(key, project))

    def section(key: str, cls: type, value: Any) -> Any:
        try:
            return build(cls, {} if value is None else value, path=key)
        except ConfigError as exc:
            problems.extend(str(exc).split("\n  ")[1:])
            return None

    sections = {k: section(k, cls, data.get(k)) for k, cls in _ORCHESTRATOR_SECTIONS.items()}
    shared = {k: section(k, cls, data.get(k)) for k, cls in project.shared.items()}

    stage_data = data.get("stage") or {}
    if not isinstance(stage_data, Mapping):
        problems.append(f"stage: expected a mapping of stage configs, got {stage_data!r}")
        stage_data = {}
    for key in stage_data:
        if key not in project.stage_names:
            problems.append(_unknown_stage(key, project))
    stages = {s.name: section(f"stage.{s.name}", s.config, stage_data.get(s.name)) for s in project.stages}
    if sections["cluster"] is not None:
        for key, res in sections["cluster"].slurm.stages.items():
            if key not in project.stage_names:
                problems.append(f"cluster.slurm.stages.{key}: unknown stage" + suggest(key, project.stage_names))
                continue
            phases = (*project.stage(key).shard_phases, FINAL_PHASE)
            problems += [f"cluster.slurm.stages.{key}.phases.{phase}: stage '{key}' has no phase '{phase}' (its "
                         f"jobs: {', '.join(phases)})" + suggest(phase, phases)
                         for phase in res.phases if phase not in phases]

    if problems:
        raise ConfigError("\n  ".join([f"invalid configuration in {source}:", *problems]))
    secrets.register_config(data)  # from now on, log lines and printouts of this process mask them
    return PipelineConfig(
        name=name,
        project_dir=Path(project_dir).resolve(),
        run=sections["run"],
        tracking=sections["tracking"],
        cluster=sections["cluster"],
        stages=stages,
        shared=shared,
        resolved=dict(data),
        overrides=tuple(overrides),
    )


def load(
    project: Project,
    config_dir: Path,
    config_name: str,
    overrides: Sequence[str] = (),
    project_dir: Path | None = None,
) -> PipelineConfig:
    check_project(project)
    try:
        data = compose(config_dir, config_name, overrides)
    except ConfigError:
        check_override_keys(project, config_name, overrides)  # a typo'd key gets "did you mean", not Hydra's advice
        raise
    return validate(data, project, name=config_name, project_dir=project_dir or Path(config_dir).parent,
                    overrides=overrides)


def _top_level_keys(project: Project) -> set[str]:
    return set(_ORCHESTRATOR_SECTIONS) | set(project.shared) | {"stage"}


def _unknown_top_level(key: str, project: Project) -> str:
    return f"{key}: unknown top-level key" + suggest(key, _top_level_keys(project))


def _unknown_stage(name: str, project: Project) -> str:
    return f"stage.{name}: unknown stage" + suggest(name, project.stage_names)


def unknown_override_key(project: Project, key: str) -> str | None:
    """What is wrong with the dotted config ``key`` of an override, or None when the schema has it.

    The same words as :func:`validate` uses for an unknown key in a file. ``hydra.*`` keys are
    Hydra's own; keys inside free-form mappings (``cluster.env.X``) are always known.
    """
    head, _, rest = key.partition(".")
    if head == "hydra":
        return None
    if head == "stage":
        name, _, rest = rest.partition(".")
        if not name:
            return None
        if name not in project.stage_names:
            return _unknown_stage(name, project)
        return unknown_key(project.stage(name).config, rest, f"stage.{name}") if rest else None
    sections = {**_ORCHESTRATOR_SECTIONS, **project.shared}
    if head not in sections:
        return _unknown_top_level(head, project)
    return unknown_key(sections[head], rest, head) if rest else None


def check_override_keys(project: Project, config_name: str, overrides: Sequence[str]) -> None:
    """Raise ConfigError naming every override that changes a key the schema does not have.

    Hydra rejects ``stage.dedup.treshold=0.5`` (no ``+``) before llmpipe sees the config, and its
    advice, "To append to your config use +stage.dedup.treshold=0.5", would add the typo. Checked
    against the schema instead, the user gets the error ``+stage.dedup.treshold=0.5`` gets from
    :func:`validate`: "stage.dedup.treshold: unknown key (did you mean 'threshold'?)". Group choices
    (``stage/sft=qlora``, ``model=llama-7b``) are Hydra's to check. Returns when every key is known, so
    that the caller re-raises Hydra's own error (a syntax error, a missing option, a key the schema has
    but the composed config lacks, as in ``cluster.slurm.stages.pretrain.nodes=2``).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return
    problems = []
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or override.package is not None or "/" in key:
            continue  # `+key` is checked with the composed config; `group@pkg=x` and `a/b=x` pick options
        problem = unknown_override_key(project, key)
        if problem is not None and problem not in problems:
            problems.append(problem)
    if problems:
        raise ConfigError("\n  ".join([f"invalid configuration in config '{config_name}':", *problems]))


def check_project(project: Project) -> None:
    """Developer errors in the registry itself: execution-only fields that do not exist."""
    for stage in project.stages:
        paths = field_paths(stage.config)
        for name in stage.unhashed:
            if name not in paths:
                raise ConfigError(
                    f"stage '{stage.name}' names execution-only field '{name}', which its config "
                    f"{stage.config.__name__} does not have" + suggest(name, paths)
                )
