"""Running the real `llmpipe` CLI on the tiny config against a freshly built embedded corpus.

Shared by the end-to-end test (tests/test_pipeline_tiny.py) and the Slurm executor's test
(tests/slurm/test_slurm.py), which compares its outputs with the local run's: both use the
session fixture ``tiny_data`` (tests/conftest.py), so the corpus is built and the data stages run
locally once per test session.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLMPIPE = str(Path(sys.executable).parent / "llmpipe")


def corpus_overrides(corpus: Path) -> list[str]:
    """Point the tiny config at a corpus built by ``python -m llmpipe.corpus``."""
    return [f"data.warc=[{corpus}/*.warc.gz]", f"stage.quality.classifier.positive={corpus}/quality/positive.txt",
            f"stage.quality.classifier.negative={corpus}/quality/negative.txt"]


def build_corpus(corpus: Path) -> None:
    subprocess.run([sys.executable, "-m", "llmpipe.corpus", str(corpus)], cwd=REPO, check=True, timeout=600)


def llmpipe(*args: str, root: Path, corpus: Path | None, timeout: float = 3600,
            conf: str = "tiny") -> subprocess.CompletedProcess:
    """``llmpipe <args> -c <conf>`` with the run root and corpus (if any) given; output captured."""
    cmd = [LLMPIPE, *args, "-c", conf, f"run.root={root}", *(corpus_overrides(corpus) if corpus else [])]
    env = {**os.environ, "LLMPIPE_LOG_LEVEL": "INFO"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def plan_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """``llmpipe plan`` output -> {stage: (fingerprint, action)}."""
    table = stdout.split("\n\n")[0]  # the table ends at the first blank line (outside inputs, job scripts follow)
    rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
    return {r[0]: (r[1], r[2]) for r in rows if len(r) >= 3}
