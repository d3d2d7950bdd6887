"""Build the labelled sample of real text that measures the pii detectors (issue 14).

On real documentation pages the IP detector took section numbers for addresses. This script cuts
text installed on this machine into passages around *candidate spans* and writes them as JSONL for
a person to label; ``tests/stages/pii/data/labelled.jsonl`` is the result, and the rules the labels
follow are in ``tests/stages/pii/data/README.md``. The tests read only the committed file, so the
machine that runs them needs none of these sources.

Sources, read in a fixed order:

- ``/usr/share/doc``: plain text, Markdown, changelogs, NEWS, copyright files (gzipped or not),
  and HTML pages turned into text by the ingest stage's own extractor and normaliser (the text
  the pii stage sees in the pipeline). JSON, PostScript, PDF, images and the like are skipped.
- ``/usr/share/info``: GNU manuals (section numbers, menus, tables of contents).
- ``/usr/share/man``: man pages of every installed language, rendered by ``man -l`` at 80 columns;
  only pages whose source holds a candidate are rendered.

Candidates: a dotted quad that Python's ``ipaddress`` accepts (not inside a longer dotted or
alphanumeric token; or next to a letter of another script), a token of hex groups and colons that
``ipaddress`` accepts as IPv6, anything shaped like ``x@y.z``, and what libphonenumber's matcher
finds at leniency VALID for US, GB, DE or FR. These are broader than the detectors on purpose:
everything a detector could take lies among them (``check`` lists what a detector finds outside
them).

Choosing passages: every candidate is an anchor of its kind; anchors are shuffled with a fixed
seed and taken in turn, at most ``PER_SOURCE`` per source file and ``PER_GROUP`` per package
and kind (so that one changelog, or the thousand gcloud man pages, cannot fill the sample), until
each kind has its quota. A passage is the anchor's line and up to ``CONTEXT_LINES`` lines either
side, as many as fit in ``MAX_PASSAGE`` characters (an ellipsis marks a cut line); a passage that
overlaps another of its file, or repeats one (Debian ships the same changelog in several
packages; nodejs a page as .md and .html) is skipped. Every candidate inside a passage is a span
to label, not only the anchor. Each passage gets a split, ``dev`` or ``test``, from a hash of its
source file. Raising a quota keeps the passages drawn before for that kind and adds new ones
(passages of the kinds drawn after it may shift where a new one overlaps them).

  build  write the passages (``--out``); a span keeps its label and batch from ``--labels`` when
         that file has a span at the same offsets of the same source, else its label is null and
         its batch ``--batch``: label those by hand.
  check  validate a labelled file (offsets, values, labels, none left null) and list every span the
         detector finds that no labelled span covers: label it, or count it as a false positive.

Batch d (``PUBLIC_KINDS``): ``build ... --kinds ipv4_public ipv6_public --no-man`` draws only
candidates that the shipped config would replace as public addresses, from source files that
neither ``--labels`` nor an earlier draw uses (/usr/share/doc and info only: about 3 minutes).

Run: ``.venv/bin/python bench/pii_sample.py build --out /tmp/candidates.jsonl --labels
tests/stages/pii/data/labelled.jsonl --batch e`` (about 15 to 25 minutes on two busy cores: most
of it renders some 4,000 man pages), then
``.venv/bin/python bench/pii_sample.py check tests/stages/pii/data/labelled.jsonl``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import ipaddress
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.files import write_text_atomic  # noqa: E402
from pipeline.schema import build as build_config  # noqa: E402
from stages.pii.detectors import IpConfig, address_verdict, phone_matches  # noqa: E402
from stages.pii.scoring import read_sample  # noqa: E402

SEED = 14  # issue 14
# Anchors per kind, drawn in this order. Email addresses in documentation are nearly all real (the
# authors of changelogs), so a second draw takes only the unusual ones: a TLD outside the
# COMMON_TLDS most frequent in the sources, or ':', '/', '=' or '-' just before, or ':' or '/'
# just after -- where a string shaped like an address is most often something else (a file name, a
# message id, an account in a URL). Precision on that draw is a harder test than on the first.
QUOTAS = {"ipv4": 630, "email": 120, "ipv6": 40, "phone": 30, "email_unusual": 70,
          "ipv4_public": 120, "ipv6_public": 40}
# Batch d (issue 14): few addresses in documentation are public, so the shipped config's precision
# rested on a handful. These draws take only candidates that the shipped config replaces when it
# reads them as addresses (``address_verdict`` says True: public, not a network's .0) -- real public
# addresses and the versions and numbers shaped like them, where a mistake costs precision -- and
# only from source files that no earlier draw used: text the numbering rules were never written on.
PUBLIC_KINDS = {"ipv4_public": "ipv4", "ipv6_public": "ipv6"}
COMMON_TLDS = 30
PER_SOURCE = 3  # anchors per source file and kind
PER_GROUP = 10  # anchors per package (or man page family, info manual) and kind
CONTEXT_LINES = 6  # lines kept either side of the anchor's line, fewer if they do not fit
MAX_PASSAGE = 1200  # characters; a line longer than this is cut around the anchor
MAX_SOURCE_BYTES = 4_000_000  # larger files are skipped (generated API dumps)
SKIPPED_SUFFIXES = (".json", ".json.gz", ".ps", ".ps.gz", ".pdf", ".png", ".gif", ".jpg", ".svg", ".svgz", ".css",
                    ".js", ".ico", ".woff", ".woff2", ".ttf", ".xcf", ".mo", ".db", ".cocci")
HTML_SUFFIXES = (".html", ".htm", ".html.gz", ".xhtml")
PHONE_REGIONS = ("US", "GB", "DE", "FR")
PHONE_MIN_DIGITS = 7

# Broad candidate patterns; ipaddress decides what is an address-shaped token.
_QUAD = re.compile(r"(?<![\w.])\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
# A quad glued to a letter of another script ("130.225.17.255인"): a span to label, not an anchor.
_GLUED_QUAD = re.compile(r"(?<![A-Za-z0-9_.])\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![A-Za-z0-9_]|\.\d)")
_HEXCOLON = re.compile(r"(?<![\w:.])[0-9A-Fa-f:]*:[0-9A-Fa-f]*:[0-9A-Fa-f:.]*(?![\w:])")
_EMAILISH = re.compile(r"[\w.+%'-]+@(?:[\w-]+\.)+[\w-]+")
# Files without any of these hold no candidate: not read further (and man pages not rendered).
_SOURCE_HINT = re.compile(
    rb"\d\.\d{1,3}\.\d{1,3}\.\d|@|::|[0-9a-fA-F]:[0-9a-fA-F]{1,4}:|\+\d|\(\d{3}\)|\d{3}[-. ]\d{3,4}[-. ]\d{4}"
)


@dataclass(frozen=True)
class Candidate:
    start: int
    end: int
    kind: str  # ipv4, ipv6, email, phone


# --- sources -----------------------------------------------------------------------------------------

def iter_sources(man: bool = True) -> Iterator[tuple[str, str]]:
    """(path, text) of every readable source, in a fixed order; man pages only with ``man``."""
    for root in ("/usr/share/doc", "/usr/share/info"):
        for path in sorted(_files(root)):
            text = read_doc(path)
            if text:
                yield path, text
    for path in sorted(_files("/usr/share/man") if man else ()):
        if path.endswith(".gz"):
            text = render_man(path)
            if text:
                yield path, text


def _files(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and os.path.isfile(path):
                yield path


def read_doc(path: str) -> str | None:
    """The text of a documentation file, HTML turned into text as ingest does; None if not text."""
    lower = path.lower()
    if lower.endswith(SKIPPED_SUFFIXES) or os.path.getsize(path) > MAX_SOURCE_BYTES:
        return None
    try:
        data = gzip.open(path).read() if lower.endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError):
        return None
    if b"\0" in data[:4096] or len(data) > MAX_SOURCE_BYTES or not _SOURCE_HINT.search(data):
        return None
    text = data.decode("utf-8", "replace")
    if lower.endswith(HTML_SUFFIXES):
        from stages.ingest.stage import extract_text, normalize_text

        text = normalize_text(extract_text(text, "resiliparse"))
    return text


def render_man(path: str) -> str | None:
    """A man page as ``man`` prints it to a pipe (80 columns, no overstrikes); None if nothing to find."""
    try:
        raw = gzip.open(path).read()
    except (OSError, EOFError):
        return None
    if not _SOURCE_HINT.search(raw):
        return None
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    try:
        done = subprocess.run(["man", "-l", path], capture_output=True, env=env, timeout=30, check=False)
    except subprocess.TimeoutExpired:  # a few pages make groff wait for ever
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


# --- candidates --------------------------------------------------------------------------------------

def candidates(text: str) -> list[Candidate]:
    """Every candidate span of ``text``, sorted, none overlapping (the first found wins)."""
    found: list[Candidate] = []
    for m in _QUAD.finditer(text):
        if _parses(m.group()):
            found.append(Candidate(m.start(), m.end(), "ipv4"))
    if "::" in text or ":" in text:
        for m in _HEXCOLON.finditer(text):
            token = m.group().rstrip(".")
            token = token[:-1] if token.endswith(":") and not token.endswith("::") else token
            if token.count(":") >= 2 and _parses(token) and any(c.isalnum() for c in token):
                found.append(Candidate(m.start(), m.start() + len(token), "ipv6"))
    if "@" in text:
        for m in _EMAILISH.finditer(text):
            start = m.start()
            while start < m.end() and text[start] in ".'-":
                start += 1
            found.append(Candidate(start, m.end(), "email"))
    found.sort(key=lambda c: (c.start, -c.end))
    out: list[Candidate] = []
    for c in found:
        if not out or c.start >= out[-1].end:
            out.append(c)
    # A phone candidate may not cut into an address, glued to a letter or not.
    taken = [(c.start, c.end) for c in out + glued_quads(text, 0, len(text), out)]
    out += [c for c in phone_candidates(text) if not any(s < c.end and c.start < e for s, e in taken)]
    return sorted(out, key=lambda c: c.start)


def glued_quads(text: str, lo: int, hi: int, taken: list[Candidate]) -> list[Candidate]:
    """Address-shaped quads in text[lo:hi] next to a non-ASCII letter, which ``candidates`` leaves out."""
    out = []
    for m in _GLUED_QUAD.finditer(text, lo, hi):
        if _parses(m.group()) and not any(c.start < m.end() and m.start() < c.end for c in taken):
            out.append(Candidate(m.start(), m.end(), "ipv4"))
    return out


def unusual_email(text: str, c: Candidate, common_tlds: set[str]) -> bool:
    tld = text[c.start:c.end].rsplit(".", 1)[-1].lower()
    before = text[c.start - 1] if c.start else ""
    after = text[c.end] if c.end < len(text) else ""
    return tld not in common_tlds or before in ":/=-" or after in ":/"


def shipped_ip_config() -> IpConfig:
    """The ``ip_address`` section of conf/stage/pii/default.yaml, read alone: the draws depend on
    nothing else (and a half-edited config elsewhere in the project cannot stop a build)."""
    import yaml

    path = REPO / "conf" / "stage" / "pii" / "default.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))["ip_address"]
    return build_config(IpConfig, data, path="stage.pii.ip_address", source=str(path))


def _parses(token: str) -> bool:
    try:
        ipaddress.ip_address(token)
    except ValueError:
        return False
    return True


def phone_candidates(text: str) -> list[Candidate]:
    """What libphonenumber's matcher finds at leniency VALID (run on windows around digit runs: the
    same matches, much faster; tests/stages/pii/test_pii.py checks that the windows lose none),
    non-overlapping, the longest first."""
    import phonenumbers

    spans = sorted(set(phone_matches(text, PHONE_REGIONS, phonenumbers.Leniency.VALID, PHONE_MIN_DIGITS)),
                   key=lambda se: (se[0], -se[1]))
    out: list[Candidate] = []
    for start, end in spans:
        if not out or start >= out[-1].end:
            out.append(Candidate(start, end, "phone"))
    return out


def passage(text: str, anchor: Candidate) -> tuple[int, int, str, str]:
    """(start, end, prefix, suffix) of the passage around ``anchor``: its line and up to CONTEXT_LINES
    lines either side, as many as fit in MAX_PASSAGE; a window of its line if that alone is too long,
    a '…' marking each cut."""
    line_start = text.rfind("\n", 0, anchor.start) + 1
    line_end = text.find("\n", anchor.end)
    line_end = len(text) if line_end < 0 else line_end
    for lines in range(CONTEXT_LINES, -1, -1):
        start, end = line_start, line_end
        for _ in range(lines):
            if start > 0:
                start = text.rfind("\n", 0, start - 1) + 1
            if end < len(text):
                nxt = text.find("\n", end + 1)
                end = len(text) if nxt < 0 else nxt
        if end - start <= MAX_PASSAGE:
            return start, end, "", ""
    half = (MAX_PASSAGE - (anchor.end - anchor.start)) // 2
    lo = text.find(" ", max(line_start, anchor.start - half), anchor.start)
    hi = text.rfind(" ", anchor.end, min(line_end, anchor.end + half))
    lo = anchor.start if lo < 0 else lo + 1
    hi = anchor.end if hi < 0 else hi
    return lo, hi, "… " if lo > line_start else "", " …" if hi < line_end else ""


def group_of(source: str) -> str:
    """The package, man page family (gcloud_*, git-*) or info manual a source belongs to."""
    parts = Path(source).parts
    if source.startswith("/usr/share/doc/"):
        return "doc:" + parts[4]
    name = re.split(r"[._-]", Path(source).name, maxsplit=1)[0]
    return ("man:" if source.startswith("/usr/share/man/") else "info:") + name


def split_of(source: str) -> str:
    return "dev" if hashlib.sha1(source.encode()).digest()[0] % 2 == 0 else "test"


# --- build -------------------------------------------------------------------------------------------

def build(labels_from: Path | None, batch: str, kinds: tuple[str, ...] = tuple(QUOTAS), man: bool = True
          ) -> list[dict]:
    """The passages, each with every candidate span; labels (and their batch) copied from
    ``labels_from`` where known; a span not labelled there gets ``batch`` and no label. ``kinds``:
    the draws to make (in QUOTAS' order); ``man``: read man pages too (most of the time goes there).
    The PUBLIC_KINDS draws skip every source an earlier draw or ``labels_from`` uses."""
    labelled = read_sample(labels_from, allow_unlabelled=True) if labels_from and labels_from.exists() else []

    anchors: dict[str, list[tuple[str, int]]] = defaultdict(list)  # kind -> [(source, index)]
    texts: dict[str, str] = {}
    found: dict[str, list[Candidate]] = {}
    tlds: Counter[str] = Counter()
    for source, text in iter_sources(man):
        cands = candidates(text)
        if not cands:
            continue
        texts[source], found[source] = text, cands
        for i, c in enumerate(cands):
            anchors[c.kind].append((source, i))
            if c.kind == "email":
                tlds[text[c.start:c.end].rsplit(".", 1)[-1].lower()] += 1
        if len(texts) % 500 == 0:
            print(f"{len(texts)} sources with candidates", file=sys.stderr)
    print(file=sys.stderr)

    known = known_labels(labelled, texts)
    common = {t for t, _ in tlds.most_common(COMMON_TLDS)}
    anchors["email_unusual"] = [(source, i) for source, i in anchors["email"]
                                if unusual_email(texts[source], found[source][i], common)]
    shipped_ip = shipped_ip_config()
    for kind, shape in PUBLIC_KINDS.items():  # what the shipped config replaces if it reads an address
        anchors[kind] = [(source, i) for source, i in anchors[shape]
                         if address_verdict(texts[source][found[source][i].start:found[source][i].end], shipped_ip)]
    rng = random.Random(SEED)
    records, seen_texts = [], set()
    taken_ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)  # no two passages overlap
    for kind, quota in QUOTAS.items():
        if kind not in kinds:
            continue
        pool = list(anchors[kind])
        rng.shuffle(pool)
        taken, per_source, per_group = 0, Counter(), Counter()
        used_before = set(taken_ranges) | {r["source"] for r in labelled} if kind in PUBLIC_KINDS else set()
        for source, i in pool:
            if taken >= quota:
                break
            if per_source[source] >= PER_SOURCE or per_group[group_of(source)] >= PER_GROUP:
                continue
            if source in used_before:
                continue
            text, cands = texts[source], found[source]
            lo, hi, prefix, suffix = passage(text, cands[i])
            body = prefix + text[lo:hi] + suffix
            # The same passage again (one changelog in several packages, a page as .md and .html)
            # has the same passage text or the same anchor line, punctuation aside.
            line_end = text.find("\n", cands[i].end)
            line = text[text.rfind("\n", 0, cands[i].start) + 1:len(text) if line_end < 0 else line_end]
            keys = {" ".join(body.split()), re.sub(r"\W+", "", line)}
            if keys & seen_texts or any(a < hi and lo < b for a, b in taken_ranges[source]):
                continue
            seen_texts.update(keys)
            taken_ranges[source].append((lo, hi))
            per_source[source] += 1
            per_group[group_of(source)] += 1
            taken += 1
            spans = []
            for c in sorted(cands + glued_quads(text, lo, hi, cands), key=lambda c: c.start):
                if c.start >= lo and c.end <= hi:
                    s, e = c.start - lo + len(prefix), c.end - lo + len(prefix)
                    label, span_batch = known.get((source, c.start, c.end), (None, batch))
                    spans.append({"start": s, "end": e, "value": body[s:e], "kind": c.kind, "label": label,
                                  "batch": span_batch})
            records.append({"source": source, "offset": lo - len(prefix), "split": split_of(source),
                            "anchor": kind, "text": body, "spans": spans})
    for n, rec in enumerate(records):
        rec["id"] = f"p{n:04d}"
    return [{"id": r["id"], **{k: v for k, v in r.items() if k != "id"}} for r in records]


def known_labels(records: list[dict], texts: dict[str, str]) -> dict[tuple[str, int, int], tuple[str, str]]:
    """{(source, start, end): (label, batch)} of the labelled spans of ``records``, at offsets in their
    source's text (found again when a record has no "offset"), so that labels survive a change of
    passages."""
    known = {}
    for rec in records:
        text = texts.get(rec["source"])
        if text is None:
            continue
        body = rec["text"]
        prefix = "… " if body.startswith("… ") else ""
        core = body[len(prefix):len(body) - (2 if body.endswith(" …") else 0)]
        offset = rec.get("offset")
        lo = offset + len(prefix) if offset is not None else text.find(core)
        if lo < 0 or text[lo:lo + len(core)] != core:
            continue
        for s in rec["spans"]:
            if s["label"] is not None:
                key = (rec["source"], lo + s["start"] - len(prefix), lo + s["end"] - len(prefix))
                known[key] = (s["label"], s.get("batch", "a"))
    return known


# --- check -------------------------------------------------------------------------------------------

def check(path: Path) -> int:
    """Validate a labelled file, then list what the detectors find (every address replaced: private and
    example ones too) where no span is: a candidate the patterns above missed, to be labelled."""
    import dataclasses

    from llmpipe.project import stage_config
    from stages.pii.scoring import unlabelled_detections
    from stages.pii.stage import scrubber_for

    records = read_sample(path)  # raises SampleError on bad offsets, values or labels
    spans = [s for r in records for s in r["spans"]]
    print(f"{path}: {len(records)} passages, {len(spans)} spans")
    for key, n in sorted(Counter((s.get("batch"), s["kind"], s["label"]) for s in spans).items(), key=str):
        print(f"  batch {key[0]} {key[1]:6} {key[2]:11} {n}")
    shipped = stage_config("pii")
    cfg = dataclasses.replace(shipped, ip_address=dataclasses.replace(shipped.ip_address, keep_non_public=False),
                              email=dataclasses.replace(shipped.email, keep_reserved_domains=False))
    missed = list(unlabelled_detections(scrubber_for(cfg), records))
    for rec, (start, end, kind) in missed:
        print(f"  not a candidate: {rec['id']} {kind} {rec['text'][start:end]!r} in {rec['source']}")
    print(f"  {len(missed)} detections outside the labelled spans")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write candidate passages")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--labels", type=Path, help="a labelled file whose labels carry over")
    b.add_argument("--batch", default="a", help="the batch of spans not labelled in --labels (default: a)")
    b.add_argument("--kinds", nargs="+", choices=tuple(QUOTAS), default=tuple(QUOTAS),
                   help="draw only these kinds (batch d: --kinds ipv4_public ipv6_public --no-man)")
    b.add_argument("--no-man", action="store_true", help="leave man pages out (they take most of the time)")
    c = sub.add_parser("check", help="validate a labelled file")
    c.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.command == "check":
        return check(args.path)
    records = build(args.labels, args.batch, tuple(args.kinds), man=not args.no_man)
    write_text_atomic(args.out, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    spans = [s for r in records for s in r["spans"]]
    print(f"{args.out}: {len(records)} passages, {len(spans)} spans, "
          f"{sum(s['label'] is None for s in spans)} unlabelled; kinds {dict(Counter(s['kind'] for s in spans))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
