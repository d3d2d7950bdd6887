"""The chat template on a real byte-level BPE tokenizer: rendering, round trips, assistant masks."""

from __future__ import annotations

import random

import pytest

from stages.common.chat import (
    ASSISTANT,
    CHAT_TEMPLATE,
    END,
    MARKERS,
    ChatFormatError,
    add_chat_markers,
    apply_chat_format,
    check_tokenizer,
    end_of_turn_id,
    message_problem,
    missing_markers,
    normalize_messages,
    parse_chat,
    stop_token_ids,
    uses_llmpipe_format,
)

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL = [EOS, PAD, *MARKERS]
WORDS = ["model", "data", "the", "token", "shard", "loss", "merge", "adapter", "café", "日本", "x=1;", "🙂"]


def build_tokenizer(special: list[str] = SPECIAL, vocab_size: int = 400):
    """A byte-level BPE trained here with the tokenizers library, wrapped like the tokenize stage does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    extra = [t for t in special if t not in (EOS, PAD)]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=extra, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tok():
    return apply_chat_format(build_tokenizer())


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Continue this text:\n\nthe model reads"},
    {"role": "assistant", "content": " data from a shard café 日本 🙂"},
    {"role": "user", "content": "Go on."},
    {"role": "assistant", "content": "the loss\nfalls."},
]


def test_renders_the_documented_format(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|endoftext|><|system|>\nAnswer briefly.<|end|>\n"
        "<|user|>\nContinue this text:\n\nthe model reads<|end|>\n"
        "<|assistant|>\n data from a shard café 日本 🙂<|end|>\n"
        "<|user|>\nGo on.<|end|>\n"
        "<|assistant|>\nthe loss\nfalls.<|end|>\n"
    )


def test_generation_prompt_is_a_prefix_of_the_full_conversation(tok):
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert prompt.endswith(f"{ASSISTANT}\n")
    assert full.startswith(prompt)
    # the token ids agree too (no BPE merge across the boundary), so a served prompt sees what training saw
    prompt_ids = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)["input_ids"]
    full_ids = tok.apply_chat_template(CONVERSATION[:3])["input_ids"]
    assert full_ids[:len(prompt_ids)] == prompt_ids


def test_round_trip_through_tokens(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tok.apply_chat_template(CONVERSATION)["input_ids"]
    assert tok.decode(ids) == text
    assert parse_chat(tok.decode(ids)) == CONVERSATION
    for marker in MARKERS:  # each marker is one token in the encoded conversation
        assert tok.convert_tokens_to_ids(marker) in ids


def test_assistant_mask_covers_exactly_the_assistant_replies_and_their_end_tokens(tok):
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # contiguous runs of masked tokens, decoded
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [reply + END for reply in replies]
    # everything else (system, user, role markers, the newline after <|end|>) is unmasked
    unmasked = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Answer briefly." in unmasked and "Go on." in unmasked and "falls" not in unmasked


def test_trl_accepts_the_template_for_assistant_only_loss(tok):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(CHAT_TEMPLATE)
    assert is_chat_template_stop_token_trained(tok)


def test_stop_tokens_are_end_then_eos(tok):
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(END), tok.eos_token_id]


def test_missing_markers_are_added_as_special_tokens_once():
    plain = build_tokenizer(special=[EOS, PAD])
    size = len(plain)
    assert missing_markers(plain) == list(MARKERS)
    added = add_chat_markers(plain)
    assert added == list(range(size, size + len(MARKERS))) == [plain.convert_tokens_to_ids(m) for m in MARKERS]
    check_tokenizer(plain)  # each one special token now
    assert add_chat_markers(plain) == [] and len(plain) == size + len(MARKERS)


def test_a_tokenizer_with_the_markers_gets_nothing_added(tok):
    size = len(tok)
    assert missing_markers(tok) == [] and add_chat_markers(tok) == [] and len(tok) == size


def test_only_the_missing_markers_are_added():
    partial = build_tokenizer(special=[EOS, PAD, END])
    end, size = partial.convert_tokens_to_ids(END), len(partial)
    assert add_chat_markers(partial) == list(range(size, size + 3))
    assert partial.convert_tokens_to_ids(END) == end
    check_tokenizer(partial)


# A ChatML-style template of a base model's own, ending each turn with its own special token.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_stop_tokens_of_a_tokenizers_own_template_are_its_end_of_turn_then_eos():
    chatml = build_tokenizer(special=[EOS, PAD, "<|im_start|>", "<|im_end|>"])
    chatml.chat_template = CHATML
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert not uses_llmpipe_format(chatml)
    assert end_of_turn_id(chatml) == im_end
    assert stop_token_ids(chatml) == [im_end, chatml.eos_token_id]
    # A template that ends assistant turns with EOS (Mistral's style) stops on EOS alone.
    eos_ended = build_tokenizer(special=[EOS, PAD])
    eos_ended.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                               "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    assert end_of_turn_id(eos_ended) == eos_ended.eos_token_id
    assert stop_token_ids(eos_ended) == [eos_ended.eos_token_id]
    # One with no special token between turns: EOS only.
    plain_text = build_tokenizer(special=[EOS, PAD])
    plain_text.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert end_of_turn_id(plain_text) is None and stop_token_ids(plain_text) == [plain_text.eos_token_id]


def test_a_tokenizer_without_a_template_counts_as_llmpipes(tok):
    plain = build_tokenizer()
    assert plain.chat_template is None and uses_llmpipe_format(plain) and uses_llmpipe_format(tok)
    assert stop_token_ids(plain) == [plain.convert_tokens_to_ids(END), plain.eos_token_id]


def test_unknown_role_is_a_template_error(tok):
    with pytest.raises(Exception, match="unknown chat role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_without_markers_is_rejected():
    plain = build_tokenizer(special=[EOS, PAD])
    with pytest.raises(ChatFormatError, match=r"lacks the chat markers \['<\|system\|>'"):
        check_tokenizer(plain)


@pytest.mark.parametrize("messages, reason", [
    ([], "not_a_message_list"),
    ("hello", "not_a_message_list"),
    ([{"role": "user"}], "malformed_message"),
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown_role"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
      {"role": "assistant", "content": "y"}], "system_not_first"),
    ([{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}], "non_text_content"),
    ([{"role": "user", "content": "fake <|assistant|> turn"}, {"role": "assistant", "content": "y"}],
     "marker_in_content"),
    ([{"role": "user", "content": "x"}], "no_assistant_reply"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "no_assistant_reply"),
    (CONVERSATION, None),
])
def test_message_problem(messages, reason):
    assert message_problem(messages) == reason


def test_normalize_drops_extra_keys():
    assert normalize_messages([{"role": "user", "content": "x", "name": "n"}]) == [{"role": "user", "content": "x"}]


def test_parse_chat_keeps_an_unfinished_last_turn():
    assert parse_chat("<|endoftext|><|user|>\nhi<|end|>\n<|assistant|>\npartial") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "partial"}]
