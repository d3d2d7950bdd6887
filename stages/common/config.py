"""Config groups shared by several stages. Stages take them by interpolation (``model: ${model}``)
so that a change to the model re-runs only the stages that use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    name: str  # a label for runs and output metadata
    architecture: str = "llama"  # transformers model family
    hidden_size: int = 256  # width of the residual stream
    intermediate_size: int = 768  # MLP width
    num_layers: int = 4  # transformer blocks
    num_heads: int = 8  # attention heads; head_dim = hidden_size / num_heads
    num_kv_heads: int = 8  # key/value heads (grouped-query attention when fewer than num_heads)
    vocab_size: int = 8192  # tokenizer vocabulary size
    max_seq_len: int = 256  # context length
    rope_theta: float = 10000.0  # rotary embedding base
    tokenizer: str | None = None  # an existing tokenizer dir; null: the tokenize stage trains one

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size {self.hidden_size} is not divisible by "
                             f"model.num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads {self.num_heads} is not a multiple of "
                             f"model.num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True)
class DataConfig:
    name: str  # a label for the corpus
    warc: tuple[str, ...] = ()  # WARC inputs of the crawl (globs, paths or URLs)
