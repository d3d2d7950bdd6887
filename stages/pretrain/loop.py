"""The pretrain stage's training loop: one process per rank, started by the DeepSpeed launcher.

    python -m stages.pretrain.loop --job <output_dir>/pretrain_job.json

The job file (written by stages/pretrain/stage.py) holds the stage config, the input paths and what the
stage decided (steps, accumulation, precision, the checkpoint to resume from); ds_config.json next
to it is the DeepSpeed config. Every rank builds the same randomly initialised model (same seed;
under ZeRO-3 it is created already partitioned), wraps it with ``deepspeed.initialize`` and trains;
rank 0 alone writes metrics, logs, checkpoint manifests (stages/pretrain/checkpoints.py), the
exported model and the summary (atomically, through pipeline.files). The curves carry the names
every training stage uses (stages/common/training.py): ``train_loss``, ``eval_loss``, ``lr``,
``grad_norm``, ``tokens_per_s``, and ``resume_step``. A rank that fails records why in
``rank_errors/`` of the output dir, so that the stage's error says it (not only the log).

Save requests (pipeline/save_request.py, the file named in the job file): at every optimizer-step
boundary rank 0 looks for the file and one all-reduce of that flag makes every rank agree on the
step (ranks that saw the file at different steps would enter the collective save at different
steps and hang). They save that step's checkpoint, rank 0 records the step in ``saved_on_request.json``,
and they exit without exporting. One stat and one all-reduce of one number per step: nothing next to
a step's work.

Data order: optimizer step ``k`` trains on a fixed set of ``global_batch_size`` sequences, drawn
from a per-epoch permutation seeded by ``(seed, epoch)``; each rank takes a contiguous share. So
the sequences of a step do not depend on the number of ranks or the micro batch size, and a
resumed run starts exactly at the step after its checkpoint without replaying the loader.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import LlmpipeError
from pipeline.files import atomic_path, hash_files, list_files, write_json_atomic, write_manifest
from pipeline.save_request import requested
from pipeline.schema import build
from stages.common.launch import rank_start, record_rank_error
from stages.common.training import EVAL_LOSS, GRAD_NORM, LR, RESUME_STEP, TOKENS_PER_S, TRAIN_LOSS, any_rank
from stages.pretrain.checkpoints import checkpoint_meta, checkpoint_tag, prune_checkpoints
from stages.pretrain.stage import CHECKPOINTS, SAVED_ON_REQUEST, SUMMARY_FILE, PretrainConfig

log = logging.getLogger("llmpipe.pretrain")


class CheckpointLoadError(LlmpipeError):
    """DeepSpeed could not load a checkpoint whose files match their manifest (written damaged?)."""


# ---------------------------------------------------------------- data order


def step_batch(step: int, n: int, global_batch: int, seed: int, cache: dict | None = None) -> np.ndarray:
    """Indices of the ``global_batch`` sequences that optimizer step ``step`` trains on.

    Each epoch is a fresh permutation of the ``n`` sequences (seeded by ``(seed, epoch)``) cut into
    ``n // global_batch`` steps; the remainder of an epoch is skipped. ``cache`` keeps the current
    epoch's permutation between calls.
    """
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise ValueError(f"{n} sequences are fewer than one global batch of {global_batch}")
    epoch, j = divmod(step, per_epoch)
    cache = {} if cache is None else cache
    if cache.get("epoch") != epoch:
        cache["epoch"], cache["perm"] = epoch, np.random.default_rng([seed, epoch]).permutation(n)
    return cache["perm"][j * global_batch:(j + 1) * global_batch]


class StepSampler:
    """This rank's sequence indices for steps ``start``..``stop - 1``, in training order.

    A step's global batch is split into ``world`` contiguous shares; consecutive groups of
    ``micro_batch_size`` indices of a share are that rank's micro batches (the DataLoader groups them).
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} ranks")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop
        self.share = global_batch // world

    def __iter__(self) -> Iterator[int]:
        cache: dict = {}
        for step in range(self.start, self.stop):
            batch = step_batch(step, self.n, self.global_batch, self.seed, cache)
            yield from batch[self.rank * self.share:(self.rank + 1) * self.share].tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.share


def eval_rows(n: int, limit: int, seed: int) -> list[int]:
    """The val sequences every evaluation scores: all of them when ``n <= limit``, else ``limit`` drawn
    with ``seed`` across the whole split (the val shards hold documents in corpus order: its first rows
    are one corner of the data), in ascending order. The same rows at every evaluation and on resume."""
    if n <= limit:
        return list(range(n))
    return sorted(random.Random(f"{seed}\0eval-rows").sample(range(n), limit))


def eval_indices(n: int, limit: int, rank: int, world: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    """This rank's share of the ``eval_rows`` of the val split, padded to the same length on every rank
    (ZeRO-3 needs every rank in every forward); padding rows are flagged False and not counted."""
    rows = eval_rows(n, limit, seed)
    total = len(rows)
    per_rank = math.ceil(total / world)
    indices, real = [], []
    for k in range(per_rank):
        i = rank + k * world
        indices.append(rows[i] if i < total else rows[0] if rows else 0)
        real.append(i < total)
    return indices, real


def lr_ratio(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warmup from 1/warmup to 1
    over ``warmup`` steps, then a half cosine down to ``min_ratio`` at step ``total``.

    The same curve as transformers' get_cosine_with_min_lr_schedule_with_warmup_lr_rate; importing
    transformers.optimization pulls in peft and bitsandbytes (~5-20 s per rank), so it is not used.
    DeepSpeed's WarmupCosineLR is not used either: it trains the first step at lr 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- bookkeeping


@dataclass
class TrainState:
    """What a checkpoint carries besides DeepSpeed's own state (in its client_state)."""

    step: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    initial_eval_loss: float | None = None
    last_loss: float | None = None
    last_eval_loss: float | None = None


class MetricsFile:
    """Appends records in StageContext.log_metrics' format; only rank 0 has one."""

    def __init__(self, path: str | None, attempt: int, enabled: bool):
        self.path = Path(path) if path and enabled else None
        self.attempt = attempt

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.path is None:
            return
        record = {"t": time.time(), "step": step, "attempt": self.attempt,
                  "metrics": {k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")  # one write per line: the runner tails this file live


# ---------------------------------------------------------------- training


class Trainer:
    """One rank's view of the run: engine, data, schedule, and the loop with its side duties."""

    def __init__(self, job: dict[str, Any]):
        import deepspeed
        import torch
        import torch.distributed as tdist

        self.job = job
        self.cfg: PretrainConfig = build(PretrainConfig, job["config"], path="stage.pretrain")
        self.out = Path(job["output_dir"])
        self.ckpt_root = self.out / CHECKPOINTS
        self.data = job["data"]
        sched = job["schedule"]
        self.steps, self.accum = int(sched["steps"]), int(sched["grad_accum"])
        self.tokens_per_step = int(sched["tokens_per_step"])
        self.cuda = job["accelerator"] == "cuda"

        deepspeed.init_distributed()
        self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        if self.world != int(sched["world_size"]):
            raise RuntimeError(f"the launcher started {self.world} ranks, the stage planned {sched['world_size']}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cuda:
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        self.metrics = MetricsFile(job["metrics_file"], int(job["attempt"]), self.rank == 0)
        self.save_request = job.get("save_request")  # where a save before the time limit is asked for; None: never
        self.ds_config = json.loads(Path(job["ds_config"]).read_text())
        self._build_engine()

    def _build_engine(self) -> None:
        import deepspeed
        import torch
        from torch.optim.lr_scheduler import LambdaLR
        from transformers.integrations import HfDeepSpeedConfig

        from stages.common.modeling import SpecialIds, build_model, llama_config, train_flops_per_token

        cfg, data = self.cfg, self.data
        # Must exist before the model is built: from_config then creates ZeRO-3 weights partitioned.
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if cfg.zero_stage == 3 else None
        ids = SpecialIds(data["bos_id"], data["eos_id"], data["pad_id"])
        self.model_config = llama_config(cfg.model, int(data["vocab_size"]), ids)
        dtype = torch.bfloat16 if self.job["bf16"] else torch.float32
        model = build_model(self.model_config, cfg.seed, dtype=dtype, attention=cfg.attention)
        model.config.use_cache = False  # no KV cache while training; the export turns it back on
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Decay matrices and embeddings; norm weights (1-D) are exempt, as in most LLM recipes. Under
        # ZeRO-3 a parameter's tensor is an empty slice: its real shape is ds_shape.
        def ndim(p: Any) -> int:
            return len(getattr(p, "ds_shape", p.shape))

        decay = [p for p in model.parameters() if ndim(p) >= 2]
        no_decay = [p for p in model.parameters() if ndim(p) < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

        def schedule(optimizer: Any) -> Any:
            return LambdaLR(optimizer, partial(lr_ratio, warmup=cfg.warmup_steps, total=self.steps,
                                               min_ratio=cfg.min_lr_ratio))

        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=groups,
                                                                 config=self.ds_config, lr_scheduler=schedule)
        self.flops_per_token = train_flops_per_token(self.model_config, int(data["seq_len"]))
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    # -- data --------------------------------------------------------------------------------
    def _loader(self, start: int) -> Iterator[Any]:
        import torch
        from torch.utils.data import DataLoader

        from stages.common.token_shards import TokenDataset

        dataset = TokenDataset(self.job["tokens"], "train")
        sampler = StepSampler(len(dataset), self.cfg.global_batch_size, self.rank, self.world, self.cfg.seed,
                              start, self.steps)
        loader = DataLoader(dataset, batch_size=self.cfg.micro_batch_size, sampler=sampler,
                            num_workers=self.cfg.loader_workers, pin_memory=self.cuda)
        for batch in loader:
            yield batch.to(self.device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch

    def _labels(self, ids: Any) -> Any:
        pad = self.data["pad_id"]
        if pad is None:
            return ids
        return ids.masked_fill(ids == pad, -100)  # padding of a keep_partial tail is not trained on

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss per token over ``eval_sequences`` val sequences drawn across the split (eval_rows), all
        ranks together."""
        import torch
        import torch.distributed as tdist

        from stages.common.token_shards import TokenDataset

        val = TokenDataset(self.job["tokens"], "val")
        indices, real = eval_indices(len(val), self.cfg.eval_sequences, self.rank, self.world, self.cfg.seed)
        mb = self.cfg.micro_batch_size
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, token count
        self.engine.eval()
        with torch.no_grad():
            for s in range(0, len(indices), mb):
                ids = torch.from_numpy(np.stack([val[i] for i in indices[s:s + mb]])).to(self.device)
                labels = self._labels(ids).clone()
                labels[~torch.tensor(real[s:s + mb], device=self.device)] = -100
                loss = self.engine(input_ids=ids, labels=labels).loss
                n = (labels[:, 1:] != -100).sum()
                if n > 0:
                    total += torch.stack([loss.double() * n, n.double()])
        self.engine.train()
        tdist.all_reduce(total)
        return (total[0] / total[1]).item()

    # -- checkpoints -----------------------------------------------------------------------------
    def resume(self) -> TrainState:
        """Load the checkpoint the stage verified and chose (stages/pretrain/checkpoints.py), if any;
        return the state to continue from. A load that fails names the checkpoint and DeepSpeed's reason."""
        tag = self.job["resume_from"]
        if tag is None:
            return TrainState()
        ckpt = self.ckpt_root / tag
        try:
            path, client = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag)
        except Exception as exc:  # torch.load's "PytorchStreamReader failed ...", a missing shard...
            raise CheckpointLoadError(f"{ckpt}: DeepSpeed could not load it: {type(exc).__name__}: {exc}") from exc
        if path is None:
            raise CheckpointLoadError(f"{ckpt}: DeepSpeed found no checkpoint files to load there")
        state = TrainState(**client["llmpipe"])
        log.info("resumed from %s at step %d (%d tokens trained)", ckpt, state.step, state.tokens)
        return state

    def save(self, state: TrainState) -> None:
        """Save a checkpoint, then its manifest: the ranks hash a share of its files each (one reader per
        file, in parallel, instead of rank 0 reading every rank's shards) and rank 0 writes the whole."""
        import torch.distributed as tdist

        tag = checkpoint_tag(state.step)
        ckpt = self.ckpt_root / tag
        t0 = time.perf_counter()
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state={"llmpipe": asdict(state)})
        # save_checkpoint ends with a barrier: every rank's files are on disk before they are listed.
        names = [list_files(ckpt) if self.rank == 0 else None]
        tdist.broadcast_object_list(names, src=0)
        parts: list[Any] = [None] * self.world
        tdist.all_gather_object(parts, hash_files(ckpt, names[0][self.rank::self.world]))
        if self.rank == 0:
            entries = {name: entry for part in parts for name, entry in part.items()}
            write_manifest(ckpt, entries, meta=checkpoint_meta(state.step, self.world, self.cfg.zero_stage))
            prune_checkpoints(self.ckpt_root, self.cfg.keep_checkpoints)
            log.info("checkpoint %s saved in %.1fs", tag, time.perf_counter() - t0)
        self._barrier()

    def save_requested(self) -> bool:
        """Whether a save was requested, the same answer on every rank (call it at the same point on all)."""
        if self.save_request is None:  # the same job file on every rank: none of them calls the collective
            return False
        return any_rank(self.rank == 0 and requested(self.save_request), self.device)

    def _barrier(self) -> None:
        import torch.distributed as tdist

        tdist.barrier()

    # -- export ----------------------------------------------------------------------------------
    def export(self) -> Path:
        """Rank 0 writes the HF model dir (safetensors + tokenizer) atomically as ``<output>/model``.

        Under ZeRO-3 each rank holds a slice of every weight: all ranks take part in gathering the
        full 16-bit state dict (layer by layer) onto rank 0's CPU first.
        """
        state_dict = self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.zero_stage == 3 else None
        final = self.out / "model"
        if self.rank == 0:
            module = self.engine.module
            module.config.use_cache = True
            with atomic_path(final) as tmp:
                module.save_pretrained(str(tmp), state_dict=state_dict, max_shard_size="5GB")
                for f in Path(self.job["tokenizer"]).iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
            log.info("exported the model to %s", final)
        self._barrier()
        return final

    # -- loop ------------------------------------------------------------------------------------
    def _reduce_mean(self, value: Any) -> float:
        import torch.distributed as tdist

        value = value.clone()
        tdist.all_reduce(value)
        return value.item() / self.world

    def _eval_and_log(self, state: TrainState) -> None:
        t0 = time.perf_counter()
        loss = self.evaluate()
        state.last_eval_loss = loss
        if state.initial_eval_loss is None:
            state.initial_eval_loss = loss
        self.metrics.log({EVAL_LOSS: loss, "perplexity": math.exp(min(loss, 50.0))}, step=state.step)
        if self.rank == 0:
            log.info("step %d/%d eval_loss %.4f perplexity %.2f (%.1fs)", state.step, self.steps, loss,
                     math.exp(min(loss, 50.0)), time.perf_counter() - t0)

    def train(self) -> dict[str, float] | None:
        """Train to the last step, export and return the summary; None when a save request stopped it first."""
        import torch

        from stages.common.modeling import peak_tflops

        cfg = self.cfg
        state = self.resume()
        resumed_from = state.step
        if resumed_from:
            self.metrics.log({RESUME_STEP: resumed_from}, step=resumed_from)
        if state.initial_eval_loss is None:
            self._eval_and_log(state)
        peak = None
        if self.cuda:
            peak = peak_tflops(torch.cuda.get_device_name(self.device), cfg.peak_tflops)
            torch.cuda.reset_peak_memory_stats(self.device)
        batches = self._loader(state.step)
        window_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        window_steps, window_t0, paused = 0, time.perf_counter(), 0.0  # paused: eval/checkpoint time in the window
        attempt_t0, attempt_train_s, attempt_tokens = time.perf_counter(), 0.0, 0
        while state.step < self.steps:
            step_lr = self.engine.get_lr()[0]  # the rate this step's update uses
            for _ in range(self.accum):
                ids = next(batches)
                loss = self.engine(input_ids=ids, labels=self._labels(ids)).loss
                self.engine.backward(loss)
                self.engine.step()
                window_loss += loss.detach().float()
            state.step += 1
            state.tokens += self.tokens_per_step
            window_steps += 1
            last = state.step == self.steps
            if state.step % cfg.log_every == 0 or last:
                mean_loss = self._reduce_mean(window_loss) / (self.accum * window_steps)  # syncs the device
                elapsed = time.perf_counter() - window_t0 - paused
                attempt_train_s += elapsed
                attempt_tokens += window_steps * self.tokens_per_step
                state.train_time_s += elapsed
                state.last_loss = mean_loss
                self._log_step(state, mean_loss, step_lr, window_steps * self.tokens_per_step / elapsed, peak)
                window_loss.zero_()
                window_steps, window_t0, paused = 0, time.perf_counter(), 0.0
            stop = not last and self.save_requested()
            t0 = time.perf_counter()
            if state.step % cfg.eval_every == 0 or last:
                self._eval_and_log(state)
            if state.step % cfg.checkpoint_every == 0 or last or stop:
                self.save(state)
            paused += time.perf_counter() - t0
            if stop:
                batches.close()
                if self.rank == 0:
                    write_json_atomic(self.out / SAVED_ON_REQUEST, {"step": state.step, "t": time.time()})
                    log.info("save requested (%s): saved %s at step %d; stopping without exporting",
                             self.save_request, checkpoint_tag(state.step), state.step)
                return None
        batches.close()  # stops DataLoader workers, if any
        self.export()
        # The stage's final metrics, named apart from the curves (the runner logs them at step 0, which
        # would put a stray point on a curve of the same name); as the sft and align stages name them.
        summary = {
            "final_train_loss": state.last_loss, "final_eval_loss": state.last_eval_loss,
            "final_perplexity": math.exp(min(state.last_eval_loss, 50.0)),
            "initial_eval_loss": state.initial_eval_loss,
            "initial_perplexity": math.exp(min(state.initial_eval_loss, 50.0)),
            "tokens": state.tokens, "steps": state.step, "train_time_s": state.train_time_s,
            "mean_tokens_per_s": attempt_tokens / attempt_train_s if attempt_train_s else 0.0,
            "resumed_from_step": resumed_from, "checkpoints_set_aside": self.job["checkpoints_set_aside"],
            "params": self.n_params, "world_size": self.world,
            "attempt_wall_s": time.perf_counter() - attempt_t0,
        }
        if self.cuda:
            summary["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if peak and summary["mean_tokens_per_s"]:
                summary["mean_mfu"] = self.flops_per_token * summary["mean_tokens_per_s"] / self.world / (peak * 1e12)
        summary = {k: float(v) for k, v in summary.items() if v is not None}
        if self.rank == 0:
            write_json_atomic(self.out / SUMMARY_FILE, summary, indent=2, newline=True)
        return summary

    def _log_step(self, state: TrainState, loss: float, lr: float, tokens_per_s: float, peak: float | None) -> None:
        import torch

        grad_norm = self.engine.get_global_grad_norm()
        metrics = {TRAIN_LOSS: loss, LR: lr, TOKENS_PER_S: tokens_per_s}
        if grad_norm is not None:
            metrics[GRAD_NORM] = float(grad_norm)
        if self.cuda:
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if peak:
                metrics["mfu"] = self.flops_per_token * tokens_per_s / self.world / (peak * 1e12)
        self.metrics.log(metrics, step=state.step)
        if self.rank == 0:
            remaining = (self.steps - state.step) * self.tokens_per_step / tokens_per_s
            log.info("step %d/%d loss %.4f lr %.2e %s%.0f tok/s, ~%.0fs left", state.step, self.steps, loss,
                     lr, f"grad_norm {metrics[GRAD_NORM]:.3f} " if GRAD_NORM in metrics else "",
                     tokens_per_s, remaining)


def main(argv: list[str] | None = None) -> int:
    job, rank = rank_start(__doc__.splitlines()[0], argv)
    try:
        Trainer(job).train()
    except Exception as exc:
        record_rank_error(Path(job["output_dir"]), rank, exc)
        raise
    import torch.distributed as tdist

    tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    # Everything is written and closed by now. Skip the interpreter's teardown of torch, DeepSpeed and
    # transformers: it spent 15-20 s in C++ destructors per rank on 2 loaded cores, for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
