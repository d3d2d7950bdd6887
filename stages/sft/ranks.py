"""One rank of a launched sft run (stages/common/train_ranks.py): ``python -m stages.sft.ranks --job <file>``.

Every rank reads back what the stage process prepared (the conversations in ``<output>/data``, the
base model dir), builds the same SFTTrainer and trains it with :func:`stages.sft.stage.train`, the
function the stage calls when it trains in its own process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.sft.stage import BASE, DATA_DIR, SftConfig, resolve_runtime, train


def train_rank(cfg: SftConfig, ctx: Any, job: Mapping[str, Any]) -> tuple[Path, dict]:
    from stages.common.train_ranks import rank_runtime
    from stages.common.training import load_tokenizer
    from stages.sft.data import InstructionData, read_jsonl

    base_dir = Path(job["base_dir"])
    rt = rank_runtime(resolve_runtime(cfg), cfg.train, int(job["world_size"]))
    data = InstructionData(train=read_jsonl(ctx.output_dir / DATA_DIR / "train.jsonl"),
                           validation=read_jsonl(ctx.output_dir / DATA_DIR / "validation.jsonl"))
    return train(cfg, ctx, rt, load_tokenizer(base_dir, BASE), data, base_dir)


if __name__ == "__main__":
    from stages.common.train_ranks import exit_now, run_rank

    exit_now(run_rank(SftConfig, train_rank))
