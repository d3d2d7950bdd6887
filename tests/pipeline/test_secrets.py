"""Secrets given through config: masked in everything written (MLflow params and artifacts,
stage_info.json, the journal, logs, printouts), still handed to the processes that need them, and
never verbatim in a fingerprint. The end-to-end tests run a real project and a real MLflow store, then
read every byte written for the secrets."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import Project, Stage, StageContext
from pipeline.cli import main
from pipeline.fingerprint import fingerprint_payload
from pipeline.logs import setup_logging
from pipeline.secrets import (
    MASK,
    for_fingerprint,
    is_secret_key,
    redact,
    redact_override,
    redact_text,
    register,
)
from pipeline.tracking import pending_journals

# ---------------------------------------------------------------- a project that needs secrets


@dataclass(frozen=True)
class FetchConfig:
    url: str  # where the data comes from; may carry credentials
    api_token: str  # a secret in a stage config
    token_env: str  # names the environment variable holding the hub token (a name, shown)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run_fetch(cfg: FetchConfig, ctx: StageContext) -> dict[str, float]:
    token = os.environ.get(cfg.token_env, "")
    ctx.log.info("fetching %s with %s=%s", cfg.url, cfg.token_env, token)  # the worker's log filter masks both
    # What the stage was handed, as hashes: the output itself must not hold the secrets either.
    ctx.output("seen").write_text(json.dumps({"env": sha(token), "api_token": sha(cfg.api_token)}))
    return {"ok": 1.0}


VAULT = Project(name="vault", stages=(Stage("fetch", FetchConfig, run_fetch, (), ("seen",)),),
                import_path="tests.pipeline.test_secrets:VAULT")

VAULT_YAML = """\
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking:
  {enabled: true, uri: null, experiment: vault, artifact_location: null,
   ui_host: 127.0.0.1, ui_port: 5000, ui_workers: 1}
cluster: {executor: local, env: {}}
stage:
  fetch: {url: "https://example.org/corpus", api_token: placeholder, token_env: HF_TOKEN}
"""

HF_TOKEN = "hf_envtoken5b1f0c"  # given as +cluster.env.HF_TOKEN=...
API_TOKEN = "cfgtoken9d2e7a"  # given as stage.fetch.api_token=...
URI_PASSWORD = "uripass47c1aa"  # inside the data URL
QUERY_TOKEN = "querytok0e93bd"  # a ?token= of the data URL
URL = f"https://reader:{URI_PASSWORD}@data.example/corpus?token={QUERY_TOKEN}&part=1"
SECRETS = (HF_TOKEN, API_TOKEN, URI_PASSWORD, QUERY_TOKEN)


@pytest.fixture
def vault(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "vault.yaml").write_text(VAULT_YAML)
    return tmp_path


def cli(project_dir: Path, *args: str) -> int:
    return main(list(args), project_path="tests.pipeline.test_secrets:VAULT", default_config_dir=project_dir / "conf")


def files_holding(folder: Path, secrets=SECRETS) -> list[str]:
    """Every file under ``folder`` (databases included, byte for byte) that holds one of ``secrets``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def assert_no_secret(text: str, secrets=SECRETS) -> None:
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"{leaked} in:\n{text[-3000:]}"


# ---------------------------------------------------------------- which keys are secret


@pytest.mark.parametrize("key", ["HF_TOKEN", "token", "api_key", "apiKey", "APIKEY", "db_password", "client_secret",
                                 "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "private-key", "credentials"])
def test_keys_that_name_a_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", [
    "api_key_env", "token_env", "HF_TOKEN_PATH", "key_file", "secret_name",  # they name where the secret is
    "max_tokens", "tokenizer", "sample_max_new_tokens", "keep_partial", "TOKENIZERS_PARALLELISM",  # counts, names
    "eos_token", "pad_token",  # a tokenizer's vocabulary
    "PWD", "placeholder", "enabled",
])
def test_keys_that_do_not(key):
    assert not is_secret_key(key)


def test_redact_masks_secret_values_key_by_key_and_every_cluster_env_value():
    data = {"cluster": {"executor": "local", "env": {"HF_TOKEN": "hf_x", "NCCL_DEBUG": "INFO"}},
            "tracking": {"uri": "http://alice:pw@host:5000"},
            "stage": {"pii": {"secret": {"enabled": True, "placeholder": "<SECRET>", "min_length": 8}},
                      "serve": {"api_key_env": "SERVE_KEY", "api_key": None},
                      "fetch": {"tokens": ["a"], "api_token": "t0k3n", "hosts": [URL]}}}
    assert redact(data) == {
        "cluster": {"executor": "local", "env": {"HF_TOKEN": MASK, "NCCL_DEBUG": MASK}},
        "tracking": {"uri": f"http://alice:{MASK}@host:5000"},
        # a mapping under a secret-looking key is a group of settings: its own keys decide
        "stage": {"pii": {"secret": {"enabled": True, "placeholder": "<SECRET>", "min_length": 8}},
                  "serve": {"api_key_env": "SERVE_KEY", "api_key": None},
                  "fetch": {"tokens": ["a"], "api_token": MASK,
                            "hosts": [f"https://reader:{MASK}@data.example/corpus?token={MASK}&part=1"]}}}


@pytest.mark.parametrize(("override", "shown"), [
    ("+cluster.env.HF_TOKEN=hf_abc", "+cluster.env.HF_TOKEN=***"),
    ("+cluster.env.WANDB_MODE=offline", "+cluster.env.WANDB_MODE=***"),
    ("cluster.env={HF_TOKEN:hf_abc}", "cluster.env=***"),
    ("stage.fetch.api_token=abc", "stage.fetch.api_token=***"),
    ("tracking.uri=https://u:pw@mlflow.example", "tracking.uri=https://u:***@mlflow.example"),
    ("stage.serve.api_key_env=MY_KEY", "stage.serve.api_key_env=MY_KEY"),
    ("cluster=slurm", "cluster=slurm"),
    ("stage/sft=qlora", "stage/sft=qlora"),
])
def test_overrides_are_shown_without_their_secret(override, shown):
    assert redact_override(override) == shown


def test_free_text_masks_uri_credentials_assignments_flags_and_known_values():
    register(["known-secret-value"])
    text = (f"GET {URL} from http://host:5000/api sqlite:///runs/mlflow.db HF_TOKEN=hf_abc --api-key k3y "
            "--max-tokens 5 llmpipe.run_key=abc known-secret-value https://x.blob/c?sv=1&sig=s1gn&se=2")
    assert redact_text(text) == (
        f"GET https://reader:{MASK}@data.example/corpus?token={MASK}&part=1 from http://host:5000/api "
        f"sqlite:///runs/mlflow.db HF_TOKEN={MASK} --api-key {MASK} --max-tokens 5 llmpipe.run_key=abc {MASK} "
        f"https://x.blob/c?sv=1&sig={MASK}&se=2")
    assert redact_text(redact_text(text)) == redact_text(text)


def test_fingerprints_hash_secret_values_and_leave_uri_credentials_out():
    def fp_config(**cfg):
        return fingerprint_payload("fetch", 1, cfg, {})["config"]

    one = fp_config(api_token="a-token", url=URL, n=1)
    assert one == {"api_token": "sha256:" + sha("a-token"), "n": 1,
                   "url": f"https://reader:{MASK}@data.example/corpus?token={MASK}&part=1"}
    assert fp_config(api_token="b-token", url=URL, n=1) != one  # a new secret re-runs the stage
    # other credentials for the same data: the same output
    assert fp_config(api_token="a-token", url=URL.replace(URI_PASSWORD, "other"), n=1) == one


@pytest.mark.parametrize("conf", ["tiny", "llama-7b"])
def test_no_shipped_value_is_taken_for_a_secret(conf):
    """So no fingerprint moved and no param is hidden: every stage config enters its fingerprint as it is."""
    from llmpipe.project import PROJECT, load_config
    from pipeline.plan import hashed_config

    cfg = load_config(conf)
    for stage in PROJECT.stages:
        config = hashed_config(stage, cfg.stages[stage.name])
        assert for_fingerprint(config) == config, stage.name
    assert redact(cfg.resolved) == cfg.resolved


def test_log_lines_and_tracebacks_are_masked(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "svc-token-8a7f")  # named like a secret: masked once logging is set up
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging(stream=stream)
        log = logging.getLogger("llmpipe.test")
        log.info("connecting to %s with %s", "http://alice:pw-8a7f@host/x", "svc-token-8a7f")
        try:
            raise RuntimeError(f"cannot reach {URL}")
        except RuntimeError:
            log.exception("sync failed")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
    out = stream.getvalue()
    assert f"connecting to http://alice:{MASK}@host/x with {MASK}" in out
    assert f"RuntimeError: cannot reach https://reader:{MASK}@" in out
    assert_no_secret(out, ("pw-8a7f", "svc-token-8a7f", URI_PASSWORD, QUERY_TOKEN))


# ---------------------------------------------------------------- a real run


def test_secrets_reach_the_stage_and_nothing_written_holds_them(vault, capsys, monkeypatch):
    monkeypatch.chdir(vault)
    args = ("-c", "vault", f"+cluster.env.HF_TOKEN={HF_TOKEN}", f"stage.fetch.api_token={API_TOKEN}",
            f"stage.fetch.url='{URL}'")
    assert cli(vault, "plan", *args) == 0
    assert cli(vault, "run", "--wait-tracking", *args) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err, printed.err[-3000:]

    root = vault / "runs"
    [output] = (root / "fetch").glob("fetch-*")
    seen = json.loads((output / "seen").read_text())
    assert seen == {"env": sha(HF_TOKEN), "api_token": sha(API_TOKEN)}  # the stage process got them unchanged

    info = json.loads((output / "stage_info.json").read_text())
    assert info["config"] == {"url": f"https://reader:{MASK}@data.example/corpus?token={MASK}&part=1",
                              "api_token": MASK, "token_env": "HF_TOKEN"}
    assert info["payload"]["config"]["api_token"] == "sha256:" + sha(API_TOKEN)
    assert f"+cluster.env.HF_TOKEN={MASK}" in info["overrides"]
    log = (output / "stage.log").read_text()
    assert f"fetching https://reader:{MASK}@data.example/corpus?token={MASK}&part=1 with HF_TOKEN={MASK}" in log

    # MLflow: params, the resolved config, the stage_info artifact
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")  # the embedded store
    exp = client.get_experiment_by_name("vault")
    found = client.search_runs([exp.experiment_id])
    runs = {r.info.run_name: r for r in found}
    parent = next(r for r in found if "mlflow.parentRunId" not in r.data.tags)
    fetch = runs["fetch"]
    assert f"+cluster.env.HF_TOKEN={MASK}" in parent.data.params["overrides"]
    assert f"stage.fetch.api_token={MASK}" in parent.data.params["overrides"]
    assert fetch.data.params["api_token"] == MASK and fetch.data.params["token_env"] == "HF_TOKEN"
    resolved = json.loads(Path(client.download_artifacts(parent.info.run_id, "resolved_config.json",
                                                         str(vault / "dl"))).read_text())
    assert resolved["cluster"]["env"] == {"HF_TOKEN": MASK}

    # a new token re-runs the stage (it is hashed into the fingerprint); `why` and `plan` show no value
    assert cli(vault, "why", "fetch", *args[:3], "stage.fetch.api_token=another-token-77", args[4]) == 0
    why = capsys.readouterr().out
    assert "- api_token: \"sha256:" + sha(API_TOKEN) in why and "+ api_token: \"sha256:" in why
    assert_no_secret(why, (*SECRETS, "another-token-77"))
    assert cli(vault, "status", *args) == 0
    assert "tracking: all 1 journal(s) in MLflow" in capsys.readouterr().out

    assert files_holding(root) == []  # outputs, stage_info, logs, journal, sync state and log, MLflow db and artifacts
    assert_no_secret(printed.out + printed.err)


# ---------------------------------------------------------------- a tracking server behind a password

SERVER = """\
import base64, os, sys, threading
from werkzeug.serving import make_server
os.environ.update({"_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{sys.argv[1]}/mlflow.db",
                   "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/", "_MLFLOW_SERVER_SERVE_ARTIFACTS": "true",
                   "_MLFLOW_SERVER_ARTIFACT_DESTINATION": f"{sys.argv[1]}/artifacts"})
from mlflow.server import app
expected = "Basic " + base64.b64encode(sys.argv[3].encode()).decode()

def guarded(environ, start_response):  # only requests that carry the password get through
    if environ.get("HTTP_AUTHORIZATION") != expected:
        start_response("401 Unauthorized", [("Content-Type", "text/plain")])
        return [b"unauthorized"]
    return app.wsgi_app(environ, start_response)

server = make_server("127.0.0.1", int(sys.argv[2]), guarded, threaded=True)
print("listening", flush=True)
server.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_tracking_uri_with_a_password_works_and_a_failed_sync_is_finished_by_sync(vault, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(vault)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once while the server is down
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    password = "srvpass31e9d2"
    port = free_port()
    uri = f"http://alice:{password}@127.0.0.1:{port}"
    args = ("-c", "vault", f"tracking.uri={uri}", f"+cluster.env.HF_TOKEN={HF_TOKEN}")
    secrets = (password, HF_TOKEN)

    # nothing listens yet: the run succeeds, its sync fails, and the run says so
    assert cli(vault, "run", "--wait-tracking", *args) == 0
    first = capsys.readouterr()
    assert "warning: tracking: the MLflow sync of" in first.err and "run `llmpipe sync` to apply it" in first.err
    root = vault / "runs"
    [journal] = pending_journals(root)
    assert json.loads(journal.read_text().splitlines()[0])["uri"] == f"http://alice:{MASK}@127.0.0.1:{port}"
    assert cli(vault, "status", *args) == 0
    assert "tracking: 1 journal(s) not yet in MLflow" in capsys.readouterr().out

    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(store), str(port), f"alice:{password}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == "listening", server.stdout.read()
        assert cli(vault, "sync", *args) == 0  # the config gives the password back; the journal never had it
        assert "applied 1 tracking journal(s)" in capsys.readouterr().out
        assert pending_journals(root) == []

        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("vault")
        found = client.search_runs([exp.experiment_id])
        runs = {r.info.run_name: r for r in found}
        parent = next(r for r in found if "mlflow.parentRunId" not in r.data.tags)
        assert parent.data.params["overrides"].endswith(f"+cluster.env.HF_TOKEN={MASK}")
        assert {a.path for a in client.list_artifacts(runs["fetch"].info.run_id)} >= {"stage_info.json", "stage.log"}
        with pytest.raises(MlflowException):  # the server does check the password
            MlflowClient(tracking_uri=f"http://alice:wrong@127.0.0.1:{port}").get_experiment_by_name("vault")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert files_holding(root, secrets) == [] and files_holding(store, secrets) == []
    assert_no_secret(first.out + first.err + server.stdout.read(), secrets)
