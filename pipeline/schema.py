"""Turn plain config mappings into typed, frozen dataclasses, or say exactly what is wrong.

OmegaConf's structured configs reject unknown keys too, but name neither the alternatives nor
all the problems at once; here every problem is reported with its full key path and, for an
unknown key, the closest valid names ("did you mean").
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from pipeline.errors import ConfigError

_MISSING = dataclasses.MISSING


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def suggest(key: str, candidates: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ' (valid keys: ...)'."""
    candidates = sorted(candidates)
    close = difflib.get_close_matches(key, candidates, n=2, cutoff=0.6)
    if close:
        return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
    if candidates:
        return " (valid keys: " + ", ".join(candidates) + ")"
    return ""


class Invalid(ValueError):
    """Raised by a config dataclass's ``__post_init__`` for bad values of its own fields.

    Each problem is ``(key, message)`` with ``key`` relative to the dataclass (a field's config
    key, a dotted path into a nested block, or "" for the block as a whole); the schema walker
    prefixes the block's own key path, so a message never spells its location by hand:
    ``raise Invalid("r", "must be at least 1, got 0")`` reads ``stage.sft.lora.r: must be at least
    1, got 0``. ``Invalid.check(problems)`` raises one error for a list of them, if any.
    """

    def __init__(self, key: str = "", message: str = "", *, problems: typing.Sequence[tuple[str, str]] = ()):
        self.problems = [*problems, *([(key, message)] if message else [])]
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in self.problems))

    @classmethod
    def check(cls, problems: typing.Sequence[tuple[str, str]]) -> None:
        if problems:
            raise cls(problems=problems)


class _Collector:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '<root>'}: {message}")


def build(cls: type, data: Any, path: str = "", source: str | None = None) -> Any:
    """Validate ``data`` against dataclass ``cls`` and return an instance.

    Raises :class:`ConfigError` listing every problem found, each with its key path.
    """
    errors = _Collector()
    value = _convert(cls, data, path, errors)
    if errors.problems:
        head = f"invalid configuration{f' in {source}' if source else ''}:"
        raise ConfigError("\n  ".join([head, *errors.problems]))
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str, errors: _Collector) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, value, path, errors)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for candidate in non_none:
            trial = _Collector()
            converted = _convert(candidate, value, path, trial)
            if not trial.problems:
                return converted
        if len(non_none) == 1:
            return _convert(non_none[0], value, path, errors)
        errors.add(path, f"expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            errors.add(path, f"{value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if value is None:
        errors.add(path, f"expected {_type_name(tp)}, got null")
        return None
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            errors.add(path, f"expected a list, got {value!r}")
            return ()
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_tp = args[0]
        elif origin is tuple and args:
            if len(args) != len(value):
                errors.add(path, f"expected {len(args)} items, got {len(value)}")
                return ()
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_convert(a, v, _join(path, i), errors) for i, (a, v) in pairs)
        else:
            item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, _join(path, i), errors) for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            errors.add(path, f"expected a mapping, got {value!r}")
            return {}
        key_tp, val_tp = args if args else (str, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                errors.add(_join(path, str(k)), "keys must be strings")
                continue
            out[k] = _convert(val_tp, v, _join(path, k), errors)
        return types.MappingProxyType(out)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            errors.add(path, f"{value!r} is not one of {', '.join(repr(m.value) for m in tp)}")
            return None
    if tp is bool:
        if not isinstance(value, bool):
            errors.add(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.add(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.add(path, f"expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.add(path, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            errors.add(path, f"expected a path, got {value!r}")
            return value
        return Path(value)
    errors.add(path, f"unsupported schema type {_type_name(tp)}")
    return value


def _convert_dataclass(cls: type, value: Any, path: str, errors: _Collector) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        errors.add(path, f"expected a mapping for {cls.__name__}, got {value!r}")
        return None
    before = len(errors.problems)
    hints = typing.get_type_hints(cls)
    fields = {key_of(f): f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            errors.add(_join(path, key), "unknown key" + suggest(str(key), fields))
    kwargs = {}
    for key, f in fields.items():
        if key in value:
            raw = value[key]
            if f.metadata.get("one_or_many") and isinstance(raw, str):
                raw = [raw]  # `input=/data/*.warc.gz` means the list of that one pattern
            kwargs[f.name] = _convert(hints[f.name], raw, _join(path, key), errors)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            errors.add(_join(path, key), f"missing required key ({_type_name(hints[f.name])})")
    if len(errors.problems) > before:  # its own checks would only repeat these, or trip on a None
        return None
    try:
        return cls(**kwargs)
    except Invalid as exc:  # __post_init__ checks of the dataclass itself, by field
        for key, message in exc.problems:
            errors.add(_join(path, key) if key else path, message)
    except (TypeError, ValueError) as exc:
        errors.add(path, str(exc))
    return None


def key_of(f: dataclasses.Field) -> str:
    """The config key of a field: its name, or ``metadata={"key": ...}`` for Python keywords."""
    return f.metadata.get("key", f.name)


def one_or_many() -> Any:
    """A list field that also takes one bare string as the list of that string: for paths and globs,
    which users type as ``stage.ingest.input=/data/*.warc.gz``. Opt-in, so that other lists still
    reject a string (``targets: q_proj`` is more likely a mistake than a one-module list). The
    validated value is the same tuple either way, and so is its fingerprint. Declares no default:
    ``input: tuple[str, ...] = one_or_many()`` still takes its value from the YAML."""
    return dataclasses.field(metadata={"one_or_many": True})


def unknown_key(tp: Any, key: str, path: str = "") -> str | None:
    """The problem with the dotted config ``key`` (relative to schema ``tp``), or None if the schema has it.

    For a key given on the command line that the composed config lacks: ``"stage.dedup.treshold: unknown
    key (did you mean 'threshold'?)"``, the same words :func:`build` uses for an unknown key in a file.
    Keys inside a free-form mapping (``cluster.env.X``) and below ``Any`` are always known.
    """
    for part in key.split("."):
        tp = _without_none(tp)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            fields = {key_of(f): f for f in dataclasses.fields(tp) if f.init}
            if part not in fields:
                return f"{_join(path, part)}: unknown key" + suggest(part, fields)
            tp = typing.get_type_hints(tp)[fields[part].name]
        elif typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping):
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        elif typing.get_origin(tp) in (tuple, list) and part.isdigit():
            args = typing.get_args(tp)
            tp = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        elif tp is Any or typing.get_origin(tp) in (Union, types.UnionType):
            return None  # a free-form value, or a union the key alone cannot decide between
        else:
            return f"{_join(path, part)}: unknown key ({path} is a {_type_name(tp)} value, not a block of keys)"
        path = _join(path, part)
    return None


def _without_none(tp: Any) -> Any:
    """``X | None`` as ``X``; other types as they are."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def to_plain(value: Any) -> Any:
    """A dataclass instance (or nested values) as plain JSON-like data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {key_of(f): to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def field_paths(cls: type, prefix: str = "") -> set[str]:
    """Every dotted field path of a dataclass schema, nested dataclasses included; the values of a mapping of
    dataclasses (``sources: Mapping[str, SourceConfig]``) under ``*`` (``sources.*.weight``)."""
    paths = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = _join(prefix, key_of(f))
        paths.add(p)
        tp = _without_none(hints[f.name])
        if dataclasses.is_dataclass(tp):
            paths |= field_paths(tp, p)
        elif typing.get_origin(tp) in (dict, Mapping) and len(args := typing.get_args(tp)) == 2 \
                and dataclasses.is_dataclass(args[1]):
            paths |= field_paths(args[1], f"{p}.*")
    return paths
