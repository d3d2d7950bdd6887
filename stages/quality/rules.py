"""Document-level quality heuristics of the quality stage: Gopher and C4 rules.

Each rule reads one document and either keeps it (``None``) or drops it with a reason name
(a string such as ``"stop_words"``); the stage counts drops as ``dropped_<reason>``. A document
is dropped by the first rule it fails, in the order of ``Rules.check``: cheap statistics first,
repetition last. A threshold set to null in the config turns its rule off.

Sources, for the semantics and the default thresholds in conf/stage/quality/default.yaml:

- Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
  Gopher", Appendix A (MassiveWeb): the quality filter (word count, mean word length,
  symbol-to-word ratio, bullet and ellipsis lines, alphabetic words, stop words) and repetition
  removal (duplicate lines and paragraphs, top n-gram and duplicate n-gram character fractions).
- C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", Section 2.2, with the constants of its reference implementation (TensorFlow
  Datasets' c4_utils: 3 sentences, 5 words per line, end marks . ? ! ", words up to 1000 chars).
  C4 removes lines; this stage only drops whole documents and never edits text, so the line rules
  become "count the sentences in the lines C4 would keep".
- FineWeb: Penedo et al. 2024, who turned C4's terminal-punctuation line rule into a document
  rule: drop when (about) 12% of the lines or fewer end with punctuation; here, below 12%.

- FineWeb-2: Penedo et al. 2025, "FineWeb2: One Pipeline to Scale Them All", which adapts these
  English rules per language: each language its own stop words, word segmentation and thresholds.

The published rules assume English words. Here what depends on the language sits in one table,
``languages`` (``LanguageRules``, keyed by ingest's ``language`` code, ``default`` for the rest,
``und`` included): the stop words (Gopher's English list for en, the equivalent function words for
the others; no list: the rule is skipped), the mean word length range, and how words are counted.
Chinese and Japanese put no spaces between words, so with ``chars_per_word`` set every Han or kana
letter is a unit worth 1/chars_per_word word: word counts, words per line and the n-gram sizes of
the repetition rules then mean about as much text as in English. Every other threshold is shared.
The shipped values keep translated documentation at the rate of its English original (within 0.08
on tests/fixtures/multilingual, 11 languages; bench/quality_lang.py), where the English-only rules
kept 0-14% of the de, fr, es, it, pt, ru, zh and ja translations against 50-77% of the originals.

These are plain statistics over words: no library in the environment implements them (datatrove
does, but is not a dependency).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path

from pipeline import Invalid

DEFAULT_LANGUAGE = "default"  # the languages entry of every language without its own, und included

# Every reason a heuristic can give, in the order the rules run.
REASONS = (
    "empty_text",
    "too_few_words", "too_many_words", "mean_word_length", "symbol_ratio", "bullet_lines",
    "ellipsis_lines", "alpha_words", "stop_words",
    "long_word", "lorem_ipsum", "curly_bracket", "bad_words", "punct_lines", "too_few_sentences",
    "duplicate_lines", "duplicate_line_chars", "duplicate_paragraphs", "duplicate_paragraph_chars",
    "top_ngram_ratio", "duplicate_ngram_ratio",
)

# CJK punctuation: the ideographic comma and full stop, corner and angle brackets, the katakana middle
# dot, and the fullwidth forms of ASCII punctuation.
_CJK_PUNCT = "、。〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟・" + "".join(
    chr(c) for c in (*range(0xFF01, 0xFF10), *range(0xFF1A, 0xFF21), *range(0xFF3B, 0xFF41), *range(0xFF5B, 0xFF66)))
# Stripped from both ends of a whitespace token to get a word; a token of only these is no word.
_PUNCT = string.punctuation + "“”‘’«»…–—·•" + _CJK_PUNCT
_BULLETS = ("•", "‣", "◦", "⁃", "●", "○", "▪", "■", "□", "►", "-", "*", "–", "—")
_ELLIPSES = ("...", "…")
# Sentence ends of scripts other than Latin: CJK full stop, exclamation and question marks (and closing
# corner brackets, CJK's quotes), the Devanagari danda, the Arabic question mark, the Urdu full stop.
_OTHER_END_MARKS = ("。", "！", "？", "」", "』", "।", "؟", "۔")
_END_MARKS = (".", "?", "!", '"', *_OTHER_END_MARKS)  # C4's terminal punctuation, and other scripts'
_PUNCT_LINE_ENDS = (".", "?", "!", '"', "'", "”", "’", *_OTHER_END_MARKS)  # FineWeb's, with typographic quotes
_C4_SKIP_LINE = ("javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies",
                 "use of cookies", "use cookies")  # lines C4 removes: JavaScript warnings, policy notices
# A sentence ends with end marks (and perhaps closing quotes or brackets) before a space or the end; CJK
# end marks need no space after them.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|[。！？]+[」』）]*|[।؟۔]+")
# Letters of the scripts written without spaces between words: Han ideographs (with 々 〆 〇), hiragana,
# katakana (halfwidth too, without the middle dot, which is punctuation). A run of them is split into
# characters when the language's chars_per_word is set. Hangul is not here: Korean puts spaces between words.
_UNSPACED = ("\u3005-\u3007\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
             "\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")
_UNSPACED_TOKEN = re.compile(f"[{_UNSPACED}]|[^{_UNSPACED}\\s]+")  # one such letter, or a run of others up to a space
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_NO_LETTER_LINE = re.compile(r"^(?:[^\w\n]|[\d_])+$", re.MULTILINE)  # a word (one per line) without any letter


@dataclass(frozen=True, kw_only=True)
class GopherQualityConfig:
    min_words: int | None  # fewer words drop the document (too_few_words)
    max_words: int | None  # more words drop the document (too_many_words)
    max_symbol_word_ratio: float | None  # '#' per word or ellipses per word above this drops (symbol_ratio)
    max_bullet_lines_ratio: float | None  # share of lines starting with a bullet above this drops (bullet_lines)
    max_ellipsis_lines_ratio: float | None  # share of lines ending with an ellipsis above this drops
    min_alpha_words_ratio: float | None  # share of words with a letter below this drops (alpha_words)
    # fewer occurrences of the language's stop words drop the document (stop_words); languages.<code>.stop_words
    min_stop_words: int | None  # stop words a document needs

    def __post_init__(self) -> None:
        Invalid.check([*_range_problems(self, "min_words", "max_words"),
                       *_fraction_problems(self, "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                                           "min_alpha_words_ratio")])


@dataclass(frozen=True, kw_only=True)
class LanguageRules:
    """What differs between languages, FineWeb-2's way: one entry per language code of ingest's ``language``
    column (``default`` for the others, ``und`` included). The other thresholds hold for every language."""

    stop_words: tuple[str, ...] | None  # counted by gopher.min_stop_words; null: no list, the rule is skipped
    # null: words are whitespace tokens; x: in runs of Han/kana letters each character is one unit, worth 1/x
    # word in every count (so min_words and the n-gram sizes mean about the same text as in English)
    chars_per_word: float | None  # CJK characters per word
    min_mean_word_length: float | None  # mean word length in characters below this drops (mean_word_length)
    max_mean_word_length: float | None  # mean word length above this drops (mean_word_length)

    def __post_init__(self) -> None:
        problems = _range_problems(self, "min_mean_word_length", "max_mean_word_length")
        if self.chars_per_word is not None and self.chars_per_word <= 0:
            problems.append(("chars_per_word", f"must be > 0, got {self.chars_per_word}"))
        if self.stop_words is not None and not self.stop_words:
            problems.append(("stop_words", "is an empty list: give words, or null to skip the stop-word rule"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class GopherRepetitionConfig:
    max_duplicate_lines_ratio: float | None  # share of lines repeating an earlier line (duplicate_lines)
    max_duplicate_line_chars_ratio: float | None  # share of characters in such lines (duplicate_line_chars)
    max_duplicate_paragraphs_ratio: float | None  # share of repeated paragraphs (duplicate_paragraphs)
    max_duplicate_paragraph_chars_ratio: float | None  # characters in repeated paragraphs
    # [n, max]: characters covered by the most frequent n-gram, over all word characters (top_ngram_ratio)
    max_top_ngram_ratio: tuple[tuple[int, float], ...]  # most frequent n-gram limits
    # [n, max]: characters covered by repeats of an earlier n-gram (duplicate_ngram_ratio)
    max_duplicate_ngram_ratio: tuple[tuple[int, float], ...]  # repeated n-gram limits

    def __post_init__(self) -> None:
        problems = _fraction_problems(self, "max_duplicate_lines_ratio", "max_duplicate_line_chars_ratio",
                                      "max_duplicate_paragraphs_ratio", "max_duplicate_paragraph_chars_ratio")
        for key in ("max_top_ngram_ratio", "max_duplicate_ngram_ratio"):
            problems += [(key, f"[{n}, {limit}] needs n >= 1 and a ratio in [0, 1]")
                         for n, limit in getattr(self, key) if n < 1 or not 0.0 <= limit <= 1.0]
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class C4Config:
    min_sentences: int | None  # fewer sentences in the lines C4 keeps drop the document (too_few_sentences)
    min_words_per_line: int  # a line counts towards min_sentences only with this many words (C4: 5)
    min_punct_lines_ratio: float | None  # share of lines ending in punctuation below this drops (punct_lines)
    max_word_length: int | None  # a longer whitespace token drops the document (long_word)
    lorem_ipsum: bool  # drop documents containing "lorem ipsum" (lorem_ipsum)
    curly_bracket: bool  # drop documents containing "{" (C4 did; off because code is wanted)
    bad_words_file: str | None  # word list, one entry per line (C4 used LDNOOBW); a match drops (bad_words)

    def __post_init__(self) -> None:
        problems = _fraction_problems(self, "min_punct_lines_ratio")
        if self.min_words_per_line < 0:
            problems.append(("min_words_per_line", f"must be >= 0, got {self.min_words_per_line}"))
        Invalid.check(problems)


@dataclass
class DocStats:
    """What several rules share, computed once per document."""

    text: str
    tokens: list[str]  # whitespace tokens; with chars_per_word, runs of Han/kana split into their characters
    words: list[str]  # tokens without surrounding punctuation; empty ones left out
    n_words: float  # words counted: Han/kana characters count 1/chars_per_word each, other words 1
    chars_per_word: float | None  # the language's (None: whitespace words)
    lines: list[str] = field(default_factory=list)  # non-empty lines, stripped

    @classmethod
    def of(cls, text: str, chars_per_word: float | None = None) -> DocStats:
        tokens, unspaced = split_tokens(text, chars_per_word)
        words = [w for w in (t.strip(_PUNCT) for t in tokens) if w]
        n_words = len(words) - unspaced + (unspaced / chars_per_word if chars_per_word else 0)
        lines = [s for s in (line.strip() for line in text.split("\n")) if s]
        return cls(text, tokens, words, n_words, chars_per_word, lines)


def split_tokens(text: str, chars_per_word: float | None) -> tuple[list[str], int]:
    """(whitespace tokens, how many of them are single Han/kana letters).

    Without ``chars_per_word`` these are plain whitespace tokens (and 0). With it, every Han or kana
    letter is a token of its own, and tokens of punctuation only are left out: "使用ls命令。然后" gives
    使 用 ls 命 令 然 后. Chinese and Japanese put no spaces between words, so a whole sentence would
    otherwise be one "word".
    """
    if chars_per_word is None:
        return text.split(), 0
    tokens = _UNSPACED_TOKEN.findall(text)
    return [t for t in tokens if t.strip(_PUNCT)], len(_UNSPACED_CHAR.findall(text))


def count_words(text: str, chars_per_word: float | None) -> float:
    """Words in ``text`` as the rules count them: whitespace tokens, Han/kana letters 1/chars_per_word each."""
    tokens, unspaced = split_tokens(text, chars_per_word)
    return len(tokens) - unspaced + (unspaced / chars_per_word if chars_per_word else 0)


class Rules:
    """The configured heuristics, ready to check documents (bad-word pattern compiled once).

    ``languages`` maps a language code (ingest's ``language`` column) to its ``LanguageRules``; a
    document whose language has no entry (``und`` too), or that comes without a language, gets the
    ``default`` entry.
    """

    def __init__(self, gopher: GopherQualityConfig, repetition: GopherRepetitionConfig, c4: C4Config,
                 languages: Mapping[str, LanguageRules], bad_words: Iterable[str] = ()):
        if DEFAULT_LANGUAGE not in languages:
            raise Invalid("languages", f"has no {DEFAULT_LANGUAGE!r} entry (the rules of every other language)")
        self.gopher = gopher
        self.repetition = repetition
        self.c4 = c4
        self.languages = dict(languages)
        self.stop_words = {code: frozenset(rules.stop_words or ()) for code, rules in languages.items()}
        self.bad_words = _bad_words_pattern(bad_words)

    def language_key(self, language: str | None) -> str:
        """The entry of ``languages`` that checks documents in ``language``."""
        return language if language in self.languages else DEFAULT_LANGUAGE

    def check(self, text: str | None, language: str | None) -> tuple[str | None, int]:
        """(reason or None, word count, rounded) for one document in ``language`` (ingest's code)."""
        if text is None or not text.strip():
            return "empty_text", 0
        key = self.language_key(language)
        lang = self.languages[key]
        doc = DocStats.of(text, lang.chars_per_word)
        reason = self.gopher_quality(doc, key) or self.c4_rules(doc) or self.gopher_repetition(doc)
        return reason, round(doc.n_words)

    def gopher_quality(self, doc: DocStats, language: str) -> str | None:
        """Gopher's quality filter (Rae et al. 2021, App. A), with ``languages[language]``'s stop words and
        word lengths."""
        g = self.gopher
        lang = self.languages[language]
        n_words = doc.n_words
        if g.min_words is not None and n_words < g.min_words:
            return "too_few_words"
        if g.max_words is not None and n_words > g.max_words:
            return "too_many_words"
        per_word = max(n_words, 1)
        mean_len = sum(map(len, doc.words)) / per_word
        if ((lang.min_mean_word_length is not None and mean_len < lang.min_mean_word_length)
                or (lang.max_mean_word_length is not None and mean_len > lang.max_mean_word_length)):
            return "mean_word_length"
        if g.max_symbol_word_ratio is not None:
            # The paper bounds the hash and the ellipsis separately, each against the word count.
            hashes = doc.text.count("#")
            ellipses = sum(doc.text.count(e) for e in _ELLIPSES)
            if max(hashes, ellipses) / per_word > g.max_symbol_word_ratio:
                return "symbol_ratio"
        n_lines = max(len(doc.lines), 1)
        if (g.max_bullet_lines_ratio is not None
                and sum(line.startswith(_BULLETS) for line in doc.lines) / n_lines > g.max_bullet_lines_ratio):
            return "bullet_lines"
        if (g.max_ellipsis_lines_ratio is not None
                and sum(line.endswith(_ELLIPSES) for line in doc.lines) / n_lines > g.max_ellipsis_lines_ratio):
            return "ellipsis_lines"
        if g.min_alpha_words_ratio is not None:
            # Words without a letter are never Han/kana, so each counts one word.
            no_letter = len(_NO_LETTER_LINE.findall("\n".join(doc.words)))
            if (n_words - no_letter) / per_word < g.min_alpha_words_ratio:
                return "alpha_words"
        # Occurrences, matched case-sensitively as the reference implementations do: a text in
        # capitals only has no "the" and is dropped, which is the point of the rule. A language
        # without a list skips the rule.
        stop_words = self.stop_words[language]
        if (g.min_stop_words is not None and stop_words
                and sum(map(stop_words.__contains__, doc.words)) < g.min_stop_words):
            return "stop_words"
        return None

    def c4_rules(self, doc: DocStats) -> str | None:
        """C4's page rules (Raffel et al. 2020, Sec. 2.2) applied to whole documents."""
        c = self.c4
        if c.max_word_length is not None and max(map(len, doc.tokens)) > c.max_word_length:
            return "long_word"
        lowered = doc.text.lower()
        if c.lorem_ipsum and "lorem ipsum" in lowered:
            return "lorem_ipsum"
        if c.curly_bracket and "{" in doc.text:
            return "curly_bracket"
        if self.bad_words is not None and self.bad_words.search(lowered):
            return "bad_words"
        if c.min_punct_lines_ratio is not None:
            ended = sum(line.endswith(_PUNCT_LINE_ENDS) for line in doc.lines)
            if ended / max(len(doc.lines), 1) < c.min_punct_lines_ratio:
                return "punct_lines"
        if (c.min_sentences is not None
                and count_c4_sentences(doc.lines, c.min_words_per_line, doc.chars_per_word) < c.min_sentences):
            return "too_few_sentences"
        return None

    def gopher_repetition(self, doc: DocStats) -> str | None:
        """Gopher's repetition removal (Rae et al. 2021, App. A, thresholds of its Table A1)."""
        r = self.repetition
        n_chars = max(len(doc.text), 1)
        if r.max_duplicate_lines_ratio is not None or r.max_duplicate_line_chars_ratio is not None:
            dup, dup_chars = duplicate_elements(doc.lines)
            if r.max_duplicate_lines_ratio is not None and dup / max(len(doc.lines), 1) > r.max_duplicate_lines_ratio:
                return "duplicate_lines"
            if r.max_duplicate_line_chars_ratio is not None and dup_chars / n_chars > r.max_duplicate_line_chars_ratio:
                return "duplicate_line_chars"
        if r.max_duplicate_paragraphs_ratio is not None or r.max_duplicate_paragraph_chars_ratio is not None:
            paragraphs = [p for p in (s.strip() for s in _PARAGRAPH_BREAK.split(doc.text)) if p]
            dup, dup_chars = duplicate_elements(paragraphs)
            limit = r.max_duplicate_paragraphs_ratio
            if limit is not None and dup / max(len(paragraphs), 1) > limit:
                return "duplicate_paragraphs"
            limit = r.max_duplicate_paragraph_chars_ratio
            if limit is not None and dup_chars / n_chars > limit:
                return "duplicate_paragraph_chars"
        # Han/kana letters are units of 1/chars_per_word word: an n-gram of words is n x (units per word) units.
        return self.ngram_repetition([w.lower() for w in doc.words], len(doc.words) / max(doc.n_words, 1e-9))

    def ngram_repetition(self, words: list[str], units_per_word: float = 1.0) -> str | None:
        """Top n-gram and duplicate n-gram character fractions, going up in n.

        A repeated n-gram starts where a repeated (n-1)-gram starts, so each n only looks at the
        positions the previous one found repeated: most words drop out after n = 2 or 3.
        ``words`` may be units smaller than words (Han/kana letters): the limit for n words then
        applies to n-grams of round(n x ``units_per_word``) units (the stricter limit where two
        sizes round to one).
        """
        top = _scaled(self.repetition.max_top_ngram_ratio, units_per_word)
        dup = _scaled(self.repetition.max_duplicate_ngram_ratio, units_per_word)
        lengths = [len(w) for w in words]
        total = sum(lengths)
        if not (top or dup) or total == 0:
            return None
        ns = sorted(top.keys() | dup.keys())
        starts: list[int] | None = None
        for n in range(ns[0], ns[-1] + 1):
            repeated = repeated_ngrams(words, n, starts)
            if n in top and top_ngram_chars(repeated) / total > top[n]:
                return "top_ngram_ratio"
            if n in dup and duplicate_ngram_chars(repeated, lengths, n) / total > dup[n]:
                return "duplicate_ngram_ratio"
            if not repeated:
                break  # no n-gram repeats, so no longer one can
            starts = sorted(i for positions in repeated.values() for i in positions)
        return None


def _scaled(limits: Iterable[tuple[int, float]], units_per_word: float) -> dict[int, float]:
    """{n-gram size in units: limit} for [n words, limit] pairs."""
    out: dict[int, float] = {}
    for n, limit in limits:
        size = max(n, round(n * units_per_word))
        out[size] = min(limit, out.get(size, limit))
    return out


def duplicate_elements(elements: list[str]) -> tuple[int, int]:
    """(how many elements repeat an earlier one, their characters): Gopher's duplicate lines/paragraphs."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for e in elements:
        if e in seen:
            dup += 1
            dup_chars += len(e)
        else:
            seen.add(e)
    return dup, dup_chars


def repeated_ngrams(words: list[str], n: int, starts: Iterable[int] | None = None) -> dict[tuple[str, ...], list[int]]:
    """Every word n-gram that occurs more than once, with its start positions (among ``starts`` if given)."""
    where: dict[tuple[str, ...], list[int]] = defaultdict(list)
    if starts is None:
        for i, gram in enumerate(zip(*(words[k:] for k in range(n)), strict=False)):  # stops at the last n-gram
            where[gram].append(i)
    else:
        last = len(words) - n
        for i in starts:
            if i <= last:
                where[tuple(words[i:i + n])].append(i)
    return {gram: positions for gram, positions in where.items() if len(positions) > 1}


def top_ngram_chars(repeated: dict[tuple[str, ...], list[int]]) -> int:
    """Characters covered by the most frequent n-gram, every occurrence counted (Gopher's top n-gram).

    An n-gram seen once is no repetition, so only repeated ones are candidates.
    """
    if not repeated:
        return 0
    gram, positions = max(repeated.items(), key=lambda item: len(item[1]))
    return len(positions) * sum(map(len, gram))


def duplicate_ngram_chars(repeated: dict[tuple[str, ...], list[int]], lengths: list[int], n: int) -> int:
    """Characters of the words covered by the repeats of n-grams (Gopher's duplicate n-grams).

    As with duplicate lines, an n-gram's first occurrence is the original and its later ones are
    the duplicates (so a text written out twice scores 0.5, not 1). A word covered by overlapping
    duplicates counts once ("taking care not to count characters that occur in overlapping n-grams
    more than once").
    """
    covered = bytearray(len(lengths))
    for positions in repeated.values():
        for i in positions[1:]:
            covered[i:i + n] = b"\x01" * n
    return sum(compress(lengths, covered))


def count_c4_sentences(lines: list[str], min_words_per_line: int, chars_per_word: float | None = None) -> int:
    """Sentences in the lines C4 keeps: ending in an end mark, long enough, no JavaScript/policy notice.

    C4 split sentences with NLTK's Punkt English model, which is a download; ends of sentences
    (end marks before a space or the line end) count the same for the purpose of "at least 3".
    A line's words are counted as everywhere else (``count_words``: Han/kana letters by
    ``chars_per_word``).
    """
    total = 0
    for line in lines:
        if not line.endswith(_END_MARKS) or count_words(line, chars_per_word) < min_words_per_line:
            continue
        lowered = line.lower()
        if any(s in lowered for s in _C4_SKIP_LINE):
            continue
        total += max(len(_SENTENCE_END.findall(line)), 1)
    return total


def read_word_list(path: Path) -> list[str]:
    """Entries of a bad-words file: one per line, blank lines and '#' comments ignored, lowercased."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip().lower()
        if line and not line.startswith("#"):
            entries.append(line)
    return entries


def _bad_words_pattern(entries: Iterable[str]) -> re.Pattern[str] | None:
    # Whole words or phrases only: "ass" must not match "class". Longest first, so phrases win.
    entries = sorted({e.lower() for e in entries if e}, key=len, reverse=True)
    if not entries:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, entries)) + r")(?!\w)")


def _range_problems(cfg: object, low_key: str, high_key: str) -> list[tuple[str, str]]:
    low, high = getattr(cfg, low_key), getattr(cfg, high_key)
    if low is not None and high is not None and low > high:
        return [(low_key, f"{low} is greater than {high_key} ({high})")]
    return []


def _fraction_problems(cfg: object, *keys: str) -> list[tuple[str, str]]:
    """(key, message) for each of ``keys`` set to a value outside [0, 1] (null turns a rule off)."""
    return [(key, f"must be a fraction in [0, 1], got {getattr(cfg, key)}") for key in keys
            if getattr(cfg, key) is not None and not 0.0 <= getattr(cfg, key) <= 1.0]
