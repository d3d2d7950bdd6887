"""The chat format of llmpipe models: one Jinja template, set on the tokenizer by the training stages
(sft and align, through stages/common/training.py's ``load_tokenizer``), unless the base model brings
its own chat template (see "Models from elsewhere" below).

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``. It is
rendered with the reserved special tokens of the tokenize stage (one token each)::

    <|endoftext|><|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n

- The leading ``<|endoftext|>`` is the tokenizer's BOS (the tokenize stage makes BOS = EOS): in
  pretraining every document follows an EOS, so a conversation starts where a document would.
- ``add_generation_prompt`` appends ``<|assistant|>\\n``: the prompt a model completes at inference.
- Assistant content *and its* ``<|end|>`` sit between ``{% generation %}`` and ``{% endgeneration %}``,
  so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the tokens the
  model must produce, the stop token included (TRL's ``assistant_only_loss=True`` trains on those
  only; TRL warns when the end-of-turn token falls outside the mask, because the model would then
  never learn to stop).
- Generation stops at ``<|end|>``: :func:`stop_token_ids` is what the model's generation config, a
  vLLM server and the evaluator should use as end-of-sequence ids.

Content that spells one of the markers would be tokenized as the marker itself (a forged turn), so
:func:`message_problem` rejects it; the sft and align stages count and skip such conversations.

Models from elsewhere (a Hugging Face model dir rather than the pretrain stage's output):

- A tokenizer with no chat template gets llmpipe's. The markers it lacks as single special tokens are
  added by :func:`add_chat_markers`, which returns the ids that are new to the vocabulary: the model
  has no trained rows for them, so the training stages grow its embeddings and train those rows
  (stages/common/training.py). A tokenizer that already has them gets nothing added.
- A tokenizer with its own template keeps it (the choice of template is ``load_tokenizer``'s). Its
  replies then end on the template's own end-of-turn token, which :func:`end_of_turn_id` finds by
  rendering a probe conversation, and :func:`stop_token_ids` gives that token and EOS instead of
  ``<|end|>``. :func:`parse_chat` reads llmpipe's format only.

Light module: no torch/transformers import, so stages and ``llmpipe plan`` can import it freely.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.errors import LlmpipeError

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
MARKERS = (SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")
ROLE_MARKER = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# Whitespace control (`{%-`, `-%}`) keeps the template's own layout out of the output: every
# character rendered is spelled out in a string literal, so what the model sees is exactly the
# format documented above.
CHAT_TEMPLATE = (
    "{{- bos_token if bos_token is defined and bos_token else '' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}"
    "{{- message['content'] ~ '<|end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_TURN = re.compile(r"(<\|system\|>|<\|user\|>|<\|assistant\|>)\n(.*?)(?:<\|end\|>\n?|\Z)", re.DOTALL)


class ChatFormatError(LlmpipeError):
    """A tokenizer cannot carry the chat format (a marker is missing or is not a single token)."""


def check_tokenizer(tokenizer: Any) -> None:
    """Raise ChatFormatError unless every marker is one special token of ``tokenizer``.

    A marker split into several tokens would still render, but the model could not stop on
    ``<|end|>`` and the assistant mask would not line up with turn boundaries.
    """
    vocab = tokenizer.get_vocab()
    missing = [m for m in MARKERS if m not in vocab]
    if missing:
        raise ChatFormatError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks the chat markers "
                              f"{missing}; train it with the tokenize stage (which reserves them) or add them "
                              f"as special tokens")
    for marker in MARKERS:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if ids != [vocab[marker]]:
            raise ChatFormatError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} encodes {marker!r} as "
                                  f"{ids}, not as its single token {vocab[marker]}: it must be a special token")


def missing_markers(tokenizer: Any) -> list[str]:
    """The markers that are not single special tokens of ``tokenizer`` (absent, or split into pieces)."""
    vocab = tokenizer.get_vocab()
    return [m for m in MARKERS
            if m not in vocab or tokenizer.encode(m, add_special_tokens=False) != [vocab[m]]]


def add_chat_markers(tokenizer: Any) -> list[int]:
    """Make every marker a single special token of ``tokenizer`` (in place); the ids new to its vocabulary.

    Only the missing markers are added, at the end of the vocabulary. A marker the vocabulary already
    has as an ordinary token is made special under its old id, which is not reported: only a new id
    is a row the model has never trained.
    """
    missing = missing_markers(tokenizer)
    if not missing:
        return []
    known = set(tokenizer.get_vocab().values())
    tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    check_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab[m] for m in missing if vocab[m] not in known)


def apply_chat_format(tokenizer: Any) -> Any:
    """Set llmpipe's chat template on ``tokenizer`` (in place, and returned) after checking its markers."""
    check_tokenizer(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (the ``default`` one of named variants), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    return template or None


def uses_llmpipe_format(tokenizer: Any) -> bool:
    """Whether replies end on ``<|end|>``: the template is llmpipe's, or there is none (then the training
    stages set llmpipe's, so a tokenizer of the tokenize stage counts)."""
    template = chat_template_of(tokenizer)
    return template is None or template == CHAT_TEMPLATE


_PROBE = "llmpipe-probe-"  # distinct content to find in a rendered conversation


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token a template's assistant turn ends on, or None when none is found.

    Renders user, assistant, user and takes the first special token between the assistant's content
    and the next user's (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, EOS for Mistral's).
    """
    from jinja2 import TemplateError

    probe = [{"role": "user", "content": _PROBE + "u"}, {"role": "assistant", "content": _PROBE + "a"},
             {"role": "user", "content": _PROBE + "v"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except (TemplateError, TypeError, ValueError):
        return None
    start, stop = text.find(_PROBE + "a"), text.find(_PROBE + "v")
    if start < 0 or stop < start:
        return None
    between = text[start + len(_PROBE) + 1:stop]
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    special.update(tokenizer.all_special_ids)
    return next((i for i in tokenizer.encode(between, add_special_tokens=False) if i in special), None)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated reply: the end-of-turn token first, then the tokenizer's EOS.

    The end-of-turn token is ``<|end|>`` for llmpipe's format (:func:`uses_llmpipe_format`), else
    the one the tokenizer's own template ends assistant turns with (:func:`end_of_turn_id`), if any.
    """
    if uses_llmpipe_format(tokenizer):
        end = tokenizer.convert_tokens_to_ids(END)
        ids = [end] if end is not None and end != getattr(tokenizer, "unk_token_id", None) else []
    else:
        end = end_of_turn_id(tokenizer)
        ids = [end] if end is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def message_problem(messages: Any) -> str | None:
    """Why ``messages`` cannot be a training conversation, as a short reason; None when it can.

    A usable conversation is a non-empty list of ``{role, content}`` mappings with string content,
    known roles, a system message only first, no marker spelled inside content, and at least one
    assistant turn with non-empty content (there is nothing to learn otherwise).
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        return "not_a_message_list"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            return "malformed_message"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return "unknown_role"
        if role == "system" and i > 0:
            return "system_not_first"
        if not isinstance(content, str):
            return "non_text_content"
        if any(marker in content for marker in MARKERS):
            return "marker_in_content"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no_assistant_reply"
    return None


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Plain ``{role, content}`` dicts (drops extra keys such as ``name`` that the template ignores)."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def parse_chat(text: str) -> list[dict[str, str]]:
    """The messages of a rendered conversation (the inverse of the template).

    BOS and anything before the first marker are ignored; a final turn with no ``<|end|>`` (a reply
    cut off, or the empty turn after a generation prompt) is returned as is. Used by evaluation to
    read a model's reply out of decoded text, and by the tests to check round trips.
    """
    return [{"role": role_of(marker), "content": content} for marker, content in _TURN.findall(text)]


def role_of(marker: str) -> str:
    for role, m in ROLE_MARKER.items():
        if m == marker:
            return role
    raise ValueError(f"{marker!r} is not a role marker")
