"""Write the example training data of examples/data/ (what each file is: examples/data/README.md).

Short, checkable tasks a tiny model (256-token context, pretrained on Python documentation) can get
better at: repeat a phrase, write a word in capitals, name the first or last word of a sentence,
reverse a list, and short questions on Python's built-ins. Every reply is under 200 characters.
Preference pairs put the correct reply as ``chosen`` and a plausible wrong one as ``rejected``
(a word repeated or swapped, the answer cut short, the list left in order...).

Deterministic: each file comes from its own seeded generator, with no network and no clock, so
running this again writes the same bytes (tests/stages/sft/test_data_formats.py checks it)::

    python examples/make_data.py            # rewrites examples/data/
    python examples/make_data.py --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

NOUNS = ["list", "string", "module", "function", "value", "object", "class", "method", "file", "loop", "key",
         "index", "number", "tuple", "set", "dict", "error", "line", "name", "type", "argument", "buffer",
         "socket", "thread", "path", "iterator", "generator", "integer", "option", "result", "item", "field",
         "stream", "record", "package", "parser", "server", "timer", "queue", "table"]
VERBS = ["returns", "reads", "writes", "opens", "closes", "holds", "raises", "calls", "checks", "sorts", "joins",
         "splits", "copies", "clears", "yields", "stores"]
DETERMINERS = ["the", "each", "every", "this", "that", "one", "another", "some"]
ADJECTIVES = ["new", "empty", "sorted", "small", "default", "single", "last", "first", "open", "hidden", "large",
              "short", "local", "global", "simple", "valid"]

# Questions on Python's built-ins: (question, correct answer, plausible wrong answer).
PYTHON_QA = [
    ("What does len() return?", "The number of items in an object.", "The first item of an object."),
    ("What does str.upper() return?", "A copy of the string converted to uppercase.",
     "A copy of the string converted to lowercase."),
    ("What does str.lower() return?", "A copy of the string converted to lowercase.",
     "A copy of the string converted to uppercase."),
    ("What does list.append(x) do?", "It adds x to the end of the list.", "It adds x to the start of the list."),
    ("What does list.pop() do?", "It removes and returns the last item of the list.",
     "It removes and returns the first item of the list."),
    ("What does sorted() return?", "A new sorted list from the items of an iterable.",
     "The same list, sorted in place."),
    ("What does abs() return?", "The absolute value of a number.", "The number with its sign changed."),
    ("What numbers does range(3) give?", "0, 1 and 2.", "1, 2 and 3."),
    ("Which keyword defines a function?", "def", "func"),
    ("Which keyword defines a class?", "class", "def"),
    ("Which statement leaves a loop early?", "break", "continue"),
    ("Which statement skips to the next iteration of a loop?", "continue", "break"),
    ("Which statement imports a module?", "import", "include"),
    ("What does print() return?", "None", "The printed text."),
    ("What does bool([]) return?", "False", "True"),
    ("What does bool([0]) return?", "True", "False"),
    ("What exception does int('x') raise?", "ValueError", "TypeError"),
    ("What exception does a missing dict key raise?", "KeyError", "IndexError"),
    ("What exception does a list index out of range raise?", "IndexError", "KeyError"),
    ("What does dict.get(key) return when the key is missing?", "None, or the default if one is given.",
     "It raises KeyError."),
    ("What does str.strip() do?", "It returns a copy of the string without leading and trailing whitespace.",
     "It removes every space in the string."),
    ("What does str.split() return?", "A list of the words in the string.", "The first word of the string."),
    ("What does open() return?", "A file object.", "The text of the file."),
    ("What does max([3, 1, 2]) return?", "3", "2"),
    ("What does min([3, 1, 2]) return?", "1", "3"),
    ("What does sum([1, 2, 3]) return?", "6", "123"),
    ("What does list(reversed([1, 2, 3])) return?", "[3, 2, 1]", "[1, 2, 3]"),
    ("What does 'a,b'.split(',') return?", "['a', 'b']", "['a,b']"),
    ("What does the pass statement do?", "Nothing: it is a placeholder where a statement is required.",
     "It ends the program."),
    ("What does enumerate() yield?", "Pairs of a count and an item of the iterable.", "The items in reverse order."),
    ("What does isinstance(obj, cls) return?", "True if obj is an instance of cls, else False.",
     "The class of obj."),
    ("What does str.startswith(prefix) return?", "True if the string starts with prefix, else False.",
     "The prefix of the string."),
]
SYSTEM = "You are a helpful assistant. Answer briefly."


# ---------------------------------------------------------------- tasks


def phrase(rng: random.Random) -> str:
    """A short sentence in the vocabulary of the Python docs, e.g. "each module returns a new list"."""
    return (f"{rng.choice(DETERMINERS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} {rng.choice(['a', 'the', 'one'])} "
            f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}")


def task(rng: random.Random) -> tuple[str, str, str, str, str]:
    """One task: (kind, instruction, input, answer, a plausible wrong answer). The instruction is a
    sentence (Alpaca's ``instruction``); a chat prompt is made of both (``prompt_of``)."""
    kind = rng.choice(["repeat", "capitals", "first_word", "last_word", "reverse", "length", "python"])
    if kind == "repeat":
        text = phrase(rng)
        words = text.split()
        wrong = rng.choice([" ".join(words[:-2]), " ".join(words[:2] + words[1:]),
                            " ".join(words[:-1] + [rng.choice([n for n in NOUNS if n != words[-1]])])])
        return kind, "Repeat this phrase.", text, text, wrong
    if kind == "capitals":
        word = rng.choice(NOUNS)
        wrong = rng.choice([word, word.capitalize(), rng.choice([n for n in NOUNS if n != word]).upper()])
        return kind, "Write this word in capitals.", word, word.upper(), wrong
    if kind in ("first_word", "last_word"):
        words = phrase(rng).split()
        answer = words[0] if kind == "first_word" else words[-1]
        wrong = rng.choice([w for w in words if w != answer])
        which = "first" if kind == "first_word" else "last"
        return kind, f"What is the {which} word of this sentence?", " ".join(words), answer, wrong
    if kind == "reverse":
        items = rng.sample(NOUNS, rng.randint(3, 5))
        backwards = list(reversed(items))
        wrong = rng.choice([items, backwards[:-1], backwards[1:2] + backwards[:1] + backwards[2:]])
        return kind, "Reverse the list.", ", ".join(items), ", ".join(backwards), ", ".join(wrong)
    if kind == "length":
        word = rng.choice(NOUNS)
        question = f"What does len('{word}') return?"
        return kind, question, "", str(len(word)), str(len(word) + rng.choice([-1, 1]))
    question, answer, wrong = rng.choice(PYTHON_QA)
    return kind, question, "", answer, wrong


def prompt_of(instruction: str, text: str) -> str:
    """"Repeat this phrase: the list holds ...", or the instruction alone (a question) when there is no input."""
    return f"{instruction.rstrip('.?')}: {text}" if text else instruction


def conversation(rng: random.Random) -> list[dict[str, str]]:
    """A chat as {role, content}: one task, sometimes with a system prompt, sometimes a second turn."""
    kind, instruction, text, answer, _ = task(rng)
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.2 else []
    messages += [{"role": "user", "content": prompt_of(instruction, text)}, {"role": "assistant", "content": answer}]
    if kind == "repeat" and rng.random() < 0.5:  # a second turn on the same phrase
        messages += [{"role": "user", "content": "Now write it in capitals."},
                     {"role": "assistant", "content": answer.upper()}]
    return messages


# ---------------------------------------------------------------- files


SHAREGPT_SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


def chat_messages(rng: random.Random) -> dict:
    return {"messages": conversation(rng)}


def chat_sharegpt(rng: random.Random) -> dict:
    return {"conversations": [{"from": SHAREGPT_SPEAKER[m["role"]], "value": m["content"]}
                              for m in conversation(rng)]}


def chat_alpaca(rng: random.Random) -> dict:
    _, instruction, text, answer, _ = task(rng)
    record = {"instruction": instruction, "input": text, "output": answer}
    if rng.random() < 0.2:
        record["system"] = SYSTEM
    return record


def preference_text(rng: random.Random) -> dict:
    _, instruction, text, answer, wrong = task(rng)
    return {"prompt": prompt_of(instruction, text), "chosen": answer, "rejected": wrong}


def preference_messages(rng: random.Random) -> dict:
    _, instruction, text, answer, wrong = task(rng)
    return {"prompt": [{"role": "user", "content": prompt_of(instruction, text)}],
            "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": wrong}]}


# file name -> (record maker, number of records); each file has its own generator, seeded by its name.
FILES: dict[str, tuple[Callable[[random.Random], dict], int]] = {
    "chat-messages.jsonl": (chat_messages, 120),
    "chat-sharegpt.jsonl": (chat_sharegpt, 120),
    "chat-alpaca.jsonl": (chat_alpaca, 120),
    "preferences.jsonl": (preference_text, 160),
    "preferences-messages.jsonl": (preference_messages, 160),
}


def write_all(out: Path) -> list[Path]:
    """Write every file of FILES into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (make, count) in FILES.items():
        rng = random.Random(f"llmpipe-examples:{name}")
        lines = [json.dumps(make(rng), ensure_ascii=False) for _ in range(count)]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="output folder")
    for path in write_all(parser.parse_args().out):
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
