"""pii on real text (issue 14): precision and recall per type on hand-labelled documentation passages,
and the contexts where a dotted quad is a section, list or version number rather than an address.

The sample is tests/stages/pii/data/labelled.jsonl (built by bench/pii_sample.py from the
documentation of a Debian machine, labelled by hand; the rules are in the README beside it).
bench/pii.py prints the same figures for the detectors before issue 14, and their speed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from stages.pii.scoring import Counts, SampleError, read_sample, score, wanted_by
from stages.pii.stage import PiiConfig, scrubber_for

SAMPLE = Path(__file__).parent / "data" / "labelled.jsonl"
DEFAULT = stage_config("pii")  # conf/stage/pii/default.yaml
# Floors: issue 14's target, precision >= 0.98 for IP addresses and emails on the whole sample;
# recall at what the detectors reached, less a margin of a mistake or two (bench/pii.py prints the
# figures). The rules were written on batches a, b and c (and one on d1); d2 was never looked at to
# write one, and is too small to assert on alone (13 public addresses with the shipped config):
# bench/pii.py prints it. With the shipped config IP precision is 0.985 on all (130 of 132), recall
# 0.867: the gcloud man pages of batch d write example addresses such as 1.2.3.4 that the tiny-quad
# rule keeps as versions.
ABC, ALL = ("a", "b", "c"), ("a", "b", "c", "d1", "d2")
FLOORS = {  # (config, type, batches): (precision, recall)
    ("shipped", "ip_address", ABC): (0.98, 0.95),
    ("shipped", "ip_address", ALL): (0.98, 0.85),
    ("shipped", "email", ALL): (0.98, 0.99),
    ("every-address", "ip_address", ALL): (0.98, 0.91),
    ("every-address", "email", ALL): (0.98, 0.99),
}


def every_address(cfg: PiiConfig) -> PiiConfig:
    """``cfg`` with private IPs and example.com addresses replaced too: every labelled address counts."""
    return dataclasses.replace(cfg, ip_address=dataclasses.replace(cfg.ip_address, keep_non_public=False),
                               email=dataclasses.replace(cfg.email, keep_reserved_domains=False))


CONFIGS = {"shipped": DEFAULT, "every-address": every_address(DEFAULT)}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return read_sample(SAMPLE)


def counts_for(cfg: PiiConfig, records: list[dict], batches: tuple[str, ...] = ALL) -> dict[str, Counts]:
    """Counts per type over the spans of ``batches``."""
    return score(scrubber_for(cfg), records, wanted_by(cfg.ip_address, cfg.email), batches)


def test_the_sample_is_what_the_readme_describes(records):
    spans = [s for r in records for s in r["spans"]]
    labels = {s["label"] for s in spans}
    assert len(records) >= 400 and len(spans) >= 800
    assert {"ip_address", "email", "none"} <= labels
    assert {r["split"] for r in records} == {"dev", "test"}
    assert all(r["source"].startswith(("/usr/share/doc/", "/usr/share/info/", "/usr/share/man/")) for r in records)
    # Each labelled kind has enough of both sides to measure: numbers that look like addresses,
    # and addresses, public ones among them.
    ipv4 = [s for s in spans if s["kind"] == "ipv4"]
    assert sum(s["label"] == "none" for s in ipv4) >= 150 and sum(s["label"] == "ip_address" for s in ipv4) >= 100
    assert sum(s["label"] == "email" for s in spans) >= 300
    # Batch d: drawn for public addresses and the numbers shaped like them, from other source files.
    assert {s["batch"] for s in spans} == set(ALL)
    batch_d = [s for s in spans if s["batch"] in ("d1", "d2") and s["kind"] in ("ipv4", "ipv6")]
    assert len(batch_d) >= 150 and sum(s["label"] == "ip_address" for s in batch_d) >= 40
    assert not {r["source"] for r in records if r["spans"][0]["batch"] in ("d1", "d2")} & \
        {r["source"] for r in records if r["spans"][0]["batch"] not in ("d1", "d2")}


@pytest.mark.parametrize("config, kind, batches", sorted(FLOORS))
def test_precision_and_recall_on_labelled_real_text(records, config, kind, batches):
    """Precision and recall of the replacements against the hand labels, not below their floors."""
    c = counts_for(CONFIGS[config], records, batches)[kind]
    precision, recall = FLOORS[(config, kind, batches)]
    assert c.tp >= 30, f"{kind}: too few hits to measure: {c}"
    assert c.precision >= precision, f"{kind} ({config}, batches {batches}): {c}; false positives: {c.fp_values[:20]}"
    assert c.recall >= recall, f"{kind} ({config}, batches {batches}): {c}; misses: {c.fn_values[:20]}"


def test_the_sample_holds_the_numbers_that_fooled_the_detector(records):
    """With the numbering rules off, most IP replacements on this sample are wrong, as in issue 14
    (about 1,800 of 2,300 on its pages; here about 4 in 5): the sample tests what it is meant to test."""
    cfg = dataclasses.replace(DEFAULT, ip_address=dataclasses.replace(DEFAULT.ip_address, version_context=False))
    c = counts_for(cfg, records)["ip_address"]
    assert c.fp > 3 * c.tp, c


def test_a_malformed_sample_is_a_named_error(tmp_path):
    bad = tmp_path / "labelled.jsonl"
    bad.write_text('{"id": "p1", "source": "x", "split": "dev", "text": "ip 8.8.8.8", '
                   '"spans": [{"start": 3, "end": 9, "value": "8.8.8.8", "label": "ip_address"}]}\n')
    with pytest.raises(SampleError, match=r"labelled\.jsonl:1 \(p1\): span 3-9 is '8\.8\.8\.'"):
        read_sample(bad)
    bad.write_text('{"id": "p1", "source": "x", "split": "dev", "text": "ip 8.8.8.8", '
                   '"spans": [{"start": 3, "end": 10, "value": "8.8.8.8", "label": "ip"}]}\n')
    with pytest.raises(SampleError, match=r"has label 'ip'; labels are secret, email"):
        read_sample(bad)


# --- contexts --------------------------------------------------------------------------------------

def scrub(text: str, cfg: PiiConfig = DEFAULT) -> str:
    return scrubber_for(cfg).scrub(text)[0]


@pytest.mark.parametrize("text", [
    "11.1.2.1. Virtual domains",  # the example
    "2.3.4.5 Title",
    "   7.1.3.5  SHA1 ........................ 54",  # a table of contents line
    "#### 2.1.2.4. Footer Magic Bytes",
    "* 3.43.6.2 What does the LTdnlc test mean?",
    "1.2.3.4) Install the package first.",
    "11.1.2 Mail 11.1.2.1 Virtual domains 11.1.2.2 Aliases",  # a flattened table of contents
    "Array length is described in Section 22.1.4.1 of the ECMAScript Language Specification.",
    "x25519 (OID 1.3.101.110) and ed25519 (OID 1.3.101.112)",
    "iso.org.dod.internet is 1.3.6.1; 1.3.6.1.4.1.311 is Microsoft's arc.",
    "Git 1.8.5.6",
    "      Git 1.7.11.6\n      Prepare for 1.7.11.6",
    "dpkg (1.16.4.3) unstable; urgency=low",
    "xft (2.1.8.2-0ubuntu1) dapper; urgency=low",
    "    Requires xextproto 7.0.99.1",
    "* V8: Upgrade to 3.15.11.15",
    "**deps**: patch V8 to 10.8.168.25 (Michaël Zasso)",
    "**v8**: Upgrade to version 4.5.103.30 from 4.4.63.30",
    "It hasn't been used since libxcb 1.1.90.1, released in 2008.",
    "\t* m4/po.m4: Upgrade to gettext-0.19.8.1.",
    "Changes in 1.2.5.3 (15 Jan 2012)",
    "2015-07-29 (3.8.11.1)",
    "Pin it with kestrel==4.2.1.0 or newer; the date was 12.05.2024.",
    " 755609 glib 2.46.0 breaks Sun Java JVM 1.8.0.60",
    "case.  Last confirmed on 2.6.38.6.",
    # a value the text calls a revision once is one where it recurs (a CVS diff header)
    "retrieving revision 1.58.2.2\n--- locate/locate.c\t22 Apr 2007 16:57:42 -0000\t1.58.2.2",
])
def test_numbers_that_look_like_addresses_are_kept(text):
    assert scrub(text) == text


@pytest.mark.parametrize("text, expected", [
    ("listen 93.184.216.34:80;", "listen <IP_ADDRESS>:80;"),
    ("ip addr add 93.184.216.34/24 dev eth0", "ip addr add <IP_ADDRESS>/24 dev eth0"),
    ('66.249.66.1 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 200',
     '<IP_ADDRESS> - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 200'),
    ("nameserver 8.8.8.8", "nameserver <IP_ADDRESS>"),
    ("93.184.216.34 www.example.com", "<IP_ADDRESS> www.example.com"),  # a hosts file line
    ("ping 9.9.9.9", "ping <IP_ADDRESS>"),
    ("dig @1.1.1.1 example.org", "dig @<IP_ADDRESS> example.org"),
    ("This allows\n      user@[1.2.3.4] to work.", "This allows\n      user@[<IP_ADDRESS>] to work."),
    ("Connection from 23.21.12.5 port 51234", "Connection from <IP_ADDRESS> port 51234"),
    ("If the default public resolver, which is\n   8.8.8.8, shall not be used",
     "If the default public resolver, which is\n   <IP_ADDRESS>, shall not be used"),
    ("console.log(blockList.check('::ffff:123.123.123.123', 'ipv6'));",  # one address, not a quad inside one
     "console.log(blockList.check('<IP_ADDRESS>', 'ipv6'));"),
    ("resolver.setServers([\n  '4.4.4.4',\n  '[2001:4860:4860::8888]',\n])",
     "resolver.setServers([\n  '<IP_ADDRESS>',\n  '[<IP_ADDRESS>]',\n])"),
    ("Contact me at 93.184.216.34 for details.", "Contact me at <IP_ADDRESS> for details."),
    ("The blocked host was 12.34.56.78.", "The blocked host was <IP_ADDRESS>."),
    ("접속을 허용할 주소는 130.225.17.25인 호스트뿐이다", "접속을 허용할 주소는 <IP_ADDRESS>인 호스트뿐이다"),
])
def test_addresses_stay_found(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize("text", ["listen 192.168.1.10:80;", "ip addr add 10.0.0.1/24 dev eth0",
                                  "ssh-keyscan 10.20.1.1", "arp -i eth1 -d 10.0.0.1", "gateway 10.1.1.1 up"])
def test_private_addresses_are_found_when_configured(text):
    """Kept by the shipped config (non-public), but recognised as addresses: numbering rules do not take them."""
    assert scrub(text) == text
    assert "<IP_ADDRESS>" in scrub(text, every_address(DEFAULT))


def test_a_debian_changelog_heading_is_a_version_even_where_every_address_counts():
    text = "dpkg (0.93.42.3) BETA; priority=LOW\n\n  * Rebuilt using ncurses 1.9.2c-0."
    assert scrub(text, every_address(DEFAULT)) == text
    assert scrub("ping example.org (93.184.216.34) 56 bytes") == "ping example.org (<IP_ADDRESS>) 56 bytes"


def test_a_number_named_once_is_still_an_address_where_a_port_follows_it():
    text = "Built from revision 93.184.216.34 of the tree; the mirror listens on 93.184.216.34:8080."
    assert scrub(text) == "Built from revision 93.184.216.34 of the tree; the mirror listens on <IP_ADDRESS>:8080."


def test_numbering_rules_go_with_version_context():
    cfg = dataclasses.replace(DEFAULT, ip_address=dataclasses.replace(DEFAULT.ip_address, version_context=False))
    assert scrub("11.1.2.1. Virtual domains\nGit 1.8.5.6", cfg) == "<IP_ADDRESS>. Virtual domains\nGit <IP_ADDRESS>"


def test_email_shapes_in_url_paths_are_message_ids_but_query_values_are_addresses():
    text = ("https://lore.kernel.org/git/7v64clg5u9.fsf@assigned-by-dhcp.cox.net/ and "
            "https://example.org/contact?to=bob@mailbox.org")
    assert scrub(text) == ("https://lore.kernel.org/git/7v64clg5u9.fsf@assigned-by-dhcp.cox.net/ and "
                           "https://example.org/contact?to=<EMAIL>")


def test_message_ids_in_mail_headers_are_not_addresses():
    """README rule: a message id is no mailbox; the sender's address in the same header block is."""
    text = ("    Signed-off-by: Christian Linhart <chris@DemoRecorder.com>\n"
            "    Message-ID: <54562798.8040500@DemoRecorder.com>\n"
            "In-Reply-To: <87d0x@gnus.mailbox.org>\n"
            "References: <1334571250.5056.52.camel@vespa.frost.org> <87d0x@gnus.mailbox.org>\n"
            "From: bob@mailbox.org (a Message-ID: header names no person)")
    assert scrub(text) == ("    Signed-off-by: Christian Linhart <<EMAIL>>\n"
                           "    Message-ID: <54562798.8040500@DemoRecorder.com>\n"
                           "In-Reply-To: <87d0x@gnus.mailbox.org>\n"
                           "References: <1334571250.5056.52.camel@vespa.frost.org> <87d0x@gnus.mailbox.org>\n"
                           "From: <EMAIL> (a Message-ID: header names no person)")


def test_bracketed_bare_digits_are_not_phones():
    text = "lrwxrwxrwx. user -> user:[4026531837]"
    assert scrub(text) == text
    assert "<PHONE>" in scrub("Phone: (4155550132)")


@pytest.mark.parametrize("name, text", [
    ("small quads", "1.2.3.4 " * 20_000),  # every quad weighed, the numbering indexed once
    ("heading lines", "1.1.1.1. Title\n" * 10_000),
    ("quads and IPv6", "1.2.3.4 fe80::1 " * 10_000),
    ("release verbs", "update " * 20_000 + "1.2.3.4"),
])
def test_numbering_checks_stay_linear(name, text):
    """No timing assertion: a check that scanned the whole text per quad would not finish in the test run."""
    out, _ = scrubber_for(DEFAULT).scrub(text)
    assert isinstance(out, str)
