"""The MLflow UI, opened in a real headless browser (Debian's chromium) on a store the sync made from a pipeline
run whose stages logged four models: the experiment opens in the model-training view, and its models page
lists the four models. Checked by the text of the rendered DOM (`chromium --headless --dump-dom`; the UI is a
React app, so the browser is given virtual time to fetch and render).

Installs chromium with apt-get when it is missing (as tests/slurm/start_cluster.sh installs Slurm); skips,
saying why, only where that cannot be done.
"""

import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline import config
from pipeline.processes import terminate_group
from pipeline.runner import Runner
from pipeline.tracking import tracking_uri, ui_link
from tests.pipeline.lineage_project import LINEAGE, MODEL_STAGES, write_lineage_conf

pytestmark = pytest.mark.integration

SERVER_START_S = 300  # ~20 s on an idle 2-core machine, minutes when it is shared
RENDER_BUDGET_MS = 20000  # virtual time chromium gives the React app to fetch and render


def chromium() -> str:
    """The chromium executable, installed with apt-get if missing; a skip that says why where it cannot be."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed, and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"apt-get could not install chromium: {(proc.stderr or proc.stdout)[-500:]}")
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(browser: str, url: str, profile) -> str:
    """The text of the DOM chromium rendered at ``url`` (scripts and styles left out)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             f"--virtual-time-budget={RENDER_BUDGET_MS}", "--dump-dom"]
    proc = subprocess.run([browser, *flags, url], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", proc.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A store made by a tracked run of the lineage project, served by `mlflow ui`; yields (base URL, config)."""
    project = tmp_path_factory.mktemp("ui")
    conf = write_lineage_conf(project)
    cfg = config.load(LINEAGE, conf, "lineage", [], project_dir=project)
    result = Runner(cfg, LINEAGE).run()
    assert result.ok and result.tracker.wait(timeout=300)
    port = free_port()
    log = open(project / "ui.log", "wb")  # noqa: SIM115 - closed below
    # As `llmpipe ui` starts it (pipeline/cli.py), in a process group of its own: its workers go with it.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(cfg),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow ui did not answer: {(project / 'ui.log').read_text()[-2000:]}")
                time.sleep(1)
        yield base, cfg
    finally:
        terminate_group(server, grace_s=30)
        log.close()


def experiment(base: str, name: str) -> dict:
    """The experiment as the UI's own API serves it to the browser."""
    with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name={name}") as r:
        return json.loads(r.read())["experiment"]


def test_the_experiment_opens_in_the_model_training_view(ui, tmp_path):
    base, cfg = ui
    exp = experiment(base, cfg.tracking.experiment)
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    text = page_text(chromium(), ui_link(base, exp["experiment_id"]), tmp_path / "profile")
    # The model-training view: Runs, Models and Model registry tabs, the pipeline run listed; not the GenAI
    # view's Overview, Traces dashboards and Agent versions.
    assert "Model registry" in text and " Models " in text and "Agent versions" not in text, text[:2000]
    assert "lineage: ran 7 (corpus, clean, pretrain, sft, +3)" in text, text[:2000]


def test_the_models_page_lists_the_four_models(ui, tmp_path):
    base, cfg = ui
    exp_id = experiment(base, cfg.tracking.experiment)["experiment_id"]
    text = page_text(chromium(), ui_link(base, exp_id, "models"), tmp_path / "profile")
    assert "Logged Models" in text, text[:2000]
    listed = re.findall(r"\b(pretrain|sft|align|quantize) Ready\b", text)  # name, then status, per table row
    assert sorted(listed) == sorted(MODEL_STAGES), text[:2000]
