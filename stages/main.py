"""The `llmpipe` console script: the orchestrator's CLI over this project's stages."""

import sys
from pathlib import Path

from pipeline.cli import main as cli_main

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def main() -> int:
    return cli_main(sys.argv[1:], project_path="stages.registry:PROJECT", default_config_dir=CONFIG_DIR)


if __name__ == "__main__":
    sys.exit(main())
