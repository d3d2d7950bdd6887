"""Test-only stages: cheap file work with the same contract as the real stages.

    source -> upper -> count        side (independent)
                 \\-> slow (resumable, for kill/resume tests)
"""

from __future__ import annotations

import json
import os
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


def run_slow(cfg: SlowConfig, ctx: StageContext) -> dict[str, float]:
    """Counts steps in a progress file, resuming from the previous attempt's progress."""
    progress = ctx.output_dir / "progress.txt"
    done = int(progress.read_text()) if progress.exists() else 0
    (ctx.output_dir / f"attempt-{ctx.attempt}-started-at-{done}").touch()
    (ctx.output_dir / "pid").write_text(str(os.getpid()))
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
              unhashed=frozenset({"step_s"})),
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
  slow: {steps: 6, step_s: 0.0}
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


def run_future(cfg: NoConfig, ctx: StageContext) -> dict[str, float]:
    from pipeline import StageNotImplemented

    raise StageNotImplemented("future")


BROKEN = Project(
    name="broken",
    stages=(
        Stage("lazy", NoConfig, run_lazy, (), ("data",)),
        Stage("future", NoConfig, run_future, (), ("model",)),
        Stage("after", NoConfig, run_lazy, ("future.model",), ("x",)),
    ),
    import_path="tests.pipeline.toy:BROKEN",
)

BROKEN_YAML = """\
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking: {enabled: false}
stage: {lazy: {}, future: {}, after: {}}
"""
