"""The ``model`` config group as a transformers Llama model, and the arithmetic around it.

Shared by the training stages (pretrain builds the model from scratch; sft, align and quantize
load what pretrain exported). Heavy libraries are imported inside the functions, so importing
this module costs nothing.

FLOPs are counted the way the PaLM paper (appendix B) does, so MFU figures compare with the
literature: per token, 6 x (parameters that do matmuls) for forward + backward, plus the
attention score/value matmuls, 12 x layers x hidden x sequence length. Recomputation by gradient
checkpointing is not counted (it is overhead, not useful work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import LlmpipeError
from stages.common.config import ModelConfig

# Dense BF16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, matched as
# substrings of torch.cuda.get_device_name(); first match wins, so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / NVL
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)


class VocabSizeError(LlmpipeError):
    """The tokenizer has more tokens than the model's embedding is configured for."""


class ModelArchitectureError(LlmpipeError):
    """The ``model`` config names an architecture or attention kernel this code cannot build."""


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the model config records, so generate() stops at end of text and pads correctly."""

    bos: int | None
    eos: int | None
    pad: int | None


def check_vocab(tokenizer_len: int, model: ModelConfig, tokenizer_dir: Any = "the tokenizer") -> int:
    """The embedding size to build: the tokenizer's length, which must fit ``model.vocab_size``.

    The embedding is sized to the tokenizer rather than to ``model.vocab_size`` so that no row is
    a token that can never occur; ``model.vocab_size`` is the upper bound the config promises.
    """
    if tokenizer_len > model.vocab_size:
        raise VocabSizeError(f"tokenizer {tokenizer_dir} has {tokenizer_len} tokens, more than "
                             f"model.vocab_size={model.vocab_size}: raise model.vocab_size to at least "
                             f"{tokenizer_len} or use a smaller tokenizer")
    if tokenizer_len < 1:
        raise VocabSizeError(f"tokenizer {tokenizer_dir} is empty (length {tokenizer_len})")
    return tokenizer_len


def llama_config(model: ModelConfig, vocab_size: int, ids: SpecialIds, max_seq_len: int | None = None) -> Any:
    """A transformers LlamaConfig of the ``model`` group's shape with ``vocab_size`` embeddings.

    Input and output embeddings are not tied (as in Llama 2); ``use_cache`` is left on so the
    exported model generates efficiently (training turns it off on its own copy).
    """
    from transformers import LlamaConfig

    if model.architecture != "llama":
        raise ModelArchitectureError(f"model.architecture={model.architecture!r}: only 'llama' is supported")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        max_position_embeddings=max_seq_len or model.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        tie_word_embeddings=False,
    )


def build_model(config: Any, seed: int, dtype: Any = None, attention: str = "sdpa") -> Any:
    """A randomly initialised causal LM from ``config`` (the same weights for the same seed).

    Built with ``from_config`` so that, when a transformers ``HfDeepSpeedConfig`` with ZeRO-3 is
    alive, the weights are created already partitioned (``zero.Init``) instead of whole on every rank.
    """
    from transformers import AutoModelForCausalLM, set_seed

    if attention == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ModelArchitectureError("attention='flash_attention_2' needs the flash_attn package, which is "
                                         "not installed; use 'sdpa'")
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)


def matmul_params(config: Any) -> int:
    """Parameters that take part in matrix multiplies: everything but the input embedding table
    (a lookup) and the norms (elementwise). The untied LM head counts."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_o = 2 * h * config.num_attention_heads * head_dim
    k_v = 2 * h * config.num_key_value_heads * head_dim
    mlp = 3 * h * config.intermediate_size
    return layers * (q_o + k_v + mlp) + h * config.vocab_size


def train_flops_per_token(config: Any, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6N + 12 * layers * hidden * seq_len (PaLM, app. B)."""
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_tflops(device_name: str, configured: float | None = None) -> float | None:
    """Peak dense BF16 TFLOP/s of one accelerator: the configured value, else the table, else None."""
    if configured is not None:
        return configured
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None
