import contextlib
import fcntl
import json
import os
import shutil
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
    locally through the real CLI, once per test run: the end-to-end test continues from a copy of
    this root, and the Slurm test compares its job arrays' outputs with these. Read-only for its
    users (copy the root to run more stages in it).

    Under pytest-xdist (`make test` runs two workers, ``--dist loadfile``: a module's tests, and so its
    fixtures, stay on one worker) the workers share the one build: the first to need it builds it
    under a file lock in the run's common temp dir, the others wait and reuse it."""
    from tests.tiny_run import build_corpus, llmpipe

    base = shared_tmp(tmp_path_factory) / "tiny-data"
    done = base / "done.json"
    with exclusive(base.with_suffix(".lock")):
        if done.exists():
            return {k: Path(v) if k != "stdout" else v for k, v in json.loads(done.read_text()).items()}
        shutil.rmtree(base, ignore_errors=True)  # what a failed build left
        corpus, root = base / "corpus", base / "runs"
        build_corpus(corpus)
        proc = llmpipe("run", "--wait-tracking", "run.only=[tokenize]", root=root, corpus=corpus)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
        data = {"corpus": corpus, "root": root, "stdout": proc.stdout}
        done.write_text(json.dumps({k: str(v) for k, v in data.items()}))
        return data


def shared_tmp(tmp_path_factory) -> Path:
    """The temp dir all xdist workers of this run share (each worker's basetemp is a child of it);
    without xdist, the session's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def exclusive(lock: Path):
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# `make test` runs two xdist workers (--dist loadfile): a worker takes the next module when it runs out of work, so
# the modules that take longest go first (longest-first keeps the two busy to the end), and the first module of
# the second worker needs no `tiny_data`, which the first builds meanwhile. Measured on 2 cores; the rest keep
# their order. A name here that no longer exists is harmless.
FIRST = ("tests/test_pipeline_tiny.py", "tests/stages/sft/test_sft_ranks.py", "tests/slurm/test_slurm.py",
         "tests/stages/align/test_align_ranks.py", "tests/pipeline/test_faults.py",
         "tests/stages/evaluate/test_evaluate.py", "tests/pipeline/test_mlflow_lineage.py",
         "tests/stages/serve/test_serve.py", "tests/pipeline/test_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(FIRST)))  # stable: the rest keep order
