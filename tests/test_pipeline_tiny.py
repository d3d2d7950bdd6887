"""The tiny default pipeline end to end, through the real CLI, on a freshly built embedded corpus.

This is the integration test CI runs: every stage's real library on the real code path, at tiny
sizes. It runs the pipeline once (module fixture) and checks what each stage did, then checks
that a second run is fully cached and that an edit re-runs exactly the affected stages.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LLMPIPE = str(Path(sys.executable).parent / "llmpipe")
# The last stage whose implementation has landed; the run covers it and everything it needs.
LAST_STAGE = "tokenize"

pytestmark = pytest.mark.integration


def llmpipe(*args, root, corpus, timeout=3600):
    cmd = [LLMPIPE, *args, "-c", "tiny", f"run.root={root}", f"data.warc=[{corpus}/*.warc.gz]",
           f"stage.quality.classifier.positive={corpus}/quality/positive.txt",
           f"stage.quality.classifier.negative={corpus}/quality/negative.txt"]
    env = {**os.environ, "LLMPIPE_LOG_LEVEL": "INFO"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    corpus, root = base / "corpus", base / "runs"
    subprocess.run([sys.executable, "-m", "stages.corpus", str(corpus)], cwd=REPO, check=True, timeout=600)
    proc = llmpipe("run", "--wait-tracking", f"run.only=[{LAST_STAGE}]", root=root, corpus=corpus)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return {"root": root, "corpus": corpus, "stdout": proc.stdout}


def info(root, stage):
    [path] = (root / stage).glob(f"{stage}-*/stage_info.json")
    return json.loads(path.read_text())


def test_every_data_stage_does_visible_work(tiny):
    root = tiny["root"]
    ingest = info(root, "ingest")["metrics"]
    assert ingest["docs_out"] > 250 and ingest["dropped_non_html"] > 0 and ingest["dropped_http_error"] > 0
    dedup = info(root, "dedup")["metrics"]
    assert dedup["dropped_exact"] >= 10 and dedup["dropped_near"] >= 10
    quality = info(root, "quality")["metrics"]
    assert quality["docs_out"] > 150 and quality["dropped_too_few_words"] > 0
    pii = info(root, "pii")["metrics"]
    for kind in ("email", "phone", "ip_address", "credit_card", "iban", "secret"):
        assert pii[f"pii_{kind}"] > 0, kind


def test_no_planted_junk_or_pii_survives(tiny):
    import pyarrow.parquet as pq

    manifest = json.loads((tiny["corpus"] / "manifest.json").read_text())
    records = manifest["records"] if isinstance(manifest, dict) else manifest
    junk = {r["url"] for r in records if r.get("kind") == "junk"}
    [docs] = (tiny["root"] / "pii").glob("pii-*/documents")
    table = pq.read_table(docs).to_pydict()
    assert not junk & set(table["url"])
    text = "\n".join(table["text"])
    planted = [v for r in records for v in (r.get("pii") or {}).values() for v in (v if isinstance(v, list) else [v])]
    assert planted, "the corpus manifest lists planted PII values"
    leaked = [v for v in planted if isinstance(v, str) and v in text]
    assert not leaked


def test_tokenize_packs_tokens_and_holds_out_documents(tiny):
    if LAST_STAGE == "pii":
        pytest.skip("tokenize has not landed")
    metrics = info(tiny["root"], "tokenize")["metrics"]
    assert metrics["tokens_train"] > 100_000 and metrics["tokens_val"] > 0


def test_second_run_is_fully_cached_and_an_edit_reruns_only_descendants(tiny):
    root, corpus = tiny["root"], tiny["corpus"]
    proc = llmpipe("plan", f"run.only=[{LAST_STAGE}]", root=root, corpus=corpus)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2:] if line.strip()]
    assert {r[0]: r[2] for r in rows}["ingest"] == "skip"
    assert {r[2] for r in rows if r[2] != "excluded"} == {"skip"}

    proc = llmpipe("plan", f"run.only=[{LAST_STAGE}]", "stage.pii.phone.regions=[US]", root=root, corpus=corpus)
    actions = {r[0]: r[2] for r in (line.split() for line in proc.stdout.splitlines()[2:] if line.strip())}
    assert actions["quality"] == "skip" and actions["pii"] == "run"


def test_pipeline_is_in_mlflow(tiny):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny['root'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llmpipe")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"pipeline-tiny", "ingest", "dedup", "quality", "pii"} <= names
    assert all(r.info.status == "FINISHED" for r in runs)
