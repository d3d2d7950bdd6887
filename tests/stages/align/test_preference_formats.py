"""align data files in TRL's preference formats (text, conversational, implicit prompt), the error for a
file in none of them, and the shipped example pairs (examples/data/). Fast: data loading only, no model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.project import stage_config
from stages.align.data import PreferenceDataError, build_pairs

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"
DATA = stage_config("align").data  # the shipped defaults


def files_config(*paths: Path | str, **changes):
    return dataclasses.replace(DATA, **{"source": "files", "files": tuple(map(str, paths)), "max_pairs": 1000,
                                        "eval_fraction": 0.25, **changes})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def pairs_by_id(data):
    return {p.id: p for p in data.train + data.eval}


def test_text_format(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [
        {"prompt": f"Write this word in capitals: word{i}", "chosen": f"WORD{i}", "rejected": f"word{i}"}
        for i in range(4)])
    pairs = pairs_by_id(build_pairs(tmp_path / "unused", files_config(path)))
    assert len(pairs) == 4
    assert pairs["text.jsonl:2"].prompt == (("user", "Write this word in capitals: word2"),)
    assert (pairs["text.jsonl:2"].chosen, pairs["text.jsonl:2"].rejected) == ("WORD2", "word2")


def test_conversational_format_from_jsonl_and_parquet(tmp_path):
    records = [{"prompt": [turn("system", "Be brief."), turn("user", f"Reverse the list: a, b, {i}")],
                "chosen": [turn("assistant", f"{i}, b, a")], "rejected": [turn("assistant", f"a, b, {i}")]}
               for i in range(3)]
    path = write_jsonl(tmp_path / "conv.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "conv.parquet")
    pairs = pairs_by_id(build_pairs(tmp_path / "unused", files_config(path, tmp_path / "conv.parquet")))
    assert len(pairs) == 6
    for key in ("conv.jsonl:1", "conv.parquet:1"):
        assert pairs[key].prompt == (("system", "Be brief."), ("user", "Reverse the list: a, b, 1"))
        assert (pairs[key].chosen, pairs[key].rejected) == ("1, b, a", "a, b, 1")


def test_implicit_prompt_format(tmp_path):
    """chosen and rejected hold whole conversations: their shared first turns are the prompt (TRL's
    maybe_extract_prompt), multi-turn included."""
    shared = [turn("user", "Repeat this phrase: the list holds a key"), turn("assistant", "the list holds a key"),
              turn("user", "Now write it in capitals.")]
    records = [{"chosen": [*shared, turn("assistant", "THE LIST HOLDS A KEY")],
                "rejected": [*shared, turn("assistant", "THE LIST")]},
               {"chosen": [turn("user", "Which statement leaves a loop early?"), turn("assistant", "break")],
                "rejected": [turn("user", "Which statement leaves a loop early?"), turn("assistant", "continue")]}]
    path = write_jsonl(tmp_path / "implicit.jsonl", records)
    pairs = pairs_by_id(build_pairs(tmp_path / "unused", files_config(path)))
    assert pairs["implicit.jsonl:0"].prompt == tuple((m["role"], m["content"]) for m in shared)
    assert (pairs["implicit.jsonl:0"].chosen, pairs["implicit.jsonl:0"].rejected) == ("THE LIST HOLDS A KEY",
                                                                                       "THE LIST")
    assert pairs["implicit.jsonl:1"].prompt == (("user", "Which statement leaves a loop early?"),)


def test_later_records_without_chosen_or_rejected_are_counted_not_errors(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "q1", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "c", "rejected": "d"},
        {"question": "q", "answer": "a"}, {"prompt": "q3", "chosen": "only chosen"}])
    data = build_pairs(tmp_path / "unused", files_config(path))
    assert len(data.train + data.eval) == 2 and data.counts["dropped_missing_chosen_or_rejected"] == 2


@pytest.mark.parametrize("lines, where, found", [
    (["", "{not json", json.dumps({"question": "q", "answer": "a"})], "line 3", "keys found: answer, question"),
    ([json.dumps({"prompt": "q", "completion": "a", "label": True})], "line 1",
     "keys found: completion, label, prompt"),  # TRL's unpaired format: not read
    ([json.dumps({"messages": [turn("user", "q"), turn("assistant", "a")]})], "line 1", "keys found: messages"),
    ([json.dumps(["a", "list"])], "line 1", "keys found: none (not a JSON object)"),
])
def test_a_file_in_no_preference_format_names_file_line_and_keys(tmp_path, lines, where, found):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)])
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(PreferenceDataError) as err:
        build_pairs(tmp_path / "unused", files_config(good, bad))
    message = str(err.value)
    for part in (f"stage.align.data.files: {bad}: its first record ({where}) is in no preference format",
                 "needs 'chosen' and 'rejected'", found):
        assert part in message


def test_a_parquet_file_in_no_preference_format_names_its_row_and_columns(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), tmp_path / "qa.parquet")
    with pytest.raises(PreferenceDataError, match=r"qa\.parquet: its first record \(row 1\) is in no preference "
                                                  r"format.*keys found: answer, question"):
        build_pairs(tmp_path / "unused", files_config(tmp_path / "qa.parquet"))


def test_the_example_preference_files_load_without_drops():
    text, conv = EXAMPLES / "preferences.jsonl", EXAMPLES / "preferences-messages.jsonl"
    data = build_pairs(EXAMPLES, files_config(text, conv, eval_fraction=0.1))
    pairs = data.train + data.eval
    assert len(pairs) == 320 and data.counts["records_read"] == 320
    assert not [k for k in data.counts if k.startswith("dropped_")]
    assert all(len(p.prompt) == 1 and p.prompt[0][0] == "user" for p in pairs)
    assert all(p.chosen != p.rejected and len(p.chosen) < 200 for p in pairs)
    assert len(data.eval) == 32


def test_max_pairs_keeps_a_seeded_subset_that_file_order_does_not_decide(tmp_path):
    records = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(60)]
    forward = write_jsonl(tmp_path / "a.jsonl", records)
    backward = write_jsonl(tmp_path / "b.jsonl", records[::-1])

    def kept(path, seed=0):
        data = build_pairs(None, files_config(path, max_pairs=20, seed=seed))
        assert data.counts["records_read"] == 60 and data.counts["pairs_not_sampled"] == 40
        return {p.prompt for p in data.train + data.eval}

    first = kept(forward)
    assert len(first) == 20 and first == kept(backward)
    assert first != {(("user", f"Say {i}"),) for i in range(20)}  # not the first 20 of the file
    assert kept(forward, seed=1) != first
