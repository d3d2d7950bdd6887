"""sft and align on several GPUs or nodes: the same TRL trainer in every rank, started by the launcher
pretrain uses (stages/common/launch.py: DeepSpeed's launcher, one node or many, Slurm or ssh).

The stage process keeps its shape. It prepares everything once (data written to its output dir,
tokenizer and base model checked), then asks :func:`plan_ranks` how to train:

- **in this process**, as before, when the launch gives one rank and nothing needs DeepSpeed's
  engine: a CPU run with ``launch.cpu_ranks: 1`` (the tiny default) or a node with one GPU. ZeRO
  partitions over ranks, so with one rank only ZeRO-Offload changes anything; that one is
  launched. A lone rank through the launcher trained the shipped tiny sft to the same losses
  but took ~57 s longer (the launcher and the rank's imports, on 2 loaded cores), where the
  whole tiny sft takes ~100 s on idle ones.
- **in ranks** otherwise: :func:`train_in_ranks` writes a job file (the config, inputs, attempt,
  metrics file, world size), starts ``python -m stages.<stage>.ranks`` in every rank with
  :func:`~stages.common.launch.plan_launch` / :func:`~stages.common.launch.run_launch`, waits,
  and reads back the final checkpoint and the metrics that rank 0 wrote. The stage process then
  exports (merge, write the model, sample) from that checkpoint as before.

A rank (:func:`run_rank`, the body of every ``stages/<stage>/ranks.py``) rebuilds the config from
the job, reads the prepared data back, and calls the same training function the stage calls in
process: same trainer, same :func:`~stages.common.training.train_or_resume`, so checkpoints, resume
and metrics do not depend on how the ranks were started. The HF Trainer (accelerate) takes
RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR from the launcher's environment; on CPU the ranks talk
over gloo (``use_cpu`` + ``ddp_backend``). ``train.zero_stage`` >= 1 hands the Trainer a DeepSpeed
config (:func:`~stages.common.training.deepspeed_config`); 0 is plain DDP. The global batch is
``train.batch_size x train.grad_accum x ranks`` (``batch_size`` is per rank, as in HF and TRL):
the metrics record ``world_size`` and ``global_batch_size``.

Who writes what: rank 0 alone writes metrics (its context has the stage's metrics file; the
others' has none), logs at INFO (the others at WARNING), checkpoint manifests and the result file.
Two barriers keep the manifests honest (:func:`rank_sync_callback`): after a save, so that rank 0
hashes every rank's files (its RNG state, its ZeRO shard) only once they are all written; and at
the end of training, so that no rank looks for the final checkpoint before its manifest is
written. Incomplete or corrupt checkpoints are removed or set aside by the stage process before
the launch (:func:`prepare_checkpoints`): the ranks, each looking at the same dir, then find
nothing to change, and cannot race to move the same dir.

A failing rank records its exception (stages/common/launch.py, ``rank_errors/``); the stage
raises :class:`~stages.common.launch.RanksFailed` naming the first one. A save request before a
time limit (pipeline/save_request.py; its file's path travels in the job file, so that ranks
started over ssh see it too) is no failure: the ranks save the same step and exit cleanly, rank 0
says so in the result, and the stage process raises ``SavedOnRequest`` as an in-process run does.

Multi-node runs need the output dir on a file system every node sees (as pretrain's). A ZeRO
checkpoint resumes only with the same number of ranks and ZeRO stage (DeepSpeed's layout); a plain
DDP one resumes with any.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.files import write_json_atomic
from pipeline.save_request import ENV as SAVE_REQUEST_ENV
from pipeline.save_request import SavedOnRequest, request_path
from pipeline.schema import build, to_plain
from stages.common.launch import (
    RANK_ERRORS,
    REPO_ROOT,
    LaunchConfig,
    LaunchError,
    LaunchPlan,
    RanksFailed,
    free_port,
    plan_launch,
    rank_failure,
    rank_start,
    record_rank_error,
    run_launch,
)
from stages.common.training import Runtime, TrainSettings

JOB_FILE = "train_job.json"  # <output>/train_job.json: what every rank reads
RESULT_FILE = "train_result.json"  # <output>/train_result.json: rank 0's final checkpoint and metrics
HOSTFILE = "hostfile"  # multi-node: the hosts and their slots (written by run_launch)

log = logging.getLogger("llmpipe.train_ranks")


# ---------------------------------------------------------------- the stage process


def cuda_device_count() -> int:
    """GPUs visible to this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_ranks(launch: LaunchConfig, train: TrainSettings, output_dir: Path, module: str, *, stage: str,
               cuda_devices: int, environ: Mapping[str, str] | None = None) -> LaunchPlan | None:
    """How to start the ranks of ``module`` (see :func:`~stages.common.launch.plan_launch`), or None: train in
    this process (one rank, no ZeRO-Offload).

    sft and align train on the GPUs they see (stages/common/training.py picks the device), so a
    launch on CPU while a GPU is visible (``launch.accelerator: cpu``) is refused rather than half
    honoured.
    """
    plan = plan_launch(launch, module, ["--job", str(output_dir / JOB_FILE)], cuda_devices=cuda_devices,
                       environ=os.environ if environ is None else environ, hostfile=output_dir / HOSTFILE,
                       port=free_port())
    if plan.accelerator == "cpu" and cuda_devices:
        raise LaunchError(f"stage.{stage}.launch.accelerator=cpu but {cuda_devices} GPU(s) are visible, which "
                          f"{stage} trains on: use launch.accelerator auto or cuda (or hide the GPUs)")
    if plan.world_size == 1 and train.offload_optimizer == "none":
        return None
    return plan


def prepare_checkpoints(phases: Mapping[str, Path], log_to: Any) -> dict[str, int]:
    """Remove incomplete and set aside corrupt checkpoints of each phase before the ranks look at them;
    the number set aside per phase (its metric prefix). See the module doc for why here."""
    from stages.common.training import latest_checkpoint

    return {prefix: len(latest_checkpoint(path, log_to).corrupt) for prefix, path in phases.items()}


def write_job(ctx: Any, cfg: Any, plan: LaunchPlan, **extra: Any) -> Path:
    """The job file every rank reads (atomically written): the stage's context, its config and ``extra``."""
    job = {
        "stage": ctx.stage,
        "fingerprint": ctx.fingerprint,
        "output_dir": str(ctx.output_dir),
        "inputs": {ref: str(path) for ref, path in ctx.inputs.items()},
        "attempt": ctx.attempt,
        "metrics_file": str(ctx.metrics_file) if ctx.metrics_file else None,
        "config": to_plain(cfg),
        "world_size": plan.world_size,
        "accelerator": plan.accelerator,
        "save_request": str(path) if (path := request_path()) else None,
        **extra,
    }
    path = ctx.output_dir / JOB_FILE
    write_json_atomic(path, job, indent=2, newline=True)
    return path


def train_in_ranks(ctx: Any, cfg: Any, plan: LaunchPlan, phases: Mapping[str, Path],
                   **extra: Any) -> tuple[Path, dict[str, float]]:
    """Train in the ranks of ``plan``; the final checkpoint and the metrics, as ``train_or_resume`` gives them.

    ``phases``: each training phase's checkpoint dir by its metric prefix ("" for the only or last
    phase), cleaned first (:func:`prepare_checkpoints`); what it set aside is added to the phase's
    ``checkpoints_set_aside``. ``extra`` goes into the job file for the rank module.
    """
    out = ctx.output_dir
    shutil.rmtree(out / RANK_ERRORS, ignore_errors=True)  # an earlier attempt's: not this one's cause
    (out / RESULT_FILE).unlink(missing_ok=True)
    set_aside = prepare_checkpoints(phases, ctx.log)
    write_job(ctx, cfg, plan, **extra)
    ctx.log.info("launch: %s", plan.describe())
    returncode = run_launch(plan, out / HOSTFILE, cwd=REPO_ROOT)
    if returncode != 0:
        cause = rank_failure(out)
        raise RanksFailed(f"stage.{ctx.stage}: the DeepSpeed launcher exited with status {returncode}"
                          f"{f' ({cause})' if cause else ''}; the next attempt resumes from the newest complete "
                          f"checkpoint under {out / 'checkpoints'}")
    if not (out / RESULT_FILE).is_file():
        raise RanksFailed(f"stage.{ctx.stage}: the ranks exited cleanly but rank 0 wrote no {out / RESULT_FILE}")
    result = json.loads((out / RESULT_FILE).read_text())
    if "saved_on_request" in result:  # the ranks saved a step and stopped: not a model to export
        raise SavedOnRequest(int(result["saved_on_request"]), f"checkpoints under {out / 'checkpoints'}")
    metrics = {k: float(v) for k, v in result["metrics"].items()}
    for prefix, count in set_aside.items():
        key = f"{prefix}checkpoints_set_aside"
        metrics[key] = metrics.get(key, 0.0) + count
    return Path(result["checkpoint"]), metrics


def layout_metrics(train: TrainSettings, world_size: int) -> dict[str, float]:
    """``world_size`` and the optimizer step's ``global_batch_size`` (examples: batch x accumulation x ranks)."""
    return {"world_size": float(world_size),
            "global_batch_size": float(train.batch_size * train.grad_accum * world_size)}


# ---------------------------------------------------------------- a rank


def rank_runtime(rt: Runtime, train: TrainSettings, world_size: int) -> Runtime:
    """The stage's runtime as a launched rank uses it: the world size and the DeepSpeed config of ``train``."""
    from stages.common.training import deepspeed_config

    return replace(rt, world_size=world_size, deepspeed=deepspeed_config(train, rt.cuda))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_sync_callback() -> Any:
    """A TrainerCallback holding the ranks together around checkpoints (see the module doc).

    It must come before the manifest callback (``train_or_resume`` adds that one after the
    trainer is built): add it when building the trainer, with :func:`synced`.
    """
    from transformers import TrainerCallback

    class RankSync(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _barrier()  # every rank's files of this checkpoint are on disk before rank 0 hashes them

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _barrier()  # rank 0 wrote the last manifest before any rank looks for the final checkpoint

    return RankSync()


def synced(build: Callable[[Any], Any], rt: Runtime) -> Callable[[Any], Any]:
    """``build`` (a ``train_or_resume`` trainer factory) with :func:`rank_sync_callback` added to its trainer
    when several ranks train; ``build`` itself for one process."""
    if rt.world_size == 1:
        return build

    def build_synced(resume: Any) -> Any:
        trainer = build(resume)
        trainer.add_callback(rank_sync_callback())
        return trainer

    return build_synced


def rank_context(job: Mapping[str, Any], rank: int) -> Any:
    """The StageContext of a rank: the stage's, with the metrics file for rank 0 only."""
    from pipeline.stage import StageContext

    return StageContext(stage=job["stage"], fingerprint=job["fingerprint"], output_dir=Path(job["output_dir"]),
                        inputs={ref: Path(p) for ref, p in job["inputs"].items()}, attempt=int(job["attempt"]),
                        log=logging.getLogger("llmpipe.stage"),
                        metrics_file=Path(job["metrics_file"]) if job["metrics_file"] and rank == 0 else None)


RankTrain = Callable[[Any, Any, Mapping[str, Any]], tuple[Path, dict[str, float]]]


def run_rank(config_cls: type, train: RankTrain, argv: list[str] | None = None) -> int:
    """The body of a stage's rank module: ``train(cfg, ctx, job)`` in this rank, rank 0 writing the result.

    ``train`` returns what ``train_or_resume`` returns (final checkpoint, metrics). An exception is
    recorded for the stage process (``rank_errors/``) and raised, so the rank exits non-zero and the
    launcher stops the others; ``SavedOnRequest`` is not a failure: rank 0 records the step instead.
    """
    from stages.common.training import offline_hub

    job, rank = rank_start(f"one rank of a launched sft/align training ({JOB_FILE})", argv)
    out = Path(job["output_dir"])
    if job.get("save_request"):  # where the stage process would be asked to save: every rank looks there
        os.environ[SAVE_REQUEST_ENV] = job["save_request"]
    try:
        offline_hub()
        cfg = build(config_cls, job["config"], path=f"stage.{job['stage']}")
        checkpoint, metrics = train(cfg, rank_context(job, rank), job)
        result: dict[str, Any] = {"checkpoint": str(checkpoint), "metrics": metrics}
    except SavedOnRequest as saved:  # every rank saved the same step (they agree on it): the stage says so
        result = {"saved_on_request": saved.step}
    except Exception as exc:
        record_rank_error(out, rank, exc)
        raise
    if rank == 0:
        write_json_atomic(out / RESULT_FILE, result, indent=2, newline=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def exit_now(status: int) -> None:
    """End a rank process without the interpreter's teardown of torch, DeepSpeed and transformers (everything
    is written and closed by now; pretrain measured 15-20 s per rank of C++ destructors on 2 loaded cores)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
