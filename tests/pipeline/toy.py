"""Test-only stages: cheap file work with the same contract as the real stages.

    source -> upper -> count        side (independent)
                 \\-> slow (resumable, for kill/resume tests; optionally starts a helper like vLLM's server)

    fill (FAULTS: fills a small file system, for the disk-full tests)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import Project, Stage, StageContext


@dataclass(frozen=True)
class SourceConfig:
    text: str = "hello"  # what to write
    repeat: int = 1  # how many times
    workers: int = 1  # execution-only
    fail: bool = False  # execution-only: raise, to test failure handling


def run_source(cfg: SourceConfig, ctx: StageContext) -> dict[str, float]:
    if cfg.fail:
        raise RuntimeError("source asked to fail")
    ctx.output("text").write_text(cfg.text * cfg.repeat)
    for step in range(3):
        ctx.log_metric("progress", step / 2, step=step)
    return {"chars": len(cfg.text) * cfg.repeat}


@dataclass(frozen=True)
class Nested:
    a: int = 1  # a nested field
    b: tuple[str, ...] = ("x",)  # a list


@dataclass(frozen=True)
class UpperConfig:
    suffix: str = "!"  # appended to the upper-cased text
    nested: Nested = Nested()  # nested settings
    log_every: int = 10  # execution-only


def run_upper(cfg: UpperConfig, ctx: StageContext) -> dict[str, float]:
    text = ctx.input("source.text").read_text()
    ctx.output("text").write_text(text.upper() + cfg.suffix)
    (ctx.output_dir / "report.md").write_text(f"# upper\n{len(text)} chars\n")
    ctx.log_artifact(ctx.output_dir / "report.md")
    return {"chars": len(text) + len(cfg.suffix)}


@dataclass(frozen=True)
class CountConfig:
    fail: bool = False  # execution-only: raise, to test failure handling


def run_count(cfg: CountConfig, ctx: StageContext) -> dict[str, float]:
    if cfg.fail:
        raise RuntimeError("count asked to fail")
    text = ctx.input("upper.text").read_text()
    ctx.output("stats").write_text(json.dumps({"chars": len(text)}))
    return {"chars": len(text)}


@dataclass(frozen=True)
class SideConfig:
    value: int = 7  # written to the output


def run_side(cfg: SideConfig, ctx: StageContext) -> dict[str, float]:
    ctx.output("data").write_text(str(cfg.value))
    return {"value": cfg.value}


@dataclass(frozen=True)
class SlowConfig:
    steps: int = 6  # steps to do
    step_s: float = 0.0  # execution-only: seconds per step
    helper: bool = False  # execution-only: start a helper in its own session that ignores SIGTERM (as a server may)


# A helper that only SIGKILL stops, in a session of its own: what vLLM's server is to the serve stage.
HELPER = "trap '' TERM; exec sleep 300"


def run_slow(cfg: SlowConfig, ctx: StageContext) -> dict[str, float]:
    """Counts steps in a progress file, resuming from the previous attempt's progress."""
    from pipeline.processes import pid_alive

    progress = ctx.output_dir / "progress.txt"
    done = int(progress.read_text()) if progress.exists() else 0
    (ctx.output_dir / f"attempt-{ctx.attempt}-started-at-{done}").touch()
    (ctx.output_dir / "pid").write_text(str(os.getpid()))
    helper_pid = ctx.output_dir / "helper.pid"
    if helper_pid.exists():  # an earlier attempt's helper must be gone before this attempt starts
        alive = pid_alive(int(helper_pid.read_text()))
        (ctx.output_dir / f"attempt-{ctx.attempt}-old-helper-alive").write_text("yes" if alive else "no")
    if cfg.helper:
        helper = subprocess.Popen(["bash", "-c", HELPER], start_new_session=True)
        helper_pid.write_text(str(helper.pid))
    for step in range(done, cfg.steps):
        time.sleep(cfg.step_s)
        progress.write_text(str(step + 1))
    ctx.output("result").write_text(ctx.input("upper.text").read_text())
    return {"resumed_from": done}


PROJECT = Project(
    name="toy",
    stages=(
        Stage("source", SourceConfig, run_source, (), ("text",), unhashed=frozenset({"workers", "fail"})),
        Stage("upper", UpperConfig, run_upper, ("source.text",), ("text",), unhashed=frozenset({"log_every"})),
        Stage("count", CountConfig, run_count, ("upper.text",), ("stats",), unhashed=frozenset({"fail"})),
        Stage("side", SideConfig, run_side, (), ("data",)),
        Stage("slow", SlowConfig, run_slow, ("upper.text",), ("result",), resumable=True,
              unhashed=frozenset({"step_s", "helper"})),
    ),
    import_path="tests.pipeline.toy:PROJECT",
)

TOY_BASE_YAML = """\
defaults:
  - _self_
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking:
  {enabled: false, uri: null, experiment: toy, artifact_location: null,
   ui_host: 127.0.0.1, ui_port: 5000, ui_workers: 1}
cluster: {executor: local, env: {}}
stage:
  source: {text: hello, repeat: 2, workers: 1, fail: false}
  upper: {suffix: "!", nested: {a: 1, b: [x]}, log_every: 10}
  count: {fail: false}
  side: {value: 7}
  slow: {steps: 6, step_s: 0.0, helper: false}
"""


def write_toy_conf(root: Path, yaml_text: str = TOY_BASE_YAML) -> Path:
    """A conf dir with one top-level config 'toy'; returns the conf dir (project dir is its parent)."""
    conf = root / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "toy.yaml").write_text(yaml_text)
    return conf


@dataclass(frozen=True)
class NoConfig:
    pass


def run_lazy(cfg: NoConfig, ctx: StageContext) -> dict[str, float]:
    return {}  # declares an output it never writes


BROKEN = Project(
    name="broken",
    stages=(
        Stage("lazy", NoConfig, run_lazy, (), ("data",)),
        Stage("after", NoConfig, run_lazy, ("lazy.data",), ("x",)),
    ),
    import_path="tests.pipeline.toy:BROKEN",
)

BROKEN_YAML = """\
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking: {enabled: false}
stage: {lazy: {}, after: {}}
"""


# ---------------------------------------------------------------- a stage that maps over shards
#
#     parts -> shout (two maps over shards, a global step between them) -> tally
#
# shout declares shard_phases=("shout", "stamp"): on Slurm it runs as two job arrays and a final job.


@dataclass(frozen=True)
class PartsConfig:
    parts: int = 5  # input shards to write
    words: int = 4  # words per shard (shard i has words + i)


def run_parts(cfg: PartsConfig, ctx: StageContext) -> dict[str, float]:
    out = ctx.output("parts")
    out.mkdir()
    for i in range(cfg.parts):
        (out / f"part-{i}.txt").write_text(" ".join(f"w{i}x{j}" for j in range(cfg.words + i)))
    return {"parts": cfg.parts}


@dataclass(frozen=True)
class ShoutConfig:
    suffix: str = "!"  # appended to every shard
    workers: int = 1  # execution-only
    prelude_s: float = 0.0  # execution-only: seconds of work before the first map (to test its lock)


@dataclass(frozen=True)
class StampJob:
    suffix: str
    total: int  # words over every shard: the global step's result


def _who() -> str:
    """Which process handled a shard, and as which array task (the test reads it)."""
    from pipeline import sharding

    return json.dumps({"pid": os.getpid(), "slice": os.environ.get(sharding.ENV)})


def shout_shard(task):
    from stages.common.shards import ShardResult

    words = Path(task.source).read_text().split()
    out = task.output_dir / "up"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task.name}.txt").write_text(" ".join(w.upper() for w in words))
    (out / f"{task.name}.who").write_text(_who())
    return ShardResult(docs_in=len(words), docs_out=len(words))


def stamp_shard(task):
    from stages.common.shards import ShardResult

    text = Path(task.source).read_text()
    out = task.output_dir / "shouted"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task.name}.txt").write_text(f"{text}{task.config.suffix} (of {task.config.total})")
    (task.output_dir / "_who").mkdir(exist_ok=True)
    (task.output_dir / "_who" / f"{task.name}.json").write_text(_who())
    return ShardResult(docs_in=1, docs_out=1)


def run_shout(cfg: ShoutConfig, ctx: StageContext) -> dict[str, float]:
    from stages.common.shards import map_shards

    began = time.time()  # the prelude: every array task runs it, one at a time (pipeline/sharding.py)
    time.sleep(cfg.prelude_s)
    with open(ctx.output_dir / "prelude.jsonl", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "began": began, "ended": time.time()}) + "\n")
    sources = sorted(str(p) for p in ctx.input("parts.parts").glob("*.txt"))
    work = ctx.output_dir / "_work"
    first = map_shards(shout_shard, sources, work, cfg, workers=cfg.workers, desc="shout", phase="shout")
    total = first.docs_in  # the global step between the maps
    upper = sorted(str(p) for p in (work / "up").glob("*.txt"))
    second = map_shards(stamp_shard, upper, ctx.output_dir, StampJob(cfg.suffix, total), workers=cfg.workers,
                        desc="stamp", phase="stamp")
    ctx.log_metric("words", total)
    return {"words": total, "shards": second.docs_out}


@dataclass(frozen=True)
class TallyConfig:
    pass


def run_tally(cfg: TallyConfig, ctx: StageContext) -> dict[str, float]:
    texts = [p.read_text() for p in sorted(ctx.input("shout.shouted").glob("*.txt"))]
    ctx.output("tally").write_text(json.dumps({"shards": len(texts), "chars": sum(map(len, texts))}))
    return {"shards": len(texts)}


SHARDED = Project(
    name="sharded",
    stages=(
        Stage("parts", PartsConfig, run_parts, (), ("parts",)),
        Stage("shout", ShoutConfig, run_shout, ("parts.parts",), ("shouted",), resumable=True,
              shard_phases=("shout", "stamp"),
              unhashed=frozenset({"workers", "prelude_s"})),
        Stage("tally", TallyConfig, run_tally, ("shout.shouted",), ("tally",)),
    ),
    import_path="tests.pipeline.toy:SHARDED",
)

SHARDED_YAML = """\
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking: {enabled: false}
cluster: {executor: local, env: {}}
stage:
  parts: {parts: 5, words: 4}
  shout: {suffix: "!", workers: 1, prelude_s: 0.0}
  tally: {}
"""


def load_sharded(project_dir: Path, *overrides: str):
    """The SHARDED project's config from a conf dir written under ``project_dir``."""
    from pipeline import config

    conf = project_dir / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "sharded.yaml").write_text(SHARDED_YAML)
    return config.load(SHARDED, conf, "sharded", list(overrides), project_dir=project_dir)


# ---------------------------------------------------------------- processes and faults


# An orchestrator in a process of its own, for the tests that kill it: argv = project import path,
# conf dir, config name, JSON list of overrides, project dir.
ORCHESTRATOR = """
import json, sys
from pipeline import config
from pipeline.runner import Runner
from pipeline.worker import load_project
project = load_project(sys.argv[1])
cfg = config.load(project, sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), project_dir=sys.argv[5])
Runner(cfg, project).run()
"""


def start_orchestrator(project: Project, conf_dir: Path, conf_name: str, overrides: list[str],
                       **popen) -> subprocess.Popen:
    """``Runner(cfg, project).run()`` in a new process (its own session), the project dir being the
    conf dir's parent; ``popen`` goes to Popen (env, stdout...)."""
    # As from an interactive shell: Ctrl-C raises KeyboardInterrupt. A test session started in the background
    # by a non-interactive shell (`make test &`, CI runners) inherits SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: the orchestrator would then finish its run despite the test's Ctrl-C.
    return subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, project.import_path, str(conf_dir), conf_name,
                             json.dumps(overrides), str(Path(conf_dir).parent)], start_new_session=True,
                            preexec_fn=_default_sigint, **popen)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SLOW = ("stage.slow.step_s=0.3", "stage.slow.steps=40")


def orchestrator_running_slow(toy, steps: int, *overrides: str, **popen):
    """An orchestrator process running the slow stage (40 steps of 0.3 s, ``overrides`` added), once
    the stage has done ``steps`` steps: (the process, the store, the slow stage's fingerprint, its
    progress file). ``toy`` is the conftest fixture."""
    from pipeline.plan import make_plan
    from pipeline.runner import Runner
    from pipeline.store import Store

    cfg = toy(*SLOW, *overrides)
    Runner(toy("run.only=[upper]"), toy.project).run()
    fp = make_plan(cfg, toy.project).stages["slow"].fingerprint
    store = Store(cfg.root)
    proc = start_orchestrator(toy.project, toy.conf_dir, "toy", [*SLOW, *overrides, "run.only=[slow]"], **popen)
    progress = store.partial_dir("slow", fp) / "progress.txt"
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.exists() and int(progress.read_text() or 0) >= steps):
        time.sleep(0.1)
    assert progress.exists(), "the slow stage never started"
    return proc, store, fp, progress


@dataclass(frozen=True)
class FillConfig:
    parts: int = 4  # files to write
    part_kb: int = 1024  # KiB per file
    disguise: bool = False  # execution-only: report a full disk the way fastText does, as a ValueError
    hard: bool = False  # execution-only: on a full disk, exit at once (no error report, nothing freed)


def run_fill(cfg: FillConfig, ctx: StageContext) -> dict[str, float]:
    """Writes ``parts`` files, each complete or absent (temporary name, then rename); resumes by
    skipping the parts an earlier attempt finished."""
    out = ctx.output("parts")
    out.mkdir(exist_ok=True)
    reused = 0
    chunk = bytes(range(256)) * 4  # 1 KiB, not all zeros: a compressing file system stores it whole
    for i in range(cfg.parts):
        part = out / f"part-{i}"
        if part.exists():
            reused += 1
            continue
        tmp = out / f".part-{i}.tmp"
        try:
            with open(tmp, "wb") as f:
                for _ in range(cfg.part_kb):
                    f.write(chunk)
        except OSError:
            if cfg.hard:
                os._exit(3)
            if cfg.disguise:  # fastText leaves its cut-short model file, and fails later to read it
                raise ValueError("Vector::mul: size mismatch") from None
            tmp.unlink(missing_ok=True)  # as atomic_path does
            raise
        tmp.rename(part)
    return {"reused": reused}


FAULTS = Project(
    name="faults",
    stages=(Stage("fill", FillConfig, run_fill, (), ("parts",), resumable=True,
                  unhashed=frozenset({"disguise", "hard"})),),
    import_path="tests.pipeline.toy:FAULTS",
)

FAULTS_YAML = """\
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking: {enabled: false}
cluster: {executor: local, env: {}}
stage:
  fill: {parts: 4, part_kb: 1024, disguise: false, hard: false}
"""
