"""An lm-eval model for a GGUF file: llama.cpp (llama-cpp-python's ``Llama``) in this process.

Why not through llama.cpp's OpenAI-compatible server, as the GPTQ model goes through vLLM's: its
``echo`` + ``logprobs`` answers cannot give the loglikelihoods lm-eval needs (llama-cpp-python
0.3.36, checked on the tiny model against transformers on the same f32 weights):

- without a leading BOS, every prompt token is scored with the logits *at* its own position (the
  token predicted from itself; values far off);
- with one, the first token after BOS has no logprob (the OpenAI-style ``null`` first entry), so the
  first token of every perplexity window is lost, and ``local-completions`` (which indexes from the
  context length) reads the continuation one token off;
- it takes text, not token ids, so lm-eval's tokens would be re-tokenized by the server.

lm-eval's own ``gguf`` model talks to the same server and has no ``loglikelihood_rolling`` (no
perplexity). So the GGUF is scored here, from token ids: one ``Llama.eval`` per request over
lm-eval's exact tokens (the HF tokenizer's, the one the GGUF was converted from; llama.cpp's copy
tokenizes the same, which the quantize stage's tests check), log-softmax of the logits llama.cpp
keeps for every position (``logits_all``). The model, its weights and its kernels are llama.cpp's
own, as served; what differs from serving is only the HTTP in front. Perplexity windows and few-shot
handling are lm-eval's (``TemplateLM``, the rolling windows of its hf model), so the numbers compare
with the hf and vLLM rows token for token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def gguf_lm(gguf_file: Path, tokenizer_dir: Path, max_length: int, n_threads: int | None = None) -> Any:
    """An lm-eval ``TemplateLM`` scoring ``gguf_file`` with llama.cpp, counting tokens with the HF tokenizer in
    ``tokenizer_dir``; contexts are cut to ``max_length`` tokens (the model's window) as the hf model cuts them."""
    import numpy as np
    from llama_cpp import Llama, LogitsProcessorList, MinTokensLogitsProcessor
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from transformers import AutoTokenizer

    class GGUFLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            self.max_length = max_length
            self.llm = Llama(model_path=str(gguf_file), n_ctx=max_length, n_batch=max_length, n_ubatch=max_length,
                             logits_all=True, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:  # as lm-eval's hf model: BOS, else EOS
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
            res = []
            for cache_key, context_enc, continuation_enc in requests:
                # the hf model's cut: the last max_length + 1 tokens, all but the last of them fed
                tokens = (context_enc + continuation_enc)[-(self.max_length + 1):]
                feed, n = tokens[:-1], len(continuation_enc)
                self.llm.reset()
                self.llm.eval(feed)
                logits = np.asarray(self.llm.scores[len(feed) - n:len(feed)], dtype=np.float64)
                top = logits.max(axis=1, keepdims=True)
                logprobs = logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
                targets = np.asarray(tokens[-n:])
                answer = (float(logprobs[np.arange(n), targets].sum()), bool((logits.argmax(axis=1) == targets).all()))
                res.append(answer)
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            return res

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in [req.args for req in requests]:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                total = sum(score for score, _ in self._loglikelihood_tokens([(None, *w) for w in windows]))
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
                out.append(total)
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                until = gen_kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                max_gen = int(gen_kwargs.get("max_gen_toks", 256))
                prompt = self.tok_encode(context)[-max(1, self.max_length - max_gen):]
                self.llm.reset()
                text = self.llm.create_completion(prompt=prompt, max_tokens=max_gen, temperature=0.0,
                                                  stop=until)["choices"][0]["text"]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

        def generate_exactly(self, prompt: str, n: int) -> int:
            """Greedy completion of ``prompt`` generating exactly ``n`` tokens (EOS held back); how many it made."""
            self.llm.reset()
            answer = self.llm.create_completion(
                prompt=self.tok_encode(prompt), max_tokens=n, temperature=0.0,
                logits_processor=LogitsProcessorList([MinTokensLogitsProcessor(n, self.llm.token_eos())]))
            return int(answer["usage"]["completion_tokens"])

        def close(self) -> None:
            self.llm.close()

    return GGUFLM()


def timed_generation(generate: Any, prompt: str, max_tokens: int, requests: int) -> float | None:
    """Tokens per second of ``generate(prompt, max_tokens) -> tokens made``: ``requests`` calls one after
    another, after one untimed warm-up (first-call costs are not generation speed); None for 0 requests."""
    if not requests:
        return None
    generate(prompt, max_tokens)
    started = time.perf_counter()
    tokens = sum(generate(prompt, max_tokens) for _ in range(requests))
    return tokens / (time.perf_counter() - started)

