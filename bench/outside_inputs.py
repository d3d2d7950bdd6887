"""Planning with big outside inputs: the content digest of a multi-GB base model dir, cold and cached.

A fine-tune's fingerprint holds the digest of its base model dir and data files (pipeline/content.py),
so `llmpipe plan` reads them. The digest is cached by (path, size, mtime, inode): this measures what
that buys on a model dir of --gib GiB (several safetensors shards plus config and tokenizer files).

Baseline, same machine, same run: hashing every byte each time (what planning would cost without the
cache), i.e. the cold digest. Figures: cold digest, cached digest, and `plan` of conf/tiny-finetune.yaml
with that dir as base model (target: under 2 s), and the ratio cold/cached.

    python bench/outside_inputs.py --gib 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_model_dir(root: Path, gib: float, shards: int) -> Path:
    """A dir shaped like a sharded HF model: config.json, tokenizer files and ``shards`` weight files of
    random bytes (random: no file system shortcut for zeros), copied from the tiny base when present."""
    model = root / "model"
    model.mkdir(parents=True)
    base = REPO / "runs" / "base-model"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, model / name)
    if not (model / "config.json").is_file():
        (model / "config.json").write_text("{}")
    size = int(gib * (1 << 30)) // shards
    block = os.urandom(1 << 24)
    for i in range(shards):
        with open(model / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
    return model


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmpipe-bench-") as tmp:
        os.environ["LLMPIPE_CACHE_DIR"] = str(Path(tmp) / "cache")
        from pipeline.content import content_digest

        model = make_model_dir(Path(tmp), args.gib, args.shards)
        cold, digest = timed(lambda: content_digest(model))
        cached, again = timed(lambda: content_digest(model))
        assert digest == again
        env = {**os.environ, "BASE_MODEL": str(model)}
        plan_s, result = timed(lambda: subprocess.run(
            [sys.executable, "-m", "llmpipe", "plan", "--config-name", "tiny-finetune", f"run.root={tmp}/runs"],
            cwd=REPO, env=env, capture_output=True, text=True))
        if result.returncode != 0:
            print(result.stdout, result.stderr)
        print(f"model dir: {args.gib:.1f} GiB in {args.shards} shards")
        print(f"baseline, hashing every byte (no cache): {cold:.2f} s ({args.gib / cold:.2f} GiB/s)")
        print(f"cached digest (stat only):               {cached * 1000:.1f} ms  ratio {cold / cached:.0f}x faster")
        print(f"llmpipe plan -c tiny-finetune (cached):  {plan_s:.2f} s (target < 2 s; the whole CLI process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
