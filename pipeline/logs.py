"""The one logging setup: console for the orchestrator; stdout for a stage worker, whose output
the executor writes to the stage's own log file."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None, stream: TextIO | None = None) -> None:
    level = level or os.environ.get("LLMPIPE_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries stay at WARNING unless asked for.
    for name in ("alembic", "urllib3", "git", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
