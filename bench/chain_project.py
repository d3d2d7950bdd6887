"""An eleven-stage chain with the real stage names and trivial work, so the orchestrator's own
cost (planning, fingerprints, caching, tracking journal) can be measured before or without the
real stages' outputs."""

from dataclasses import dataclass

from pipeline import Project, Stage, StageContext

NAMES = ("ingest", "dedup", "quality", "pii", "tokenize", "pretrain", "sft", "align", "quantize", "serve",
         "evaluate")


@dataclass(frozen=True)
class StepConfig:
    value: int = 1  # written to the output
    workers: int = 2  # execution-only


def run_step(cfg: StepConfig, ctx: StageContext) -> dict[str, float]:
    ctx.output("out").write_text(str(cfg.value))
    return {"value": cfg.value}


PROJECT = Project(
    name="chain",
    stages=tuple(Stage(n, StepConfig, run_step, (f"{NAMES[i - 1]}.out",) if i else (), ("out",),
                       unhashed=frozenset({"workers"})) for i, n in enumerate(NAMES)),
    import_path="bench.chain_project:PROJECT",
)

YAML = """\
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking:
  {enabled: true, uri: null, experiment: bench, artifact_location: null,
   ui_host: 127.0.0.1, ui_port: 5000, ui_workers: 1}
cluster: {executor: local, env: {}}
stage:
""" + "".join(f"  {n}: {{value: 1, workers: 2}}\n" for n in NAMES)
