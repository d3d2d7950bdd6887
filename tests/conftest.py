import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Stage worker processes import test-only projects (tests.pipeline.toy) from the repo root.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# Never reach a hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# The content-digest cache of outside inputs (pipeline/content.py): the session's own, not the user's.
os.environ.setdefault("LLMPIPE_CACHE_DIR", tempfile.mkdtemp(prefix="llmpipe-cache-"))


@pytest.fixture
def toy(tmp_path):
    """Load the toy project's config from a temporary project folder: toy(overrides...)."""
    from pipeline import config
    from tests.pipeline.toy import PROJECT, write_toy_conf

    conf_dir = write_toy_conf(tmp_path)

    def load(*overrides: str, conf_name: str = "toy"):
        return config.load(PROJECT, conf_dir, conf_name, list(overrides), project_dir=tmp_path)

    load.project = PROJECT
    load.dir = tmp_path
    load.conf_dir = conf_dir
    return load


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A fresh embedded corpus and the tiny pipeline's data stages (ingest -> tokenize) run on it
    locally through the real CLI, once per session: the end-to-end test continues from this root,
    and the Slurm test compares its job arrays' outputs with these."""
    from tests.tiny_run import build_corpus, llmpipe

    base = tmp_path_factory.mktemp("tiny")
    corpus, root = base / "corpus", base / "runs"
    build_corpus(corpus)
    proc = llmpipe("run", "--wait-tracking", "run.only=[tokenize]", root=root, corpus=corpus)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return {"corpus": corpus, "root": root, "stdout": proc.stdout}
