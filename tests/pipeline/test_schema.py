from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.errors import ConfigError
from pipeline.schema import Invalid, build, field_paths, one_or_many, to_plain, unknown_key


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


@dataclass(frozen=True, kw_only=True)
class Globs:
    inputs: tuple[str, ...] = one_or_many()  # one pattern or a list of them
    names: tuple[str, ...]  # an ordinary list

    def __post_init__(self) -> None:
        Invalid.check([("inputs", "is empty")] if not self.inputs else [])


@pytest.mark.parametrize(("value", "expected"), [("a/*.gz", ("a/*.gz",)), (["a", "b"], ("a", "b")), ([], ())])
def test_one_or_many_takes_a_string_as_a_one_item_list(value, expected):
    if not expected:
        with pytest.raises(ConfigError, match=r"^invalid configuration:\n  g\.inputs: is empty$"):
            build(Globs, {"inputs": value, "names": []}, path="g")
        return
    cfg = build(Globs, {"inputs": value, "names": ["x"]})
    assert cfg.inputs == expected
    assert to_plain(cfg)["inputs"] == list(expected)  # so a string and its one-item list fingerprint alike


def test_lists_without_the_opt_in_still_reject_a_string():
    with pytest.raises(ConfigError, match=r"g\.names: expected a list, got 'x'"):
        build(Globs, {"inputs": "a", "names": "x"}, path="g")


@dataclass(frozen=True)
class Block:
    low: int  # low
    high: int  # high

    def __post_init__(self) -> None:
        problems = []
        if self.low < 0:
            problems.append(("low", f"must be at least 0, got {self.low}"))
        if self.low > self.high:
            problems.append(("", "low is above high"))
        Invalid.check(problems)


@pytest.mark.parametrize(("data", "lines"), [
    ({"low": -1, "high": 0}, ["stage.x.block.low: must be at least 0, got -1"]),
    ({"low": 3, "high": 0}, ["stage.x.block: low is above high"]),
    ({"low": -1, "high": -2}, ["stage.x.block.low: must be at least 0, got -1", "stage.x.block: low is above high"]),
])
def test_invalid_problems_get_the_block_path_once(data, lines):
    with pytest.raises(ConfigError) as err:
        build(Block, data, path="stage.x.block")
    assert str(err.value).split("\n  ")[1:] == lines


@pytest.mark.parametrize(("key", "expected"), [
    ("lr", None),
    ("inner.rank", None),
    ("from", None),
    ("env.ANYTHING", None),  # a free-form mapping takes any key
    ("inner.rnak", "stage.sft.inner.rnak: unknown key (did you mean 'rank'?)"),
    ("innr.rank", "stage.sft.innr: unknown key (did you mean 'inner'?)"),
    ("lr.x", "stage.sft.lr.x: unknown key (stage.sft.lr is a float value, not a block of keys)"),
])
def test_unknown_key_checks_a_dotted_key_against_the_schema(key, expected):
    assert unknown_key(Outer, key, "stage.sft") == expected
