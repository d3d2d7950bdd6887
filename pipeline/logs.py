"""The one logging setup: console for the orchestrator; stdout for a stage worker, whose output
the executor writes to the stage's own log file.

Every record passes :class:`RedactSecrets` on its way out, in the orchestrator, the stage workers and
the MLflow sync alike: a secret that reaches a log line (a tracking URI with its password, a token an
exception message quotes) is written as ``***`` (pipeline/secrets.py says what counts). The values it
knows come from the loaded config (pipeline/config.py registers them) and from the environment
(variables whose name says secret, registered here), so a stage worker, which gets cluster.env as its
environment, masks them too.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from pipeline.secrets import redact_text, register_environment

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class RedactSecrets(logging.Filter):
    """Masks secrets in a record's message, traceback and stack before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def setup_logging(level: str | int | None = None, stream: TextIO | None = None) -> None:
    level = level or os.environ.get("LLMPIPE_LOG_LEVEL", "INFO")
    register_environment()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(RedactSecrets())
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries stay at WARNING unless asked for.
    for name in ("alembic", "urllib3", "git", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
