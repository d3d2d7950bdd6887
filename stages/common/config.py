"""Config groups shared by several stages. Stages take them by interpolation (``model: ${model}``)
so that a change to the model re-runs only the stages that use it.

Like every project config, these carry no defaults: conf/model/*.yaml and conf/data/*.yaml give every
value (tests and benchmarks start from there too, through ``llmpipe.project.stage_config``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline import Invalid, one_or_many

SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # it names metrics: source.<name>.tokens_train


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str  # a label for runs and output metadata
    architecture: str  # transformers model family
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # MLP width
    num_layers: int  # transformer blocks
    num_heads: int  # attention heads; head_dim = hidden_size / num_heads
    num_kv_heads: int  # key/value heads (grouped-query attention when fewer than num_heads)
    vocab_size: int  # tokenizer vocabulary size
    max_seq_len: int  # context length
    rope_theta: float  # rotary embedding base
    tokenizer: str | None  # an existing tokenizer dir; null: the tokenize stage trains one

    def __post_init__(self) -> None:
        problems = [(name, f"must be at least 1, got {getattr(self, name)}")
                    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                                 "vocab_size", "max_seq_len") if getattr(self, name) < 1]
        Invalid.check(problems)  # the divisibility checks below need positive sizes
        if self.hidden_size % self.num_heads:
            problems.append(("hidden_size", f"{self.hidden_size} is not divisible by num_heads ({self.num_heads})"))
        if self.num_heads % self.num_kv_heads:
            problems.append(("num_heads", f"{self.num_heads} is not a multiple of num_kv_heads ({self.num_kv_heads})"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One data source of a mixture (``data.sources.<name>``)."""

    input: tuple[str, ...] = one_or_many()  # its WARC files: one or a list of globs, paths or URLs
    weight: float  # its share of the training tokens, relative to the other sources' weights

    def __post_init__(self) -> None:
        problems = []
        if not self.input:
            problems.append(("input", "names no WARC file, glob or URL"))
        if not (self.weight > 0 and math.isfinite(self.weight)):
            problems.append(("weight", f"must be a positive number, got {self.weight}"))
        Invalid.check(problems)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str  # a label for the corpus; the `source` of every document when there is one input (warc)
    warc: tuple[str, ...] = one_or_many()  # WARC inputs of the crawl: one or a list of globs, paths or URLs
    # Several sources instead of warc: {<name>: {input: [...], weight: <float>}}; tokenize makes each source's
    # share of the training tokens its weight's share (stages/tokenize/mixture.py); ingest tags every document
    sources: Mapping[str, SourceConfig]

    def __post_init__(self) -> None:
        problems = []
        if self.sources and self.warc:
            problems.append(("warc", "set it to [] when data.sources lists the inputs (each source has its own input)"))
        if not self.sources and not self.warc:
            problems.append(("warc", "names no input: give data.warc or data.sources"))
        problems += [("sources", f"{name!r} is not a source name (letters, digits, '_' and '-')")
                     for name in self.sources if not SOURCE_NAME.fullmatch(name)]
        Invalid.check(problems)
