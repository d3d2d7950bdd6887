"""Content addresses for stage outputs.

fingerprint = sha256(canonical JSON of stage name, code version, resolved config minus the
stage's execution-only fields, external source state and upstream fingerprints)[:12]

Every config field counts unless the stage names it as execution-only: forgetting to exclude a
field costs a re-run, forgetting to include one would silently reuse a stale output.

Secrets never enter verbatim (pipeline/secrets.py): a value under a secret-looking key counts as its
sha256, and credentials inside URIs are left out. The payload is also what stage_info.json keeps and
`llmpipe why` diffs, so neither shows them either.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.errors import ConfigError
from pipeline.secrets import for_fingerprint

FINGERPRINT_LENGTH = 12


class UnhashableValue(ConfigError):
    """A value with no deterministic serialisation (a set, an object, NaN...)."""


def _canonical(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnhashableValue(f"{path}: {value!r} cannot be fingerprinted (not finite)")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnhashableValue(f"{path}: key {k!r} is not a string")
            out[k] = _canonical(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise UnhashableValue(
        f"{path or '<root>'}: {type(value).__name__} value {value!r} has no deterministic "
        "serialisation; use plain strings, numbers, lists and mappings"
    )


def canonical_json(value: Any) -> str:
    """Key order, whitespace and tuple/list differences do not change the result."""
    return json.dumps(_canonical(value, ""), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def without(config: Mapping[str, Any], dotted: Iterable[str]) -> dict[str, Any]:
    """A deep copy of ``config`` minus the given dotted paths; a ``*`` part stands for every key of a
    mapping (``sources.*.weight``: the weight of every source)."""
    out = json.loads(json.dumps(config))
    for path in dotted:
        _drop(out, path.split("."))
    return out


def _drop(node: Any, parts: list[str]) -> None:
    if not isinstance(node, dict):
        return
    head, *rest = parts
    if not rest:
        node.pop(head, None)
    elif head == "*":
        for child in node.values():
            _drop(child, rest)
    else:
        _drop(node.get(head), rest)


def fingerprint_payload(
    stage: str,
    version: int,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    external: Any = None,
) -> dict[str, Any]:
    payload = {"stage": stage, "version": version, "config": for_fingerprint(config), "inputs": dict(inputs)}
    if external is not None:
        payload["external"] = for_fingerprint(external)
    return payload


def fingerprint(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_LENGTH]
