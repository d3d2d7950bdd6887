from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.errors import ConfigError
from pipeline.schema import build, field_paths, to_plain


@dataclass(frozen=True)
class Inner:
    rank: int = 8  # lora rank
    targets: tuple[str, ...] = ("q_proj",)  # modules


@dataclass(frozen=True)
class Outer:
    lr: float  # required
    method: Literal["lora", "full"] = "lora"  # method
    inner: Inner = Inner()  # nested
    path: Path | None = None  # optional path
    env: dict[str, str] = field(default_factory=dict)  # mapping
    flag: bool = False  # boolean
    from_: str | None = field(default=None, metadata={"key": "from"})  # keyword-named key


def test_builds_typed_frozen_instance():
    cfg = build(Outer, {"lr": 1, "inner": {"rank": 4, "targets": ["a", "b"]}, "path": "x/y", "from": "sft"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner == Inner(4, ("a", "b"))
    assert cfg.path == Path("x/y")
    assert cfg.from_ == "sft"
    assert to_plain(cfg)["from"] == "sft"


def test_unknown_key_names_full_path_and_suggests():
    with pytest.raises(ConfigError) as err:
        build(Outer, {"lr": 1, "inner": {"rnak": 4}}, path="stage.sft")
    msg = str(err.value)
    assert "stage.sft.inner.rnak: unknown key" in msg
    assert "did you mean 'rank'" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"zzz: unknown key \(valid keys: "):
        build(Inner, {"zzz": 1})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
        ({"lr": True}, "lr: expected a number, got True"),
        ({"lr": 1, "method": "qlora"}, "method: 'qlora' is not one of 'lora', 'full'"),
        ({"lr": 1, "inner": {"rank": 2.5}}, "inner.rank: expected an integer, got 2.5"),
        ({"lr": 1, "inner": {"targets": "q_proj"}}, "inner.targets: expected a list"),
        ({"lr": 1, "flag": "yes"}, "flag: expected true/false"),
        ({"lr": 1, "env": {"A": 1}}, "env.A: expected a string"),
        ({}, "lr: missing required key"),
    ],
)
def test_wrong_types_are_rejected_with_their_path(data, expected):
    with pytest.raises(ConfigError) as err:
        build(Outer, data)
    assert expected in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build(Outer, {"lr": "x", "methd": "lora", "inner": {"rank": "y"}})
    msg = str(err.value)
    assert "lr:" in msg and "methd:" in msg and "inner.rank:" in msg


def test_field_paths_cover_nested_and_aliases():
    assert {"lr", "inner", "inner.rank", "inner.targets", "from"} <= field_paths(Outer)
