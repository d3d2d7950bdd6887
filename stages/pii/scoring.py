"""Precision and recall of a Scrubber on a labelled sample of real text (issue 14).

The sample (``tests/stages/pii/data/labelled.jsonl``, built by ``bench/pii_sample.py``; its
labelling rules are in the README beside it) is JSONL, one passage per line::

    {"id": "p0001", "source": "/usr/share/doc/...", "split": "dev", "anchor": "ipv4", "text": "...",
     "spans": [{"start": 12, "end": 23, "value": "192.168.1.1", "kind": "ipv4", "label": "ip_address",
                "batch": "a"}]}

Every candidate span of a passage is labelled with the PII type it is (``LABELS``) or ``none``,
and carries the batch it was labelled in (``a``, ``b``, ``c``: the rules of issue 14 were written
looking at them; ``d1``, ``d2``: labelled before the last round of rules, ``d2`` never used to
write one; see the README).
A detection counts as a true positive when a span with exactly its offsets carries its type;
any other detection is a false positive, including one where no candidate was (so an unlabelled
passage can only lower precision). A labelled span that no detection matches exactly is a false
negative, but only when ``wanted`` (``wanted_by``) says the config should replace it: with the
shipped config a private IP or an example.com address is labelled as what it is and is kept on
purpose.

The test (``tests/stages/pii/test_precision.py``) and the benchmark (``bench/pii.py``) both score
through here, so they cannot disagree on what a hit is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import LlmpipeError
from stages.pii.detectors import PII_TYPES, EmailConfig, IpConfig, Scrubber, address_verdict, is_reserved_domain

LABELS: tuple[str, ...] = (*PII_TYPES, "none")
Record = dict  # one passage of the sample, as read from JSONL


class SampleError(LlmpipeError):
    """A labelled sample file is malformed: the message names the file, line and span."""


@dataclass
class Counts:
    """Hits of one PII type: true positives, false positives, false negatives."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    fp_values: list[str] = field(default_factory=list)  # what was taken for this type by mistake
    fn_values: list[str] = field(default_factory=list)  # what was missed

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __str__(self) -> str:
        return (f"tp={self.tp} fp={self.fp} fn={self.fn} precision={self.precision:.3f} "
                f"recall={self.recall:.3f} f1={self.f1:.3f}")


def read_sample(path: Path | str, *, allow_unlabelled: bool = False) -> list[Record]:
    """The passages of a labelled JSONL file, each span checked against its passage."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SampleError(f"{where}: not JSON: {exc}") from None
            for key in ("id", "source", "split", "text", "spans"):
                if key not in rec:
                    raise SampleError(f"{where}: no {key!r}")
            text, end = rec["text"], 0
            for span in rec["spans"]:
                s, e, label = span["start"], span["end"], span["label"]
                if not end <= s < e <= len(text):
                    raise SampleError(f"{where} ({rec['id']}): span {s}-{e} overlaps another or lies outside the text")
                if text[s:e] != span["value"]:
                    raise SampleError(f"{where} ({rec['id']}): span {s}-{e} is {text[s:e]!r}, "
                                      f"its value says {span['value']!r}")
                if label not in LABELS and not (allow_unlabelled and label is None):
                    raise SampleError(f"{where} ({rec['id']}): span {span['value']!r} has label {label!r}; "
                                      f"labels are {', '.join(LABELS)}")
                end = e
            records.append(rec)
    return records


def wanted_by(ip: IpConfig, email: EmailConfig) -> Callable[[str, str], bool]:
    """``wanted(label, value)`` for a config: every span labelled with a type must be replaced, except
    what that config keeps by design -- for addresses, whatever ``address_verdict`` keeps (the
    unspecified address and IPv4 network addresses always, non-public ones under
    ``keep_non_public``), and addresses at reserved domains under ``keep_reserved_domains``."""

    def wanted(label: str, value: str) -> bool:
        if label == "ip_address":
            return address_verdict(value, ip) is not False
        if label == "email":
            return not (email.keep_reserved_domains and is_reserved_domain(value.rsplit("@", 1)[-1]))
        return label != "none"

    return wanted


def score(scrubber: Scrubber, records: list[Record], wanted: Callable[[str, str], bool] | None = None,
          batch: str | Collection[str] | None = None) -> dict[str, Counts]:
    """Counts per type over ``records``; ``wanted(label, value)``: which labelled spans must be found
    (default: every span labelled with a type); ``batch``: count only the spans of that batch, or of
    those batches (a detection of a span of another batch is left out; one where no span is counts
    once, whatever the batches: score several batches in one call rather than summing calls)."""
    counts = {t: Counts() for t in scrubber.types}
    batches = {batch} if isinstance(batch, str) else None if batch is None else set(batch)
    for rec in records:
        text = rec["text"]
        labelled = {(s["start"], s["end"]): s["label"] for s in rec["spans"]
                    if batches is None or s.get("batch") in batches}
        elsewhere = {(s["start"], s["end"]) for s in rec["spans"]} - set(labelled)
        found = set()
        for start, end, kind in scrubber.find(text):
            found.add((start, end, kind))
            if (start, end) in elsewhere:
                continue
            if labelled.get((start, end)) == kind:
                counts[kind].tp += 1
            else:
                counts[kind].fp += 1
                counts[kind].fp_values.append(f"{rec['id']}: {text[start:end]!r}")
        for (start, end), label in labelled.items():
            if label in counts and (start, end, label) not in found and \
                    (wanted is None or wanted(label, text[start:end])):
                counts[label].fn += 1
                counts[label].fn_values.append(f"{rec['id']}: {text[start:end]!r}")
    return counts


def unlabelled_detections(scrubber: Scrubber, records: list[Record]) -> Iterator[tuple[Record, tuple[int, int, str]]]:
    """Detections where the sample has no span with the same offsets: candidates the sample missed."""
    for rec in records:
        spans = {(s["start"], s["end"]) for s in rec["spans"]}
        for start, end, kind in scrubber.find(rec["text"]):
            if (start, end) not in spans:
                yield rec, (start, end, kind)
