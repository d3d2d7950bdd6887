"""pii stage: recall on planted PII, zero replacements in clean technical text, secrets, IBANs,
the stage end to end on Parquet shards, resume, and inputs that could make a regex backtrack."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import random
import string
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.schema import Invalid, build
from pipeline.stage import StageContext
from stages.common.shards import DONE_DIR
from stages.pii import stage as pii
from stages.pii.detectors import (
    IBAN_LENGTHS,
    iban_checksum_valid,
    is_card_number,
    luhn_valid,
)
from stages.pii.stage import PiiConfig, ShardSchemaError, scrubber_for

REPO = Path(__file__).resolve().parents[3]
DEFAULT = stage_config("pii")  # conf/stage/pii/default.yaml, as the tiny pipeline runs it
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>",
               "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>", "secret": "<SECRET>"}


def scrub(text: str, cfg: PiiConfig = DEFAULT) -> str:
    return scrubber_for(cfg).scrub(text)[0]


def section(name: str, **changes):
    """One detector's block of the shipped config (email, phone, ip_address, secret...) with ``changes``."""
    return dataclasses.replace(getattr(DEFAULT, name), **changes)


# --- planted PII, generated with a seeded generator -------------------------------------------------

# Sentences around a planted value; none of them names a credential, none holds other PII.
TEMPLATES = (
    "Contact me at {x} for details.",
    "{x}",
    "Reach us: {x}.",
    "(primary: {x})",
    "<td>{x}</td>",
    "Sent from {x}, thanks!",
    '"{x}"',
    "The value was {x}; see above.",
    "{x} is what was written on the form",
    "Line one\n{x}\nLine three",
    "Details\t{x}\t(updated 2024-03-15)",
    "Numbers: {x}, and more to follow in the 2nd quarter.",
)
NAMES = ("anna", "bob", "chen", "dmitri", "eve", "fatima", "goran", "hiro", "ines", "jamal", "kofi", "lena")
TLDS = ("com", "org", "net", "de", "co.uk", "io", "fr", "edu", "gov", "info", "ai", "dev", "com.au", "ch")


def random_email(rng: random.Random) -> str:
    first, last = rng.choice(NAMES), rng.choice(NAMES)
    local = rng.choice([f"{first}.{last}", f"{first}_{last}{rng.randint(1, 99)}", f"{first[0]}{last}+news",
                        f"{first}-{last}", f"{first}{rng.randint(1970, 2010)}", first.upper()])
    labels = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.2:
        labels[0] += f"-{rng.randint(1, 9)}"
    return f"{local}@{'.'.join(labels)}.{rng.choice(TLDS)}"


def random_phone(rng: random.Random, national_regions: tuple[str, ...]) -> str:
    """A valid number (libphonenumber says so), written the way people write it."""
    import phonenumbers
    from phonenumbers import PhoneNumberFormat as F

    region = rng.choice(("US", "GB", "DE", "FR", "IN", "JP", "BR", "AU", "ES", "IT", "NL", "CA"))
    kind = rng.choice((phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE))
    example = phonenumbers.example_number_for_type(region, kind)
    nsn = phonenumbers.national_significant_number(example)
    while True:  # keep the leading digits (area/mobile prefix), randomise the subscriber part
        keep = max(2, len(nsn) - 5)
        digits = nsn[:keep] + "".join(rng.choices(string.digits, k=len(nsn) - keep))
        number = phonenumbers.parse(f"+{example.country_code}{digits}")
        if phonenumbers.is_valid_number(number):
            break
    formats = [phonenumbers.format_number(number, F.INTERNATIONAL), phonenumbers.format_number(number, F.E164)]
    if region in national_regions:
        formats.append(phonenumbers.format_number(number, F.NATIONAL))
    if region == "US":
        area, exchange, line = digits[:3], digits[3:6], digits[6:]
        formats += [f"({area}) {exchange}-{line}", f"{area}-{exchange}-{line}", f"{area}.{exchange}.{line}",
                    f"+1 ({area}) {exchange}-{line}", f"1-{area}-{exchange}-{line}", f"+1 {area}-{exchange}-{line}"]
    return rng.choice(formats)


def random_public_ip(rng: random.Random) -> str:
    while True:
        if rng.random() < 0.6:
            addr = ipaddress.IPv4Address(rng.getrandbits(32))
        else:  # global unicast IPv6 lives in 2000::/3
            low = rng.getrandbits(112 - 16 * rng.randint(0, 5))  # zero groups at the end: "::" compression
            addr = ipaddress.IPv6Address((0x2000 + rng.getrandbits(13)) << 112 | low)
        if addr.is_global and not addr.is_multicast and not addr.is_reserved and not str(addr).endswith(".0"):
            break  # a host address: x.y.z.0 is a network address, kept on purpose
    if isinstance(addr, ipaddress.IPv4Address):
        return str(addr)
    return rng.choice([addr.compressed, addr.exploded, addr.compressed.upper()])


CARD_PREFIXES = (("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
                 ("6011", 16), ("65", 16), ("36", 14), ("3528", 16), ("62", 16), ("4", 19))


def random_card(rng: random.Random) -> str:
    prefix, length = rng.choice(CARD_PREFIXES)
    body = prefix + "".join(rng.choices(string.digits, k=length - len(prefix) - 1))
    digits = next(body + d for d in string.digits if luhn_valid(body + d))
    if length == 15 and rng.random() < 0.5:  # American Express groups 4-6-5
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        groups = [digits[i:i + 4] for i in range(0, length, 4)]
        if len(groups[-1]) < 3:  # e.g. 14 digits: 4-4-4-2 is not how anyone writes it
            groups[-2:] = [groups[-2] + groups[-1]]
    return rng.choice(["".join(groups), " ".join(groups), "-".join(groups)])


def planted(kind: str, n: int, seed: int, national_regions: tuple[str, ...] = ("US", "GB")) -> list[tuple[str, str]]:
    """``n`` (sentence, expected scrubbed sentence) pairs with one planted value each."""
    rng = random.Random(seed)
    make = {"email": random_email, "ip_address": random_public_ip, "credit_card": random_card,
            "phone": lambda r: random_phone(r, national_regions)}[kind]
    out = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        out.append((template.format(x=make(rng)), template.format(x=PLACEHOLDER[kind])))
    return out


def recall(pairs: list[tuple[str, str]], cfg: PiiConfig = DEFAULT) -> tuple[float, list[str]]:
    misses = [f"{text!r} -> {scrub(text, cfg)!r}" for text, expected in pairs if scrub(text, cfg) != expected]
    return 1 - len(misses) / len(pairs), misses


@pytest.mark.parametrize("kind, seed", [("email", 1), ("phone", 2), ("ip_address", 3), ("credit_card", 4)])
def test_recall_on_planted_values(kind, seed):
    """Each of 400 planted values is replaced exactly: the sentence around it is left as it was."""
    rate, misses = recall(planted(kind, 400, seed=seed))
    assert rate >= 0.99, f"{kind} recall {rate:.3f}; misses:\n" + "\n".join(misses[:20])


def test_recall_on_phones_with_national_formats_of_more_regions():
    regions = ("US", "GB", "DE", "FR", "IN", "JP", "BR", "AU", "ES", "IT", "NL", "CA")
    cfg = dataclasses.replace(DEFAULT, phone=section("phone", regions=regions))
    rate, misses = recall(planted("phone", 300, seed=7, national_regions=regions), cfg)
    assert rate >= 0.99, f"phone recall {rate:.3f}; misses:\n" + "\n".join(misses[:20])


@pytest.mark.parametrize("number", ["+1 415-555-0132", "(415) 555-0132", "+44 20 7946 0958", "+49 30 901820",
                                    "415.555.0132", "+1 (415) 555-0132", "020 7946 0958", "+33 1 42 68 53 00"])
def test_phone_formats_named_in_the_issue(number):
    assert scrub(f"Call {number} today.") == "Call <PHONE> today."


def test_windows_find_what_the_matcher_finds_in_the_whole_text():
    """The speed-up (libphonenumber only sees windows around long digit runs) changes no match."""
    import phonenumbers

    from stages.pii.detectors import phone_matches

    regions = ("US", "GB", "DE")
    pairs = [p for kind in ("phone", "ip_address", "credit_card")
             for p in planted(kind, 80, seed=13, national_regions=regions)]
    texts = [" ".join(t for t, _ in pairs), CLEAN, "tel: +1 415-555-0132 ext. 1234, fax (415) 555-0199 x12"]
    for leniency in (phonenumbers.Leniency.VALID, phonenumbers.Leniency.STRICT_GROUPING):
        for text in texts:
            whole = {(m.start, m.end) for r in regions
                     for m in phonenumbers.PhoneNumberMatcher(text, r, leniency=leniency, min_candidate_length=7)
                     if sum(c.isdigit() for c in m.raw_string) >= 7}  # min_digits: shorter ones are skipped
            assert set(phone_matches(text, regions, leniency, 7)) == whole
            assert whole or text is CLEAN


def test_phone_extensions_and_bare_digits():
    assert scrub("tel: +1 415-555-0132 ext. 1234.") == "tel: <PHONE>."
    assert scrub("used=8186245120, free=2181107712") == "used=8186245120, free=2181107712"
    assert scrub("Phone: 4155550132") == "Phone: <PHONE>"
    cfg = dataclasses.replace(DEFAULT, phone=section("phone", bare_digits_need_context=False))
    assert scrub("id 4155550132", cfg) == "id <PHONE>"


def test_national_format_needs_its_region():
    text = "Ruf an: 030 901820."
    assert scrub(text) == text  # Berlin's national format is not read with the default regions (US, GB)
    cfg = dataclasses.replace(DEFAULT, phone=section("phone", regions=("US", "GB", "DE")))
    assert scrub(text, cfg) == "Ruf an: <PHONE>."


def test_planted_values_in_one_long_document():
    """All kinds mixed in one document: the same replacements as sentence by sentence."""
    pairs = [p for kind in ("email", "phone", "ip_address", "credit_card") for p in planted(kind, 60, seed=3)]
    random.Random(4).shuffle(pairs)
    text, counts = scrubber_for(DEFAULT).scrub(" ".join(t for t, _ in pairs))
    assert text == " ".join(e for _, e in pairs)
    assert counts == Counter({"email": 60, "phone": 60, "ip_address": 60, "credit_card": 60})


# --- clean text: nothing may be replaced ------------------------------------------------------------

CLEAN = """\
Release notes for Kestrel 4.2.1 (published 2024-03-15, updated 15.03.2024 and 03/15/2024)

Kestrel 4.2.1 is a maintenance release of the 4.x series. It requires Python 3.11.4 or newer and was
tested on Ubuntu 22.04, Debian 12 and Windows 10.0.19045.3803. The previous build, version 4.1.0.2, is
still supported until December 31st, 2024; build 10.0.0.1 of the agent and firmware 2.4.1.7 of the
sensor ship with it. See section 1.2.3.4 of the manual and figure 3.1.2.1 for the upgrade path. Pin it
with kestrel==4.2.1.0 or kestrel>=4.1.0.2 in requirements.txt. Browsers that send
"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
are supported, as is Firefox/115.0.

What changed: the scheduler now starts at 09:30 and stops at 17:45:30 UTC; jobs submitted between
2024-03-15 08:00 and 2024-03-16 08:00 are migrated automatically. The 1st, 2nd, 3rd and 22nd retries
back off exponentially (2^10 = 1024 ms, then 2^11 = 2048 ms). Throughput improved by 37.5 % on the
c5.4xlarge instance (16 vCPU, 32 GiB), from 1,234,567 to 1,697,530 events per hour, roughly 471.5 per
second. A licence costs $1,299.99 per year, EUR 1.199,00 in Germany or GBP 999 (about 1 050 EUR).
Order #48213 shipped on 12 March; invoice INV-2024-000317 is attached, reference 20240315-0042.
Support hours are 8:00-17:00 (Mon-Fri), 10:00-14:00 (Sat); the SLA is 99.95 % and the RPO 15 min.

Configuration. By default the server listens on 127.0.0.1:8080 and the metrics exporter on
0.0.0.0:9100; inside the cluster use 10.0.0.12, 172.16.4.20 or 192.168.1.254 (netmask 255.255.255.0,
gateway 192.168.1.1, CIDR 10.0.0.0/8). The documentation examples use 192.0.2.10, 198.51.100.7,
203.0.113.45 and 2001:db8::1; link-local fe80::1ff:fe23:4567:890a%eth0 and loopback ::1 are accepted too.
The multicast group is 239.255.0.1 and the MAC address of the test NIC is 00:1A:2B:3C:4D:5E.
Write to admin@example.com, alerts@ops.example.org or jane@staging.test when something breaks;
the icons are logo@2x.png and logo@3x.png, and the JavaScript client is @kestrel/client@4.2.1
(install it with npm install lodash@4.17.21 first). Decorators such as @property and @dataclass work.

    import math, uuid
    from dataclasses import dataclass

    @dataclass
    class Point:
        x: float = 0.0
        y: float = 0.0

    def norm(p: Point) -> float:
        return math.sqrt(p.x ** 2 + p.y ** 2)  # 3-4-5 triangle: norm(Point(3, 4)) == 5.0

    TAU = 6.283185307179586
    ids = [uuid.UUID("550e8400-e29b-41d4-a716-446655440000"), uuid.UUID("123e4567-e89b-12d3-a456-426614174000")]
    evens, odds = list(range(100))[::2], list(range(100))[1::2]
    password = request.form["password"]
    api_key = os.environ["KESTREL_API_KEY"]
    token = tokenizer.encode(text)
    secret_key = settings.SECRET_KEY
    db_url = f"postgres://{user}:{password}@{host}:5432/{name}"
    std::vector<int> v{1, 2, 3}; std::map<std::string, int> counts;

The password field is required; set KESTREL_PASSWORD=${DB_PASSWORD} in the environment, or use
password: "********" as a placeholder in the sample file. The api_key: YOUR_API_KEY line must be
edited before use, and the token: <paste-your-token-here> line too. max_tokens=2048, pad_token=0,
num_tokens: 50257. sk-learn users can call sklearn.linear_model; ask-the-community-forum-first.
Connect with postgres://user:password@localhost:5432/app in development. Bearer authentication
is described in RFC 6750.

Checksums. The release tarball kestrel-4.2.1.tar.gz has SHA-256
9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 and SHA-1
a94a8fe5ccb19ba61c4c0873d391e987982fbbd3; the commit is 3f786850e387550fdab836ed7e6dc881de23001b
(short: 3f78685). The MD5 of the old one was 5d41402abc4b2a76b9719d911017c592.

Further reading: ISBN 978-0-306-40615-7 and ISBN 0-306-40615-2 (Smith, J. Data Systems, 2nd ed.,
pp. 211-227 (2003)); ISBN-13 9780306406157. Numbers in tables: 4111 1111 1111 1112 is a typical
invalid card number used to test the checksum, and 1234 5678 9012 3456 is not valid either. The
order id 7000 0000 0000 0000 and the ticket 5500-0000-0000-0005 fail the Luhn check. Epoch
1710460800 is 2024-03-15T00:00:00Z; 1710460800000 in milliseconds. The account number field
DE00 1234 5678 9012 3456 78 is an invalid IBAN used in the form's help text, as is GB00 TEST 0000 0000 0000 00.

Math. Euler's number e = 2.718281828459045, pi = 3.14159265358979, sqrt(2) = 1.41421356.
The sum 1 + 2 + ... + 100 = 5050; 12 * 12 = 144; 7/8 = 0.875; 10^6 = 1000000; 3.0e-4 is the
learning rate; the ratio was 16:9 and the score 3-1. Coordinates: 37.7749, -122.4194.
The vote was 215-201; the 2024-2025 season; the 1990s; chapter 11; room 101; bus 42;
HTTP/1.1 200 OK; port 443 and 65535; PID 123456; 0x7fff5fbff8c8; CVE-2024-3094;
RFC 5321 section 4.5.3.1.1; ASN 13335; zip code 94103; call extension 4417.

From the monitoring docs: svmem(total=10367352832, available=6472179712, percent=37.6), created
2017-12-23 45:01:23+0900 (sic); programs of 32768-65535 bytes compile; supported LLVM versions:
0.34.0 - 0.36.0    10.0.x; workspace_id='2345678901'. Chat badge:
https://img.shields.io/badge/chat-@kestrel--users-CF0E5B.svg?logo=slack
"""


def test_clean_text_has_no_replacement():
    spans = scrubber_for(DEFAULT).find(CLEAN)
    assert len(CLEAN) > 4000
    assert [CLEAN[s:e] for s, e, _ in spans] == []
    assert scrub(CLEAN) == CLEAN


def test_scrubbing_twice_changes_nothing_more():
    pairs = [p for kind in ("email", "phone", "ip_address", "credit_card") for p in planted(kind, 30, seed=5)]
    once = scrub(" ".join(t for t, _ in pairs) + SECRET_SAMPLES_TEXT)
    assert scrub(once) == once


# --- emails and IP addresses: what is kept ----------------------------------------------------------

def test_accounts_in_urls_and_git_remotes_are_not_emails():
    text = "clone ssh://git@gitlab.acme.io/x.git or git@github.com:org/repo.git; mail git@github.com: now"
    assert scrub(text) == "clone ssh://git@gitlab.acme.io/x.git or git@github.com:org/repo.git; mail <EMAIL>: now"


def test_reserved_email_domains_are_kept_unless_configured():
    text = "Write to jane@example.com or ops@mail.example.org, not jane@gmail.com."
    assert scrub(text) == "Write to jane@example.com or ops@mail.example.org, not <EMAIL>."
    cfg = dataclasses.replace(DEFAULT, email=section("email", keep_reserved_domains=False))
    assert scrub(text, cfg) == "Write to <EMAIL> or <EMAIL>, not <EMAIL>."


@pytest.mark.parametrize("addr", ["10.1.2.3", "172.16.0.1", "192.168.0.10", "127.0.0.1", "169.254.10.1",
                                  "192.0.2.1", "198.51.100.20", "203.0.113.7", "100.64.1.1", "::1", "fe80::1",
                                  "fd12:3456:789a::1", "2001:db8:85a3::8a2e:370:7334", "fec0::1"])
def test_non_public_ips_are_kept_by_default(addr):
    text = f"host {addr} is up"
    assert scrub(text) == text
    cfg = dataclasses.replace(DEFAULT, ip_address=section("ip_address", keep_non_public=False))
    assert scrub(text, cfg) == "host <IP_ADDRESS> is up"


def test_version_context_keeps_version_numbers_only():
    kept = ('version 1.2.3.4, Version: 8.8.4.4, build 10.0.0.1, sections "1.2.3.4", Chrome/120.1.2.3, '
            'pkg==1.2.3.4')
    assert scrub(kept) == kept
    cfg = dataclasses.replace(DEFAULT, ip_address=section("ip_address", version_context=False))
    assert scrub(kept, cfg).count("<IP_ADDRESS>") == 5  # 10.0.0.1 is private, kept anyway
    assert scrub("resolver 8.8.4.4 and ip = 1.2.3.4") == "resolver <IP_ADDRESS> and ip = <IP_ADDRESS>"
    text = "versions after 1.11.1.1; update DNS to 9.9.9.9"
    assert scrub(text) == "versions after 1.11.1.1; update DNS to <IP_ADDRESS>"


def test_ip_addresses_in_urls_and_with_ports():
    assert scrub("GET http://93.184.216.34:8080/index.html") == "GET http://<IP_ADDRESS>:8080/index.html"
    assert scrub("http://[2606:4700:4700::1111]:443/") == "http://[<IP_ADDRESS>]:443/"
    assert scrub("at 2606:4700:4700::1111.") == "at <IP_ADDRESS>."
    assert scrub("dns 8.8.8.8.5 and 999.1.1.1 and 1.2.3") == "dns 8.8.8.8.5 and 999.1.1.1 and 1.2.3"


def test_ipv6_can_be_turned_off():
    cfg = dataclasses.replace(DEFAULT, ip_address=section("ip_address", ipv6=False))
    assert scrub("8.8.8.8 and 2606:4700:4700::1111", cfg) == "<IP_ADDRESS> and 2606:4700:4700::1111"


# --- payment cards and IBANs ------------------------------------------------------------------------

def test_card_numbers_need_luhn_an_issuer_range_and_consistent_grouping():
    assert is_card_number("4111 1111 1111 1111") and is_card_number("3782-822463-10005")
    assert not is_card_number("4111 1111 1111 1112")  # Luhn
    assert not is_card_number("9111111111111119")  # Luhn-valid, no issuer starts with 9
    assert not is_card_number("4111 1111-1111 1111")  # two separators
    assert not is_card_number("41 11 11 11 11 11 11 11")  # groups of two are not how cards are written
    assert scrub("card 4111111111111111 exp 12/27") == "card <CREDIT_CARD> exp 12/27"
    assert scrub("ids 41111111111111110 and 14111111111111111") == "ids 41111111111111110 and 14111111111111111"


def make_iban(country: str, rng: random.Random) -> str:
    """A valid IBAN: random BBAN of the country's length, check digits by ISO 7064 mod 97-10."""
    bban = "".join(rng.choices(string.digits, k=IBAN_LENGTHS[country] - 4))
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


KNOWN_IBANS = ("DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32", "FR14 2004 1010 0505 0001 3M02 606",
               "NL91 ABNA 0417 1643 00", "BE68 5390 0754 7034", "CH93 0076 2011 6238 5295 7", "NO93 8601 1117 947")


@pytest.mark.parametrize("iban", KNOWN_IBANS)
def test_published_example_ibans_are_replaced_grouped_or_not(iban):
    assert scrub(f"Pay to {iban}, ref 7.") == "Pay to <IBAN>, ref 7."
    assert scrub(f"IBAN: {iban.replace(' ', '')}") == "IBAN: <IBAN>"


def test_generated_ibans_valid_replaced_invalid_kept():
    rng = random.Random(11)
    for country in sorted(IBAN_LENGTHS):
        iban = make_iban(country, rng)
        assert iban_checksum_valid(iban), iban
        grouped = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
        assert scrub(f"account {grouped} closed") == "account <IBAN> closed", grouped
        wrong_digit = str((int(iban[-1]) + 1) % 10)
        broken = iban[:-1] + wrong_digit  # one changed digit always breaks mod 97
        assert not iban_checksum_valid(broken)
        assert scrub(f"account {broken} closed") == f"account {broken} closed"
    assert scrub("DE89 3704 0044 0532 0130 00 EUR") == "<IBAN> EUR"  # the country length ends it
    assert scrub("DE89 3704 0044 0532 0130") == "DE89 3704 0044 0532 0130"  # too short for DE


# --- secrets ----------------------------------------------------------------------------------------

_rng = random.Random(42)
_ALNUM = string.ascii_letters + string.digits


def _rand(n: int, alphabet: str = _ALNUM) -> str:
    while True:  # a real token mixes cases and digits; make sure a short draw does too
        s = "".join(_rng.choices(alphabet, k=n))
        if alphabet != _ALNUM or (any(c.isupper() for c in s) and any(c.islower() for c in s)
                                  and any(c.isdigit() for c in s)):
            return s


PEM_BODY = "\n".join(base64.b64encode(_rng.randbytes(48 * 8)).decode()[i:i + 64] for i in range(0, 512, 64))
SECRET_TOKENS = {
    "aws_access_key_id": "AKIA" + _rand(16, string.ascii_uppercase + string.digits),
    "aws_temporary_key_id": "ASIA" + _rand(16, string.ascii_uppercase + string.digits),
    "github_classic": "ghp_" + _rand(36),
    "github_oauth": "gho_" + _rand(36),
    "github_fine_grained": "github_pat_" + _rand(22) + "_" + _rand(59),
    "slack_bot": f"xoxb-{_rand(11, string.digits)}-{_rand(13, string.digits)}-{_rand(24)}",
    "slack_user": f"xoxp-{_rand(11, string.digits)}-{_rand(12, string.digits)}-{_rand(13, string.digits)}-{_rand(32)}",
    "slack_webhook": f"https://hooks.slack.com/services/T{_rand(8, 'ABCDEFGHJK0123456789')}/"
                     f"B{_rand(8, 'ABCDEFGHJK0123456789')}/{_rand(24)}",
    "openai_legacy": "sk-" + _rand(48),
    "openai_project": "sk-proj-" + _rand(64) + "_" + _rand(20),
    "anthropic": "sk-ant-api03-" + _rand(80) + "-" + _rand(12),
    "stripe": "sk_live_" + _rand(24),
    "google_api_key": "AIza" + _rand(35, _ALNUM + "_-"),
    "huggingface": "hf_" + _rand(34),
    "jwt": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
           + _rand(43, _ALNUM + "_-"),
    "rsa_private_key": f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----",
    "openssh_private_key": f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}\n-----END OPENSSH PRIVATE KEY-----",
    "pkcs8_private_key": f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----",
    "pgp_private_key": f"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n{PEM_BODY}\n-----END PGP PRIVATE KEY BLOCK-----",
}
SECRET_SAMPLES_TEXT = " ".join(f"\nkey {v} here." for v in SECRET_TOKENS.values())


@pytest.mark.parametrize("name", sorted(SECRET_TOKENS))
def test_each_secret_pattern(name):
    token = SECRET_TOKENS[name]
    assert scrub(f"config:\n  value {token}\nend") == "config:\n  value <SECRET>\nend"
    assert scrub(f'"{token}",') == '"<SECRET>",'


def test_truncated_private_key_block_is_replaced_to_the_end_of_its_body():
    text = f"-----BEGIN EC PRIVATE KEY-----\n{PEM_BODY}\n\nThat was half a key."
    assert scrub(text) == "<SECRET>\n\nThat was half a key."


@pytest.mark.parametrize("line, expected", [
    ("password=Tr0ub4dor&3", "password=<SECRET>"),
    ("DB_PASSWORD=s3cr3t-Pa55w0rd", "DB_PASSWORD=<SECRET>"),
    ('{"api_key": "a8f5f167f44f4964e6c998dee827110c"}', '{"api_key": "<SECRET>"}'),
    ("client_secret: 'Zx8QeR2tYu7IoP'", "client_secret: '<SECRET>'"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
     "aws_secret_access_key = <SECRET>"),
    ("$token = 'x9Fk2Lm0Qp7Rs3';", "$token = '<SECRET>';"),
    ("Server=db;Uid=sa;Pwd=MyPa55word42;", "Server=db;Uid=sa;Pwd=<SECRET>;"),
    ("Authorization: Bearer 4f9c2a7e1b8d3f6a0c5e", "Authorization: Bearer <SECRET>"),
    ("mysql://root:hQ7vT2pK9x@db.internal:3306/shop", "mysql://root:<SECRET>@db.internal:3306/shop"),
])
def test_credentials_in_assignments(line, expected):
    assert scrub(line) == expected
    cfg = dataclasses.replace(DEFAULT, secret=section("secret", assignments=False))
    assert scrub(line, cfg) == line


@pytest.mark.parametrize("line", [
    "password = request.form['password']", "password: ********", "api_key=YOUR_API_KEY", "token = os.getenv('T')",
    "password=${DB_PASSWORD}", "password: changeme", "secret: true", "token: 50256", "password=xxxxxxxxxxxx",
    "PWD=/home/user/project2", "sk-learn-is-a-library-for-ml", "pad_token = '<pad>'", "Bearer token authentication",
])
def test_non_secrets_near_credential_words_are_kept(line):
    assert scrub(line) == line


# --- types, placeholders, config --------------------------------------------------------------------

def test_each_type_can_be_disabled_and_renamed():
    text = ("mail bob@gmail.com, call +1 415-555-0132, ip 8.8.8.8, card 4111111111111111, "
            "iban DE89 3704 0044 0532 0130 00, key ghp_" + "a1B2" * 9)
    assert all(p in scrub(text) for p in PLACEHOLDER.values())
    for kind in pii.PII_TYPES:
        section = getattr(DEFAULT, kind)
        off = dataclasses.replace(DEFAULT, **{kind: dataclasses.replace(section, enabled=False)})
        assert PLACEHOLDER[kind] not in scrub(text, off)
        renamed = dataclasses.replace(DEFAULT, **{kind: dataclasses.replace(section, placeholder=f"[{kind}]")})
        assert f"[{kind}]" in scrub(text, renamed)


def test_a_kept_match_is_not_taken_by_a_later_detector():
    """192.168.1.254 is a valid Indian phone number; as a private IP it is kept, not replaced as a phone."""
    phone = section("phone", regions=("IN",), leniency="valid")
    text = "gateway 192.168.1.254 up"
    assert scrub(text, dataclasses.replace(DEFAULT, phone=phone)) == text
    no_ip = dataclasses.replace(DEFAULT, phone=phone, ip_address=section("ip_address", enabled=False))
    assert scrub(text, no_ip) == "gateway <PHONE> up"  # what would happen without the IP detector


def test_default_yaml_matches_the_schema_defaults():
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(REPO / "conf/stage/pii/default.yaml"))
    assert build(PiiConfig, data, path="stage.pii") == DEFAULT


def test_config_errors_name_the_key_and_value():
    with pytest.raises(ConfigError, match=r"stage\.pii\.phone\.regions: 'XX' is not a region"):
        stage_config("pii", "stage.pii.phone.regions=[US,XX]")
    with pytest.raises(ConfigError, match=r"stage\.pii\.phone\.leniency: 'loose' is not one of"):
        stage_config("pii", "stage.pii.phone.leniency=loose")
    with pytest.raises(ConfigError, match=r"stage\.pii\.emial: unknown key \(did you mean 'email'"):
        stage_config("pii", "+stage.pii.emial={}")
    with pytest.raises(Invalid, match="min_entropy: must be >= 0, got -1"):
        section("secret", min_entropy=-1)


# --- pathological inputs: every pattern stays linear ------------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("local part without @", "a" * 200_000),
    ("many @", "a@" * 50_000),
    ("endless domain", "a@" + "b." * 100_000),
    ("dotted digits", "1." * 30_000),  # the phone matcher parses every candidate: keep these shorter
    ("spaced digits", "1 " * 30_000),
    ("dashed digits", "1-" * 30_000),
    ("colons", ":" * 100_000 + "1"),
    ("hex and colons", "a:" * 100_000),
    ("capitals and digits", "DE89 " + "ABCD " * 40_000),
    ("assignments", "password=" * 20_000),
    ("unclosed private key", "-----BEGIN RSA PRIVATE KEY-----\n" + "QUJD" * 50_000),
    ("begins without end", "-----BEGIN PRIVATE KEY-----" * 5_000),
    ("long digit run", "4" * 200_000),
])
def test_pathological_input_finishes(name, text):
    """No timing assertion: a catastrophic backtrack would not finish at all within the test run."""
    out, _ = scrubber_for(DEFAULT).scrub(text)
    assert isinstance(out, str)


# --- the stage on Parquet shards --------------------------------------------------------------------

def write_shard(path: Path, texts: list[str | None], prefix: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [f"{prefix}-{i}" for i in range(len(texts))],
                      "url": [f"https://site.test/{prefix}/{i}" for i in range(len(texts))],
                      "text": pa.array(texts, pa.string()),
                      "quality_score": pa.array([0.5] * len(texts), pa.float32())})
    pq.write_table(table, path)


@pytest.fixture
def corpus(tmp_path):
    """Three shards of planted documents (each with a known number of each type), one null text."""
    rng = random.Random(9)
    kinds = ("email", "phone", "ip_address", "credit_card")
    pools = {k: planted(k, 120, seed=20 + i) for i, k in enumerate(kinds)}
    expected = Counter()
    shards = []
    for _ in range(3):
        texts: list[str | None] = []
        for d in range(20):
            parts = [CLEAN[:300]] if d % 4 == 0 else []  # some documents hold no PII at all
            if d % 4:
                for k in kinds:
                    for _ in range(rng.randint(0, 2)):
                        parts.append(pools[k].pop()[0])
                        expected[k] += 1
            texts.append(" ".join(parts) or "nothing to see")
        shards.append(texts)
    shards[1].append(None)
    for s, texts in enumerate(shards):
        write_shard(tmp_path / "quality" / f"part-{s}.parquet", texts, f"s{s}")
    return tmp_path / "quality", shards, expected


def make_ctx(tmp_path: Path, source: Path) -> StageContext:
    out = tmp_path / "pii-out"
    out.mkdir(exist_ok=True)
    return StageContext(stage="pii", fingerprint="test", output_dir=out, inputs={"quality.documents": source},
                        metrics_file=tmp_path / "metrics.jsonl")


def test_stage_end_to_end_and_resume(corpus, tmp_path):
    source, shards, expected = corpus
    ctx = make_ctx(tmp_path, source)
    cfg = dataclasses.replace(DEFAULT, workers=2)
    metrics = pii.run(cfg, ctx)

    n_docs = sum(len(s) for s in shards)
    assert metrics["docs_in"] == n_docs and metrics["docs_out"] == n_docs - 1
    assert metrics["dropped_no_text"] == 1
    for kind in ("email", "phone", "ip_address", "credit_card"):
        assert metrics[f"pii_{kind}"] == expected[kind], kind
    assert metrics["pii_iban"] == 0 and metrics["pii_secret"] == 0
    assert metrics["docs_per_s"] > 0 and metrics["bytes_per_s"] > 0

    out = sorted((ctx.output_dir / "documents").glob("*.parquet"))
    assert [p.name for p in out] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    table = pa.concat_tables([pq.read_table(p) for p in out])
    assert table.column_names == ["id", "url", "text", "quality_score",
                                  *(f"pii_{t}" for t in pii.PII_TYPES)]
    assert table.schema.field("pii_email").type == pa.int32()
    rows = table.to_pylist()
    assert sum(r["pii_email"] for r in rows) == expected["email"]
    assert metrics["docs_with_pii"] == sum(any(r[f"pii_{t}"] for t in pii.PII_TYPES) for r in rows)
    originals = {f"s{s}-{i}": t for s, texts in enumerate(shards) for i, t in enumerate(texts)}
    for r in rows:
        assert r["text"] == scrub(originals[r["id"]])
        assert r["url"].startswith("https://site.test/") and r["quality_score"] == 0.5

    # Resume: a second attempt after shard 1 was lost redoes shard 1 only, with the same totals.
    before = {p.name: p.stat().st_mtime_ns for p in out}
    (ctx.output_dir / "documents" / "00001.parquet").unlink()
    (ctx.output_dir / DONE_DIR / "00001.json").unlink()
    again = pii.run(cfg, ctx)
    after = {p.name: p.stat().st_mtime_ns for p in (ctx.output_dir / "documents").glob("*.parquet")}
    assert after["00000.parquet"] == before["00000.parquet"] and after["00002.parquet"] == before["00002.parquet"]
    assert "00001.parquet" in after
    for key in ("docs_in", "docs_out", "docs_with_pii", *(f"pii_{t}" for t in pii.PII_TYPES)):
        assert again[key] == metrics[key], key


def test_disabled_types_get_no_column(corpus, tmp_path):
    source, _, _ = corpus
    cfg = dataclasses.replace(DEFAULT, workers=1, phone=section("phone", enabled=False),
                              secret=section("secret", enabled=False))
    metrics = pii.run(cfg, make_ctx(tmp_path, source))
    assert "pii_phone" not in metrics and "pii_secret" not in metrics and metrics["pii_iban"] == 0
    table = pq.read_table(tmp_path / "pii-out" / "documents" / "00000.parquet")
    assert "pii_phone" not in table.column_names and "pii_email" in table.column_names
    assert "<PHONE>" not in " ".join(table.column("text").to_pylist())


def test_shard_without_text_column_is_a_named_error(tmp_path):
    bad = tmp_path / "quality" / "bad.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), bad)
    with pytest.raises(ShardSchemaError, match=r"bad\.parquet has no 'text' column"):
        pii.run(dataclasses.replace(DEFAULT, workers=1), make_ctx(tmp_path, bad.parent))


def test_unreadable_shard_is_a_named_error(tmp_path):
    bad = tmp_path / "quality" / "broken.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ShardSchemaError, match=r"cannot read input shard .*broken\.parquet"):
        pii.run(dataclasses.replace(DEFAULT, workers=1), make_ctx(tmp_path, bad.parent))


# --- throughput --------------------------------------------------------------------------------------

WORDS = ("the of and to in is was for on that with as by at from it this be are an or which have has not "
         "but were their more its also one two new other after first year time people city river music team "
         "season game school company government world during between under about later against history "
         "century north south early known however including well many most used such between into over").split()


def web_like_docs(n: int, seed: int) -> list[str]:
    """Documents of a few KB: mostly prose, some technical lines from CLEAN, a little planted PII."""
    rng = random.Random(seed)
    clean_lines = [line for line in CLEAN.splitlines() if line.strip()]
    pools = {k: [t for t, _ in planted(k, 200, seed=seed + i)]
             for i, k in enumerate(("email", "phone", "ip_address", "credit_card"))}
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(10, 40)):
            r = rng.random()
            if r < 0.80:
                words = rng.choices(WORDS, k=rng.randint(8, 24))
                if rng.random() < 0.3:
                    number = rng.choice(["1998", "2024", "$12.50", "3.5", "42", "10:30"])
                    words.insert(rng.randrange(len(words)), number)
                parts.append(" ".join(words).capitalize() + ".")
            elif r < 0.97:
                parts.append(rng.choice(clean_lines))
            else:
                parts.append(rng.choice(pools[rng.choice(list(pools))]))
        docs.append(" ".join(parts))
    return docs


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_throughput_on_a_generated_corpus(tmp_path, workers):
    """docs/s and MB/s of the whole stage on 2,000 documents (about 4 MB) in 8 shards; printed with -s."""
    docs = web_like_docs(2000, seed=1)
    for s in range(8):
        write_shard(tmp_path / "quality" / f"part-{s}.parquet", docs[s::8], f"s{s}")
    metrics = pii.run(dataclasses.replace(DEFAULT, workers=workers), make_ctx(tmp_path, tmp_path / "quality"))
    print(f"\npii workers={workers}: {metrics['docs_in']:.0f} docs, {metrics['bytes_in'] / 1e6:.1f} MB, "
          f"{metrics['docs_per_s']:.0f} docs/s, {metrics['bytes_per_s'] / 1e6:.2f} MB/s, "
          f"{metrics['docs_with_pii']:.0f} docs with PII")
    assert metrics["docs_out"] == 2000 and metrics["docs_with_pii"] > 0


def test_a_document_a_detector_fails_on_is_dropped_not_passed_on(tmp_path, monkeypatch):
    from stages.pii.detectors import Scrubber, email_finder

    def fragile(text):
        if "BOOM" in text:
            raise RuntimeError("detector bug")
        return email_finder(section("email"))(text)

    monkeypatch.setattr(pii, "scrubber_for", lambda cfg: Scrubber([("email", "<EMAIL>", fragile)]))
    write_shard(tmp_path / "quality" / "a.parquet", ["mail bob@gmail.com", "BOOM bob@gmail.com", "nothing"], "a")
    metrics = pii.run(dataclasses.replace(DEFAULT, workers=1), make_ctx(tmp_path, tmp_path / "quality"))
    assert metrics["dropped_scrub_error"] == 1 and metrics["docs_out"] == 2 and metrics["pii_email"] == 1
    texts = pq.read_table(tmp_path / "pii-out" / "documents" / "00000.parquet").column("text").to_pylist()
    assert texts == ["mail <EMAIL>", "nothing"]
