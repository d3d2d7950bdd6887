"""A tiny Llama + tokenizer that GPTQ and vLLM's CPU backend accept, built here with no download.

Shared by the model-stage tests (sft, align, quantize, serve, evaluate); import it read-only::

    from tests.stages.model_fixtures import build_base_model, build_tiny_model, corpus_texts, write_documents

    model_dir = build_tiny_model(tmp_path / "model", train_steps=40)   # an HF model dir
    base_dir = build_base_model(tmp_path / "base")                     # the same, as a base from elsewhere
    docs_dir = write_documents(tmp_path / "docs", corpus_texts(200))    # Parquet id,url,text

    @pytest.fixture(scope="module", autouse=True)                       # tiny models: one torch thread
    def one_torch_thread():
        yield from torch_threads(1)

Shape constraints it respects (vLLM CPU and GPTQ): head_dim = hidden / heads >= 32, every linear
size a multiple of 32 and of the GPTQ group size (hidden 128 and intermediate 256 fit groups of
32, 64 and 128). The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on
:func:`corpus_texts`, with the tokenize stage's special tokens (``<|endoftext|>`` = BOS = EOS,
``<|pad|>``, chat markers) and llmpipe's chat template (stages/common/chat.py), so chat requests
and ``apply_chat_template`` work on it. ``train_steps`` > 0 fits the random model on the corpus
for a few seconds so that perplexities and generations are not those of pure noise.

:func:`build_base_model` is a base model from elsewhere: its tokenizer has EOS (= BOS) as its only
special token, no pad token, no chat markers and no chat template.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from stages.common.chat import MARKERS, apply_chat_format

EOS, PAD = "<|endoftext|>", "<|pad|>"
SUBJECTS = ["The pipeline", "A shard", "The tokenizer", "Each model", "The server", "The trainer", "A document"]
VERBS = ["reads", "writes", "merges", "packs", "splits", "loads", "saves", "serves"]
OBJECTS = ["the data", "many tokens", "a checkpoint", "the weights", "every shard", "the corpus", "a new file"]
TOPICS = ["Training notes", "Data handling", "Model export", "Shard layout", "Evaluation", "Serving"]


def corpus_texts(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` short documents (a heading and 3-8 template sentences): learnable, deterministic for ``seed``."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(rng.randint(3, 8))]
        texts.append(f"{rng.choice(TOPICS)} {i}\n" + " ".join(sentences))
    return texts


def write_documents(directory: Path, texts: list[str], shards: int = 1, prefix: str = "doc") -> Path:
    """A documents artifact: ``directory/part-XXX.parquet`` with columns id, url, text (``shards`` files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("text", pa.string())])
    rows = [{"id": f"{prefix}-{i:05d}", "url": f"https://example.org/{prefix}/{i}", "text": t}
            for i, t in enumerate(texts)]
    per_shard = -(-len(rows) // shards) if rows else 0
    for s in range(shards):
        part = rows[s * per_shard:(s + 1) * per_shard]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), directory / f"part-{s:03d}.parquet")
    return directory


def build_tokenizer(texts: list[str], vocab_size: int = 512, chat: bool = True):
    """A transformers fast tokenizer (byte-level BPE trained on ``texts``) with the chat template set;
    with ``chat=False`` a base model's: EOS only, no pad token, no chat markers, no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[EOS, PAD, *MARKERS] if chat else [EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if not chat:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=256,
                                       clean_up_tokenization_spaces=False)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                     additional_special_tokens=list(MARKERS), model_max_length=256,
                                     clean_up_tokenization_spaces=False)
    return apply_chat_format(hf_tok)


def build_tiny_model(directory: Path, hidden: int = 128, layers: int = 2, heads: int = 4, intermediate: int = 256,
                     vocab_size: int = 512, max_seq_len: int = 256, train_steps: int = 0, seed: int = 0,
                     texts: list[str] | None = None, chat: bool = True) -> Path:
    """Save a tiny random Llama (float32 safetensors) + its tokenizer into ``directory``; return it.

    ``texts`` (default :func:`corpus_texts`) train the tokenizer and, with ``train_steps`` > 0, the
    model: that many AdamW steps on batches of 8 packed 64-token windows (about 0.1 s a step at the
    default size). ``vocab_size`` is the BPE's target; the embedding has exactly the tokenizer's length.
    ``chat=False``: a base model's tokenizer (see :func:`build_tokenizer`).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    texts = texts if texts is not None else corpus_texts()
    tok = build_tokenizer(texts, vocab_size, chat=chat)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_seq_len, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if train_steps > 0:
        _fit(model, tok, texts, train_steps, seed)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def build_base_model(directory: Path, **kwargs) -> Path:
    """:func:`build_tiny_model` (same arguments) with a base model's tokenizer: no pad, no chat markers,
    no chat template (a base model from elsewhere, which the training stages must fit with them)."""
    return build_tiny_model(directory, chat=False, **kwargs)


def _fit(model, tok, texts: list[str], steps: int, seed: int, window: int = 64, batch: int = 8) -> None:
    """A few plain next-token steps on ``texts`` packed with EOS separators (the pretraining layout)."""
    import torch

    ids = [i for t in texts for i in [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    data = torch.tensor(ids[:len(ids) // window * window]).view(-1, window)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, then restore the number (the body of a fixture).

    The test models are tiny (hidden 64): a second thread barely helps them, and on a busy machine
    (CI jobs side by side) it costs a lot: measured under load 3-7 on 2 cores, the sft tests took
    ~4 min with torch's 2 threads and ~50 s with 1.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
