"""sft data files in the formats people have: OpenAI messages, ShareGPT and Alpaca, detected per file.

Fast: data loading only, no model. The shipped example files (examples/data/) are read as they are
and checked against their generator (examples/make_data.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.project import stage_config
from stages.sft.data import SftDataError, load_instruction_data

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "data"
CHAT_FILES = ("chat-messages.jsonl", "chat-sharegpt.jsonl", "chat-alpaca.jsonl")
DATA = stage_config("sft").data  # the shipped defaults


def files_config(*paths: Path | str, **changes):
    return replace(DATA, **{"source": "files", "files": tuple(map(str, paths)), "max_examples": None, **changes})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def all_examples(data):
    return data.train + data.validation


# The same conversation in each format; each must read as CONVERSATION.
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Reverse the list.\n\na, b, c"},
                {"role": "assistant", "content": "c, b, a"}]
AS_SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."},
                                 {"from": "human", "value": "Reverse the list.\n\na, b, c"},
                                 {"from": "gpt", "value": "c, b, a"}]}
AS_ALPACA = {"instruction": "Reverse the list.", "input": "a, b, c", "output": "c, b, a", "system": "Be brief."}


# ---------------------------------------------------------------- the shipped examples


def test_example_files_are_what_their_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    written = sorted(p.name for p in tmp_path.iterdir())
    # text.jsonl is make_text.py's; eval-stdlib-quiz.jsonl is written by hand (examples/data/README.md)
    assert written == sorted(p.name for p in EXAMPLES.glob("*.jsonl") if p.name not in ("text.jsonl",
                                                                                       "eval-stdlib-quiz.jsonl"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), f"rerun examples/make_data.py: {name}"
        assert (EXAMPLES / name).stat().st_size < 100_000


def test_the_three_example_chat_files_load_together_each_in_its_format():
    data = load_instruction_data(files_config(*(EXAMPLES / f for f in CHAT_FILES)), [])
    metrics = data.metrics()
    assert metrics["records_in"] == 360 and not data.dropped
    assert metrics["format_messages"] == metrics["format_sharegpt"] == metrics["format_alpaca"] == 120
    assert metrics["train_examples"] + metrics["validation_examples"] == 360
    by_format = {}
    for e in all_examples(data):
        by_format.setdefault(e.format, []).append(e.messages)
        assert all(m["role"] in ("system", "user", "assistant") for m in e.messages)
        assert all(len(m["content"]) < 200 for m in e.messages if m["role"] == "assistant")
    # ShareGPT speakers became roles; Alpaca's input follows its instruction after a blank line.
    assert any(m[-1]["role"] == "assistant" and m[-2]["role"] == "user" for m in by_format["sharegpt"])
    assert any(m[-2]["content"].startswith("Repeat this phrase.\n\n") for m in by_format["alpaca"])
    assert any(m[0]["role"] == "system" for m in by_format["alpaca"])
    assert any(len(m) == 4 for m in by_format["messages"])  # a second turn


def test_example_files_support_a_subset_and_count_formats_after_it():
    data = load_instruction_data(files_config(str(EXAMPLES / "chat-*.jsonl"), max_examples=90), [])
    counts = {k: v for k, v in data.metrics().items() if k.startswith("format_")}
    assert sum(counts.values()) == len(all_examples(data)) == 90
    assert set(counts) == {"format_messages", "format_sharegpt", "format_alpaca"}


# ---------------------------------------------------------------- conversions


def test_each_format_reads_as_the_same_conversation(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}])
    b = write_jsonl(tmp_path / "b.jsonl", [AS_SHAREGPT])
    c = write_jsonl(tmp_path / "c.jsonl", [AS_ALPACA])
    data = load_instruction_data(files_config(a, b, c, validation_fraction=0.0), [])
    assert [e.messages for e in data.train] == [CONVERSATION] * 3
    assert [e.format for e in data.train] == ["messages", "sharegpt", "alpaca"]
    assert len({e.split_key for e in data.train}) == 1  # duplicates across formats share a split key


def test_sharegpt_variants_and_alpaca_without_input(tmp_path):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "user", "value": "q1"}, {"from": "bot", "value": "a1"}]},
        {"conversations": [{"from": "Human", "value": "q2"}, {"from": "chatgpt", "value": "a2"}], "system": "S"},
        {"conversations": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
        {"conversations": [{"from": "human", "value": "q4"}, {"from": "gpt", "value": "a4", "weight": 1}],
         "id": "x"},
    ])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say yo.", "output": "yo"},
        {"instruction": "Say ok.", "input": "  ", "output": "ok", "system": ""},
    ])
    data = load_instruction_data(files_config(path, alpaca, validation_fraction=0.0), [])
    got = [e.messages for e in data.train]
    assert got[0] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert got[1] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "a2"}]
    assert got[2][1] == {"role": "assistant", "content": "a3"} and got[3][1] == {"role": "assistant", "content": "a4"}
    assert got[4:] == [[{"role": "user", "content": s}, {"role": "assistant", "content": r}]
                       for s, r in (("Say hi.", "hi"), ("Say yo.", "yo"), ("Say ok.", "ok"))]
    assert data.metrics()["format_sharegpt"] == 4 and data.metrics()["format_alpaca"] == 3


def test_later_records_without_their_files_keys_are_counted(tmp_path):
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [
        "", AS_SHAREGPT, "{broken", {"messages": CONVERSATION},  # a record of another format: dropped
        {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "r"}]},
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "r"}]}, [1, 2],
    ])
    alpaca = write_jsonl(tmp_path / "a.jsonl", [AS_ALPACA, {"instruction": "no output"},
                                                {"instruction": "x", "input": 3, "output": "y"},
                                                {"instruction": "x", "output": ""}])
    data = load_instruction_data(files_config(sharegpt, alpaca), [])
    assert data.docs_in == 10 and len(all_examples(data)) == 2
    assert dict(data.dropped) == {"invalid_json": 1, "missing_conversations": 2, "unknown_role": 1,
                                  "malformed_message": 1, "missing_instruction_or_output": 1,
                                  "non_text_content": 1, "no_assistant_reply": 1}


def test_messages_column_is_still_configurable(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"chat": CONVERSATION}])
    data = load_instruction_data(files_config(chat, messages_column="chat", validation_fraction=0.0), [])
    assert data.train[0].messages == CONVERSATION and data.train[0].format == "messages"
    # Named "conversations", the column is ShareGPT's: {from, value} turns are read too.
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [AS_SHAREGPT])
    data = load_instruction_data(files_config(sharegpt, messages_column="conversations", validation_fraction=0.0), [])
    assert data.train[0].messages == CONVERSATION


# ---------------------------------------------------------------- Parquet


def test_parquet_in_sharegpt_and_alpaca_formats(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
             "source": "web"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    rows = [{"instruction": f"do {i}", "input": None if i % 2 else f"on {i}", "output": f"done {i}"}
            for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    data = load_instruction_data(files_config(tmp_path / "*.parquet", validation_fraction=0.0), [])
    assert data.metrics()["format_sharegpt"] == 6 and data.metrics()["format_alpaca"] == 4 and not data.dropped
    users = {e.messages[0]["content"] for e in data.train}
    assert {"q0", "do 0\n\non 0", "do 1"} <= users
    assert {"role": "assistant", "content": "a5"} in [e.messages[-1] for e in data.train]


# ---------------------------------------------------------------- unknown formats


@pytest.mark.parametrize("lines, where, found", [
    (["", "{not json", json.dumps({"question": "q", "answer": "a"})], "line 3", "keys found: answer, question"),
    ([json.dumps(["a", "list"])], "line 1", r"keys found: none \(not a JSON object\)"),
    ([json.dumps({"instruction": "an instruction but no output"})], "line 1", "keys found: instruction"),
])
def test_a_file_in_no_known_format_names_file_line_and_keys(tmp_path, lines, where, found):
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CONVERSATION}])
    bad = write_jsonl(tmp_path / "qa.jsonl", lines)
    with pytest.raises(SftDataError) as err:
        load_instruction_data(files_config(good, bad), [])
    message = str(err.value)
    assert f"{bad}: no column 'messages'" in message
    for part in (f"its first record ({where})", "'conversations' (ShareGPT", "'instruction' and 'output' (Alpaca",
                 "stage.sft.data.messages_column"):
        assert part in message
    assert re.search(found, message)


def test_a_parquet_file_in_no_known_format_names_its_row_and_columns(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), tmp_path / "qa.parquet")
    with pytest.raises(SftDataError, match=r"qa\.parquet: no column 'messages' .* \(row 1\); keys found: answer, "
                                           r"question"):
        load_instruction_data(files_config(tmp_path / "qa.parquet"), [])
    # An empty file has no record to detect a format from: it adds nothing.
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CONVERSATION}])
    data = load_instruction_data(files_config(good, tmp_path / "empty.parquet", validation_fraction=0.0), [])
    assert data.docs_in == 1
