"""serve: serve each quantized format with an OpenAI-compatible server; check it and load-test it.

Which models (:func:`served_models`): with ``base_model: quantize`` (the default), the formats the
quantize stage produced (``quantize.formats``: its manifest, stages/common/quantized.py) that
``formats`` picks: ``all`` (every produced one, the primary first) or a list such as ``[gguf]``. A
format the quantize stage was not asked for is an error before any server starts; one it skipped
(e.g. AWQ without a GPU) is logged and listed in endpoint.json, not an error. Any other
``base_model`` (align, sft, pretrain, a model dir, a hub model) is served alone, on vLLM.

Which server: a model dir (GPTQ, AWQ, an unquantized model) runs on vLLM's server
(stages/common/vllm_server.py); a GGUF file on llama.cpp's (llama-cpp-python's server,
stages/common/llama_server.py; ``gguf.n_threads``, ``gguf.extra_args``). Both are the same
:class:`~stages.common.server_process.ServerProcess` and get the same checks and the same load test.

What the stage does for each model, one after the other (``run``):

1. Starts the server (its own process group, bound to 127.0.0.1 unless ``host`` says otherwise, a
   free port unless ``port`` is set, the API key read from the environment variable named by
   ``api_key_env``) and waits until it answers. On CPU vLLM's ``VLLM_CPU_KVCACHE_SPACE`` is
   ``cpu_kvcache_space_gib``.
2. Checks that ``/v1/completions`` and ``/v1/chat/completions`` answer with non-empty text for
   the first prompts of ``prompts`` (greedy). Chat requests are rendered by the server with the
   tokenizer's chat template (a GGUF carries its own copy); a model whose tokenizer has none is
   refused before anything starts.
3. Load-tests it with vLLM's own serving benchmark (``vllm bench serve``, run in-process through
   its CLI flags, against either server's OpenAI endpoint): ``bench.requests`` prompts drawn from
   ``prompts`` with ``bench.seed``, ``bench.concurrency`` in flight, each generating exactly
   ``bench.max_tokens`` tokens (EOS ignored; on llama.cpp held back with ``min_tokens``) over
   streaming, so time to first token is measured. llama.cpp's server runs one request at a time:
   the others queue, which its latencies show. Returned as metrics: requests/s, output and total
   tokens/s, TTFT mean/p50/p95, end-to-end latency mean/p50/p95, time per output token p50/p95,
   plus the startup time.
4. Writes the ``endpoint`` artifact: ``endpoint.json`` (the first model's record at the top, as a
   one-model run always had it: model path, served name, engine and its settings, the URL it had,
   the checks' results, the benchmark figures and settings; for quantize formats also ``formats``,
   every format's record, and ``skipped``), ``server.log`` (every server's log, one section each),
   ``bench_prompts.jsonl``, and vLLM's full benchmark result (``bench_result.json`` for the first
   model, ``bench_result.<format>.json`` for the others); attaches endpoint.json and server.log to
   the MLflow run.
5. Stops the server. With ``keep_alive`` (execution-only) the first model is served last and kept
   serving in the foreground until Ctrl-C or SIGTERM, then stopped cleanly.

Metrics: the first model's under their plain names (``requests_per_s``, ``ttft_ms_p50``...), and,
for quantize formats, every format's as ``<format>.<metric>`` (``gguf.output_tokens_per_s``,
``gptq.size_mb``...), plus ``formats_served`` and ``formats_skipped``.

Serving a built model in the foreground without the orchestrator (``make serve``;
:func:`serve_foreground`)::

    llmpipe serve [--config-name tiny] [--bench] [overrides...]   # the quantize output's primary format
    llmpipe serve stage.serve.formats=[gguf]                       # ... or another of its formats
    llmpipe serve --model-dir PATH [overrides...]                  # any HF model dir (or a quantize GGUF)

Which vLLM command starts the server depends on what is installed (full vLLM on GPU: ``vllm
serve``; vllm-cpu: ``python -m vllm.entrypoints.openai.api_server``): see
:func:`stages.common.vllm_server.launcher_argv`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import Invalid, LlmpipeError, Stage, StageContext
from pipeline.files import write_json_atomic
from stages.common.llama_server import LlamaCppServer
from stages.common.models import base_model_hooks, check_model_spec, model_dir, parse_model
from stages.common.quantized import FORMATS, QuantizedFormatsError, manifest_path, read_formats
from stages.common.server_process import ServerProcess, log_tail
from stages.common.vllm_server import VllmServer

BASE_STAGES = ("quantize", "align", "sft", "pretrain")  # the stages base_model may name
QUANTIZE = "quantize"
FORMATS_INPUT = "quantize.formats"
ALL_FORMATS = "all"

ENDPOINT_FILE = "endpoint.json"
SERVER_LOG = "server.log"
BENCH_PROMPTS = "bench_prompts.jsonl"
BENCH_RESULT = "bench_result.json"

# Our metric name -> the key of vLLM's benchmark result it is read from.
BENCH_METRICS = {
    "requests_per_s": "request_throughput",
    "output_tokens_per_s": "output_throughput",
    "total_tokens_per_s": "total_token_throughput",
    "ttft_ms_mean": "mean_ttft_ms",
    "ttft_ms_p50": "p50_ttft_ms",
    "ttft_ms_p95": "p95_ttft_ms",
    "latency_ms_mean": "mean_e2el_ms",
    "latency_ms_p50": "p50_e2el_ms",
    "latency_ms_p95": "p95_e2el_ms",
    "tpot_ms_p50": "p50_tpot_ms",
    "tpot_ms_p95": "p95_tpot_ms",
    "bench_completed": "completed",
    "bench_failed": "failed",
    "bench_output_tokens": "total_output_tokens",
    "bench_duration_s": "duration",
}


class ServeError(LlmpipeError):
    """The model cannot be served as configured, or the served endpoint misbehaves; the message says which."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    requests: int  # requests sent by the load benchmark; 0 skips the benchmark
    concurrency: int  # requests in flight at once (all are issued at once, this many run)
    max_tokens: int  # tokens each request generates (EOS ignored, so every request yields exactly this many)
    endpoint: Literal["completions", "chat"]  # the API the load goes to
    warmups: int  # requests sent (and not measured) before the benchmark
    seed: int  # seeds the draw of prompts (and vLLM's shuffle of them)

    def __post_init__(self) -> None:
        Invalid.check([*((name, f"must be >= 0, got {getattr(self, name)}")
                         for name in ("requests", "warmups") if getattr(self, name) < 0),
                       *((name, f"must be >= 1, got {getattr(self, name)}")
                         for name in ("concurrency", "max_tokens") if getattr(self, name) < 1)])


@dataclass(frozen=True, kw_only=True)
class GgufServeConfig:
    n_threads: int | None  # CPU threads of llama.cpp's server; null: its default (half the cores)
    extra_args: tuple[str, ...]  # more llama-cpp-python server flags, e.g. [--n_gpu_layers, "-1"]

    def __post_init__(self) -> None:
        Invalid.check([("n_threads", f"must be >= 1 or null, got {self.n_threads}")]
                      if self.n_threads is not None and self.n_threads < 1 else [])


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    base_model: str  # the model served: quantize, align, sft or pretrain (their output), a model dir, or org/name[@rev]
    host: str  # bind address; 0.0.0.0 exposes the server beyond this machine
    port: int | None  # TCP port; null: a free port chosen at start
    api_key_env: str | None  # NAME of an environment variable holding the API key; null: no key
    served_model_name: str | None  # the model name clients send; null: the model dir's name
    dtype: Literal["auto", "bfloat16", "float16", "float32"]  # auto: as saved; bf16 for 4-bit saved in fp32
    max_model_len: int | None  # longest prompt + completion in tokens; null: the model's own
    tensor_parallel_size: int  # GPUs one replica is split over
    cpu_kvcache_space_gib: int  # VLLM_CPU_KVCACHE_SPACE: GiB of KV cache on a CPU-only machine
    enforce_eager: bool  # skip torch.compile / CUDA graphs (vllm-cpu 0.32.0's worker then crashed here)
    extra_args: tuple[str, ...]  # more `vllm serve` flags, passed as they are
    startup_timeout_s: float  # give up waiting for /health after this long
    check_max_tokens: int  # tokens generated by the completion and chat checks
    prompts: tuple[str, ...]  # checks use the first two; the benchmark draws from all
    bench: BenchConfig  # the load benchmark
    keep_alive: bool  # after the checks and the benchmark, keep serving until Ctrl-C / SIGTERM
    formats: str | tuple[str, ...]  # base_model quantize: "all" it produced, or a list of gptq, gguf, awq
    gguf: GgufServeConfig  # llama.cpp's server, which serves the gguf format

    def __post_init__(self) -> None:
        problems = check_model_spec(self.base_model, BASE_STAGES)
        problems += format_problems(self.formats, self.base_model)
        if not self.prompts or not all(p.strip() for p in self.prompts):
            problems.append(("prompts", "must hold at least one non-empty prompt"))
        if self.tensor_parallel_size < 1:
            problems.append(("tensor_parallel_size", f"must be >= 1, got {self.tensor_parallel_size}"))
        if self.check_max_tokens < 1:
            problems.append(("check_max_tokens", f"must be >= 1, got {self.check_max_tokens}"))
        if self.port is not None and not 0 < self.port < 65536:
            problems.append(("port", f"{self.port} is not a TCP port (1-65535)"))
        Invalid.check(problems)


# ---------------------------------------------------------------- pure helpers


def format_problems(formats: str | tuple[str, ...], base_model: str) -> list[tuple[str, str]]:
    """What is wrong with ``formats``: "all", or a non-empty list of distinct quantized formats, and a
    list only when ``base_model`` is the quantize stage (no other model has formats to choose from)."""
    import difflib

    if formats == ALL_FORMATS:
        return []
    names = (formats,) if isinstance(formats, str) else formats
    if not names:
        return [("formats", f"must be {ALL_FORMATS!r} or a non-empty list of {', '.join(FORMATS)}")]
    problems = []
    for name in names:
        if name not in FORMATS:
            close = difflib.get_close_matches(name, [*FORMATS, ALL_FORMATS], n=1, cutoff=0.5)
            problems.append(("formats", f"{name!r} is not a quantized format; choose from {', '.join(FORMATS)} "
                                        f"or {ALL_FORMATS!r}{f' (did you mean {close[0]!r}?)' if close else ''}"))
    if len(set(names)) != len(names):
        problems.append(("formats", f"repeats a format: {list(names)}"))
    if base_model != QUANTIZE:
        problems.append(("formats", f"{list(names)} picks formats of the quantize output, but base_model is "
                                    f"{base_model!r}; set base_model: quantize, or formats: {ALL_FORMATS}"))
    return problems


def wanted_formats(formats: str | tuple[str, ...]) -> tuple[str, ...] | None:
    """The formats asked for, in order; None for "all" (every produced one, in the manifest's order)."""
    if formats == ALL_FORMATS:
        return None
    return (formats,) if isinstance(formats, str) else tuple(formats)


def api_key_from_env(name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key held by environment variable ``name`` (None when no key is configured)."""
    if name is None:
        return None
    environ = os.environ if environ is None else environ
    key = environ.get(name, "")
    if not key:
        raise ServeError(f"stage.serve.api_key_env names {name!r}, but that environment variable is unset or "
                         f"empty; export it, or set api_key_env: null to serve without a key")
    return key


def chat_template_of(model_dir: Path) -> str | None:
    """The chat template saved with the tokenizer of ``model_dir`` (chat_template.jinja or
    tokenizer_config.json's ``chat_template``), or None."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = Path(model_dir) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list) and template:  # named templates: [{"name": ..., "template": ...}]
            return str(template[0].get("template", "")) or None
    return None


def server_options(cfg: ServeConfig, model_dir: Path) -> dict[str, Any]:
    """Keyword arguments of :class:`VllmServer` for this config (the API key excluded)."""
    extra = list(cfg.extra_args)
    if cfg.enforce_eager and "--enforce-eager" not in extra:
        extra.append("--enforce-eager")
    return {
        "host": cfg.host, "port": cfg.port, "dtype": cfg.dtype, "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "served_model_name": cfg.served_model_name or Path(model_dir).name,
        "extra_args": tuple(extra), "startup_timeout_s": cfg.startup_timeout_s,
        "env": {"VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_space_gib)},
    }


def draw_prompts(pool: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` prompts drawn from ``pool`` with replacement; the same for the same seed, on any machine."""
    rng = random.Random(seed)
    return [rng.choice(list(pool)) for _ in range(n)]


def completion_request(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Body of a greedy /v1/completions check. ``min_tokens`` (a vLLM extension) holds back EOS and
    stop tokens for a few tokens, so a model that would end at once still shows it can generate."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "min_tokens": min(4, max_tokens)}


def chat_request(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Body of a greedy /v1/chat/completions check: one user turn, rendered by the server's chat template."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "min_tokens": min(4, max_tokens)}


def bench_argv(*, base_url: str, served_model_name: str, tokenizer: Path, prompts_file: Path,
               bench: BenchConfig, extra_body: Mapping[str, Any] | None = None) -> list[str]:
    """Flags of ``vllm bench serve`` for our load test (its documented CLI, parsed by its own parser).

    Streaming requests (TTFT), all issued at once (``--request-rate inf``) and ``concurrency`` in
    flight, greedy, EOS ignored so every request generates ``max_tokens``, percentiles 50 and 95.
    Prompts are sent as they are: the chat endpoint applies the chat template server-side.
    ``extra_body`` goes into every request's JSON (``--extra-body``): llama.cpp's server ignores
    ``ignore_eos``, so it gets ``min_tokens`` instead (:func:`bench_extra_body`).
    """
    chat = bench.endpoint == "chat"
    extra = ["--extra-body", json.dumps(dict(extra_body), sort_keys=True)] if extra_body else []
    return [*extra,
        "--backend", "openai-chat" if chat else "openai",
        "--base-url", base_url,
        "--endpoint", "/v1/chat/completions" if chat else "/v1/completions",
        "--model", served_model_name, "--served-model-name", served_model_name,
        "--tokenizer", str(tokenizer),
        "--dataset-name", "custom", "--dataset-path", str(prompts_file), "--skip-chat-template",
        "--custom-output-len", str(bench.max_tokens), "--ignore-eos", "--temperature", "0",
        "--num-prompts", str(bench.requests), "--max-concurrency", str(bench.concurrency),
        "--request-rate", "inf", "--num-warmups", str(bench.warmups),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95",
        "--seed", str(bench.seed), "--disable-tqdm",
    ]


def bench_extra_body(engine: str, bench: BenchConfig) -> dict[str, Any] | None:
    """Request fields the benchmark adds for ``engine``: none for vLLM (``--ignore-eos`` does it); for
    llama.cpp, whose server drops ``ignore_eos`` (and reads ``max_tokens``, not the chat API's
    ``max_completion_tokens``), ``min_tokens`` = ``max_tokens`` = ``bench.max_tokens``, so that every
    request generates exactly that many tokens there too (EOS held back by its min-tokens processor)."""
    if engine != LlamaCppServer.engine:
        return None
    return {"min_tokens": bench.max_tokens, "max_tokens": bench.max_tokens}


def bench_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Our metrics from vLLM's benchmark result; a missing key (another vLLM version) is a named error."""
    missing = [key for key in BENCH_METRICS.values() if key not in result]
    if missing:
        raise ServeError(f"vLLM's benchmark result lacks {missing}; it has {sorted(result)}")
    return {ours: float(result[theirs]) for ours, theirs in BENCH_METRICS.items()}


# ---------------------------------------------------------------- what is served


@dataclass(frozen=True)
class ServedModel:
    """One model the stage serves: a format of the quantize output, or the one model ``base_model`` names."""

    format: str | None  # gptq | gguf | awq (a quantize output's format); None for any other base_model
    path: Path  # the Hugging Face model dir, or the GGUF file
    tokenizer: Path  # a model dir with its tokenizer (the chat-template check and the benchmark's token counts)
    bytes: int | None = None  # weight bytes on disk (a quantize format's, from its manifest)

    @property
    def label(self) -> str:
        return self.format or "model"


def is_gguf(path: Path) -> bool:
    return Path(path).suffix == ".gguf" and Path(path).is_file()


def tokenizer_dir(path: Path) -> Path:
    """The dir whose tokenizer goes with the model at ``path``: the model dir itself; for a GGUF file
    of a quantize output, the first model dir of that output's formats (the GGUF holds the same
    tokenizer, in llama.cpp's form, which the benchmark client cannot read)."""
    path = Path(path)
    if not is_gguf(path):
        return path
    for ancestor in path.parents[:3]:
        if manifest_path(ancestor).is_file():
            dirs = [f.path for f in read_formats(ancestor) if f.path is not None and f.path.is_dir()]
            if dirs:
                return dirs[0]
    raise ServeError(f"{path} is a GGUF file outside a quantize output: there is no tokenizer dir to check its "
                     f"chat template and count benchmark tokens with; serve it from the pipeline "
                     f"(stage.serve.formats), or serve a model dir")


def served_models(cfg: ServeConfig, inputs: Any) -> tuple[list[ServedModel], dict[str, str]]:
    """The models to serve, in order, and ``{format: why}`` for the formats asked for that quantize skipped.

    ``inputs`` is a StageContext or a Plan (anything with ``input`` or ``committed``: `llmpipe serve`
    serves a committed output without running the stage). ``base_model: quantize`` serves the formats
    of ``formats`` ("all": every produced one, the primary first); a format quantize was not asked for
    is a ServeError before any server starts; one it skipped (no GPU, library missing) is reported,
    not served. Any other base_model is the one model it names."""
    source = parse_model(cfg.base_model, BASE_STAGES)
    committed = bool(source.input_ref) and not hasattr(inputs, "input")
    resolve = (lambda ref: Path(inputs.committed(ref))) if committed else (lambda ref: Path(inputs.input(ref)))
    if cfg.base_model != QUANTIZE:
        path = resolve(source.input_ref) if source.input_ref else model_dir(source, inputs)
        return [ServedModel(None, path, path)], {}
    primary = resolve("quantize.model")  # first: `llmpipe serve` before quantize ran names the model
    try:
        formats = read_formats(resolve(FORMATS_INPUT))
    except QuantizedFormatsError as exc:
        raise ServeError(f"stage.serve.formats: {exc}") from exc
    by_name = {f.format: f for f in formats}
    wanted = wanted_formats(cfg.formats) or tuple(by_name)
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise ServeError(f"stage.serve.formats asks for {missing}, but the quantize output has only {list(by_name)} "
                         f"(stage.quantize.formats); add them there, or drop them here")
    skipped = {name: by_name[name].skipped for name in wanted if by_name[name].skipped}
    served = [ServedModel(name, by_name[name].path, primary if name == "gguf" else by_name[name].path,
                          by_name[name].bytes)
              for name in wanted if not by_name[name].skipped]
    if not served:
        raise ServeError(f"stage.serve.formats {list(wanted)}: quantize produced none of them ({skipped})")
    return served, skipped  # type: ignore[return-value]


def served_dir(cfg: ServeConfig, inputs: Any) -> Path:
    """The model (dir or GGUF file) that `llmpipe serve` and ``keep_alive`` serve: the first of
    :func:`served_models` (the primary format by default; ``stage.serve.formats=[gguf]`` picks another)."""
    return served_models(cfg, inputs)[0][0].path


# ---------------------------------------------------------------- talking to the server


def _post(server: ServerProcess, path: str, body: Mapping[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    import httpx

    response = httpx.post(f"{server.base_url}{path}", json=dict(body), headers=server.headers, timeout=timeout_s)
    if response.status_code != 200:
        raise ServeError(f"POST {server.base_url}{path} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def run_checks(server: ServerProcess, cfg: ServeConfig, log: logging.Logger) -> dict[str, dict[str, Any]]:
    """One greedy completion and one chat turn; raise ServeError unless both come back with text.

    Text means at least one generated character. Whitespace counts: the server and the chat template
    worked even when a barely trained model's likeliest tokens are newlines (the tiny default's are:
    its corpus is documentation pages); that is logged as a warning about the model, not an error."""
    prompts = cfg.prompts
    checks: dict[str, dict[str, Any]] = {}
    for name, path, body, read in (
        ("completion", "/completions", completion_request(server.served_model_name, prompts[0], cfg.check_max_tokens),
         lambda r: r["choices"][0]["text"]),
        ("chat", "/chat/completions",
         chat_request(server.served_model_name, prompts[1 % len(prompts)], cfg.check_max_tokens),
         lambda r: r["choices"][0]["message"]["content"]),
    ):
        t0 = time.perf_counter()
        answer = _post(server, path, body)
        seconds = time.perf_counter() - t0
        text = read(answer) or ""
        if not text:
            raise ServeError(f"the {name} check got no text from {server.base_url}{path} for prompt "
                             f"{body.get('prompt') or body['messages']!r}: {json.dumps(answer)[:500]}")
        if not text.strip():
            log.warning("the %s check got only whitespace (%r): the server works, the model says nothing yet",
                        name, text[:40])
        checks[name] = {"ok": True, "endpoint": f"/v1{path}", "request": body, "text": text, "seconds": seconds,
                        "completion_tokens": answer.get("usage", {}).get("completion_tokens")}
    return checks


def run_benchmark(server: ServerProcess, cfg: ServeConfig, model_dir: Path, out_dir: Path,
                  log: logging.Logger, result_file: str = BENCH_RESULT) -> tuple[dict[str, float], dict[str, Any]]:
    """vLLM's serving benchmark against ``server`` (vLLM's or llama.cpp's: both speak the OpenAI API);
    ``model_dir`` holds the tokenizer it counts tokens with. (our metrics, vLLM's full result)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    prompts_file = out_dir / BENCH_PROMPTS
    prompts = draw_prompts(cfg.prompts, cfg.bench.requests, cfg.bench.seed)
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    args = parser.parse_args(bench_argv(base_url=server.root_url, served_model_name=server.served_model_name,
                                        tokenizer=model_dir, prompts_file=prompts_file, bench=cfg.bench,
                                        extra_body=bench_extra_body(server.engine, cfg.bench)))
    log.info("benchmark of the %s server: %d requests, %d in flight, %d tokens each, /v1/%s", server.label,
             cfg.bench.requests, cfg.bench.concurrency, cfg.bench.max_tokens, cfg.bench.endpoint)
    previous_key = os.environ.get("OPENAI_API_KEY")
    if server.api_key:  # vLLM's benchmark client sends $OPENAI_API_KEY as the bearer token
        os.environ["OPENAI_API_KEY"] = server.api_key
    try:
        result = bench_main(args)
    finally:
        if previous_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = previous_key
    (out_dir / result_file).write_text(json.dumps(result, indent=2, default=str))
    metrics = bench_metrics(result)
    if metrics["bench_completed"] == 0:
        raise ServeError(f"every benchmark request failed against {server.base_url} (see {out_dir / result_file} "
                         f"and {server.log_file})")
    if metrics["bench_failed"]:
        log.warning("%d of %d benchmark requests failed", int(metrics["bench_failed"]), cfg.bench.requests)
    return metrics, result


def serve_until_stopped(server: ServerProcess, log: logging.Logger) -> None:
    """Block while the server runs; Ctrl-C or SIGTERM ends the wait (the caller's ``with`` then stops
    the server cleanly). A server that dies by itself is a ServeError with its log's tail."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(signal.Signals(signum).name)

        previous = signal.signal(signal.SIGTERM, on_term)
    log.info("serving %s at %s until Ctrl-C or SIGTERM", server.served_model_name, server.base_url)
    try:
        code = server.wait()
        raise ServeError(f"the {server.label} server at {server.base_url} exited by itself with code {code}:\n"
                         f"{log_tail(server.read_log())}")
    except KeyboardInterrupt as exc:
        log.info("stopping the %s server (%s)", server.label, exc or "interrupted")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def gguf_server_options(cfg: ServeConfig, gguf_file: Path) -> dict[str, Any]:
    """Keyword arguments of :class:`LlamaCppServer` for this config (the API key excluded): the same
    address, name and context window as vLLM gets (``max_model_len`` null: n_ctx 0, the GGUF's own)."""
    return {"host": cfg.host, "port": cfg.port, "served_model_name": cfg.served_model_name or Path(gguf_file).stem,
            "n_ctx": cfg.max_model_len or 0, "n_threads": cfg.gguf.n_threads, "extra_args": tuple(cfg.gguf.extra_args),
            "startup_timeout_s": cfg.startup_timeout_s}


def make_server(cfg: ServeConfig, model_path: Path, log_file: Path, tokenizer: Path | None = None) -> ServerProcess:
    """A configured (not yet started) server for a model dir (vLLM) or a GGUF file (llama.cpp); refuses a
    model whose tokenizer (``tokenizer``, default :func:`tokenizer_dir`) has no chat template."""
    if not Path(model_path).exists():
        raise ServeError(f"model dir {model_path} does not exist")
    tokenizer = tokenizer or tokenizer_dir(model_path)
    if chat_template_of(tokenizer) is None:
        raise ServeError(f"the tokenizer in {tokenizer} has no chat template (chat_template.jinja or "
                         f"tokenizer_config.json's chat_template); the sft stage sets it")
    key = api_key_from_env(cfg.api_key_env)
    if is_gguf(model_path):
        return LlamaCppServer(model_path, api_key=key, log_file=log_file, **gguf_server_options(cfg, model_path))
    return VllmServer(model_path, api_key=key, log_file=log_file, **server_options(cfg, model_path))


def endpoint_info(server: ServerProcess, cfg: ServeConfig, checks: Mapping[str, Any],
                  bench: Mapping[str, float], bench_file: str = BENCH_RESULT) -> dict[str, Any]:
    """What endpoint.json records of one served model: the server (engine, its settings and version),
    where it was, the checks' answers and the benchmark's figures."""
    return {
        "model_dir": str(server.model_path), "served_model_name": server.served_model_name, **server.describe(),
        "base_url": server.base_url, "host": server.host, "port": server.port,
        "api_key_env": cfg.api_key_env, "max_model_len": cfg.max_model_len, "command": server.argv,
        "startup_s": server.startup_s, "checks": dict(checks),
        "benchmark": {"settings": {"requests": cfg.bench.requests, "concurrency": cfg.bench.concurrency,
                                   "max_tokens": cfg.bench.max_tokens, "endpoint": cfg.bench.endpoint,
                                   "warmups": cfg.bench.warmups, "seed": cfg.bench.seed},
                      "metrics": dict(bench), "result_file": bench_file} if bench else None,
        "server_log": SERVER_LOG,
    }


# ---------------------------------------------------------------- the stage


def serve_one(model: ServedModel, cfg: ServeConfig, out: Path, log: logging.Logger, bench_file: str,
              keep_alive: bool, publish: Any) -> dict[str, float]:
    """Start the server for one model, check it, benchmark it, ``publish(info)`` (endpoint.json is
    written before a kept-alive server blocks), and stop it (or keep serving first). Its metrics."""
    server = make_server(cfg, model.path, out / SERVER_LOG, model.tokenizer)
    with server:
        checks = run_checks(server, cfg, log)
        log.info("%s: checks passed: completion %r, chat %r", model.label, checks["completion"]["text"][:60],
                 checks["chat"]["text"][:60])
        bench: dict[str, float] = {}
        if cfg.bench.requests:
            bench, _ = run_benchmark(server, cfg, model.tokenizer, out, log, result_file=bench_file)
            log.info("%s: %.2f req/s, %.1f output tok/s, TTFT p50 %.0f ms, latency p50/p95 %.0f/%.0f ms",
                     model.label, bench["requests_per_s"], bench["output_tokens_per_s"], bench["ttft_ms_p50"],
                     bench["latency_ms_p50"], bench["latency_ms_p95"])
        publish(endpoint_info(server, cfg, checks, bench, bench_file))
        if keep_alive:
            serve_until_stopped(server, log)
    assert server.startup_s is not None
    return {"startup_s": server.startup_s, "checks_passed": float(len(checks)),
            "check_completion_s": checks["completion"]["seconds"], "check_chat_s": checks["chat"]["seconds"],
            **({"size_mb": model.bytes / 1e6} if model.bytes is not None else {}), **bench}


def run(cfg: ServeConfig, ctx: StageContext) -> dict[str, float]:
    served, skipped = served_models(cfg, ctx)
    for name, why in skipped.items():
        ctx.log.warning("format %s: not served, quantize skipped it (%s)", name, why)
    out = ctx.output("endpoint")
    out.mkdir(parents=True, exist_ok=True)
    first = served[0]
    infos: dict[str, dict[str, Any]] = {}

    def publish(model: ServedModel) -> Any:
        def write(info: dict[str, Any]) -> None:
            infos[model.label] = info
            if first.label not in infos:  # a kept-alive first model is served last (below); it writes the file
                return
            doc = {**infos[first.label], "format": first.format}
            if first.format is not None:
                doc |= {"formats": dict(infos), "skipped": dict(skipped)}
            write_json_atomic(out / ENDPOINT_FILE, doc, indent=2)
        return write

    # keep_alive serves the first model in the foreground: benchmark the others before it
    order = [*served[1:], first] if cfg.keep_alive else served
    metrics: dict[str, float] = {}
    try:
        for model in order:
            bench_file = BENCH_RESULT if model is first else f"bench_result.{model.label}.json"
            own = serve_one(model, cfg, out, ctx.log, bench_file, cfg.keep_alive and model is first, publish(model))
            if model.format is not None:
                metrics.update({f"{model.format}.{key}": value for key, value in own.items()})
            if model is first:
                metrics.update(own)
    finally:
        for name in (ENDPOINT_FILE, SERVER_LOG):
            if (out / name).is_file():
                ctx.log_artifact(out / name)
    if first.format is not None:
        metrics |= {"formats_served": float(len(served)), "formats_skipped": float(len(skipped))}
    return metrics


STAGE = Stage(
    name="serve",
    config=ServeConfig,
    run=run,
    inputs=("quantize.model", FORMATS_INPUT, "align.model", "sft.model", "pretrain.model"),
    **base_model_hooks(BASE_STAGES, inputs=lambda cfg: (FORMATS_INPUT,) if cfg.base_model == QUANTIZE else ()),
    outputs=("endpoint",),
    unhashed=frozenset(["host", "port", "api_key_env", "startup_timeout_s", "keep_alive"]),
    description="Serve each quantized format (vLLM: GPTQ, AWQ; llama.cpp: GGUF); check and load-test it.",
)


# ---------------------------------------------------------------- foreground (`llmpipe serve`)


def serve_foreground(cfg: ServeConfig, model_dir: Path, log_file: Path, bench: bool, log: logging.Logger) -> None:
    """Start the server for ``model_dir`` (a model dir: vLLM; a GGUF file: llama.cpp), check it (and
    benchmark it if asked), print how to reach it, serve until stopped."""
    server = make_server(cfg, model_dir, log_file)
    with server:
        checks = run_checks(server, cfg, log)
        if bench and cfg.bench.requests:
            metrics, _ = run_benchmark(server, cfg, tokenizer_dir(model_dir), log_file.parent, log)
            print(json.dumps(metrics, indent=2))
        auth = f' -H "Authorization: Bearer ${cfg.api_key_env}"' if cfg.api_key_env else ""
        print(f"\n{server.label} is serving {model_dir}\n  model name: {server.served_model_name}\n  base url:   "
              f"{server.base_url}\n  log:        {log_file}\n  chat check: {checks['chat']['text'][:80]!r}\n"
              f"  try: curl {server.base_url}/completions{auth} -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{server.served_model_name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
              f"Ctrl-C stops it.\n", flush=True)
        serve_until_stopped(server, log)
