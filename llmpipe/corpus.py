"""The embedded corpus: a small, real web crawl built on this machine, with no download.

``python -m llmpipe.corpus OUT_DIR`` (``make pipeline`` runs it for ``data/embedded``) writes:

- ``OUT_DIR/embedded-0000{0..3}.warc.gz``: four WARC shards of request + response records, as a
  crawler would write them (warcio's WARCWriter, one gzip member per record, a warcinfo record
  first). The HTML is real: the pages Python's own documentation tool renders for the standard
  library (``pydoc.HTMLDoc``): one page per module (its docstring, then the classes and functions
  defined in it, each class with its own members only, so pages do not repeat their base classes
  and packages do not repeat their submodules) and one page per topic of the language reference
  that ``help()`` shows (``pydoc_data.topics``). Each page is wrapped in a site header,
  navigation and footer, so a main-text extractor has boilerplate to remove. Some pages are
  served as ISO-8859-1 or with gzip Content-Encoding.
- Planted cases, so that every data stage visibly does work (``manifest.json`` lists every record
  with its kind and what was planted in it):

  * exact duplicates: a page served again, byte for byte, under a mirror URL;
  * near duplicates: a copy with a few words replaced, deleted or swapped until the Jaccard
    similarity of its word 5-shingles with the original falls between 0.85 and 0.95;
  * low-quality pages: very short pages, link lists, one line repeated, keyword stuffing, mostly
    symbols;
  * PII in the main text of some pages: e-mail addresses, phone numbers in several national
    formats, IPv4 and IPv6 addresses, Luhn-valid credit-card numbers, IBANs with valid check
    digits, API keys (``sk-...``, ``AKIA...``, ``ghp_...``). All are generated: they belong to
    no one;
  * what the ingest stage must skip: JSON, PNG, CSS and plain-text responses, HTTP 404s and 301s.
- ``OUT_DIR/quality/positive.txt`` and ``negative.txt``: training samples for the quality
  classifier, one per line. Positives are paragraphs of the docstrings of a *different* set of
  standard-library modules (every fourth module of the list is kept for samples and is not
  rendered as a page); negatives are generated junk of the kinds planted in the crawl.
- ``OUT_DIR/.complete``: the marker, written last. A folder holding it with the same
  ``CORPUS_VERSION`` is complete, and building again is a no-op.

Deterministic: a fixed seed drives every random choice (record IDs, dates, shard assignment,
edits, planted values), the pages render in child processes with ``PYTHONHASHSEED=0`` (set
reprs print in a fixed order), memory addresses and machine paths are scrubbed, and gzip headers
carry no time. Two builds with the same Python give byte-identical files. The build happens in a
temporary sibling folder that is renamed into place, so a crash never leaves a half corpus.
Nothing of the building machine leaks in: module-level data values (which would include
``os.environ``) are not rendered, and modules describing the machine (os, sys, site, platform,
socket...) are not in the list.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline import LlmpipeError

CORPUS_VERSION = 2  # bump when the output changes: an existing corpus with another version is rebuilt
SEED = 20240501
SHARDS = 4
MARKER = ".complete"
SAMPLE_EVERY = 4  # every 4th module of MODULES feeds the quality samples instead of the crawl
SITE = "https://docs.example.org/py3"

# Standard-library modules, sorted. Left out: modules that describe the machine (os, sys, site,
# platform, socket, time, locale, tempfile, getpass...), Windows/macOS-only ones, modules removed
# from later Pythons, private and test modules, and GUI/side-effect modules (antigravity, this).
MODULES = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.coroutines", "asyncio.events",
    "asyncio.exceptions", "asyncio.futures", "asyncio.locks", "asyncio.protocols", "asyncio.queues",
    "asyncio.runners", "asyncio.streams", "asyncio.subprocess", "asyncio.taskgroups", "asyncio.tasks",
    "asyncio.threads", "asyncio.timeouts", "asyncio.transports", "atexit", "base64", "bdb", "binascii",
    "bisect", "builtins", "bz2", "cProfile", "calendar", "cmath", "cmd", "code", "codecs", "codeop",
    "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "concurrent.futures.process", "concurrent.futures.thread", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "csv", "ctypes", "ctypes.util", "dataclasses", "datetime", "dbm",
    "dbm.dumb", "decimal", "difflib", "dis", "doctest", "email", "email.charset", "email.contentmanager",
    "email.encoders", "email.errors", "email.feedparser", "email.generator", "email.header",
    "email.headerregistry", "email.iterators", "email.message", "email.mime.application",
    "email.mime.audio", "email.mime.base", "email.mime.image", "email.mime.message",
    "email.mime.multipart", "email.mime.nonmultipart", "email.mime.text", "email.parser", "email.policy",
    "email.quoprimime", "email.utils", "enum", "errno", "faulthandler", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "gc", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.entities", "html.parser", "http", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc",
    "importlib.machinery", "importlib.metadata", "importlib.resources", "importlib.resources.abc",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json", "json.decoder", "json.encoder",
    "json.tool", "keyword", "linecache", "logging", "logging.config", "logging.handlers", "lzma",
    "mailbox", "marshal", "math", "mimetypes", "mmap", "modulefinder", "multiprocessing.connection",
    "multiprocessing.context", "multiprocessing.heap", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.process", "multiprocessing.queues", "multiprocessing.reduction",
    "multiprocessing.shared_memory", "multiprocessing.sharedctypes", "multiprocessing.synchronize",
    "netrc", "numbers", "opcode", "operator", "optparse", "pathlib", "pdb", "pickle", "pickletools",
    "pkgutil", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socketserver", "sqlite3", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "tabnanny", "tarfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "tomllib", "trace", "traceback",
    "tracemalloc", "types", "typing", "unicodedata", "unittest.async_case", "unittest.case",
    "unittest.loader", "unittest.main", "unittest.mock", "unittest.result", "unittest.runner",
    "unittest.suite", "urllib.error", "urllib.parse", "urllib.request", "urllib.response",
    "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "wsgiref.handlers", "wsgiref.headers",
    "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom.minidom", "xml.dom.pulldom",
    "xml.etree.ElementPath", "xml.etree.ElementTree", "xml.parsers.expat", "xml.sax",
    "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server",
    "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


class CorpusError(LlmpipeError):
    """The corpus cannot be built where asked."""


# ---------------------------------------------------------------------------------------------
# Rendering (runs in child processes started with PYTHONHASHSEED=0)


@dataclass
class RenderedPage:
    name: str  # e.g. "json.decoder" or "reference.assignment"; also the URL path
    kind: str  # "module" or "topic"
    html: str


_ADDRESS = re.compile(r"(?:\s|&nbsp;)at(?:\s|&nbsp;)0x[0-9a-fA-F]+")  # "<object object at 0x7f...>" in signatures


def _html_doc() -> Any:
    """pydoc's HTML renderer, made machine-independent: data values are rendered as their type
    only (module- and class-level values can hold the environment, paths, or sets in hash order)."""
    import pydoc

    class PortableHTMLDoc(pydoc.HTMLDoc):
        def docother(self, object, name=None, mod=None, *ignored):  # noqa: A002 - pydoc's signature
            lhs = f"<strong>{name}</strong> = " if name else ""
            return lhs + self.escape(f"<{type(object).__name__}>")

    return PortableHTMLDoc()


@contextlib.contextmanager
def _own_members_only():
    """Make pydoc document a class's own attributes only, not the ones it inherits.

    Without this every exception class page repeats BaseException's methods: accidental
    near-duplicates that would blur the planted ones.
    """
    import pydoc

    original = pydoc.classify_class_attrs
    pydoc.classify_class_attrs = lambda cls: [a for a in original(cls) if a[2] is cls]
    try:
        yield
    finally:
        pydoc.classify_class_attrs = original


def _import_quietly(name: str) -> Any:
    import importlib
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def _members(mod: Any) -> tuple[list[tuple[str, type]], list[tuple[str, Any]]]:
    """Public classes and functions of ``mod``, by name: the ones defined in it, or in a private
    accelerator module (``_bisect``, ``_heapq``...) it exports; not the ones it re-exports from
    another public module (they have their own page)."""
    import inspect

    exported = getattr(mod, "__all__", None)
    classes, funcs = [], []
    for key, value in sorted(vars(mod).items()):
        owner = getattr(value, "__module__", None) or ""
        private_owner = any(part.startswith("_") for part in owner.split("."))
        own = owner == mod.__name__ or (private_owner and (exported is None or key in exported))
        if key.startswith("_") or not own:
            continue
        if inspect.isclass(value):
            classes.append((key, value))
        elif inspect.isroutine(value):
            funcs.append((key, value))
    return classes, funcs


def render_module(name: str) -> RenderedPage:
    """One module's page: heading, docstring, class index, its classes (own members), its functions."""
    import pydoc

    mod = _import_quietly(name)
    doc = _html_doc()
    classes, funcs = _members(mod)
    cdict = {key: f"#{key}" for key, _ in classes}
    fdict = {key: f"#-{key}" for key, _ in funcs}
    docloc = doc.getdocloc(mod)
    extras = f'<a href="{docloc}">Module Reference</a>' if docloc else "&nbsp;"
    body = doc.heading(f'<strong class="title">{name}</strong>', extras)
    body += f"<p>{doc.markup(pydoc.getdoc(mod), doc.preformat, fdict, cdict)}</p>\n"
    if classes:
        with _own_members_only():
            parts = [doc.document(value, key, name, fdict, cdict) for key, value in classes]
        body += doc.bigsection("Classes", "index", " ".join(parts))
    if funcs:
        body += doc.bigsection("Functions", "functions",
                               " ".join(doc.document(value, key, name, fdict, cdict) for key, value in funcs))
    return RenderedPage(name, "module", _ADDRESS.sub("", doc.page(f"module {name}", body)))


def render_topic(key: str) -> RenderedPage:
    """A page of the language reference, from the topics pydoc's help() and web server show."""
    from pydoc_data.topics import topics

    doc = _html_doc()
    title = key.replace("-", " ")
    body = doc.heading(f'<strong class="title">{title}</strong>', "Language Reference")
    body += doc.bigsection(title.capitalize(), "index", doc.markup(topics[key].strip(), doc.preformat))
    return RenderedPage(f"reference.{key}", "topic", doc.page(f"topic {title}", body))


def docstring_paragraphs(name: str) -> list[str]:
    """Prose paragraphs of a module's docstrings (module, its classes, their methods, functions)."""
    import inspect

    mod = _import_quietly(name)
    docs = [inspect.getdoc(mod)]
    classes, funcs = _members(mod)
    for _, cls in classes:
        docs.append(inspect.getdoc(cls))
        docs += [inspect.getdoc(v) for k, v in sorted(vars(cls).items())
                 if not k.startswith("_") and inspect.isroutine(v)]
    docs += [inspect.getdoc(f) for _, f in funcs]
    out = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc or ""):
            text = " ".join(para.split())
            if _is_prose(text):
                out.append(text)
    return out


def _is_prose(text: str) -> bool:
    """A paragraph of sentences, not code, a signature or an argument table."""
    words = text.split()
    if not 20 <= len(words) <= 250 or ">>>" in text or "::" in text:
        return False
    alpha = sum(w.strip(".,;:()'\"").isalpha() for w in words)
    return alpha / len(words) >= 0.75 and text[0].isupper() and text.rstrip()[-1] in ".:!?)"


def _render_worker(task: tuple[str, str]) -> tuple[str, str, Any]:
    kind, name = task
    os.environ.pop("PYTHONDOCS", None)  # pydoc's "Module Reference" links would follow it
    try:
        if kind == "module":
            return kind, name, render_module(name)
        if kind == "topic":
            return kind, name, render_topic(name)
        return kind, name, docstring_paragraphs(name)
    except ImportError:  # an optional module missing from this Python build: left out
        return kind, name, None


def render_all(page_modules: list[str], sample_modules: list[str], processes: int) -> tuple[list, list]:
    """Render pages and collect paragraphs in child processes with a fixed hash seed."""
    import multiprocessing
    from pydoc_data.topics import topics

    tasks = ([("module", m) for m in page_modules] + [("topic", t) for t in sorted(topics)]
             + [("samples", m) for m in sample_modules])
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"  # read by the spawned children only
    try:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_render_worker, tasks, chunksize=4)
    finally:
        if saved is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = saved
    pages = [out for kind, _, out in results if kind != "samples" and out is not None]
    paragraphs = [p for kind, _, out in results if kind == "samples" and out for p in out]
    return pages, paragraphs


# ---------------------------------------------------------------------------------------------
# Site chrome and text helpers


NAV = ("Home", "Tutorial", "Library Reference", "Language Reference", "Glossary", "Downloads", "Community",
       "Search", "Report a bug")


def with_site_chrome(html: str, title: str, related: list[str]) -> str:
    """Add the header, navigation, related-links sidebar and footer every page of the site has."""
    nav = "".join(f'<li><a href="{SITE}/{item.lower().replace(" ", "-")}/">{item}</a></li>' for item in NAV)
    side = "".join(f'<li><a href="{SITE}/{r}.html">{r}</a></li>' for r in related)
    top = (f'<header class="site"><a class="logo" href="{SITE}/">Python 3 Reference Mirror</a>'
           f'<nav class="main-nav"><ul>{nav}</ul></nav>'
           f'<div class="breadcrumbs">Home &raquo; Library &raquo; {title}</div></header>')
    bottom = (f'<aside class="related"><h3>Related modules</h3><ul>{side}</ul></aside>'
              '<footer class="site"><p>&copy; 2001-2024 Python Software Foundation. Mirrored for '
              'offline reading. <a href="/privacy">Privacy</a> &middot; <a href="/terms">Terms</a> '
              '&middot; <a href="/cookies">Cookie settings</a></p><p>Last updated: May 2024. Found a '
              'bug? <a href="/bugs">Report it</a>.</p></footer>')
    html = html.replace("<body>\n", "<body>\n" + top + '<main class="content">\n', 1)
    return html.replace("\n</body>", "</main>\n" + bottom + "\n</body>", 1)


def text_of(html: str) -> str:
    """The main text, as the ingest stage's default extractor sees it."""
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=True, alt_texts=False, links=False, form_fields=False,
                              comments=False).strip()


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


# ---------------------------------------------------------------------------------------------
# Planted cases


_TEXT_SEGMENT = re.compile(r"(<[^>]*>)")


def near_duplicate(html: str, rng: random.Random, low: float = 0.85, high: float = 0.95,
                   max_rounds: int = 200) -> tuple[str, float]:
    """A copy of ``html`` with small word edits, and the 5-shingle Jaccard of its text with the original.

    Edits (replace a word with another of the page, delete one, swap two neighbours) touch the text
    inside ``<main>`` only, one batch of ~0.5% of the shingles at a time, until the similarity is
    at most the middle of [low, high]; a batch that overshoots below ``low`` is undone and retried
    smaller. Needs a page of a few hundred words to land in the range.
    """
    original = shingles(text_of(html))
    parts = _TEXT_SEGMENT.split(html)
    start = next((i for i, p in enumerate(parts) if p.startswith("<main")), 0)
    end = next((i for i, p in enumerate(parts) if p.startswith("</main")), len(parts))
    text_idx = [i for i in range(start, end) if not parts[i].startswith("<") and re.search(r"[A-Za-z]{4}", parts[i])]
    vocab = sorted({w for i in text_idx for w in re.findall(r"\b[a-z]{4,}\b", parts[i])})
    target = (low + high) / 2
    batch = max(1, len(original) // 200)
    similarity = 1.0
    for _ in range(max_rounds):
        if similarity <= target or batch < 1 or not text_idx:
            break
        trial = list(parts)
        for _ in range(batch):
            i = rng.choice(text_idx)
            trial[i] = _edit_words(trial[i], rng, vocab)
        trial_sim = jaccard(original, shingles(text_of("".join(trial))))
        if trial_sim < low:
            batch //= 2
            continue
        parts, similarity = trial, trial_sim
    return "".join(parts), similarity


_SEPARATOR = re.compile(r"(\s+|&nbsp;)")


def _edit_words(segment: str, rng: random.Random, vocab: list[str]) -> str:
    tokens = _SEPARATOR.split(segment)  # words at even positions, separators at odd ones
    candidates = [i for i in range(0, len(tokens), 2) if re.fullmatch(r"[A-Za-z]{4,}[.,;]?", tokens[i])]
    if not candidates:
        return segment
    i = rng.choice(candidates)
    action = rng.random()
    if action < 0.5 and vocab:
        tokens[i] = rng.choice(vocab)
    elif action < 0.75 or i + 2 >= len(tokens):
        tokens[i] = ""
    else:
        tokens[i], tokens[i + 2] = tokens[i + 2], tokens[i]
    return "".join(tokens)


FIRST = ("Jane", "Omar", "Mei", "Lukas", "Priya", "Carlos", "Anna", "Kwame", "Sofia", "Hiroshi")
LAST = ("Roe", "Haddad", "Chen", "Becker", "Raman", "Ortega", "Kowalski", "Mensah", "Rossi", "Tanaka")


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def luhn_complete(prefix: str) -> str:
    """``prefix`` plus the Luhn check digit."""
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return prefix + str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in re.sub(r"\D", "", number)]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


def iban(country: str, bban: str) -> str:
    """An IBAN with valid ISO 13616 check digits."""
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


def iban_valid(value: str) -> bool:
    compact = value.replace(" ", "")
    numeric = "".join(str(int(c, 36)) for c in compact[4:] + compact[:4])
    return int(numeric) % 97 == 1


ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _alnum(rng: random.Random, n: int, alphabet: str = ALNUM) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


# Planted values must look like real personal data: documentation ranges (2001:db8::/32, 555-01xx
# numbers, RFC 2606 domains such as example.com) are deliberately kept by the pii stage as non-personal,
# so they would not test it. These domains and numbers are generated and belong to nobody known.
MAIL_DOMAINS = ("mailhost.net", "inbox-post.eu", "fastmail-box.com", "webpost.de")
US_AREA_CODES = ("212", "312", "415", "617", "206", "303", "512", "646", "702", "919")


def _public_ip(rng: random.Random, version: int) -> str:
    import ipaddress

    while True:
        if version == 4:
            value = ".".join(str(rng.randrange(1, 255)) for _ in range(4))
        else:
            value = f"2a0{rng.randrange(10)}:" + ":".join(f"{rng.randrange(65536):x}" for _ in range(7))
        ip = ipaddress.ip_address(value)
        if ip.is_global and not ip.is_multicast:  # unicast on the public internet: what a scrubber must catch
            return value


def make_pii(rng: random.Random, kind: str) -> str:
    """One generated value of a PII kind (see PII_KINDS)."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    if kind == "email":
        return f"{first.lower()}.{last.lower()}{rng.randrange(100)}@{rng.choice(MAIL_DOMAINS)}"
    if kind == "phone":
        fmt = rng.randrange(5)
        exchange = f"{rng.randrange(2, 10)}{rng.randrange(10)}{rng.randrange(10)}".replace("555", "556")
        if fmt == 0:
            return f"+1 {rng.choice(US_AREA_CODES)}-{exchange}-{_digits(rng, 4)}"
        if fmt == 1:
            return f"({rng.choice(US_AREA_CODES)}) {exchange}-{_digits(rng, 4)}"
        if fmt == 2:
            return f"+44 20 7{rng.randrange(100, 946)} {_digits(rng, 4)}"
        if fmt == 3:
            return f"+49 30 {_digits(rng, 8)}"
        return f"+33 6 {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)}"
    if kind == "ipv4":
        return _public_ip(rng, 4)
    if kind == "ipv6":
        return _public_ip(rng, 6)
    if kind == "credit_card":
        number = luhn_complete(rng.choice(("4", "51", "55")) + _digits(rng, 14 if rng.random() < 0.5 else 13))
        number = number if len(number) == 16 else luhn_complete("4" + _digits(rng, 14))
        sep = rng.choice((" ", "-", ""))
        return sep.join(number[i:i + 4] for i in range(0, 16, 4))
    if kind == "iban":
        if rng.random() < 0.5:
            return iban("DE", _digits(rng, 18))
        return iban("GB", "WEST" + _digits(rng, 14))
    if kind == "api_key":
        style = rng.randrange(3)
        if style == 0:
            return "sk-" + _alnum(rng, 48)
        if style == 1:
            return "AKIA" + _alnum(rng, 16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        return "ghp_" + _alnum(rng, 36)
    raise ValueError(f"unknown PII kind {kind!r}")


PII_KINDS = ("email", "phone", "ipv4", "ipv6", "credit_card", "iban", "api_key")
PII_SENTENCES = {
    "email": "Questions about this page can be sent to the maintainer at {}.",
    "phone": "For urgent issues call the support desk on {} during office hours.",
    "ipv4": "The build server for this mirror runs at {} behind the office firewall.",
    "ipv6": "Its IPv6 address is {} and it is reachable from the internal network only.",
    "credit_card": "Donations were charged to the card {} (expires 04/27) until the sponsor changed.",
    "iban": "Bank transfers for the hosting fees go to the account {} in the treasurer's name.",
    "api_key": "Do not share the deployment token {} outside the team.",
}


def pii_paragraph(rng: random.Random) -> tuple[str, dict[str, list[str]]]:
    """A short maintainer note with 2-4 kinds of planted PII, and what was planted."""
    kinds = rng.sample(PII_KINDS, rng.randrange(2, 5))
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    planted: dict[str, list[str]] = {}
    sentences = [f"This page is maintained by {name}."]
    for kind in sorted(kinds, key=PII_KINDS.index):
        value = make_pii(rng, kind)
        planted.setdefault(kind, []).append(value)
        sentences.append(PII_SENTENCES[kind].format(value))
    return " ".join(sentences), planted


JUNK_KINDS = ("short", "link_list", "repeated", "keyword_stuffing", "symbols")
SHORT = ("Coming soon.", "Page under construction", "Click here to continue", "Loading...", "Nothing to see here.",
         "Welcome!", "Redirecting, please wait", "Sorry, this content is not available in your region.")
SYMBOLS = ("###", "$$$", "@@", "!!!", "***", ">>>", "====", "----", "~~~", "%%%", "^^^", "|||", "::", "<<>>", "++",
           "\u2605\u2605\u2605", "\u2192\u2192", "\u00a7\u00a7", "(*_*)", "[x]", "{...}", "##!!##", "0x0x", "@#$%")
SPAM = ("cheap", "best", "free", "download", "online", "discount", "buy", "top", "deal", "fast", "now", "2024")


def junk_text(kind: str, rng: random.Random, vocab: list[str]) -> str:
    """Generated low-quality text of one kind; ``vocab`` supplies real words (module names...)."""
    if kind == "short":
        return rng.choice(SHORT)
    if kind == "link_list":
        items = rng.sample(vocab, min(len(vocab), rng.randrange(25, 60)))
        return " | ".join(["Home", "Login", "Sitemap", *items, "Contact", "Imprint"])
    if kind == "repeated":
        line = f"Click here for the best {rng.choice(vocab)} tutorial online."
        return "\n".join([line] * rng.randrange(20, 50))
    if kind == "keyword_stuffing":
        keys = [f"{rng.choice(SPAM)} {rng.choice(vocab)}" for _ in range(rng.randrange(3, 6))]
        return " ".join(rng.choice(keys) + " " + rng.choice(SPAM) for _ in range(rng.randrange(80, 160)))
    if kind == "symbols":
        count = rng.randrange(40, 120)
        return " ".join(rng.choice(SYMBOLS) if rng.random() < 0.9 else rng.choice(vocab) for _ in range(count))
    raise ValueError(f"unknown junk kind {kind!r}")


def junk_page(kind: str, rng: random.Random, vocab: list[str], title: str) -> str:
    text = junk_text(kind, rng, vocab)
    if kind == "link_list":
        body = "<ul>" + "".join(f'<li><a href="/{w}">{w}</a></li>' for w in text.split(" | ")) + "</ul>"
        if rng.random() < 0.5:  # half as bare links (extractors drop them), half as a text paragraph
            body = f"<p>{text}</p>"
    elif kind == "repeated":
        body = "".join(f"<p>{line}</p>" for line in text.split("\n"))
    else:
        body = f"<p>{text}</p>"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"</head><body>\n<h1>{title}</h1>{body}\n</body></html>")


def png_bytes(rng: random.Random, size: int = 8) -> bytes:
    """A valid, tiny PNG with random colours."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    rows = b"".join(b"\x00" + bytes(rng.randrange(256) for _ in range(size * 3)) for _ in range(size))
    header = size.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# Records


@dataclass
class Entry:
    """One response to write (with its request), and what the manifest says about it."""

    url: str
    body: bytes
    headers: list[tuple[str, str]]
    status: str = "200 OK"
    info: dict[str, Any] = field(default_factory=dict)  # kind, planted values...


def _html_entry(url: str, html: str, info: dict[str, Any], encoding: str = "utf-8", gzip_body: bool = False) -> Entry:
    if encoding != "utf-8":
        html = html.replace('<meta charset="utf-8">', f'<meta charset="{encoding}">', 1)
        info = {**info, "encoding": encoding}
    body = html.encode(encoding, errors="xmlcharrefreplace")
    headers = [("Content-Type", f"text/html; charset={encoding}")]
    if gzip_body:
        import gzip

        body = gzip.compress(body, mtime=0)
        headers.append(("Content-Encoding", "gzip"))
        info = {**info, "content_encoding": "gzip"}
    headers += [("Content-Length", str(len(body))), ("Server", "nginx")]
    return Entry(url, body, headers, info=info)


def build_entries(pages: list[RenderedPage], rng: random.Random) -> tuple[list[Entry], dict[str, Any]]:
    """Every response of the crawl: the pages, the planted cases and the non-HTML noise."""
    names = [p.name for p in pages]
    docs: list[tuple[str, str, dict[str, Any]]] = []  # (url, html, info)
    for i, page in enumerate(pages):
        related = [names[(i + k) % len(names)] for k in (1, 2, 3, 5, 8)]
        html = with_site_chrome(page.html, page.name, related)
        docs.append((f"{SITE}/{page.name}.html", html, {"kind": page.kind, "page": page.name}))

    words = [len(text_of(html).split()) for _, html, _ in docs]
    order = list(range(len(docs)))
    rng.shuffle(order)
    n = len(docs)
    pii_idx, dup_idx, rest = order[: n // 10], order[n // 10: n // 10 + n // 20], order[n // 10 + n // 20:]
    near_idx = [i for i in rest if words[i] >= 400][: n // 20]  # short pages cannot land in the Jaccard range
    stats: dict[str, Any] = {"pii_pages": len(pii_idx), "exact_duplicates": len(dup_idx),
                             "page_words": sum(words)}
    for i in sorted(pii_idx):
        url, html, info = docs[i]
        paragraph, planted = pii_paragraph(rng)
        html = html.replace('<main class="content">\n', f'<main class="content">\n<p>{paragraph}</p>\n', 1)
        docs[i] = (url, html, {**info, "pii": planted})

    entries: list[Entry] = []
    for i, (url, html, info) in enumerate(docs):
        encoding = "iso-8859-1" if i % 17 == 3 else "utf-8"
        entries.append(_html_entry(url, html, info, encoding=encoding, gzip_body=i % 23 == 5))
    for i in sorted(dup_idx):
        url, html, info = docs[i]
        entries.append(Entry(url.replace(SITE, "https://mirror.example.net/python-docs"), entries[i].body,
                             entries[i].headers, info={**info, "kind": "exact_duplicate", "duplicate_of": url}))
    similarities = []
    for i in sorted(near_idx):
        url, html, info = docs[i]
        edited, similarity = near_duplicate(html, rng)
        similarities.append(similarity)
        entries.append(_html_entry(url.replace(SITE, "https://notes.example.com/stdlib"), edited,
                                   {**info, "kind": "near_duplicate", "near_duplicate_of": url,
                                    "jaccard_5shingles": round(similarity, 4)}))
    stats["near_duplicates"] = len(similarities)
    stats["near_duplicate_jaccard"] = [round(min(similarities), 4), round(max(similarities), 4)] if similarities else []
    entries += junk_entries(rng, vocabulary(pages))
    entries += noise_entries(rng, names)
    return entries, stats


def vocabulary(pages: list[RenderedPage]) -> list[str]:
    """Real words for generated junk: the last part of every page name (json, decoder, assignment...)."""
    return sorted({p.name.split(".")[-1].replace("-", " ") for p in pages})


def junk_entries(rng: random.Random, vocab: list[str], per_kind: int = 8) -> list[Entry]:
    out = []
    for kind in JUNK_KINDS:
        for j in range(per_kind):
            title = rng.choice(("Best deals", "Welcome", "Links", "Top resources", "Home page", "Untitled"))
            html = junk_page(kind, rng, vocab, title)
            url = f"https://{rng.choice(('spam', 'links', 'deals'))}.example.info/{kind}/{j}.html"
            out.append(_html_entry(url, html, {"kind": "junk", "junk": kind}))
    return out


def noise_entries(rng: random.Random, names: list[str]) -> list[Entry]:
    """What a crawl holds besides HTML pages: API responses, images, styles, robots.txt, errors."""
    out = []
    for j in range(8):
        sample = sorted(rng.sample(names, 5))
        body = json.dumps({"modules": sample, "page": j}, sort_keys=True).encode()
        out.append(Entry(f"{SITE}/api/modules?page={j}", body, [("Content-Type", "application/json")],
                         info={"kind": "non_html", "content_type": "application/json"}))
    for j in range(6):
        out.append(Entry(f"{SITE}/_static/icon-{j}.png", png_bytes(rng), [("Content-Type", "image/png")],
                         info={"kind": "non_html", "content_type": "image/png"}))
    out.append(Entry(f"{SITE}/_static/site.css", b"body{font-family:sans-serif}nav li{display:inline}",
                     [("Content-Type", "text/css")], info={"kind": "non_html", "content_type": "text/css"}))
    out.append(Entry("https://docs.example.org/robots.txt", b"User-agent: *\nDisallow: /private/\n",
                     [("Content-Type", "text/plain")], info={"kind": "non_html", "content_type": "text/plain"}))
    for _ in range(10):
        missing = f"{rng.choice(names)}.{rng.choice(('old', 'v2', 'draft'))}"
        body = (f"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1>"
                f"<p>The requested URL /{missing}.html was not found on this server.</p></body></html>").encode()
        out.append(Entry(f"{SITE}/{missing}.html", body, [("Content-Type", "text/html; charset=utf-8")],
                         status="404 Not Found", info={"kind": "http_404"}))
    for _ in range(3):
        target = rng.choice(names)
        out.append(Entry(f"{SITE}/latest/{target}", b"", [("Location", f"{SITE}/{target}.html"),
                                                         ("Content-Type", "text/html")],
                         status="301 Moved Permanently", info={"kind": "http_301"}))
    return out


def write_shards(entries: list[Entry], folder: Path, rng: random.Random) -> list[dict[str, Any]]:
    """Write the entries, shuffled, into SHARDS WARC.gz files; return the manifest rows."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    order = list(range(len(entries)))
    rng.shuffle(order)
    start = datetime(2024, 5, 1, tzinfo=UTC)
    manifest = []
    for shard in range(SHARDS):
        name = f"embedded-{shard:05d}.warc.gz"
        buf = io.BytesIO()
        writer = WARCWriter(buf, gzip=True, warc_version="1.0")
        info = io.BytesIO(f"software: llmpipe llmpipe.corpus v{CORPUS_VERSION}\r\nformat: WARC File Format 1.0\r\n"
                          f"description: embedded corpus shard {shard}\r\n".encode())
        writer.write_record(writer.create_warc_record("", "warcinfo", payload=info, length=len(info.getvalue()),
                                                      warc_content_type="application/warc-fields",
                                                      warc_headers_dict=_warc_ids(rng, start, {"WARC-Filename": name})))
        for idx in order[shard::SHARDS]:
            entry = entries[idx]
            date = start + timedelta(seconds=37 * idx + shard)
            response = writer.create_warc_record(
                entry.url, "response", payload=io.BytesIO(entry.body), length=len(entry.body),
                http_headers=StatusAndHeaders(entry.status, entry.headers, protocol="HTTP/1.1"),
                warc_headers_dict=_warc_ids(rng, date))
            request = writer.create_warc_record(
                entry.url, "request", warc_headers_dict=_warc_ids(rng, date),
                http_headers=StatusAndHeaders(f"GET {_path(entry.url)} HTTP/1.1",
                                              [("Host", _host(entry.url)), ("User-Agent", "llmpipe-embedded/1.0")],
                                              is_http_request=True))
            writer.write_request_response_pair(request, response)
            manifest.append({"url": entry.url, "warc_file": name, "record_id": response.rec_headers.get_header(
                "WARC-Record-ID"), "status": int(entry.status.split()[0]), **entry.info})
        (folder / name).write_bytes(buf.getvalue())
    return manifest


def _warc_ids(rng: random.Random, date: datetime, extra: dict[str, str] | None = None) -> dict[str, str]:
    record_id = uuid.UUID(int=rng.getrandbits(128), version=4)
    return {"WARC-Record-ID": f"<urn:uuid:{record_id}>", "WARC-Date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
            **(extra or {})}


def _host(url: str) -> str:
    return url.split("/")[2]


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"


# ---------------------------------------------------------------------------------------------
# Quality samples


def write_samples(folder: Path, paragraphs: list[str], vocab: list[str], rng: random.Random,
                  minimum: int = 300) -> dict[str, int]:
    """positive.txt (docstring paragraphs) and negative.txt (generated junk), one sample a line."""
    positives = list(dict.fromkeys(p for p in paragraphs if "\n" not in p))
    negatives = []
    while len(negatives) < max(minimum, len(positives)):
        kind = JUNK_KINDS[len(negatives) % len(JUNK_KINDS)]
        words = junk_text(kind, rng, vocab).split()
        # cut to the length range of the positives, so that length alone does not separate the classes
        negatives.append(" ".join(words[: rng.randrange(15, 90)]))
    (folder / "quality").mkdir(parents=True, exist_ok=True)
    (folder / "quality" / "positive.txt").write_text("\n".join(positives) + "\n", encoding="utf-8")
    (folder / "quality" / "negative.txt").write_text("\n".join(negatives) + "\n", encoding="utf-8")
    return {"positive": len(positives), "negative": len(negatives)}


# ---------------------------------------------------------------------------------------------
# Build


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == CORPUS_VERSION
    except (ValueError, AttributeError):
        return False


def split_modules() -> tuple[list[str], list[str]]:
    """(modules rendered as pages, modules whose docstrings become positive samples)."""
    pages = [m for i, m in enumerate(MODULES) if i % SAMPLE_EVERY != SAMPLE_EVERY - 1]
    samples = [m for i, m in enumerate(MODULES) if i % SAMPLE_EVERY == SAMPLE_EVERY - 1]
    return pages, samples


def build_corpus(out_dir: Path, processes: int | None = None) -> dict[str, Any]:
    """Build the corpus into ``out_dir`` unless it already holds a complete one; return its stats."""
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return json.loads((out_dir / MARKER).read_text())
    if out_dir.exists() and not out_dir.is_dir():
        raise CorpusError(f"corpus folder {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise CorpusError(f"corpus folder {out_dir} holds files that are not a corpus (no {MARKER} marker): "
                          f"remove it or choose another folder")
    started = time.perf_counter()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stats = _build_into(tmp, processes or min(2, os.cpu_count() or 1))
        (tmp / MARKER).write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**stats, "build_seconds": round(time.perf_counter() - started, 2)}


def _build_into(folder: Path, processes: int) -> dict[str, Any]:
    rng = random.Random(SEED)
    page_modules, sample_modules = split_modules()
    pages, paragraphs = render_all(page_modules, sample_modules, processes)
    entries, stats = build_entries(pages, rng)
    manifest = write_shards(entries, folder, rng)
    samples = write_samples(folder, paragraphs, vocabulary(pages), rng)
    html_docs = [e for e in entries if e.status.startswith("200") and e.headers[0][1].startswith("text/html")]
    stats.update({
        "version": CORPUS_VERSION, "python": sys.version.split()[0], "seed": SEED, "shards": SHARDS,
        "records": len(entries), "html_pages": len(html_docs), "rendered_pages": len(pages),
        "modules": sum(p.kind == "module" for p in pages), "topics": sum(p.kind == "topic" for p in pages),
        "samples": samples,
        "warc_bytes": sum((folder / f"embedded-{s:05d}.warc.gz").stat().st_size for s in range(SHARDS)),
        "junk_pages": sum(e.info.get("kind") == "junk" for e in entries),
    })
    (folder / "manifest.json").write_text(json.dumps({"stats": stats, "records": manifest}, indent=1,
                                                     sort_keys=True) + "\n")
    return stats


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished build into place; an outdated or empty folder there is replaced."""
    if out_dir.exists():  # empty, or a corpus of another CORPUS_VERSION (checked in build_corpus)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out_dir)


def digest(folder: Path) -> str:
    """sha256 over every file of a corpus (names and bytes), to compare two builds."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to build the corpus in (e.g. data/embedded)")
    parser.add_argument("--processes", type=int, default=None, help="render processes (default: min(2, cpus))")
    args = parser.parse_args(argv)
    if is_complete(args.out_dir):
        print(f"{args.out_dir}: complete corpus (version {CORPUS_VERSION}) already there, nothing to do")
        return 0
    stats = build_corpus(args.out_dir, args.processes)
    print(f"{args.out_dir}: {stats['records']} responses ({stats['html_pages']} HTML pages) in {SHARDS} shards, "
          f"{stats['warc_bytes'] / 1e6:.1f} MB of WARC, samples {stats['samples']}, "
          f"built in {stats['build_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
