"""stages/common/hub.py without the hub: ids, revisions from a fake HF cache on disk, the offline switch.

``use_fake_cache`` points huggingface_hub and datasets at empty caches under tmp_path with the hub offline
(tests/test_fetch.py uses it too); ``fake_model`` / ``fake_dataset`` lay repos out as those libraries do.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.common import hub
from stages.common.hub import HubError, HubRef, parse_hub_id, require_cached, resolve_revision, snapshot_dir

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "fedcba9876543210fedcba9876543210fedcba98"


def use_fake_cache(tmp_path: Path, monkeypatch) -> Path:
    """Empty HF caches under ``tmp_path/hf`` (HF_HOME, hub/, datasets/), the hub offline, the memo cleared."""
    # Imported before the environment changes: what they read at import stays the session's own, and the
    # values patched here are restored after the test.
    import datasets.config
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these once, at import, and this test session imported them already.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    resolve_revision.cache_clear()
    return home


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = use_fake_cache(tmp_path, monkeypatch)
    yield home
    resolve_revision.cache_clear()


def fake_model(home: Path, repo: str, sha: str = SHA, ref: str | None = "main", config: bool = True) -> Path:
    """``models--org--name`` as snapshot_download leaves it: refs/<ref> -> sha, snapshots/<sha>/config.json."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / sha
    snapshot.mkdir(parents=True)
    if config:
        (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if ref:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(sha)
    return snapshot


def fake_dataset(home: Path, repo: str, sha: str = SHA, prepared: bool = True, rows: int = 3) -> None:
    """A hub dataset as ``llmpipe fetch`` leaves it: its card's commit under ``datasets--org--name/refs/main``
    and, when ``prepared``, a real prepared copy under ``datasets/org___name`` (built from a local JSONL
    file by datasets' own json builder), which an offline ``load_dataset(repo)`` reads."""
    folder = home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (folder / "snapshots" / sha).mkdir(parents=True)
    (folder / "snapshots" / sha / "README.md").write_text("card")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(sha)
    if not prepared:
        return
    import datasets
    from datasets.packaged_modules.json.json import Json

    namespace, _, name = repo.rpartition("/")
    source = home / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"chosen": f"c{i}", "rejected": f"r{i}"}) + "\n" for i in range(rows)))
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    Json(data_files={"train": str(source)}, dataset_name=name, hash="abc", cache_dir=str(cache)).download_and_prepare()
    # A local file's config is "default-<hash of the files>"; a hub dataset's is "default", under org___name.
    config = next((cache / name).iterdir())
    config.rename(config.parent / "default")
    (cache / name).rename(cache / f"{namespace}___{name}")


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(("spec", "kind", "expected"), [
    ("org/name", "model", HubRef("org/name", None, "model")),
    ("meta-llama/Llama-2-7b-hf@main", "model", HubRef("meta-llama/Llama-2-7b-hf", "main", "model")),
    (f"org/name@{SHA}", "model", HubRef("org/name", SHA, "model")),
    ("org/name@refs/pr/1", "model", HubRef("org/name", "refs/pr/1", "model")),
    (" org/name ", "model", HubRef("org/name", None, "model")),
    ("HuggingFaceH4/ultrachat_200k", "dataset", HubRef("HuggingFaceH4/ultrachat_200k", None, "dataset")),
    ("squad", "dataset", HubRef("squad", None, "dataset")),
    ("squad@v1.1", "dataset", HubRef("squad", "v1.1", "dataset")),
    ("pretrain", "model", None),  # a stage name, never a model id: a model id has exactly one '/'
    ("a/b/c", "model", None),
    ("a/b/c", "dataset", None),
    ("/abs/models/x", "model", None),
    ("./models/x", "model", None),
    ("~/models/x", "model", None),
    ("org/name@", "model", None),
    ("org/name@../../etc", "model", None),  # a revision is read from refs/<revision>: no way out of it
    ("org/na--me", "model", None),
    ("org/-name", "model", None),
    ("org/name with space", "model", None),
    ("", "dataset", None),
])
def test_parse_hub_id(spec, kind, expected):
    assert parse_hub_id(spec, kind) == expected


def test_an_existing_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("models/x") is None
    assert parse_hub_id("models/y") == HubRef("models/y", None, "model")


def test_str_is_the_id_as_written():
    assert str(HubRef("org/name", None, "model")) == "org/name"
    assert str(HubRef("org/name", "main", "dataset")) == "org/name@main"


# ---------------------------------------------------------------- revisions from the cache


def test_resolves_main_from_the_cache(hf_home):
    snapshot = fake_model(hf_home, "org/name")
    ref = parse_hub_id("org/name")
    assert resolve_revision(ref) == SHA
    assert snapshot_dir(ref, SHA) == snapshot
    assert require_cached(ref) == SHA


def test_resolves_a_branch_through_its_ref(hf_home):
    fake_model(hf_home, "org/name", SHA, ref="main")
    fake_model(hf_home, "org/name", SHA2, ref="v2")
    assert resolve_revision(parse_hub_id("org/name@v2")) == SHA2
    assert resolve_revision(parse_hub_id("org/name@main")) == SHA


def test_a_pinned_commit_is_its_own_revision_even_when_not_cached(hf_home):
    ref = parse_hub_id(f"org/name@{SHA}")
    assert resolve_revision(ref) == SHA  # no cache, no hub needed
    with pytest.raises(HubError, match="llmpipe fetch"):
        snapshot_dir(ref, SHA)
    fake_model(hf_home, "org/name", SHA, ref=None)
    assert require_cached(ref) == SHA


def test_not_cached_and_offline_says_to_fetch(hf_home):
    with pytest.raises(HubError) as err:
        resolve_revision(parse_hub_id("org/missing@v1"))
    message = str(err.value)
    assert "hub model org/missing@v1" in message
    assert str(hf_home / "hub") in message
    assert "offline" in message
    assert "`llmpipe fetch` (make fetch)" in message and "node with network" in message


def test_an_incomplete_snapshot_is_not_cached(hf_home):
    fake_model(hf_home, "org/name", config=False)
    ref = parse_hub_id("org/name")
    assert resolve_revision(ref) == SHA
    with pytest.raises(HubError, match="no config.json.*llmpipe fetch"):
        require_cached(ref)


def test_resolved_once_per_process(hf_home):
    fake_model(hf_home, "org/name")
    ref = parse_hub_id("org/name")
    assert resolve_revision(ref) == SHA
    (hf_home / "hub" / "models--org--name" / "refs" / "main").write_text(SHA2)  # a later fetch moved main
    assert resolve_revision(ref) == SHA  # this run keeps what it resolved first
    assert resolve_revision(HubRef("org/name", None, "model")) == SHA  # equal refs share the entry
    resolve_revision.cache_clear()
    assert resolve_revision(ref) == SHA2


def test_asks_the_hub_only_when_online_and_not_cached(hf_home, monkeypatch):
    import huggingface_hub

    asked = []

    class FakeApi:
        def model_info(self, repo, revision=None, timeout=None):
            asked.append((repo, revision, timeout))
            return SimpleNamespace(sha=SHA2)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    fake_model(hf_home, "org/cached")
    with pytest.raises(HubError, match="offline"):
        resolve_revision(parse_hub_id("org/other@dev"))  # offline: the hub is not asked
    assert asked == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert resolve_revision(parse_hub_id("org/cached")) == SHA  # the cache first: no request
    assert asked == []
    assert resolve_revision(parse_hub_id("org/other@dev")) == SHA2
    assert asked == [("org/other", "dev", hub.HUB_TIMEOUT_S)]


def test_an_unreachable_hub_says_to_fetch(hf_home, monkeypatch):
    import huggingface_hub

    class DownApi:
        def dataset_info(self, repo, revision=None, timeout=None):
            raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "HfApi", DownApi)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match=r"hub dataset org/chat .*unreachable \(ConnectionError: no route to host\).*"
                                       r"llmpipe fetch"):
        resolve_revision(parse_hub_id("org/chat", "dataset"))


def test_the_environment_switch_counts_after_import(hf_home, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert hub.hub_is_offline()  # HF_HUB_OFFLINE=1 in the environment, set after huggingface_hub read it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.hub_is_offline()


# ---------------------------------------------------------------- datasets and the offline switch


def test_a_cached_dataset_loads_after_the_hub_is_switched_off(hf_home, monkeypatch):
    """What align does: switch the hub off, then load its dataset. A fetched dataset still loads."""
    from huggingface_hub import constants

    fake_dataset(hf_home, "org/prefs", rows=4)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "0")  # so that the value before the test comes back after it
        monkeypatch.delenv(name)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)

    hub.hub_offline()
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    data = SimpleNamespace(source="dataset", dataset="org/prefs")
    assert hub.require_cached_data(data, "stage.align.data") == SHA
    rows = datasets.load_dataset("org/prefs", split="train")
    assert rows.num_rows == 4 and rows[0] == {"chosen": "c0", "rejected": "r0"}


def test_a_dataset_not_prepared_says_to_fetch(hf_home):
    fake_dataset(hf_home, "org/chat", prepared=False)
    data = SimpleNamespace(source="dataset", dataset="org/chat")
    with pytest.raises(HubError) as err:
        hub.require_cached_data(data, "stage.sft.data")
    message = str(err.value)
    assert message.startswith("stage.sft.data.dataset: hub dataset org/chat")
    assert "has not been prepared" in message and "llmpipe fetch" in message
    with pytest.raises(HubError, match="stage.sft.data.dataset: hub dataset org/none is not in the HF cache"):
        hub.require_cached_data(SimpleNamespace(source="dataset", dataset="org/none"), "stage.sft.data")


def test_require_cached_data_ignores_other_sources(hf_home, tmp_path):
    assert hub.require_cached_data(SimpleNamespace(source="corpus", dataset="org/chat"), "k") is None
    assert hub.require_cached_data(SimpleNamespace(source="dataset", dataset=None), "k") is None
    assert hub.require_cached_data(SimpleNamespace(source="dataset", dataset=str(tmp_path)), "k") is None


def test_fetch_refuses_when_offline(hf_home):
    with pytest.raises(HubError, match="cannot fetch hub model org/name: HF_HUB_OFFLINE is set"):
        hub.fetch(parse_hub_id("org/name"))


@pytest.fixture
def fake_download(hf_home, monkeypatch):
    """The hub "online", its answers and downloads faked: snapshot_download lays the snapshot out as the
    real one does (refs/<revision> -> SHA, snapshots/SHA/<files>); ``calls`` records the arguments."""
    import datasets
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "README.md"]

    class Api:
        def model_info(self, repo, revision=None, timeout=None):
            return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=f) for f in files])

        dataset_info = model_info

    def snapshot_download(repo, repo_type=None, revision=None, allow_patterns=None, ignore_patterns=None):
        calls.append(("snapshot_download", repo, repo_type, revision, allow_patterns, ignore_patterns))
        folder = hf_home / "hub" / f"{repo_type or 'model'}s--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / (revision or "main")).write_text(SHA)
        (folder / "snapshots" / SHA).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / SHA / "config.json").write_text("{}")
        return str(folder / "snapshots" / SHA)

    def load_dataset(repo, revision=None):
        calls.append(("load_dataset", repo, revision))
        return {"train": SimpleNamespace(cache_files=[{"filename": f"/prepared/{repo}/train.arrow"}])}

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_fetch_a_model_records_its_branch(hf_home, fake_download):
    sha, path = hub.fetch(parse_hub_id("org/name@dev"))
    assert (sha, path) == (SHA, hf_home / "hub" / "models--org--name" / "snapshots" / SHA)
    (call,) = fake_download
    assert call[:5] == ("snapshot_download", "org/name", None, "dev", None)
    assert "*.bin" in call[5]  # the repo has safetensors: the same weights as .bin are not downloaded
    resolve_revision.cache_clear()
    assert resolve_revision(parse_hub_id("org/name@dev")) == SHA  # offline later: through refs/dev


def test_fetch_a_dataset_prepares_the_fetched_commit(hf_home, fake_download):
    sha, path = hub.fetch(parse_hub_id("org/chat", "dataset"))
    assert (sha, path) == (SHA, Path("/prepared/org/chat"))
    assert fake_download == [("snapshot_download", "org/chat", "dataset", None, ["README.md"], None),
                             ("load_dataset", "org/chat", SHA)]
    assert hub.cached_revision(parse_hub_id("org/chat", "dataset")) == SHA
