"""``llmpipe fetch`` (llmpipe/fetch.py) without the hub: what a config would fetch, the dry-run list with the
revisions of a fake HF cache, what a fetch records (the downloads faked), and its errors."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmpipe import fetch as fetch_mod
from llmpipe.fetch import FETCHED, apply_hf_env, run_fetch, wanted
from llmpipe.project import load_config
from stages.common import hub
from stages.common.hub import HubError, HubRef
from tests.stages.common.test_hub import SHA, SHA2, fake_dataset, fake_model, use_fake_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = use_fake_cache(tmp_path, monkeypatch)
    yield home
    hub.resolve_revision.cache_clear()


@pytest.fixture
def no_hub(monkeypatch):
    """Any request to the hub fails the test."""
    import huggingface_hub

    class NoApi:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoApi)


def hub_config(root: Path, *extra: str):
    """The tiny config with a hub base model (sft and align), a hub dataset (sft), an outside evaluate model
    and an lm-eval task next to a local one."""
    return load_config("tiny", (f"run.root={root}", "stage.sft.base_model=org/base", "stage.align.base_model=org/base",
                                "stage.sft.data.source=dataset", "stage.sft.data.dataset=org/chat",
                                "stage.evaluate.tasks=[heldout_ppl,mmlu]", *extra))


# ---------------------------------------------------------------- what a config names


def test_wanted_reads_hub_ids_only(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "prefs").mkdir()
    monkeypatch.chdir(tmp_path)
    resolved = {"stage": {
        "sft": {"base_model": "org/base", "data": {"source": "dataset", "dataset": "HuggingFaceH4/ultrachat_200k"}},
        "align": {"base_model": "org/base", "data": {"source": "dataset", "dataset": "prefs"}},  # a local dir
        "quantize": {"base_model": "align"},  # a stage
        "serve": {"base_model": "models/mine"},  # a local dir
        "pretrain": {"data": {"source": "corpus", "dataset": "org/unused"}},  # not the dataset source
        "evaluate": {"models": ["untrained", "sft", "ext=meta-llama/Llama-2-7b-hf@main", "local=./models/mine"],
                     "tasks": ["heldout_ppl", "heldout_mc", "mmlu", "gsm8k"],
                     "nested": {"base_model": f"org/pinned@{SHA}"}},
    }}
    got = [(w.kind, w.name, w.ref, w.keys) for w in wanted(resolved)]
    assert got == [
        ("model", "org/base", HubRef("org/base", None, "model"), ["stage.sft.base_model", "stage.align.base_model"]),
        ("model", f"org/pinned@{SHA}", HubRef("org/pinned", SHA, "model"), ["stage.evaluate.nested.base_model"]),
        ("model", "meta-llama/Llama-2-7b-hf@main", HubRef("meta-llama/Llama-2-7b-hf", "main", "model"),
         ["stage.evaluate.models[2]"]),
        ("dataset", "HuggingFaceH4/ultrachat_200k", HubRef("HuggingFaceH4/ultrachat_200k", None, "dataset"),
         ["stage.sft.data.dataset"]),
        ("task", "mmlu", None, ["stage.evaluate.tasks"]),
        ("task", "gsm8k", None, ["stage.evaluate.tasks"]),
    ]


def test_the_tiny_config_fetches_nothing(tmp_path, hf_home, no_hub):
    out = io.StringIO()
    assert run_fetch(load_config("tiny", (f"run.root={tmp_path / 'runs'}",)), dry_run=True, out=out) == 0
    assert "nothing to fetch" in out.getvalue()


# ---------------------------------------------------------------- --dry-run


def test_dry_run_lists_revisions_from_the_cache(tmp_path, hf_home, no_hub):
    fake_model(hf_home, "org/base", SHA)
    fake_dataset(hf_home, "org/chat", SHA2)
    fake_dataset(hf_home, "org/prefs", SHA, prepared=False)  # its commit is known, its data is not there
    root = tmp_path / "runs"
    out = io.StringIO()
    cfg = hub_config(root, "stage.align.data.source=dataset", "stage.align.data.dataset=org/prefs",
                     'stage.evaluate.models=[pretrain,"ext=org/other@v2"]')
    assert run_fetch(cfg, dry_run=True, out=out) == 0
    lines = out.getvalue().splitlines()
    assert str(hf_home / "hub") in lines[0] and str(root / FETCHED) in lines[0]
    rows = {line.split()[1]: " ".join(line.split()) for line in lines[2:]}
    assert rows == {
        "org/base": f"model org/base {SHA} stage.sft.base_model, stage.align.base_model",
        "org/chat": f"dataset org/chat {SHA2} stage.sft.data.dataset",
        "org/other@v2": "model org/other@v2 not cached stage.evaluate.models[1]",
        "org/prefs": f"dataset org/prefs {SHA} (incomplete) stage.align.data.dataset",
        # heldout_ppl is built locally: not listed; decontaminate reads the evaluation tasks (its default: evaluate's)
        "mmlu": "task mmlu not fetched stage.evaluate.tasks, stage.decontaminate.tasks",
    }
    assert not root.exists()  # nothing written


def test_dry_run_on_the_command_line(tmp_path):
    """``llmpipe fetch --dry-run`` end to end, in its own process, with an empty cache and the hub off."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "llmpipe", "fetch", "--dry-run", "-c", "tiny",
                           f"run.root={tmp_path / 'runs'}", "stage.sft.base_model=org/base@v1",
                           "stage.evaluate.tasks=[heldout_ppl,arc_challenge]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"into the HF cache {tmp_path / 'hf' / 'hub'}" in proc.stdout
    assert "org/base@v1" in proc.stdout and "not cached" in proc.stdout and "arc_challenge" in proc.stdout


# ---------------------------------------------------------------- fetching (downloads faked)


@pytest.fixture
def online(monkeypatch):
    """The hub "online" for fetch's checks; the downloads themselves are faked by each test."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def fake_fetch(fetched: list, fail: set = frozenset()):
    def fetch(ref: HubRef):
        if ref.repo in fail:
            raise HubError(f"cannot download {ref.describe()}: RepositoryNotFoundError")
        fetched.append(ref)
        return (SHA if ref.kind == "model" else SHA2), Path("/cache") / ref.repo
    return fetch


def test_fetch_records_revisions(tmp_path, hf_home, online, no_hub, monkeypatch):
    fetched, task_calls = [], []
    monkeypatch.setattr(hub, "fetch", fake_fetch(fetched))
    monkeypatch.setattr(fetch_mod, "fetch_tasks",
                        lambda names: task_calls.append(list(names)) or {"cais/mmlu": SHA2})
    root = tmp_path / "runs"
    root.mkdir()
    (root / FETCHED).write_text(json.dumps({"models": {"org/older": {"revision": SHA2, "path": "/x"}},
                                            "datasets": {}, "tasks": ["hellaswag"], "task_datasets": {}}))
    out = io.StringIO()
    assert run_fetch(hub_config(root), out=out) == 0
    assert fetched == [HubRef("org/base", None, "model"), HubRef("org/chat", None, "dataset")]
    assert task_calls == [["mmlu"]]
    record = json.loads((root / FETCHED).read_text())
    assert record == {
        "models": {"org/older": {"revision": SHA2, "path": "/x"},  # an earlier fetch into this root
                   "org/base": {"revision": SHA, "path": "/cache/org/base"}},
        "datasets": {"org/chat": {"revision": SHA2, "path": "/cache/org/chat"}},
        "tasks": ["hellaswag", "mmlu"],
        "task_datasets": {"cais/mmlu": SHA2},
    }
    assert f"fetched model org/base at {SHA}" in out.getvalue()


def test_what_cannot_be_fetched_is_named_and_the_rest_recorded(tmp_path, hf_home, online, no_hub, monkeypatch):
    monkeypatch.setattr(hub, "fetch", fake_fetch([], fail={"org/base"}))
    monkeypatch.setattr(fetch_mod, "fetch_tasks", lambda names: {})
    root = tmp_path / "runs"
    with pytest.raises(HubError) as err:
        run_fetch(hub_config(root), out=io.StringIO())
    assert str(err.value).splitlines() == [
        "llmpipe fetch: 1 of 3 could not be fetched:",
        "  stage.sft.base_model, stage.align.base_model: cannot download hub model org/base: RepositoryNotFoundError"]
    record = json.loads((root / FETCHED).read_text())
    assert record["models"] == {} and list(record["datasets"]) == ["org/chat"] and record["tasks"] == ["mmlu"]


def test_fetch_refuses_with_the_hub_offline(tmp_path, hf_home, no_hub):
    root = tmp_path / "runs"
    with pytest.raises(HubError, match="HF_HUB_OFFLINE .* is set .*--dry-run lists offline"):
        run_fetch(hub_config(root), out=io.StringIO())
    assert not root.exists()


def test_cluster_env_hf_settings_apply_but_not_its_offline_switch(monkeypatch):
    monkeypatch.setattr(os, "environ", {})  # apply_hf_env writes this process's environment
    names = apply_hf_env({"HF_HOME": "/shared/hf", "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1", "NCCL_DEBUG": "INFO"})
    assert names == ["HF_HOME", "HF_TOKEN"]
    assert os.environ["HF_HOME"] == "/shared/hf" and "HF_HUB_OFFLINE" not in os.environ
    assert "NCCL_DEBUG" not in os.environ


def test_make_fetch():
    def make_n(*args):
        proc = subprocess.run(["make", "-n", "-o", ".venv/.setup-done", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert ".venv/bin/llmpipe fetch --config-name tiny" in make_n("fetch")
    assert "--dry-run" not in make_n("fetch")
    assert ".venv/bin/llmpipe fetch --config-name llama-7b --dry-run a=1" in make_n("fetch", "CONF=llama-7b", "DRY=1",
                                                                                    "ARGS=a=1")
    assert "\nfetch: setup" in (REPO / "Makefile").read_text()
    help_text = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert any(line.startswith("fetch ") for line in help_text.splitlines())
