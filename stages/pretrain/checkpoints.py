"""The pretrain stage's checkpoints on disk: which are complete, which to resume from, which to prune.

A checkpoint is ``checkpoints/step<8 digits>/``: the files DeepSpeed's ``save_checkpoint`` writes
for every rank, then a manifest (pipeline.files: each file's size and xxh3 hash, plus the step and
the layout that wrote it) that rank 0 writes once every rank's files are on disk; the ranks hash a
share of the files each (stages/pretrain/loop.py). The manifest is what makes a checkpoint
complete: a save cut short has none.

Before an attempt starts its ranks, the stage process picks where it resumes
(:func:`choose_resume`): the newest complete checkpoint whose files still match their manifest.
One that does not (a file cut short, changed or missing) is set aside as
``step<N>.corrupt-<UTC time>`` (renamed, not deleted, and never pruned) with a warning naming the
file, and the next newest is tried; when none is left, training starts over from step 0 and says
so. Checking the tiny model's 117 MB checkpoint takes ~0.05 s (xxh3 from the page cache, ~0.25 s
per GB), small beside loading it. With ``keep_checkpoints`` >= 2 there is an older one to fall back
to.

Light on purpose: the stage module imports it, and ``llmpipe plan`` imports every stage module.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import LlmpipeError
from pipeline.files import MANIFEST, ManifestMismatch, read_manifest, set_aside, verify_manifest


class CheckpointLayoutError(LlmpipeError):
    """A checkpoint was written by another number of ranks or another ZeRO stage than this run's."""


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def tag_step(tag: str) -> int | None:
    """The step of a checkpoint dir's name; None for anything else (a set-aside ``step<N>.corrupt-...`` too)."""
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def checkpoint_meta(step: int, world_size: int, zero_stage: int) -> dict[str, int]:
    """What a checkpoint's manifest records besides its files: the step, and the layout that wrote it."""
    return {"step": step, "world_size": world_size, "zero_stage": zero_stage}


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the checkpoints under ``root`` that have a manifest (not yet checked against it), oldest first."""
    found = []
    if root.is_dir():
        for d in root.iterdir():
            step = tag_step(d.name)
            if step is not None and d.is_dir() and (d / MANIFEST).is_file():
                found.append((step, d))
    return sorted(found)


def check_layout(meta: dict[str, Any], ckpt: Path, world: int, zero_stage: int) -> None:
    if meta["world_size"] != world or meta["zero_stage"] != zero_stage:
        raise CheckpointLayoutError(
            f"{ckpt} was written by {meta['world_size']} ranks with ZeRO stage {meta['zero_stage']}; this attempt "
            f"has {world} ranks with ZeRO stage {zero_stage}. DeepSpeed cannot load a ZeRO checkpoint into another "
            f"layout: run with the earlier launch settings and zero_stage, or delete {ckpt.parent} to start over")


@dataclass
class Resume:
    """Where an attempt starts: a verified checkpoint (or None: step 0), and what was set aside on the way."""

    checkpoint: Path | None = None
    step: int = 0
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # set aside: (new path, what failed)
    verify_s: float = 0.0


def choose_resume(root: Path, world: int, zero_stage: int, log: Any) -> Resume:
    """The newest checkpoint under ``root`` whose files match its manifest; corrupt newer ones are set aside.

    Logs a warning per checkpoint set aside (naming the file that failed) and says where training
    starts. A verified checkpoint of another layout raises :class:`CheckpointLayoutError`: it is
    sound, only this attempt's launch settings differ.
    """
    resume = Resume()
    started = time.perf_counter()
    for step, ckpt in reversed(complete_checkpoints(root)):
        try:
            meta = verify_manifest(ckpt)["meta"]
        except ManifestMismatch as exc:
            moved = set_aside(ckpt)
            resume.corrupt.append((moved, str(exc)))
            log.warning("checkpoint %s is corrupt: %s; set aside as %s, trying the one before it", ckpt.name, exc,
                        moved.name)
            continue
        check_layout(meta, ckpt, world, zero_stage)
        resume.checkpoint, resume.step = ckpt, step
        break
    resume.verify_s = time.perf_counter() - started
    if resume.checkpoint is not None:
        log.info("resuming from %s (its %d files match their manifest, checked in %.2fs)", resume.checkpoint,
                 len(read_manifest(resume.checkpoint)["files"]), resume.verify_s)
    elif resume.corrupt:
        log.warning("no complete checkpoint is left (%d set aside): training starts over from step 0",
                    len(resume.corrupt))
    return resume


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and unfinished ones (a save cut short
    by a crash: no manifest) older than the newest complete one. Set-aside checkpoints stay."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    newest = complete[-1][0]
    kept = {d for _, d in complete[-keep:]}
    for d in root.iterdir():
        step = tag_step(d.name)  # None for a set-aside one
        if d.is_dir() and d not in kept and step is not None and step < newest:
            shutil.rmtree(d, ignore_errors=True)  # an unfinished save newer than `newest` is overwritten by the next
