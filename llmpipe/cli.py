"""The `llmpipe` console script: the orchestrator's CLI over this project's stages, plus ``llmpipe serve``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llmpipe.project import CONFIG_DIR
from pipeline.cli import Command
from pipeline.cli import main as cli_main


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="serve this model instead of stage.serve.base_model: a Hugging Face model dir "
                             "(vLLM) or a .gguf file (llama.cpp)")
    parser.add_argument("--bench", action="store_true", help="also run the load benchmark before serving")


def _serve(args: argparse.Namespace, cfg, project) -> int:
    """Serve the quantized model of this config (or --model-dir) in the foreground until Ctrl-C: vLLM for model
    dirs (GPTQ, AWQ), llama.cpp for a GGUF."""
    from pipeline.plan import make_plan
    from stages.serve.stage import SERVER_LOG, serve_foreground, served_dir

    if args.model_dir is not None:
        model_dir = args.model_dir.resolve()
    else:  # stage.serve.base_model: an upstream output (OutputNotBuilt names the stage), a dir or a hub model
        model_dir = served_dir(cfg.stages["serve"], make_plan(cfg, project)).resolve()
    log_file = cfg.root / "serve" / "foreground" / SERVER_LOG
    serve_foreground(cfg.stages["serve"], model_dir, log_file, args.bench, logging.getLogger("llmpipe.serve"))
    return 0


def _fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="only list what would be fetched, with the revision each resolves to from the cache")


def _fetch(args: argparse.Namespace, cfg, project) -> int:
    """Download the hub models, datasets and lm-eval tasks the config names into the HF cache (llmpipe/fetch.py)."""
    from llmpipe.fetch import run_fetch

    return run_fetch(cfg, dry_run=args.dry_run)


COMMANDS = {"serve": Command("serve the quantized model (or --model-dir) in the foreground until Ctrl-C "
                             "(vLLM; llama.cpp for GGUF)",
                             _serve, _serve_arguments),
            "fetch": Command("download the hub models, datasets and lm-eval tasks the config names into the HF "
                             "cache (on a node with network), recording their revisions", _fetch, _fetch_arguments)}


def main(argv: list[str] | None = None) -> int:
    return cli_main(sys.argv[1:] if argv is None else argv, project_path="llmpipe.project:PROJECT",
                    default_config_dir=CONFIG_DIR, commands=COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
