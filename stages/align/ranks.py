"""One rank of a launched align phase (stages/common/train_ranks.py): ``python -m stages.align.ranks --job <file>``.

Every rank reads back the pairs the stage process wrote (``<output>/preferences``), builds the same
TRL trainer and trains the job's phase (the policy, or the reward model of rloo/grpo) with
:func:`stages.align.stage.train_phase`, the function the stage calls when it trains in its own process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.align.config import PREFERENCES, SFT, AlignConfig, base_model_dir
from stages.align.stage import resolve_runtime, train_phase


def train_rank(cfg: AlignConfig, ctx: Any, job: Mapping[str, Any]) -> tuple[Path, dict]:
    from stages.align.data import read_pairs
    from stages.common.train_ranks import rank_runtime
    from stages.common.training import load_tokenizer

    rt = rank_runtime(resolve_runtime(cfg), cfg.train, int(job["world_size"]))
    tok = load_tokenizer(base_model_dir(cfg, ctx), SFT, padding_side="left")  # as the stage process loads it
    return train_phase(job["phase"], cfg, ctx, rt, tok, read_pairs(ctx.output_dir / PREFERENCES))


if __name__ == "__main__":
    from stages.common.train_ranks import exit_now, run_rank

    exit_now(run_rank(AlignConfig, train_rank))
