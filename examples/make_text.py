"""Write examples/data/text.jsonl: plain documents for the text sources of the CPU fine-tune recipe.

``conf/tiny-finetune.yaml`` has no data stages, so the stages that need plain text read it from files:
quantize's GPTQ calibration and perplexity check (``calibration.files``, ``perplexity.files``) and
evaluate's local tasks (``heldout.files``). This file is that text: one ``{"text": ...}`` object a
line, each a document of 300 to 1500 characters of English prose about Python's standard library.

The prose is the one the embedded corpus draws on (llmpipe/corpus.py): the docstrings of the standard
library modules in ``corpus.MODULES``, split into prose paragraphs by ``corpus.docstring_paragraphs``
(no code, signatures or tables). The modules whose docstrings the corpus keeps out of its crawl (they
train the quality classifier) come first: their ~180 documents are text the tiny pipeline's pretrained
model never saw. The crawled modules follow until MAX_DOCS documents. A document is consecutive
paragraphs of one module joined by blank lines; a paragraph seen before is skipped.

Deterministic, no network and no clock: the same Python version writes the same bytes (docstrings
change between Python releases; the committed file was written with Python 3.11)::

    python examples/make_text.py              # rewrites examples/data/text.jsonl
    python examples/make_text.py --out FILE   # somewhere else
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # llmpipe, when run as a script

from llmpipe.corpus import docstring_paragraphs, split_modules  # noqa: E402 - after the path

MIN_CHARS, MAX_CHARS = 300, 1500  # a document: at least ~45 words (evaluate's passages need 40), at most ~400 tokens
MAX_DOCS = 480
SEP = "\n\n"  # between the paragraphs of a document


def module_documents(paragraphs: Iterable[str]) -> list[str]:
    """One module's paragraphs packed in order into documents of MIN_CHARS..MAX_CHARS characters; a short
    remainder joins the document before it when that fits, else it is left out."""
    docs: list[str] = []
    current: list[str] = []
    for para in paragraphs:
        if current and len(SEP.join([*current, para])) > MAX_CHARS:
            docs.append(SEP.join(current))
            current = []
        current.append(para)
        if len(SEP.join(current)) >= MIN_CHARS:
            docs.append(SEP.join(current))
            current = []
    if current and docs and len(SEP.join([docs[-1], *current])) <= MAX_CHARS:
        docs[-1] = SEP.join([docs[-1], *current])
    return [doc for doc in docs if MIN_CHARS <= len(doc) <= MAX_CHARS]


def documents() -> list[str]:
    """Up to MAX_DOCS documents: the corpus's held-out modules first, then its crawled ones."""
    pages, samples = split_modules()
    seen: set[str] = set()
    docs: list[str] = []
    for module in [*samples, *pages]:
        try:
            paragraphs = docstring_paragraphs(module)
        except ImportError:  # an optional module missing from this Python build
            continue
        fresh = [p for p in paragraphs if not (p in seen or seen.add(p))]
        for doc in module_documents(fresh):
            docs.append(doc)
            if len(docs) == MAX_DOCS:
                return docs
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "text.jsonl",
                        help="output file")
    out = parser.parse_args().out
    docs = documents()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
    print(f"{out}: {len(docs)} documents, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
