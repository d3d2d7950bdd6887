"""Hub models and datasets: parse ``org/name[@revision]``, resolve it to a commit, find it in the local
Hugging Face cache, and (``llmpipe fetch`` only) download it.

Compute nodes run offline. ``llmpipe fetch`` (llmpipe/fetch.py) runs on a node with network and fills
the HF cache; the stages then read it with ``HF_HUB_OFFLINE=1``, which huggingface_hub and datasets
honour by reading their caches:

- a model is the snapshot folder ``<HF_HUB_CACHE>/models--org--name/snapshots/<sha>``, and a branch or
  tag resolves to ``<sha>`` through ``refs/<branch>`` next to it (huggingface_hub's cache layout);
- a dataset is what ``datasets.load_dataset`` prepared under ``<HF_DATASETS_CACHE>/org___name`` (an
  offline ``load_dataset(name)`` reads the newest one there); its commit is recorded the same way as a
  model's, under ``datasets--org--name/refs``.

An unpinned id is resolved once per process (``resolve_revision`` is memoized): from the cache when it
is there (what was fetched is what runs, even when the hub has moved on), else from the hub when online.
Every "not there" error names the id, the cache folder and the fix: run ``llmpipe fetch``.

The cache folders are huggingface_hub's and datasets' own settings (``HF_HOME``, ``HF_HUB_CACHE``,
``HF_DATASETS_CACHE``), as those libraries read them when first imported. Light module: the hub
libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import LlmpipeError

Kind = Literal["model", "dataset"]

FETCH_HINT = "run `llmpipe fetch` (make fetch) with the same config on a node with network"
HUB_TIMEOUT_S = 10.0  # one metadata request (resolving a revision); downloads have huggingface_hub's own

# huggingface_hub's validate_repo_id: word characters, '-' and '.', starting and ending with a word
# character, no '--' or '..', at most 96 characters.
_PART = r"\w(?:[\w.-]*\w)?"
_REPO = re.compile(rf"(?:{_PART}/)?{_PART}")
_REVISION = re.compile(r"[\w.-]+(?:/[\w.-]+)*")  # a branch, tag or ref (refs/pr/1) or a commit
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MAX_REPO_CHARS = 96
_TRUE = {"1", "ON", "YES", "TRUE"}
# With safetensors weights in a repo, the same weights in other formats are not downloaded.
DUPLICATE_WEIGHTS = ("*.bin", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf", "original/*")


class HubError(LlmpipeError):
    """A hub model or dataset cannot be resolved or is not in the local HF cache; the message names the
    id and how to fetch it."""


@dataclass(frozen=True)
class HubRef:
    """A hub repository as written in a config: ``repo`` (``org/name``), the ``revision`` after ``@``
    (None: the default branch) and whether it is a model or a dataset repository."""

    repo: str
    revision: str | None
    kind: Kind

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo

    def describe(self) -> str:
        return f"hub {self.kind} {self}"


def parse_hub_id(spec: str, kind: Kind = "model") -> HubRef | None:
    """``org/name[@revision]`` as a HubRef, or None when ``spec`` is not shaped like one.

    A model id has exactly one ``/``; a dataset id may also be a bare ``name`` (canonical datasets). A
    spec that is a local path (one that exists, or starts with ``/``, ``.`` or ``~``) is never a hub id.
    """
    spec = spec.strip()
    if not spec or spec.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(spec)):
        return None
    repo, at, revision = spec.partition("@")
    if at and (not _REVISION.fullmatch(revision) or {".", ".."} & set(revision.split("/"))):
        return None
    if not _REPO.fullmatch(repo) or len(repo) > _MAX_REPO_CHARS or "--" in repo or ".." in repo:
        return None
    if kind == "model" and repo.count("/") != 1:
        return None
    return HubRef(repo, revision or None, kind)


# ---------------------------------------------------------------- the local cache


def hub_cache_dir() -> Path:
    """huggingface_hub's cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), where repos are stored by commit."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache_dir() -> Path:
    """Where ``datasets`` prepares datasets (``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``): the value
    the imported ``datasets`` uses, else what it will read from the environment."""
    config = sys.modules.get("datasets.config")
    if config is not None:
        return Path(config.HF_DATASETS_CACHE)
    from huggingface_hub import constants

    return Path(os.path.expanduser(os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME,
                                                                                        "datasets")))


def repo_cache_dir(ref: HubRef) -> Path:
    """``<HF_HUB_CACHE>/models--org--name`` (``datasets--org--name`` for a dataset)."""
    return hub_cache_dir() / f"{ref.kind}s--{ref.repo.replace('/', '--')}"


def hub_is_offline() -> bool:
    """Whether the hub must not be asked: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or
    was when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def cached_revision(ref: HubRef) -> str | None:
    """The commit ``ref`` names according to the local cache alone (no network), or None: a pinned
    commit when its snapshot folder is there, else the commit in ``refs/<revision or main>``."""
    folder = repo_cache_dir(ref)
    if ref.revision and _COMMIT.fullmatch(ref.revision):
        return ref.revision if (folder / "snapshots" / ref.revision).is_dir() else None
    try:
        sha = (folder / "refs" / (ref.revision or "main")).read_text().strip()
    except OSError:
        return None
    return sha if _COMMIT.fullmatch(sha) else None


def _not_cached(ref: HubRef, why: str) -> HubError:
    return HubError(f"{ref.describe()} {why}: {FETCH_HINT}")


@functools.cache
def resolve_revision(ref: HubRef) -> str:
    """The commit ``ref`` stands for, resolved once per process.

    A 40-hex revision is that commit. Otherwise the local cache's ``refs/<revision or main>``; when the
    cache does not know it and the hub is not offline, the hub (one request, ``HUB_TIMEOUT_S``). HubError
    when neither answers, or when the hub says the repository or revision does not exist.
    """
    if ref.revision and _COMMIT.fullmatch(ref.revision):
        return ref.revision
    sha = cached_revision(ref)
    if sha is not None:
        return sha
    if hub_is_offline():
        raise _not_cached(ref, f"is not in the HF cache at {hub_cache_dir()} and the hub is offline (HF_HUB_OFFLINE)")
    return _hub_info(ref).sha


def _hub_info(ref: HubRef):
    """The hub's ModelInfo / DatasetInfo of ``ref`` at its revision; HubError naming the cause."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    info = api.model_info if ref.kind == "model" else api.dataset_info
    try:
        return info(ref.repo, revision=ref.revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        raise HubError(f"{ref.describe()} is gated: accept its terms on the hub and give a token "
                       f"(HF_TOKEN in the environment or +cluster.env.HF_TOKEN=...): {exc}") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{ref.describe()}: the hub has no revision {ref.revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{ref.describe()} does not exist on the hub, or is private (give a token: HF_TOKEN): "
                       f"{exc}") from exc
    except Exception as exc:  # noqa: BLE001 - httpx, offline mode, HTTP 5xx...: the hub did not answer
        raise _not_cached(ref, f"is not in the HF cache at {hub_cache_dir()} and the hub is unreachable "
                               f"({type(exc).__name__}: {exc})") from exc


def snapshot_dir(ref: HubRef, revision: str) -> Path:
    """The snapshot folder of commit ``revision`` in the local HF cache (no network); HubError when it is
    not there, or, for a model, holds no config.json (a download that stopped early)."""
    path = repo_cache_dir(ref) / "snapshots" / revision
    if not path.is_dir():
        raise _not_cached(ref, f"(commit {revision}) is not in the HF cache at {hub_cache_dir()}")
    if ref.kind == "model" and not (path / "config.json").is_file():
        raise _not_cached(ref, f"(commit {revision}) is incomplete in the HF cache: {path} has no config.json")
    return path


def prepared_dataset_dir(ref: HubRef) -> Path | None:
    """The folder under which ``datasets`` keeps the prepared (Arrow) copies of dataset ``ref``, which an
    offline ``load_dataset`` reads, when it holds one; else None."""
    namespace, _, name = ref.repo.rpartition("/")
    from datasets.naming import camelcase_to_snakecase  # how datasets names the folder

    folder = datasets_cache_dir() / "___".join(filter(None, [namespace, camelcase_to_snakecase(name)]))
    # <config>/<version>/<hash>, as datasets' CachedDatasetModuleFactory looks for them
    return folder if any(p.is_dir() for p in folder.glob("*/*/*")) else None


def require_cached(ref: HubRef) -> str:
    """The commit of ``ref`` when everything an offline stage reads is in the local caches (no network):
    a model's snapshot with its config.json, a dataset's recorded commit and its prepared copy. HubError
    saying to run ``llmpipe fetch`` otherwise."""
    sha = cached_revision(ref)
    if sha is None:
        raise _not_cached(ref, f"is not in the HF cache at {hub_cache_dir()}")
    if ref.kind == "model":
        snapshot_dir(ref, sha)
    elif prepared_dataset_dir(ref) is None:
        raise _not_cached(ref, f"(commit {sha}) has not been prepared by `datasets` under {datasets_cache_dir()}")
    return sha


def require_cached_data(data: object, key: str) -> str | None:
    """For a training stage's ``data`` block (sft, align): when it reads a hub dataset
    (``source: dataset`` with a name that is not a local path), its commit from the caches, or the
    HubError of ``require_cached`` prefixed by ``key``. None for any other source."""
    name = getattr(data, "dataset", None)
    if getattr(data, "source", None) != "dataset" or not name:
        return None
    ref = parse_hub_id(name, kind="dataset")
    if ref is None:
        return None
    try:
        return require_cached(ref)
    except HubError as exc:
        raise HubError(f"{key}.dataset: {exc}") from exc


# ---------------------------------------------------------------- switching the hub off


def hub_offline(force: bool = False) -> None:
    """No hub access from this process: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` (unless the
    environment sets them already; ``force``: whatever it says) and the read-once constants of
    huggingface_hub and datasets when they were imported before. Cached models and datasets still load
    (require_cached tells whether they are there)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        if force:
            os.environ[name] = "1"
        else:
            os.environ.setdefault(name, "1")
    offline = os.environ["HF_HUB_OFFLINE"].upper() in _TRUE
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = offline
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = os.environ["HF_DATASETS_OFFLINE"].upper() in _TRUE


# ---------------------------------------------------------------- downloading (llmpipe fetch)


def fetch(ref: HubRef) -> tuple[str, Path]:
    """Download ``ref`` into the local caches and return ``(commit, path)``: a model's snapshot folder,
    or the folder of a dataset's prepared copy. Needs the hub; ``llmpipe fetch`` is its one caller."""
    if hub_is_offline():
        raise HubError(f"cannot fetch {ref.describe()}: HF_HUB_OFFLINE is set; run `llmpipe fetch` where the "
                       "hub is reachable, without HF_HUB_OFFLINE")
    return _fetch_model(ref) if ref.kind == "model" else _fetch_dataset(ref)


def _fetch_model(ref: HubRef) -> tuple[str, Path]:
    from huggingface_hub import snapshot_download

    files = [s.rfilename for s in _hub_info(ref).siblings or ()]
    ignore = list(DUPLICATE_WEIGHTS) if any(f.endswith(".safetensors") for f in files) else None
    try:
        # The revision as written (main when none): huggingface_hub records refs/<revision> -> commit,
        # which is how an offline run resolves the same id.
        path = Path(snapshot_download(ref.repo, revision=ref.revision, ignore_patterns=ignore))
    except Exception as exc:  # noqa: BLE001 - network, disk, auth: say which model
        raise HubError(f"cannot download {ref.describe()}: {type(exc).__name__}: {exc}") from exc
    return path.name, snapshot_dir(ref, path.name)


def _fetch_dataset(ref: HubRef) -> tuple[str, Path]:
    from huggingface_hub import snapshot_download

    _hub_info(ref)  # a missing, private or gated dataset: said as such
    try:
        # The card only: records refs/<revision> -> commit in the hub cache, as for a model.
        sha = Path(snapshot_download(ref.repo, repo_type="dataset", revision=ref.revision,
                                     allow_patterns=["README.md"])).name
        from datasets import load_dataset

        # Every split of the default config, prepared at that commit where an offline load_dataset reads it.
        dataset = load_dataset(ref.repo, revision=sha)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (not found, bad config, disk...)
        raise HubError(f"cannot download {ref.describe()}: {type(exc).__name__}: {exc}") from exc
    split = next(iter(dataset.values()))
    path = Path(split.cache_files[0]["filename"]).parent if split.cache_files else datasets_cache_dir()
    return sha, path
