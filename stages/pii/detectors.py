"""Detectors of the pii stage: each finds the spans of one kind of personal data or secret.

A detector is built from its typed config and yields ``(start, end, replace)`` spans of a text:
``replace`` is False for a match it recognises but deliberately keeps (a private IP, an
example.com address, a version number), so that no later detector takes it for something else.
The ``Scrubber`` first marks spans that are never personal data (ISBNs, UUIDs), then runs the
enabled detectors in a fixed priority order (secrets, emails, IBANs, card numbers, IP addresses,
phone numbers: the more specific pattern first), each on the text with the spans taken so far
blanked out, accepts a span only when it does not overlap one accepted before, and replaces the
accepted ``replace`` spans with their type's placeholder.
What each detector deliberately leaves alone is listed in the module docstring of ``stages.pii.stage``.

Speed and safety: every pattern is linear in the length of the text (bounded or possessive
repetitions, candidates start at a token boundary), and most start with a literal ('@', ':',
'-') or a character class, which Python's ``re`` scans for quickly; a lookbehind placed first
would make it try a full match at every position. Secret patterns only run when their literal
prefix occurs in the text. Costly checks (Luhn, mod 97, ``ipaddress``, libphonenumber's parser)
run on candidates only; libphonenumber only sees windows around runs of enough digits. The context
checks that tell a section or version number from an IPv4 address (issue 14, ``reads_as_number``)
look at bounded windows around each quad, and the text's numbering is indexed once per text.
"""

from __future__ import annotations

import bisect
import difflib
import ipaddress
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from pipeline import Invalid

Span = tuple[int, int, bool]  # start, end, replace (False: recognised and kept)
Finder = Callable[[str], Iterator[Span]]


# --- configs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EmailConfig:
    enabled: bool  # replace email addresses
    placeholder: str  # replacement text
    keep_reserved_domains: bool  # keep addresses at RFC 2606 domains (example.com, *.test, *.invalid...)


@dataclass(frozen=True, kw_only=True)
class PhoneConfig:
    enabled: bool  # replace phone numbers (found by libphonenumber's PhoneNumberMatcher)
    placeholder: str  # replacement text
    regions: tuple[str, ...]  # regions whose national formats are read; +CC numbers match anyway
    leniency: Literal["possible", "valid", "strict_grouping", "exact_grouping"]  # phonenumbers.Leniency
    min_digits: int  # runs of fewer digits are not looked at (speed; shorter valid numbers are rare)
    bare_digits_need_context: bool  # ungrouped digits (4155550132) count only after "phone", "tel", "call"...

    def __post_init__(self) -> None:
        import phonenumbers

        problems = []
        if not self.regions:
            problems.append(("regions", "is empty: name at least one region (e.g. [US]) or set enabled: false"))
        for region in self.regions:
            if region not in phonenumbers.SUPPORTED_REGIONS:
                close = difflib.get_close_matches(region.upper(), phonenumbers.SUPPORTED_REGIONS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(("regions", f"{region!r} is not a region libphonenumber knows{hint}; "
                                            "use ISO 3166 alpha-2 codes such as 'US', 'GB', 'DE'"))
        if self.min_digits < 1:
            problems.append(("min_digits", f"must be >= 1, got {self.min_digits}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class IpConfig:
    enabled: bool  # replace IPv4 (and IPv6) addresses, validated by Python's ipaddress
    placeholder: str  # replacement text
    ipv6: bool  # also look for IPv6 addresses
    keep_non_public: bool  # keep addresses that are not globally routable (private, loopback, docs...)
    version_context: bool  # keep dotted quads that read as versions, section or list numbers, OIDs (issue 14)


@dataclass(frozen=True, kw_only=True)
class CreditCardConfig:
    enabled: bool  # replace payment card numbers (known issuer prefix and length, Luhn checked)
    placeholder: str  # replacement text


@dataclass(frozen=True, kw_only=True)
class IbanConfig:
    enabled: bool  # replace IBANs (country length and ISO 13616 mod-97 checked)
    placeholder: str  # replacement text


@dataclass(frozen=True, kw_only=True)
class SecretConfig:
    enabled: bool  # replace API keys, tokens and private keys with a known shape
    placeholder: str  # replacement text
    assignments: bool  # also values of password=/api_key=/token: ..., bearer tokens and URL passwords
    min_length: int  # such assigned values shorter than this are kept
    min_entropy: float  # ... and those with less Shannon entropy (bits per character)

    def __post_init__(self) -> None:
        problems = []
        if self.min_length < 1:
            problems.append(("min_length", f"must be >= 1, got {self.min_length}"))
        if self.min_entropy < 0:
            problems.append(("min_entropy", f"must be >= 0, got {self.min_entropy}"))
        Invalid.check(problems)


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


# --- emails -----------------------------------------------------------------------------------------

# Found from the '@': the host part is matched forwards, the local part walked backwards.
_EMAIL_DOMAIN = re.compile(
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})"  # host labels, alphabetic TLD
    r"(?![\w-]|\.[A-Za-z0-9])"  # the domain ends here (a sentence's full stop may follow)
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_LOCAL_MAX = 64  # RFC 5321
# RFC 2606 / RFC 6761: names reserved for documentation and testing; nobody can own them.
_RESERVED_DOMAINS = ("example.com", "example.net", "example.org")
_RESERVED_TLDS = ("example", "test", "invalid", "localhost")
# File names with an "@" (icon@2x.png, badge-@org.svg) end in an extension that is no TLD.
_FILE_EXTENSIONS = frozenset(
    "png jpg jpeg gif svg webp ico bmp tif tiff css js mjs ts json html htm txt yaml yml toml xml pdf csv tsv "
    "tar gz tgz bz2 xz exe dll whl ipynb log".split()
)
# user@host inside a URL (scheme://user@host, scheme://user:pass@host) or an scp-style remote
# (git@github.com:org/repo.git) names an account on a host, not a mailbox.
_URL_USERINFO_BEFORE = re.compile(r"://(?:[^\s/@:]{0,128}:)?$")
# x@y.z in a URL's path is a message id in a list archive or a handle ("lore.kernel.org/git/<id>@host/",
# "medium.com/@user"), not a mailbox; in its query string ("?to=bob@x.org") it is one.
_URL_PATH_BEFORE = re.compile(r"://[^\s/?#]{1,253}/[^\s?#=&]{0,200}$")
_SCP_PATH_AFTER = re.compile(r":[\w~./-]")
# x@y.z in a Message-ID, In-Reply-To, References or Content-ID header (after ids before it on the
# line) is a message id ("Message-ID: <54562798.8040500@DemoRecorder.com>" in a changelog), not a
# mailbox.
_MESSAGE_ID_HEADERS = ("message-id", "in-reply-to", "references", "content-id")
_MESSAGE_ID_BEFORE = re.compile(
    r"(?<![\w-])(?i:message-id|in-reply-to|references|content-id)[ \t]*:[ \t]*(?:<[^<>\n]{1,250}>[ \t,]*){0,16}<?$"
)


def _message_id(text: str, start: int) -> bool:
    """Whether the address-shaped text at ``start`` sits in a message id header (a plain search for
    the header's name first: the pattern would be tried at every position of the line)."""
    line_start = max(text.rfind("\n", 0, start) + 1, start - 1200)
    line = text[line_start:start].lower()
    return any(h in line for h in _MESSAGE_ID_HEADERS) and bool(_MESSAGE_ID_BEFORE.search(text, line_start, start))


def email_finder(cfg: EmailConfig) -> Finder:
    def find(text: str) -> Iterator[Span]:
        if "@" not in text:
            return
        for m in _EMAIL_DOMAIN.finditer(text):
            start = local_part_start(text, m.start())
            if start is None:
                continue
            domain = m.group(1).lower()
            if domain.rsplit(".", 1)[-1] in _FILE_EXTENSIONS:
                continue
            not_mailbox = (_URL_USERINFO_BEFORE.search(text, max(0, start - 140), start)
                           or _SCP_PATH_AFTER.match(text, m.end())
                           or _URL_PATH_BEFORE.search(text, max(0, start - 460), start)
                           or _message_id(text, start))
            reserved = cfg.keep_reserved_domains and is_reserved_domain(domain)
            yield start, m.end(), not (not_mailbox or reserved)

    return find


def local_part_start(text: str, at: int) -> int | None:
    """Start of the local part that ends at ``at`` (the '@'), or None if there is no valid one."""
    start = at
    while start > 0 and at - start <= _LOCAL_MAX and text[start - 1] in _LOCAL_CHARS:
        start -= 1
    if at - start > _LOCAL_MAX or (start > 0 and _word_char(text[start - 1])):
        return None  # too long, or glued to a non-ASCII letter
    while start < at and text[start] == ".":
        start += 1  # a local part does not start with a dot ("see.user@x" is rare; ".user" never)
    return start if start < at else None


def is_reserved_domain(domain: str) -> bool:
    domain = domain.lower()
    if domain.rsplit(".", 1)[-1] in _RESERVED_TLDS:
        return True
    return any(domain == d or domain.endswith("." + d) for d in _RESERVED_DOMAINS)


# --- phone numbers ----------------------------------------------------------------------------------

# Digits joined by phone punctuation: a superset of what libphonenumber's matcher joins into one
# candidate (its _VALID_PUNCTUATION, at most four in a row), so a window around every run with
# enough digits holds every number the matcher could find in the whole text.
_PHONE_PUNCT = ("\\-x\u2010-\u2015\u2212\u30fc\uff0d-\uff0f \u00a0\u00ad\u200b\u2060\u3000"
                "()\uff08\uff09\uff3b\uff3d.\\[\\]/~\u2053\u223c\uff5e")
_DIGIT_CLUSTER = re.compile(rf"\d(?:[{_PHONE_PUNCT}]{{0,4}}+\d)*+")
_DIGIT = re.compile(r"\d")
_WINDOW_BEFORE = 8  # room for "+", "(", "tel:" and the character the matcher checks before a number
_WINDOW_AFTER = 24  # room for an extension: "ext. 12345", "extension 1234#"
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?")  # no grouping, no "+": an ID, a count, a timestamp... or a phone
_PHONE_WORD_BEFORE = re.compile(
    r"\b(?:phone|telephone|tel|telefon|t[ée]l[ée]phone|tel[ée]fono|mobile|mob|cell|cellphone|fax|call|dial|"
    r"whatsapp|sms|contact|hotline|ph)\b[^\n\d]{0,16}$|[\u260e\u260f\U0001f4de\U0001f4f1]\s*$",
    re.I,
)


def phone_finder(cfg: PhoneConfig) -> Finder:
    """libphonenumber's matcher, once per region; a number in international format matches in any.

    The matcher itself skips dates, timestamps, publication pages ("211-227 (2003)") and digits
    glued to letters; leniency "strict_grouping" also requires a valid number whose digit groups
    are grouped as the region writes them (so "32768-65535" or "0.34.0 - 0.36.0" are not numbers).
    """
    import phonenumbers

    leniency = getattr(phonenumbers.Leniency, cfg.leniency.upper())

    def find(text: str) -> Iterator[Span]:
        for start, end in phone_matches(text, cfg.regions, leniency, cfg.min_digits):
            if _glued(text, start, end):
                continue
            if (cfg.bare_digits_need_context and _BARE_NUMBER.fullmatch(text[start:end].strip("()[]"))
                    and not _PHONE_WORD_BEFORE.search(text, max(0, start - 40), start)):
                continue
            yield start, end, True

    return find


def phone_matches(text: str, regions: tuple[str, ...], leniency: object, min_digits: int) -> Iterator[tuple[int, int]]:
    """What PhoneNumberMatcher finds in ``text`` for each region, run on windows around digit runs only."""
    import phonenumbers

    for lo, hi in phone_windows(text, min_digits):
        window = text[lo:hi]
        for region in regions:
            for m in phonenumbers.PhoneNumberMatcher(window, region, leniency, min_candidate_length=min_digits):
                yield lo + m.start, lo + m.end


def phone_windows(text: str, min_digits: int) -> list[tuple[int, int]]:
    """Merged windows around every run of at least ``min_digits`` digits joined by phone punctuation."""
    windows: list[tuple[int, int]] = []
    for m in _DIGIT_CLUSTER.finditer(text):
        if m.end() - m.start() < min_digits or len(_DIGIT.findall(m.group())) < min_digits:
            continue
        lo, hi = max(0, m.start() - _WINDOW_BEFORE), min(len(text), m.end() + _WINDOW_AFTER)
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    return windows


def _glued(text: str, start: int, end: int) -> bool:
    """Part of something longer: INV-2024-000317, ID_4155550132, a time "2017-12-23 45:01", 4155550132.5."""
    before, after = text[max(0, start - 2):start], text[end:end + 2]
    return ((len(before) == 2 and before[1] in "-_" and before[0].isalnum())
            or (len(after) == 2 and after[0] in "-_" and after[1].isalnum())
            or (len(after) == 2 and after[0] in ":." and after[1].isdigit()))


# --- IP addresses -----------------------------------------------------------------------------------

# A dotted quad not inside a longer dotted or alphanumeric token; the lookbehind sits after the
# first digit so that the pattern starts with a character class. Only ASCII letters and digits
# glue: Korean, Japanese or Chinese text writes a particle right after a number
# ("130.225.17.255인 호스트").
_IPV4 = re.compile(r"\d(?<![A-Za-z0-9_.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![A-Za-z0-9_]|\.[A-Za-z0-9_])")
# Any IPv6 address has its first two colons within its first ten characters ("1:2:", "::",
# "abcd:ef01:"); found from there, the token of hex digits, colons and dots around it is checked
# by ipaddress.
_IPV6_CORE = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
# What may precede a dotted quad that is a version or an outline number, not an address:
# "version 1.2.3.4", "versions after 1.2.3.4", "section 1.2.3.4", "OID 1.2.3.4", "Chrome/120.0.0.0",
# "gettext-0.19.8.1", "pkg==1.2.3.4".
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:v|ver|vers|versions?|releases?|rel|builds?|rev|revision|firmware|fw|patch|kb|bump(?:s|ed)?"
    r"|kernel|linux|jvm|jdk|jre)\.?"
    r"(?:[ \t]+(?:after|before|from|to|since|until|is|was|of|and|or)){0,2}"
    r"|\b(?:sections?|sec|chapters?|ch|clauses?|articles?|art|figures?|fig|tables?|tab|items?|steps?|paragraphs?"
    r"|para|appendix|oid)\.?"
    r")[ \t]{0,3}[:#=]?[ \t]{0,3}[\"'(\[]?$|§\s{0,3}$|[A-Za-z][\w.+-]{0,30}[/-]$|(?:[=<>~!]=|\^|~)\s{0,3}$",
    re.I,
)


def ip_finder(cfg: IpConfig) -> Finder:
    def find(text: str) -> Iterator[Span]:
        if "." in text:
            yield from _ipv4(text, cfg)
        if cfg.ipv6 and ":" in text:
            yield from _ipv6(text, cfg)

    return find


# Numbering (issue 14): on real documentation pages most dotted quads are section numbers, table of
# contents entries, list items, OIDs and versions, not addresses. Their parts are small, where an
# address's octets often are not: only quads whose parts are all at most _NUMBERING_MAX are weighed.
_NUMBERING_MAX = 99
# A quad whose parts are all at most this, with no sign of an address around it, is taken for a
# version ("Git 1.8.5.6", "dpkg (1.16.4.3)"), and so is one where a single part is a development
# snapshot's 90-99 ("libXi 1.5.99.3", X.org's and GNOME's convention). Such addresses are about one
# in 3,000 of IPv4, and those that people write (1.1.1.1, 8.8.8.8, 9.9.9.9) are public resolvers
# that name nobody. Not in 10.0.0.0/8 and 127.0.0.0/8, which documentation uses for addresses all
# the time.
_TINY_MAX = 31
_SNAPSHOT = range(90, 100)
_TINY_EXEMPT = ("10", "127")
# Evidence that a quad is an address all the same (``address_evidence``): a port, a prefix length or
# a zone index right after it; a scheme or "@" right before it ("user@[1.2.3.4]" too); a
# networking word (in a few languages), command or interface name shortly before it (on its line or
# at the end of the line before: prose is wrapped); an IPv6 address near it. A prefix length
# shorter than 16 names a large network, whose address ends in .0: after another quad, "/9" or
# "/10" is a version's or a paragraph's ("linux 2.6.8.1/9", "C11 7.21.6.2/10").
_PORT_AFTER = re.compile(r":\d{1,5}(?![\d.:])")
# a port, a host prefix, a zone
_ADDRESS_AFTER = re.compile(_PORT_AFTER.pattern + r"|/(?:1[6-9]|2\d|3[0-2])(?![\d./])|%\w")
_NETWORK_PREFIX_AFTER = re.compile(r"/\d{1,2}(?![\d./])")
_ADDRESS_BEFORE = re.compile(
    r"(?:://|@)\[?$|(?i:(?<![a-z])ip(?:v4|s)?(?![a-z])|address|addr\b|host|server|resolver|gateway|router|route\b"
    r"|netmask|subnet|proxy|dns|ping|listen|bind\b|connect|peer|remote|\blocal\b|\bvia\b|hop\b|client|inet\b"
    r"|firewall|dhcp|src\b|dst\b|adress|adres\b|direcci[oó]n|indirizzo|endere[cç]o|адрес|アドレス|地址|주소"
    r"|\b(?:ssh|telnet|curl|wget|nc|dig|nslookup|traceroute|tracepath|whois|mtr|arp|ifconfig|iptables|nmap)\b"
    r"|\b(?:eth|wlan|wlp|enp|ens|eno|tun|tap|br|bond|veth|virbr|docker)\d\w*)"
    r"[^\n]{0,32}(?:\n[ \t]*)?$"
)
# A version's tail: a Debian revision or a pre-release ("2.1.8.2-0ubuntu1", "1.2.3.4-beta", "1.15.7.2~");
# "-" before another address is a range ("192.168.1.2-192.168.1.3").
# A Debian changelog heading closes the version and names the suite: "dpkg (0.93.42.3) BETA; urgency=low".
_VERSION_AFTER = re.compile(r"-(?:\d{1,3}(?![\d.])|[A-Za-z])|~|\+[A-Za-z0-9]"
                            r"|\)(?:[ \t]+[\w./-]{1,40}){1,4};[ \t]*(?:urgency|priority)=")
# What joins a quad to a version just before it: "4.5.103.30 from 4.4.63.30", "1.2.3.4, 1.2.3.5".
_NUMBER_LINK = re.compile(r"[ \t]*(?:[,;/-]|\.\.|to|from|and|or)?[ \t]*")
# Release-note verbs, maybe with the product's name: "Requires xextproto 7.0.99.1", "Upgrade V8 to
# 3.6.6.8", "patch V8 to 10.8.168.25", "bump to 1.0.99.1", "since libxcb 1.1.90.1", "(sedan dpkg
# 1.15.5.4)" -- unless a networking word is among them: "update DNS to 9.9.9.9" is an address.
_VERSION_VERB_BEFORE = re.compile(
    r"(?i:\b(?:requires?|required|depends?(?:[ \t]+on)?|upgrade[sd]?|update[sd]?|bump(?:s|ed)?|ships?|shipped"
    r"|patch(?:e[sd])?|built(?:[ \t]+(?:with|against))?|linked[ \t]+against|since|seit|depuis|desde|sinds|sedan"
    r"|(?:confirmed|tested|fixed|introduced|added|removed|deprecated|broken)[ \t]+(?:in|on|with)))"
    r"(?:[ \t]+to)?(?:[ \t]+[A-Za-z][\w.+-]{0,30}){0,3}(?:[ \t]+(?:to|version))?[ \t]+$"
)
# A line that is a product's name and a small quad, nothing else: a release heading ("Git 1.8.5.6",
# "libXi 1.5.99.3"); a command before an address is address evidence ("nameserver 8.8.8.8", "ping
# 1.1.1.1"), weighed first.
_NAME_LINE_BEFORE = re.compile(r"(?:^|\n)[ \t]*[A-Za-z][\w.+-]{0,30} $")
_LINE_END = re.compile(r"[ \t]*(?:\n|$)")
# A heading, table of contents entry or list item: the quad starts its line (after indentation and
# bullet or heading marks) and is followed by "." or ")" ("11.1.2.1. Virtual domains", "2.1.2.1)"),
# or by a title: a word that starts with a capital (or a letter of a script without case) and is no
# host name ("2.3.4.5 Title", "* 7.1.3.5 SHA1 ....... 54"; not "8.8.8.8 and ...", "8.8.8.8 Dns.Google").
_LINE_START_BEFORE = re.compile(r"(?:^|\n)[ \t]*(?:[#*>|+\u2022\u00b7\u2023\u25e6-]{1,6}[ \t]*)?$")
_TITLE_AFTER = re.compile(r"[.)](?:[ \t]|$)|[ \t]+([^\W\d_])(?![\w-]*\.[^\W\d_])", re.M)
# Dotted numbers of three or four parts, for the numbering of a whole text.
_DOTTED = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}(?:\.\d{1,3})?(?!\w|\.\w)")


def _ipv4(text: str, cfg: IpConfig) -> Iterator[Span]:
    numbering: set[str] | None = None  # built on first need
    number_end = -1  # where the last quad kept as a number ends
    verdicts: list[tuple[re.Match[str], bool | None]] = []  # kept as a number?
    named_numbers: set[str] = set()  # quads that their own context reads as numbers
    for m in _IPV4.finditer(text):
        start, end = m.start(), m.end()
        if cfg.ipv6 and start and text[start - 1] == ":" and (token := _ipv6_ending_at(text, start, end)):
            # The tail of "::ffff:123.123.123.123": the IPv6 finder takes the whole address -- unless
            # it keeps it while the quad alone would go ("64:ff9b::93.184.216.34", NAT64).
            if address_verdict(token, cfg) or not address_verdict(m.group(), cfg):
                continue
        kept: bool | None = False
        if cfg.version_context:
            kept = reads_as_number(text, start, end, number_end)
            if kept:
                named_numbers.add(m.group())
            elif kept is None:  # small parts and no other clue: is it part of the text's numbering?
                if numbering is None:
                    numbering = numbered_prefixes(text)
                parts = m.group().split(".")
                kept = ".".join(parts[:3]) in numbering or (parts[0] not in _TINY_EXEMPT and tiny(parts))
            if kept:
                number_end = end
        verdicts.append((m, kept))
    for m, kept in verdicts:
        # A value the text calls a version (or a section) once is one wherever it recurs without a
        # sign of an address: "retrieving revision 1.58.2.2" ... "-0000\t1.58.2.2" in a CVS diff.
        if kept or (m.group() in named_numbers and not address_evidence(text, m.start(), m.end())):
            yield m.start(), m.end(), False
            continue
        verdict = address_verdict(m.group(), cfg)
        if verdict is not None:
            yield m.start(), m.end(), verdict


def _ipv6_ending_at(text: str, start: int, end: int) -> str | None:
    """The IPv6 address (an IPv4-mapped or embedded form) that the quad text[start:end] ends, if any."""
    for token_start, token in ipv6_tokens(text, max(0, start - 40), end):
        if token_start < start and token_start + len(token) == end:
            try:
                ipaddress.IPv6Address(token)
            except ValueError:
                return None
            return token
    return None


def tiny(parts: list[str]) -> bool:
    """All parts at most _TINY_MAX, but for one development snapshot's part (90-99)."""
    big = [int(p) for p in parts if int(p) > _TINY_MAX]
    return not big or (len(big) == 1 and big[0] in _SNAPSHOT)


def reads_as_number(text: str, start: int, end: int, number_end: int = -1) -> bool | None:
    """Whether the dotted quad text[start:end] is a version, outline or list number rather than an
    address: True, False, or None when only the rest of the text can tell (its parts are all small
    and nothing near it decides). ``number_end``: where the last quad read as a number ends.

    A port after it says address. A version or section word before it, a version's tail after it,
    a version just before it ("from 4.4.63.30 to 4.5.103.30") or a release-note verb say number.
    Otherwise a quad with a part above _NUMBERING_MAX, or with address evidence near it, is an
    address; a small one alone on its line after a product's name is a release, and one that starts
    a line and is followed by a title is a heading or a list item. The caller weighs the rest: the
    text's numbering (``numbered_prefixes``) and tiny parts (``tiny``).
    """
    if _PORT_AFTER.match(text, end):
        return False  # "tcp/18.30.0.212:7890": no version has a port
    if _VERSION_BEFORE.search(text, max(0, start - 48), start) or _VERSION_AFTER.match(text, end):
        return True
    if 0 <= number_end and start - number_end <= 8 and _NUMBER_LINK.fullmatch(text, number_end, start):
        return True
    verb = _VERSION_VERB_BEFORE.search(text, max(0, start - 64), start)
    if verb and not _ADDRESS_BEFORE.search(text, verb.start(), start):
        return True
    if any(int(p) > _NUMBERING_MAX for p in text[start:end].split(".")):
        return False
    if address_evidence(text, start, end):
        return False
    if _NAME_LINE_BEFORE.search(text, max(0, start - 40), start) and _LINE_END.match(text, end):
        return True
    if _LINE_START_BEFORE.search(text, max(0, start - 24), start):
        title = _TITLE_AFTER.match(text, end)
        if title and not (title.group(1) or "A").islower():
            return True
    return None


def address_evidence(text: str, start: int, end: int) -> bool:
    """Something around the quad text[start:end] that only an address has (see _ADDRESS_BEFORE)."""
    return bool(_ADDRESS_AFTER.match(text, end) or _ADDRESS_BEFORE.search(text, max(0, start - 80), start)
                or (text.endswith(".0", start, end) and _NETWORK_PREFIX_AFTER.match(text, end))
                or _ipv6_near(text, start, end))


def numbered_prefixes(text: str) -> set[str]:
    """The "a.b.c" prefixes of the dotted quads that belong to a numbering of ``text``: the prefix also
    stands alone (section 7.1.3 above 7.1.3.5, release 1.8.5 before 1.8.5.6), or it has two or more
    different last parts (7.1.3.1 and 7.1.3.2)."""
    alone: set[str] = set()
    last_parts: dict[str, set[str]] = defaultdict(set)
    for m in _DOTTED.finditer(text):
        parts = m.group().split(".")
        if len(parts) == 3:
            alone.add(m.group())
        else:
            last_parts[".".join(parts[:3])].add(parts[3])
    return {p for p, last in last_parts.items() if p in alone or len(last) > 1}


def _ipv6(text: str, cfg: IpConfig) -> Iterator[Span]:
    for start, candidate in ipv6_tokens(text, 0, len(text)):
        if not any(c.isdigit() for c in candidate) and candidate != "::":
            continue  # "CBC::", "ed::": texinfo menu entries and C++ scopes, not addresses
        if _ONE_GROUP.fullmatch(candidate) and not text.startswith("/", start + len(candidate)):
            continue  # "Curve 448::", "Oct 25 2000::": one group is an address only as a prefix ("fd20::/20")
        verdict = address_verdict(candidate, cfg)
        if verdict is not None:
            yield start, start + len(candidate), verdict


_ONE_GROUP = re.compile(r"[0-9A-Fa-f]{1,4}::")


def ipv6_tokens(text: str, lo: int, hi: int) -> Iterator[tuple[int, str]]:
    """(start, token) of the IPv6-shaped tokens in text[lo:hi], not yet checked by ``ipaddress``."""
    done = 0
    for m in _IPV6_CORE.finditer(text, lo, hi):
        if m.start() < done:
            continue  # inside a token already looked at
        start, end = m.start(), m.end()
        while start > 0 and m.start() - start < 10 and text[start - 1] in _IPV6_CHARS:
            start -= 1
        while end < len(text) and text[end] in _IPV6_CHARS:
            end += 1
        done = end
        if (start > 0 and (text[start - 1] in _IPV6_CHARS or _word_char(text[start - 1]))) or \
                (end < len(text) and _word_char(text[end])):
            continue  # part of a longer token: "std::", "dead:beef:cafe:1g", a too long run
        candidate = text[start:end].rstrip(".")  # a full stop ending the sentence
        if candidate.endswith(":") and not candidate.endswith("::"):
            candidate = candidate[:-1]  # "at 2001:db8::1: ..." -- a colon after the address
        yield start, candidate


def _ipv6_near(text: str, start: int, end: int) -> bool:
    """An IPv6 address within 120 characters of text[start:end] (a list of resolvers): one with a digit
    and two groups at least ("::1" or a texinfo menu's "Curve 448::" is no evidence)."""
    for _, token in ipv6_tokens(text, max(0, start - 120), min(len(text), end + 120)):
        if any(c.isdigit() for c in token) and sum(bool(g) for g in token.split(":")) >= 2:
            try:
                ipaddress.IPv6Address(token)
            except ValueError:
                continue
            return True
    return False


def address_verdict(candidate: str, cfg: IpConfig) -> bool | None:
    """None: not an address; True: replace it; False: an address that is kept."""
    try:
        addr = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if addr.is_unspecified:  # 0.0.0.0 and :: name no host at all
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address) and candidate.endswith(".0"):
        return False  # a network address (93.184.216.0/24) names no host; "3.1.0.0", "120.0.0.0" are versions
    return not cfg.keep_non_public or is_public(addr)


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: what can point at one host (or person) on the Internet."""
    site_local = isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local  # fec0::/10, deprecated
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or site_local)


# --- payment cards ----------------------------------------------------------------------------------

# A run of digit groups joined by single spaces or dashes, not after a letter, "+" (a phone
# number) or "-"; card numbers are looked for inside it, group-aligned, so that
# "4111 1111 1111 1111 12/27" (expiry month glued on) still matches while a window inside one
# long group of digits never does.
_DIGIT_RUN = re.compile(r"\d(?<![\w+-]\d)\d*+(?:[ -]\d++)*+")
_GROUP = re.compile(r"\d+")
_MAESTRO_LENGTHS = range(12, 20)
# (lowest prefix, highest prefix, allowed lengths) of the issuer ranges (ISO/IEC 7812 IINs)
# that publish their numbering; a Luhn-valid number outside them is more likely an ID.
_CARD_RANGES: tuple[tuple[str, str, frozenset[int]], ...] = (
    ("4", "4", frozenset({13, 16, 19})),  # Visa
    ("51", "55", frozenset({16})),  # Mastercard
    ("2221", "2720", frozenset({16})),  # Mastercard 2-series
    ("34", "34", frozenset({15})),  # American Express
    ("37", "37", frozenset({15})),  # American Express
    ("6011", "6011", frozenset(range(16, 20))),  # Discover
    ("644", "649", frozenset(range(16, 20))),  # Discover
    ("65", "65", frozenset(range(16, 20))),  # Discover
    ("300", "305", frozenset(range(14, 20))),  # Diners Club
    ("36", "36", frozenset(range(14, 20))),  # Diners Club
    ("38", "39", frozenset(range(14, 20))),  # Diners Club
    ("3528", "3589", frozenset(range(16, 20))),  # JCB
    ("62", "62", frozenset(range(16, 20))),  # UnionPay
    ("2200", "2204", frozenset(range(16, 20))),  # Mir
    ("50", "50", frozenset(_MAESTRO_LENGTHS)),  # Maestro
    ("56", "58", frozenset(_MAESTRO_LENGTHS)),  # Maestro
    ("63", "63", frozenset(_MAESTRO_LENGTHS)),  # Maestro
    ("67", "67", frozenset(_MAESTRO_LENGTHS)),  # Maestro
)


def card_finder(cfg: CreditCardConfig) -> Finder:
    def find(text: str) -> Iterator[Span]:
        for m in _DIGIT_RUN.finditer(text):
            if m.end() - m.start() >= 13:
                for start, end in card_windows(m.group()):
                    yield m.start() + start, m.start() + end, True

    return find


def card_windows(run: str) -> Iterator[tuple[int, int]]:
    """Spans of card numbers in a run of digit groups: whole groups, 13-19 digits, longest first."""
    groups = [g.span() for g in _GROUP.finditer(run)]
    i = 0
    while i < len(groups):
        found, digits = None, 0
        for j in range(i, len(groups)):
            size = groups[j][1] - groups[j][0]
            digits += size
            if digits > 19 or (j > i and not 3 <= size <= 6):
                break
            if digits >= 13 and is_card_number(run[groups[i][0]:groups[j][1]]):
                found = j
        if found is None:
            i += 1
        else:
            yield groups[i][0], groups[found][1]
            i = found + 1


def is_card_number(candidate: str) -> bool:
    """Grouping consistent (one separator, groups of 3-6 digits), a known issuer range, Luhn valid."""
    separators = set(re.sub(r"\d", "", candidate))
    if len(separators) > 1:
        return False
    if separators and not all(3 <= len(g) <= 6 for g in candidate.split(separators.pop())):
        return False
    digits = re.sub(r"\D", "", candidate)
    in_range = any(lo <= digits[: len(lo)] <= hi and len(digits) in lengths for lo, hi, lengths in _CARD_RANGES)
    return in_range and luhn_valid(digits)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of ISO/IEC 7812-1."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# --- IBANs ------------------------------------------------------------------------------------------

# Country code, two check digits, then up to 30 letters/digits, in groups of four or not at all.
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
# IBAN lengths per country, from the SWIFT IBAN registry (ISO 13616).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def iban_finder(cfg: IbanConfig) -> Finder:
    def find(text: str) -> Iterator[Span]:
        for m in _IBAN.finditer(text):
            span = iban_span(m.group())
            if span is not None:
                yield m.start(), m.start() + span, True

    return find


def iban_span(candidate: str) -> int | None:
    """Length of the valid IBAN at the start of ``candidate``, or None.

    The pattern may run on into a following word in capitals ("... 0130 00 BANK"); the country's
    IBAN length says where the IBAN ends, and it must end at a space or at the end.
    """
    length = IBAN_LENGTHS.get(candidate[:2])
    if length is None:
        return None
    end = seen = 0  # walk to the country's length in letters and digits, spaces not counted
    while end < len(candidate) and seen < length:
        seen += candidate[end] != " "
        end += 1
    if seen < length or (end < len(candidate) and candidate[end] != " "):
        return None
    return end if iban_checksum_valid(candidate[:end].replace(" ", "")) else None


def iban_checksum_valid(iban: str) -> bool:
    """ISO 13616 / ISO 7064 mod 97-10: move the first four characters to the end, letters to 10..35."""
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


# --- secrets ----------------------------------------------------------------------------------------

# Credentials with a documented shape: (literals one of which must occur, pattern, extra check).
_TOKEN_PATTERNS: tuple[tuple[tuple[str, ...], re.Pattern[str], Callable[[str], bool] | None], ...] = (
    # Each pattern starts with its literal prefix (fast to scan for); the lookbehind after it checks
    # that the prefix starts a token.
    (("AKIA", "ASIA", "ABIA", "ACCA"),  # AWS access key id
     re.compile(r"A(?:KIA|SIA|BIA|CCA)(?<![A-Za-z0-9]A...)[A-Z0-9]{16}(?![A-Za-z0-9])"), None),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),  # GitHub tokens
     re.compile(r"gh[pousr]_(?<![A-Za-z0-9_]....)[A-Za-z0-9]{36,251}(?![A-Za-z0-9_])"), None),
    (("github_pat_",),  # GitHub fine-grained personal access token
     re.compile(r"github_pat_(?<![A-Za-z0-9_]github_pat_)[A-Za-z0-9_]{22,244}(?![A-Za-z0-9_])"), None),
    (("xox",),  # Slack tokens
     re.compile(r"xox[abposr]-(?<![A-Za-z0-9_-].....)[A-Za-z0-9-]{10,250}(?![A-Za-z0-9_-])"), None),
    (("hooks.slack.com",),  # Slack incoming webhook
     re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9]{8,16}/[A-Za-z0-9]{8,16}/[A-Za-z0-9]{16,48}"), None),
    (("sk-",),  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-)
     re.compile(r"sk-(?<![A-Za-z0-9_-]...)[A-Za-z0-9_-]{20,250}(?![A-Za-z0-9_-])"),
     lambda s: _mixed_case_and_digit(s[3:])),
    (("k_live_", "k_test_"),  # Stripe secret and restricted keys
     re.compile(r"[rs]k_(?:live|test)_(?<![A-Za-z0-9_]........)[A-Za-z0-9]{16,247}(?![A-Za-z0-9_])"), None),
    (("AIza",),  # Google API key
     re.compile(r"AIza(?<![A-Za-z0-9_-]AIza)[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"), None),
    (("hf_",),  # Hugging Face token
     re.compile(r"hf_(?<![A-Za-z0-9_]hf_)[A-Za-z0-9]{30,60}(?![A-Za-z0-9_])"),
     lambda s: any(c.isupper() for c in s) and any(c.islower() for c in s[3:])),
    (("eyJ",),  # JSON Web Token: base64url of '{"' three times over
     re.compile(r"eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,}+\.eyJ[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+"), None),
)
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,4}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]{1,16} ){0,4}PRIVATE KEY(?: BLOCK)?-----")
_PEM_MAX = 65536  # an END further away than this belongs to another block
# The body of a block with no END line: header lines ("Proc-Type: 4,ENCRYPTED") and base64 lines.
_PEM_BODY = re.compile(r"(?:[ \t]*+\r?\n(?:[A-Za-z-]++:[^\n]*+|[A-Za-z0-9+/=]{4,}+))*+")
# key = value, key: value, "key": "value", KEY=value where the key names a credential; only the value
# is replaced. Tried only where a stem occurs (found with str.find on the lowered text, much faster
# than a case-insensitive scan with the regex).
_ASSIGN_STEMS = ("pass", "pwd", "secret", "token", "credential", "key")
_STEM = re.compile("|".join(_ASSIGN_STEMS), re.I)  # the same, when lowering changes the text's length
_ASSIGNED = re.compile(
    r"(?i:password|passwd|passphrase|pwd|secret|token|credentials?|key)"
    r"[\"']?[ \t]{0,3}(?:=>|:=|=|:)[ \t]{0,3}[\"']?([^\s\"'`,;]{1,256})"
)
# "key" alone is too common: it must end a credential's name (api_key, apiKey, SECRET_KEY...).
_KEY_NAME_BEFORE = re.compile(r"(?:api|access|secret|private|signing|encryption|master|client)[_-]?$", re.I)
_BEARER = re.compile(r"[Bb](?i:(?<=b)earer)[ \t]+([A-Za-z0-9._~+/-]{8,1024}=*)")
_URL_PASSWORD = re.compile(r"://[^\s:/@]{1,128}:([^\s:/@]{1,256})@")
# Values that are code or templates, not literals: env lookups, calls, ${VAR}, %(name)s, <placeholder>.
_NOT_LITERAL = re.compile(r"[(){}\[\]<>$%\\]|^(?:/|~/|\.\.?/)")  # ... or a path: PWD=/home/user
_IDENTIFIER_CHAIN = re.compile(r"[A-Za-z_]+(?:[.:][A-Za-z_]+)*")  # request.form, YOUR_API_KEY, None


def secret_finder(cfg: SecretConfig) -> Finder:
    def find(text: str) -> Iterator[Span]:
        if "PRIVATE KEY" in text:
            yield from private_key_blocks(text)
        for literals, pattern, check in _TOKEN_PATTERNS:
            if any(lit in text for lit in literals):
                for m in pattern.finditer(text):
                    if check is None or check(m.group()):
                        yield m.start(), m.end(), True
        if cfg.assignments:
            yield from assigned_secrets(text, cfg)

    return find


def private_key_blocks(text: str) -> Iterator[Span]:
    """PEM/OpenSSH/PGP private key blocks, BEGIN to END; a block cut short ends with its base64 body."""
    pos, end_match = 0, None
    while begin := _PEM_BEGIN.search(text, pos):
        if end_match is None or (end_match and end_match.start() < begin.end()):
            end_match = _PEM_END.search(text, begin.end()) or False  # False: no END anywhere after
        if end_match and end_match.start() - begin.end() <= _PEM_MAX:
            end = end_match.end()
        else:
            end = _PEM_BODY.match(text, begin.end()).end()
        yield begin.start(), end, True
        pos = end


def assigned_secrets(text: str, cfg: SecretConfig) -> Iterator[Span]:
    """Literal values assigned to credential names, sent as Bearer tokens, or as passwords in URLs."""
    matches = [m for pos in _stem_positions(text) if (m := _ASSIGNED.match(text, pos))]
    matches = [m for m in matches if not m.group().lower().startswith("key")
               or _KEY_NAME_BEFORE.search(text, max(0, m.start() - 12), m.start())]
    if "earer" in text or "EARER" in text:
        matches += _BEARER.finditer(text)
    if "://" in text:
        matches += _URL_PASSWORD.finditer(text)
    for m in matches:
        value = m.group(1).rstrip(".")  # a full stop ending the sentence
        if looks_like_secret(value, cfg):
            yield m.start(1), m.start(1) + len(value), True


def _stem_positions(text: str) -> list[int]:
    lower = text.lower()
    if len(lower) != len(text):  # a few characters lower to two ("İ"): offsets would not match
        return [m.start() for m in _STEM.finditer(text)]
    positions = []
    for stem in _ASSIGN_STEMS:
        i = lower.find(stem)
        while i >= 0:
            positions.append(i)
            i = lower.find(stem, i + 1)
    return sorted(positions)


def looks_like_secret(value: str, cfg: SecretConfig) -> bool:
    """A literal value that is long and random enough to be a real credential.

    Letters and digits together, or three character classes; not code, a template, a path or an
    identifier; at least ``min_entropy`` bits per character (``********`` and ``xxxxxxxx`` have 0).
    """
    if len(value) < cfg.min_length or _NOT_LITERAL.search(value) or _IDENTIFIER_CHAIN.fullmatch(value):
        return False
    lower, upper = any(c.islower() for c in value), any(c.isupper() for c in value)
    digit, other = any(c.isdigit() for c in value), any(not c.isalnum() for c in value)
    if not (((lower or upper) and digit) or lower + upper + digit + other >= 3):
        return False
    return shannon_entropy(value) >= cfg.min_entropy


def shannon_entropy(value: str) -> float:
    """Bits per character of the value's own character distribution."""
    n = len(value)
    return -sum(k / n * math.log2(k / n) for k in Counter(value).values()) if n else 0.0


def _mixed_case_and_digit(body: str) -> bool:
    return any(c.isupper() for c in body) and any(c.islower() for c in body) and any(c.isdigit() for c in body)


# --- the scrubber -----------------------------------------------------------------------------------

# Spans that are never personal data, marked before any detector runs so that none misreads them
# (an ISBN-10 such as 0-306-40615-2 is a valid phone number in several regions).
_ISBN = re.compile(r"(?:ISBN|isbn)(?:-1[03])?:?[ \t]{0,3}(?:97[89][- ]?)?\d{1,5}[- ]?\d{1,7}[- ]?\d{1,7}[- ]?[\dX]\b")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


_UUID_CORE = re.compile(r"-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-")  # starts with a literal: fast to rule out


def never_pii(text: str) -> Iterator[Span]:
    if "ISBN" in text or "isbn" in text:
        for m in _ISBN.finditer(text):
            yield m.start(), m.end(), False
    if _UUID_CORE.search(text):
        for m in _UUID.finditer(text):
            yield m.start(), m.end(), False


PiiType = Literal["secret", "email", "iban", "credit_card", "ip_address", "phone"]
# The priority order: a span found by an earlier detector wins over an overlapping later one.
PII_TYPES: tuple[PiiType, ...] = ("secret", "email", "iban", "credit_card", "ip_address", "phone")


class Scrubber:
    """Finds and replaces every enabled type; ``detectors`` is [(type, placeholder, finder)] in priority order."""

    def __init__(self, detectors: list[tuple[str, str, Finder]]):
        self.detectors = detectors
        self.types = tuple(t for t, _, _ in detectors)
        self.placeholders = {kind: placeholder for kind, placeholder, _ in detectors}

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """The non-overlapping spans to replace, sorted by start, each with its type."""
        if not self.detectors:
            return []
        starts: list[int] = []
        taken: list[tuple[int, int, str | None]] = []  # type None: recognised and kept
        for kind, _, finder in [("never_pii", "", never_pii), *self.detectors]:
            # Each detector sees the text with what earlier ones took blanked out: it cannot misread
            # a kept IP as a phone number, and libphonenumber spends no time parsing it.
            for start, end, replace in finder(_blank(text, taken) if taken else text):
                i = bisect.bisect_right(starts, start)
                if i > 0 and taken[i - 1][1] > start:  # overlaps the span before
                    continue
                if i < len(taken) and taken[i][0] < end:  # overlaps the span after
                    continue
                starts.insert(i, start)
                taken.insert(i, (start, end, kind if replace else None))
        return [(start, end, kind) for start, end, kind in taken if kind is not None]

    def scrub(self, text: str) -> tuple[str, Counter]:
        """The text with every found span replaced by its placeholder, and the count per type."""
        spans = self.find(text)
        if not spans:
            return text, Counter()
        parts, pos = [], 0
        for start, end, kind in spans:
            parts += [text[pos:start], self.placeholders[kind]]
            pos = end
        parts.append(text[pos:])
        return "".join(parts), Counter(kind for _, _, kind in spans)


def _blank(text: str, spans: list[tuple[int, int, str | None]]) -> str:
    """``text`` with each span replaced by as many NULs: offsets stay, nothing can match across it."""
    parts, pos = [], 0
    for start, end, _ in spans:
        parts += [text[pos:start], "\0" * (end - start)]
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


_FINDERS: dict[str, Callable[..., Finder]] = {
    "secret": secret_finder, "email": email_finder, "iban": iban_finder, "credit_card": card_finder,
    "ip_address": ip_finder, "phone": phone_finder,
}


def build_scrubber(configs: dict[str, object]) -> Scrubber:
    """A Scrubber from {type: its config}; disabled types are left out."""
    detectors = []
    for kind in PII_TYPES:
        cfg = configs[kind]
        if cfg.enabled:  # type: ignore[attr-defined]
            detectors.append((kind, cfg.placeholder, _FINDERS[kind](cfg)))  # type: ignore[attr-defined]
    return Scrubber(detectors)
