"""A base model for ``conf/tiny-finetune.yaml`` built by the repo itself: ``make base-model``.

A fine-tune starts from an existing model, and this machine cannot download one. So the tiny recipe's
default base is the tiny pipeline's own pretrained model: this runs ``llmpipe run -c tiny
run.only=[pretrain]`` (cached when it already ran), then copies its ``pretrain.model`` output (weights,
config, tokenizer) to the given folder, atomically. Any local Hugging Face model dir or hub id works
instead: ``make pipeline CONF=tiny-finetune BASE_MODEL=/path/to/model``.

    python -m llmpipe.base_model runs/base-model
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.files import atomic_path


def build(dest: Path, conf: str = "tiny") -> Path:
    """``dest`` holding a copy of config ``conf``'s pretrain output (run first when not built)."""
    from llmpipe.project import PROJECT, load_config
    from pipeline.plan import make_plan

    if (dest / "config.json").is_file():
        print(f"base model: {dest} exists (delete it to rebuild)")
        return dest
    subprocess.run([sys.executable, "-m", "llmpipe", "run", "--config-name", conf, "run.only=[pretrain]"],
                   check=True)
    source = make_plan(load_config(conf), PROJECT).committed("pretrain.model")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copytree(source, tmp)
    print(f"base model: copied {source} to {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="the model dir to create")
    parser.add_argument("--config-name", default="tiny", help="the config whose pretrain output is copied")
    args = parser.parse_args(argv)
    build(args.dest, args.config_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
