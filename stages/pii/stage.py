"""pii: replace personal data and secrets with typed placeholders.

Shard in, shard out over ``quality.documents``. Every document's ``text`` is scanned by the
enabled detectors of ``stages.pii.detectors`` and each match is replaced by its type's
placeholder (``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``, ``<CREDIT_CARD>``, ``<IBAN>``,
``<SECRET>``; each configurable, each type can be turned off). Output ``documents``: every
input column, ``text`` scrubbed, plus one int32 column ``pii_<type>`` per enabled type with the
number of replacements in that document. Metrics: ``pii_<type>`` totals, ``docs_with_pii``, and
the usual docs/bytes counts and throughput. Documents whose ``text`` is null are dropped
(``dropped_no_text``), and so is a document a detector fails on (``dropped_scrub_error``,
logged with its row): the stage fails closed rather than pass a text on unscrubbed. Nothing
else is dropped. Matched values are never logged.

What is found:

- emails: ASCII local part (at most 64 characters) @ host names with an alphabetic TLD.
- phones: libphonenumber's ``PhoneNumberMatcher`` (Google's matcher, the ``phonenumbers``
  port), run once per region in ``phone.regions``: numbers in international format (+44 20...)
  are found whatever the list; national formats ("(415) 555-0132", "030 901820") only for the
  listed regions. The default is US and GB, the two national formats most common in English web
  text; each extra region adds its national numbers and its false positives, and costs one more
  pass. The default leniency "strict_grouping" wants a valid number of the region, grouped the
  way the region groups it: "415-555-0132" yes, "32768-65535" (a range) or "0.34.0 - 0.36.0"
  (versions) no, which "valid" would accept. Digits joined to a word by "-" or "_"
  (INV-2024-000317) or followed by ":"/"." and a digit (a time, a decimal) are not numbers.
- IP addresses: dotted quads and IPv6 tokens that Python's ``ipaddress`` accepts (an IPv6 token
  needs a decimal digit: texinfo's ``CBC::`` menu entries are none); a quad may touch a letter of
  another script ("130.225.17.255인": Korean and Japanese write particles right after numbers).
- payment cards: 13-19 digits, ungrouped or grouped by one kind of separator, inside a
  published issuer range (Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay, Mir,
  Maestro) with that issuer's length, and passing the Luhn check.
- IBANs: a known country code, that country's length (SWIFT registry) and the mod-97 check.
- secrets: PEM private key blocks; AWS access key ids (AKIA/ASIA...), GitHub (ghp_, gho_, ghu_,
  ghs_, ghr_, github_pat_), Slack (xox?- tokens, webhook URLs), OpenAI/Anthropic-style sk-,
  Stripe sk_/rk_live/test, Google AIza, Hugging Face hf_ tokens and JWTs; and, unless
  ``secret.assignments`` is false, the value of ``password=``, ``api_key:``, ``"token": "..."``
  assignments, of ``Bearer`` headers and of passwords in URLs (``scheme://user:pass@``) when it
  is a literal, mixes letters and digits (or three character classes) and has at least
  ``secret.min_entropy`` bits per character. Only the value is replaced: ``password=<SECRET>``.

What is deliberately left alone, and why:

- Reserved example addresses (``example.com/.net/.org``, ``*.example``, ``*.test``,
  ``*.invalid``, ``*.localhost``; ``email.keep_reserved_domains``): RFC 2606 reserves them for
  documentation, so they name nobody, and they are common in technical text worth keeping.
  File names such as ``icon@2x.png`` (a "TLD" that is a file extension) and ``package@1.2.3``
  specifiers are not addresses, nor
  are accounts in URLs (``ssh://git@host/``, ``scheme://user:pass@host``), scp-style remotes
  (``git@github.com:org/repo.git``) and x@y.z in a URL's path (message ids in list archives:
  ``lore.kernel.org/git/<id>@host/``; in the query string, ``?to=bob@x.org``, it is an address)
  or in a ``Message-ID:``, ``In-Reply-To:``, ``References:`` or ``Content-ID:`` header (message
  ids, as changelogs quote them: ``Message-ID: <54562798.8040500@DemoRecorder.com>``).
- Non-public IPs (``ip_address.keep_non_public``): private (RFC 1918), loopback, link-local,
  CGNAT, documentation (192.0.2.0/24, 2001:db8::/32...), multicast and reserved ranges, and
  the unspecified 0.0.0.0 / :: always. They are not routable on the Internet, so they do not
  point at a person or a host, and configs, tutorials and logs are full of 192.168.1.1 and
  127.0.0.1. Only globally routable unicast addresses are personal data under that reading.
- Dotted quads that read as numbers (``ip_address.version_context``; issue 14: on real
  documentation pages most quads are section numbers and versions). A quad with a port after it
  is an address. Kept: a quad right after version/release/build/section/figure/OID... words
  ("versions after 1.2.3.4" too; kernel, Linux, JVM, JDK), a product token (``Chrome/120.0.0.0``,
  ``gettext-0.19.8.1``) or ``==``/``>=``/``~=``/``^``; one with a version's tail
  (``2.1.8.2-0ubuntu1``, ``1.15.7.2~``, a Debian changelog heading's ``) unstable; urgency=``) or
  joined to a version just before it ("from 4.4.63.30"); one after a release-note verb
  ("Requires xextproto 7.0.99.1", "Upgrade V8 to 3.6.6.8", "since libxcb 1.1.90.1", "confirmed
  on 2.6.38.6") with no networking word among them ("update DNS to 9.9.9.9" is an address); a
  value so kept anywhere in the text, wherever it recurs without address evidence (a CVS
  revision in a diff header). Then, only for quads whose
  parts are all at most 99 and that have no address evidence (a prefix length of 16-32 or a zone
  after them, or any prefix after a .0 network; a scheme, "@", a networking word -- ip, address,
  Adresse, host, server, dns, gateway, via, local, remote... --, a command -- ping, ssh, dig,
  arp... -- or an interface name -- eth0, tun1... -- shortly before them; an IPv6 address
  nearby): a line that is a product's name and the quad ("Git 1.8.5.6"); a quad that starts a
  line and is followed by "." / ")" or a capitalised title (headings, tables of contents,
  numbered lists: "11.1.2.1. Virtual domains", "2.3.4.5 Title"); one whose first three parts
  also stand alone in the text or recur with another last part (the text's numbering: 7.1.3
  and 7.1.3.5, 1.8.5.5 and 1.8.5.6); and one whose parts are all at most 31 but for at most one
  development snapshot's 90-99 ("1.5.99.3"), outside 10/8 and 127/8: one IPv4 address in about
  3,000, and those people write (1.1.1.1, 8.8.8.8) are public resolvers that name nobody.
  ``v1.2.3.4`` never matches (glued to a letter), nor does a run of five or more parts (an OID).
  Measured on hand-labelled documentation (tests/stages/pii/test_precision.py, bench/pii.py):
  IP precision 0.985 (0.20 before issue 14), recall 0.87 with this config; on the batch no rule
  was written on (d2), 0.87 and 0.76 (13 public addresses: a small figure).
- Dates, times, prices, ISBNs, ordinal and short numbers: libphonenumber rejects dates,
  timestamps and publication pages itself; ISBNs (after "ISBN") and UUIDs are marked as never
  PII before any detector runs; the rest is not a valid phone number, fails the card
  ranges/Luhn, or has fewer than ``phone.min_digits`` digits.
- Ungrouped digit strings (``4155550132``, ``used=8186245120``, ``[4026531837]``) unless a phone
  word (phone, tel, call, mobile, fax, contact...) comes just before (``phone.bare_digits_need_context``): in
  technical text such strings are far more often IDs, byte counts and timestamps than phones.
- IPv4 addresses ending in .0: a network address (93.184.216.0/24) names no host, and
  "3.1.0.0", "120.0.0.0" are usually versions.
- Hashes, UUIDs and other hex: no detector matches hex strings, however random; a secret is
  recognised by its documented prefix or by the key it is assigned to, never by entropy alone
  (too many false positives on commit SHAs and checksums).
- Numbers that fail the Luhn check, IBANs that fail mod-97 or their country's length.
- Assigned values that are code or templates (``os.environ["KEY"]``, ``${DB_PASSWORD}``,
  ``<password>``, ``request.form.password``, ``YOUR_API_KEY``), placeholders such as ``********``,
  plain words and all-digit values: passwords in prose ("my password is hunter2") are missed.
- Names, postal addresses and national ID numbers: they need NER and per-country rules, not
  patterns; out of scope here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import Invalid, LlmpipeError, Stage, StageContext
from stages.common.documents import read_documents as read_shard
from stages.common.documents import text_bytes, with_column
from stages.common.shards import (
    ShardResult,
    ShardTask,
    Throughput,
    list_parquet,
    map_shards,
    workers_problem,
    write_parquet_atomic,
)
from stages.pii.detectors import (
    PII_TYPES,
    CreditCardConfig,
    EmailConfig,
    IbanConfig,
    IpConfig,
    PhoneConfig,
    Scrubber,
    SecretConfig,
    build_scrubber,
)

INPUT = "quality.documents"
log = logging.getLogger("llmpipe.pii")


class PiiError(LlmpipeError):
    """Base of the pii stage's errors."""


class ShardSchemaError(PiiError):
    """An input shard cannot be read or lacks the string column ``text``."""


@dataclass(frozen=True, kw_only=True)
class PiiConfig:
    secret: SecretConfig  # API keys, tokens, private keys, passwords
    email: EmailConfig  # email addresses
    iban: IbanConfig  # bank account numbers (IBAN)
    credit_card: CreditCardConfig  # payment card numbers
    ip_address: IpConfig  # IPv4 and IPv6 addresses
    phone: PhoneConfig  # phone numbers
    workers: int | None  # processes; null: the allocation's or machine's CPUs (execution-only)

    def __post_init__(self) -> None:
        if problem := workers_problem(self.workers):
            raise Invalid("workers", problem)

    @property
    def enabled_types(self) -> tuple[str, ...]:
        return tuple(t for t in PII_TYPES if getattr(self, t).enabled)


def run(cfg: PiiConfig, ctx: StageContext) -> dict[str, float]:
    """Scrub every shard of quality.documents; return replacements per type and throughput."""
    timer = Throughput()
    sources = list_parquet(ctx.input(INPUT))
    if not sources:
        ctx.log.warning("%s at %s holds no Parquet shard", INPUT, ctx.input(INPUT))
    if not cfg.enabled_types:
        ctx.log.warning("pii: every detector is disabled; documents are copied unchanged")
    ctx.output("documents").mkdir(parents=True, exist_ok=True)

    def progress(done: int, total: ShardResult) -> None:
        ctx.log_metrics({"docs_in": total.docs_in, "docs_with_pii": total.counts["docs_with_pii"]}, step=done)

    total = map_shards(scrub_shard, sources, ctx.output_dir, cfg, workers=cfg.workers, desc="pii",
                       phase="scrub", on_progress=progress)
    metrics = total.metrics(timer.seconds)
    for key in ("docs_with_pii", *(f"pii_{t}" for t in cfg.enabled_types)):
        metrics.setdefault(key, 0)  # a zero is a result too
    ctx.log.info("pii: %d of %d documents had PII; replacements: %s", metrics["docs_with_pii"], total.docs_in,
                 {t: metrics[f"pii_{t}"] for t in cfg.enabled_types})
    ctx.log_dataset(INPUT, ctx.input(INPUT), rows=total.docs_in)  # MLflow lineage
    ctx.log_dataset("pii.documents", ctx.output("documents"), rows=total.docs_out, context="output")
    return metrics


# --- one shard (runs in a worker process) ---------------------------------------------------------

def scrub_shard(task: ShardTask) -> ShardResult:
    """Scrub the texts of one shard; write every document with text, plus its pii_<type> counts."""
    import pyarrow as pa

    cfg: PiiConfig = task.config
    table = read_documents(Path(task.source))
    scrubber = scrubber_for(cfg)
    result = ShardResult(docs_in=table.num_rows, bytes_in=text_bytes(table))
    texts: list[str] = []
    counts: dict[str, list[int]] = {t: [] for t in scrubber.types}
    keep: list[bool] = []
    for i, text in enumerate(table.column("text").to_pylist()):
        if text is None:
            keep.append(False)
            result.drops["no_text"] += 1
            continue
        try:
            scrubbed, found = scrubber.scrub(text)
        except Exception as exc:  # fail closed: never pass a text on unscrubbed
            log.warning("%s row %d: dropped, scrubbing failed: %s: %s", task.source, i, type(exc).__name__, exc)
            keep.append(False)
            result.drops["scrub_error"] += 1
            continue
        keep.append(True)
        texts.append(scrubbed)
        for t in scrubber.types:
            counts[t].append(found[t])
        result.counts.update({f"pii_{t}": n for t, n in found.items()})
        result.counts["docs_with_pii"] += bool(found)

    if not all(keep):
        table = table.filter(pa.array(keep, pa.bool_()))
    table = with_column(table, "text", pa.array(texts, table.schema.field("text").type))
    for t in scrubber.types:
        table = with_column(table, f"pii_{t}", pa.array(counts[t], pa.int32()))
    result.docs_out = table.num_rows
    result.bytes_out = text_bytes(table)
    write_parquet_atomic(table, task.output_dir / "documents" / f"{task.name}.parquet")
    return result


@functools.lru_cache(maxsize=4)
def scrubber_for(cfg: PiiConfig) -> Scrubber:
    """The detectors of a config, compiled once per process."""
    return build_scrubber({t: getattr(cfg, t) for t in PII_TYPES})


def read_documents(path: Path) -> Any:
    """A documents shard as a pyarrow Table; it must have a string column ``text``."""
    return read_shard(path, ShardSchemaError)


STAGE = Stage(
    name="pii",
    config=PiiConfig,
    run=run,
    inputs=(INPUT,),
    outputs=("documents",),
    unhashed=frozenset(["workers"]),
    resumable=True,
    shard_phases=("scrub",),  # on Slurm: one job array over the shards, then the final job
    # 2: section, list and version numbers are no longer IP addresses (issue 14); 3: nor a value the
    # text names a version elsewhere, "JVM 1.8.0.60", "confirmed on 2.6.38.6"; message ids are no emails
    version=3,
    description="Replace personal data and secrets with typed placeholders.",
)
