"""Secrets in configs: which values are secret, how they are masked in everything llmpipe writes,
and how they enter a fingerprint.

A value is secret when
- its key names a secret: split into words (at ``_ - .`` and camelCase humps, any case), one word
  *is* ``token``, ``key``, ``secret``, ``password`` (or ``passwd``, ``passphrase``,
  ``credential(s)``, ``apikey``...): ``HF_TOKEN``, ``api_key``, ``apiKey``, ``db_password``,
  ``client_secret``. A word that only contains one is not: ``max_tokens``, ``tokenizer``,
  ``keep_partial`` hold counts and names;
- unless the key's last word says that it *names* the secret rather than holds it: ``serve.api_key_env``
  names an environment variable (``*_env``, ``*_var``), ``key_file`` a file (``*_file``, ``*_path``,
  ``*_name``, ``*_id``...): its value is shown. A tokenizer's special tokens (``eos_token``,
  ``pad_token``...) are vocabulary entries, not credentials;
- or it is any value of ``cluster.env``, whatever its name: the environment of the stage processes
  is where credentials are handed over (``+cluster.env.HF_TOKEN=hf_...``);
- or it is a credential inside a URI: the password of ``scheme://user:password@host`` and a query
  parameter whose name says secret (``?token=``, ``&X-Amz-Signature=``, ``sig=``).

Only values are judged, key by key: a mapping under a secret-looking key is a group of settings
(``stage.pii.secret: {enabled, placeholder...}``) whose own keys decide; None, booleans and empty
strings are shown as they are (they hide nothing).

Where they are masked as ``***``: the MLflow params and artifacts, stage_info.json, the tracking
journal (:func:`redact`, :func:`redact_overrides`), log lines (the filter of pipeline/logs.py) and the
printouts of ``plan``/``why``/``run`` (:func:`redact_text`). The processes that need them still get
them: cluster.env reaches the stage processes unchanged, and the MLflow sync gets the tracking URI
with its password through its environment, not the journal.

Free text is masked by pattern (URI credentials; ``NAME_TOKEN=...`` and ``--api-key ...`` with a
secret-looking name) and by value: the values registered from the loaded config and from
environment variables whose name says secret (:func:`register_config`, :func:`register_environment`).
Values of cluster.env whose name does not say secret are masked in structured records but not in
free text: ``NCCL_DEBUG=INFO`` would otherwise turn every "INFO" in a log into ``***``.

Fingerprints (:func:`for_fingerprint`): a value under a secret key enters as ``sha256:<hex>``, so a
new value re-runs the stage as any changed field does (a stage that uses the value only for access
names the field execution-only, in ``Stage.unhashed``); URI credentials are left out (the URI enters
with ``***``): they say who may read, not what is read. Cluster settings never count anyway.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

MASK = "***"
SECRET_MAPPINGS = ("cluster.env",)  # every value under these paths is secret, whatever its key
SECRET_WORDS = frozenset({
    "token", "key", "secret", "password", "passwd", "passphrase", "credential", "credentials",
    "apikey", "apitoken", "authtoken", "accesstoken", "accesskey", "secretkey", "privatekey",
})
QUERY_WORDS = SECRET_WORDS | {"sig", "signature"}  # also secret as a URI query parameter (SAS, presigned URLs)
NAMING_WORDS = frozenset({  # a last word that says the value names the secret (where it is), not holds it
    "env", "var", "vars", "variable", "name", "names", "file", "path", "dir", "url", "uri", "id", "ids",
    "length", "len", "size", "count", "type",
})
SPECIAL_TOKENS = frozenset({"bos", "eos", "unk", "sep", "pad", "cls", "mask", "special"})
# Registered values shorter than this, or that read as a flag, are not masked in free text: they would hit
# ordinary words (HF_HUB_DISABLE_IMPLICIT_TOKEN=true is not a credential); records still mask them.
MIN_TEXT_SECRET = 6
_FLAG_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null"})

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# scheme://user:PASSWORD@host -- the password runs to the last "@" before the path
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*:)([^\s/?#]+)(?=@)")
_QUERY = re.compile(r"([?&;]([A-Za-z0-9_.\-]+)=)([^&;#\s\"'<>]+)")
_ENV_ASSIGN = re.compile(r"\b([A-Z][A-Z0-9_]*)=([^\s\"']+)")  # HF_TOKEN=hf_... (shell style)
_FLAG = re.compile(r"(--([a-z][a-z0-9\-]*)[ =])([^\s\"'-][^\s\"']*)")  # --api-key VALUE, --hf-token=VALUE

# Values masked wherever they appear in free text, longest first. Replaced whole, never changed in place:
# a log line in another thread reads one version or the next.
_known: tuple[str, ...] = ()


def words(key: str) -> list[str]:
    """``"HF_TOKEN"`` -> ``["hf", "token"]``, ``"apiKey"`` -> ``["api", "key"]``."""
    return [w.lower() for w in _WORD.findall(key)]


def is_secret_key(key: str, secret_words: frozenset[str] = SECRET_WORDS) -> bool:
    """Whether the value under ``key`` (one key, not a dotted path) is secret (see the module doc)."""
    parts = words(key)
    if not parts or parts[-1] in NAMING_WORDS:
        return False
    for i, word in enumerate(parts):
        if word in secret_words and not (word == "token" and i and parts[i - 1] in SPECIAL_TOKENS):
            return True
    return False


def is_secret_path(path: str) -> bool:
    """Whether the value at dotted ``path`` (``cluster.env.HF_TOKEN``, ``stage.x.api_key``) is secret."""
    if any(path.startswith(f"{mapping}.") for mapping in SECRET_MAPPINGS):
        return True
    return is_secret_key(path.rsplit(".", 1)[-1])


def _maskable(value: Any) -> bool:
    return value is not None and not isinstance(value, bool) and value != ""


# -- free text --------------------------------------------------------------------------------------
def redact_uri(text: str) -> str:
    """``text`` with the credentials inside URIs masked: ``https://user:***@host``, ``?token=***``.

    Deterministic (no registered values): fingerprints and the tracking journal's URI rely on it.
    """
    if "=" not in text and "@" not in text:
        return text
    text = _USERINFO.sub(lambda m: m.group(1) + MASK, text)
    return _QUERY.sub(lambda m: m.group(1) + MASK if is_secret_key(m.group(2), QUERY_WORDS) else m.group(0), text)


def redact_text(text: str) -> str:
    """Free text (a log line, an error, a printout) with every secret llmpipe can recognise masked."""
    if not text:
        return text
    text = redact_uri(text)
    if "=" in text or "--" in text:
        text = _ENV_ASSIGN.sub(lambda m: f"{m.group(1)}={MASK}" if is_secret_key(m.group(1)) else m.group(0), text)
        text = _FLAG.sub(lambda m: m.group(1) + MASK if is_secret_key(m.group(2)) else m.group(0), text)
    for value in _known:
        if value in text:
            text = text.replace(value, MASK)
    return text


# -- structured records -----------------------------------------------------------------------------
def redact(value: Any, path: str = "") -> Any:
    """A copy of plain data (a resolved config, a stage config at ``path``) with secrets masked."""
    if isinstance(value, Mapping):
        return {k: redact(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, path) for v in value]
    if path and is_secret_path(path) and _maskable(value):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_override(override: str) -> str:
    """A Hydra override with a secret value masked: ``+cluster.env.HF_TOKEN=***``."""
    key, sep, value = override.partition("=")
    if not sep:
        return redact_text(override)
    path = key.lstrip("+~").partition("@")[0]
    whole_mapping = value.lstrip().startswith("{") and any(
        mapping == path or mapping.startswith(f"{path}.") for mapping in SECRET_MAPPINGS)
    if whole_mapping or (is_secret_path(path) and value not in ("", "null")):
        return f"{key}={MASK}"
    return f"{key}={redact_text(value)}"


def redact_overrides(overrides: Iterable[str]) -> list[str]:
    return [redact_override(o) for o in overrides]


def for_fingerprint(value: Any, path: str = "") -> Any:
    """``value`` as it enters a fingerprint: secret-key values as ``sha256:<hex>`` of the value, URI
    credentials masked (see the module doc); everything else unchanged."""
    if isinstance(value, Mapping):
        return {k: for_fingerprint(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [for_fingerprint(v, path) for v in value]
    if path and is_secret_path(path) and _maskable(value):
        return "sha256:" + hashlib.sha256(str(value).encode()).hexdigest()
    return redact_uri(value) if isinstance(value, str) else value


# -- values known to be secret ----------------------------------------------------------------------
def _uri_secrets(text: str) -> Iterator[str]:
    for m in _USERINFO.finditer(text):
        yield m.group(2)
    for m in _QUERY.finditer(text):
        if is_secret_key(m.group(2), QUERY_WORDS):
            yield m.group(3)


def text_secrets(value: Any, path: str = "") -> Iterator[str]:
    """The values in plain data that free text must not show: those under a secret-looking key
    (cluster.env entries by their variable's name) and URI credentials."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from text_secrets(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from text_secrets(v, path)
    elif path and is_secret_key(path.rsplit(".", 1)[-1]) and _maskable(value):
        yield str(value)
    elif isinstance(value, str):
        yield from _uri_secrets(value)


def register(values: Iterable[str]) -> None:
    """Mask these values wherever they appear in free text, from now on, in this process."""
    global _known
    new = {v for v in values if len(v) >= MIN_TEXT_SECRET and v.lower() not in _FLAG_WORDS and v != MASK}
    if not new <= set(_known):
        _known = tuple(sorted(new | set(_known), key=lambda v: (-len(v), v)))


def register_config(data: Mapping[str, Any]) -> None:
    """Register the secrets of a loaded config (see :func:`text_secrets`)."""
    register(text_secrets(data))


def register_environment(environ: Mapping[str, str] | None = None) -> None:
    """Register the values of environment variables whose name says secret (``HF_TOKEN``,
    ``MLFLOW_TRACKING_PASSWORD``), and URI credentials in any variable (``MLFLOW_TRACKING_URI``)."""
    environ = os.environ if environ is None else environ
    register(v for k, v in environ.items() if is_secret_key(k))
    register(s for v in environ.values() for s in _uri_secrets(v))


def unmask(masked: str | None, candidates: Sequence[str | None]) -> str | None:
    """The candidate whose :func:`redact_uri` is ``masked`` (a URI written with ``***``), ``masked``
    itself when it hides nothing, or None when no candidate matches."""
    if not masked or MASK not in masked:
        return masked
    return next((c for c in candidates if c and redact_uri(c) == masked), None)
