"""Small WARC files for tests, written with warcio (valid records) or by hand (broken ones).

``build_fixture_set(folder)`` writes one file per situation the ingest stage must handle and
returns what it wrote, so tests can compare the stage's counts with what is really in the files.
Other stages' tests can use ``write_warc`` / ``html_page`` to make their own inputs.
"""

from __future__ import annotations

import gzip
import io
import uuid
from dataclasses import dataclass, field
from pathlib import Path

NAV_ITEMS = ("Home", "Products", "Pricing", "Careers", "Contact us", "Sign in", "Privacy policy")
FOOTER = "Copyright 2024 Example Corp. All rights reserved. Terms of service. Cookie settings."


def html_page(title: str, paragraphs: list[str], *, charset_meta: str | None = "utf-8",
              boilerplate: bool = True) -> str:
    """A web page: navigation, header and footer around an article of ``paragraphs``."""
    meta = f'<meta charset="{charset_meta}">' if charset_meta else ""
    nav = "".join(f'<li><a href="/{i}">{item}</a></li>' for i, item in enumerate(NAV_ITEMS))
    article = "".join(f"<p>{p}</p>" for p in paragraphs)
    chrome_top = (f'<header><div class="logo">Example Corp</div><nav><ul>{nav}</ul></nav></header>'
                  if boilerplate else "")
    sidebar = ('<aside class="sidebar"><h3>Related</h3><ul>'
               + "".join(f'<li><a href="/r{i}">Related link {i}</a></li>' for i in range(6))
               + "</ul></aside>") if boilerplate else ""
    footer = f"<footer><p>{FOOTER}</p></footer>" if boilerplate else ""
    return (f"<!DOCTYPE html><html><head>{meta}<title>{title}</title></head><body>{chrome_top}"
            f"<main><article><h1>{title}</h1>{article}</article></main>{sidebar}{footer}</body></html>")


ARTICLE = [
    "The river otter is a semiaquatic mammal that lives along the rivers and lakes of North America. "
    "It has a long, streamlined body, short legs with webbed feet and a thick, tapering tail.",
    "Otters eat mostly fish, but they also take crayfish, frogs and the occasional bird. They hunt at "
    "night and can stay under water for several minutes while searching the bottom for prey.",
    "After decades of trapping and pollution, the species has returned to many of the waters where it "
    "had disappeared, thanks to reintroduction programs and cleaner rivers.",
]


@dataclass
class Rec:
    """One record to write. ``raw`` bypasses warcio (for broken records)."""

    url: str = ""
    rec_type: str = "response"
    status: str = "200 OK"
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("Content-Type", "text/html; charset=utf-8")])
    body: bytes = b""
    raw: bytes | None = None
    expect: str | None = None  # the drop reason ingest should report; None: kept


def warc_record_bytes(url: str, block: bytes, rec_type: str = "response", content_length: str | None = None) -> bytes:
    """A WARC record written by hand (``content_length`` lets a test lie about the length)."""
    length = str(len(block)) if content_length is None else content_length
    head = (f"WARC/1.0\r\nWARC-Type: {rec_type}\r\nWARC-Target-URI: {url}\r\n"
            f"WARC-Date: 2024-05-01T12:00:00Z\r\nWARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {length}\r\n\r\n")
    return head.encode() + block + b"\r\n\r\n"


def write_warc(path: Path, records: list[Rec], *, compress: bool | None = None) -> Path:
    """Write ``records`` to ``path`` (gzip per record when the name ends in .gz)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    compress = str(path).endswith(".gz") if compress is None else compress
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=compress)
    for rec in records:
        if rec.raw is not None:
            buf.write(gzip.compress(rec.raw) if compress else rec.raw)
            continue
        if rec.rec_type == "warcinfo":
            writer.write_record(writer.create_warcinfo_record(path.name, {"software": "llmpipe-tests"}))
            continue
        if rec.rec_type == "request":
            http = StatusAndHeaders(f"GET {rec.url} HTTP/1.1", [("Host", "example.com")], is_http_request=True)
            writer.write_record(writer.create_warc_record(rec.url, "request", http_headers=http))
            continue
        http = StatusAndHeaders(rec.status, rec.headers, protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(rec.url, rec.rec_type, payload=io.BytesIO(rec.body),
                                                      length=len(rec.body), http_headers=http))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def html_response(url: str, html: str, *, charset_header: str | None = "utf-8", encoding: str = "utf-8",
                  extra_headers: list[tuple[str, str]] | None = None, expect: str | None = None) -> Rec:
    ctype = "text/html" + (f"; charset={charset_header}" if charset_header else "")
    return Rec(url=url, headers=[("Content-Type", ctype), *(extra_headers or [])], body=html.encode(encoding),
               expect=expect)


PNG_BYTES = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                          "0000000d4944415478da63f8cfc0f01f0005000201a5f6ab8f0000000049454e44ae426082")


def mixed_records() -> list[Rec]:
    """Every kind of record a crawl holds, good and bad, with the reason ingest should give."""
    cafe = ["Le café du coin sert un excellent crème brûlée à côté de la gare, été comme hiver."]
    bad_http = b"THIS IS NOT AN HTTP STATUS LINE\r\nfoo: bar\r\n\r\n<html><body><p>lost</p></body></html>"
    return [
        Rec(rec_type="warcinfo", expect="non_response"),
        Rec(url="https://example.com/otters", rec_type="request", expect="non_response"),
        html_response("https://example.com/otters", html_page("River otters", ARTICLE)),
        # charset only in <meta>, body in latin-1: decoded through the meta tag
        html_response("https://example.com/cafe-meta", html_page("Café", cafe, charset_meta="iso-8859-1"),
                      charset_header=None, encoding="latin-1"),
        # header lies (utf-8) about a latin-1 body: strict utf-8 fails, detection decodes it
        html_response("https://example.com/cafe-lie", html_page("Café", cafe, charset_meta=None),
                      charset_header="utf-8", encoding="latin-1"),
        # unknown charset label: falls through to detection
        html_response("https://example.com/bogus-charset", html_page("Otters", ARTICLE[:2]),
                      charset_header="x-no-such-charset"),
        # gzip Content-Encoding is undone by warcio
        Rec(url="https://example.com/gzipped", headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")],
            body=gzip.compress(html_page("Gzipped otters", ARTICLE).encode(), mtime=0)),
        Rec(url="https://example.com/api.json", headers=[("Content-Type", "application/json")],
            body=b'{"otters": 3}', expect="non_html"),
        Rec(url="https://example.com/logo.png", headers=[("Content-Type", "image/png")], body=PNG_BYTES,
            expect="non_html"),
        Rec(url="https://example.com/missing", status="404 Not Found", headers=[("Content-Type", "text/html")],
            body=b"<html><body><h1>404 Not Found</h1><p>The page does not exist.</p></body></html>",
            expect="http_error"),
        Rec(url="https://example.com/old", status="301 Moved Permanently",
            headers=[("Location", "https://example.com/new"), ("Content-Type", "text/html")], body=b"",
            expect="http_redirect"),
        Rec(url="https://example.com/blank", headers=[("Content-Type", "text/html")], body=b"", expect="empty"),
        # binary data labelled as HTML
        Rec(url="https://example.com/binary", headers=[("Content-Type", "text/html; charset=utf-8")],
            body=bytes(range(256)) * 8, expect="bad_encoding"),
        # a page with markup and no text
        html_response("https://example.com/nothing",
                      "<html><head><title></title></head><body><div></div></body></html>", expect="no_text"),
        Rec(raw=warc_record_bytes("https://example.com/bad-http", bad_http), expect="malformed"),
        html_response("https://example.com/otters-2", html_page("River otters again", ARTICLE[::-1])),
    ]


@dataclass
class FixtureSet:
    """The files ``build_fixture_set`` wrote and what ingest should make of them."""

    folder: Path
    mixed: Path  # every kind of record (gzip)
    plain: Path  # uncompressed, with a garbage record header after two good pages
    truncated: Path  # gzip cut inside its last record
    empty: Path  # zero bytes
    not_warc: Path  # a text file named .warc.gz
    mixed_records: list[Rec]
    truncated_kept: int  # pages of the truncated file that are complete


def build_fixture_set(folder: Path) -> FixtureSet:
    folder.mkdir(parents=True, exist_ok=True)
    records = mixed_records()
    mixed = write_warc(folder / "crawl" / "a-mixed.warc.gz", records)

    plain = folder / "crawl" / "b-plain.warc"
    good = [html_response(f"https://plain.example.com/{i}", html_page(f"Page {i}", ARTICLE)) for i in range(2)]
    write_warc(plain, good)
    after = write_warc(folder / "tmp-after.warc", [html_response("https://plain.example.com/lost",
                                                                 html_page("Lost", ARTICLE))]).read_bytes()
    with open(plain, "ab") as f:  # a record header that is not one; the page after it cannot be found
        f.write(b"WARX/9.9 garbage header line\r\nno: headers\r\n\r\n" + after)
    (folder / "tmp-after.warc").unlink()

    pages = [html_response(f"https://trunc.example.com/{i}", html_page(f"Otters {i}", ARTICLE)) for i in range(4)]
    truncated = write_warc(folder / "crawl" / "c-truncated.warc.gz", pages)
    data = truncated.read_bytes()
    last = len(write_warc(folder / "tmp-last.warc.gz", pages[-1:]).read_bytes())
    (folder / "tmp-last.warc.gz").unlink()
    truncated.write_bytes(data[: len(data) - last // 2])  # cut in the middle of the last record's gzip member

    empty = folder / "crawl" / "d-empty.warc.gz"
    empty.write_bytes(b"")
    not_warc = folder / "junk" / "notes.warc.gz"
    not_warc.parent.mkdir(parents=True, exist_ok=True)
    not_warc.write_text("These are my notes, not a web archive.\nSecond line.\n")
    return FixtureSet(folder, mixed, plain, truncated, empty, not_warc, records, truncated_kept=3)
