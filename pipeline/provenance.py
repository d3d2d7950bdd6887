"""Facts recorded next to every output: code commit and host."""

from __future__ import annotations

import functools
import socket
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=8)
def git_commit(project_dir: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files differ; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def host() -> str:
    return socket.gethostname()
