"""serve: serve the quantized model with vLLM's OpenAI-compatible server; check it and load-test it.

What the stage does, in order (``run``):

1. Starts vLLM's server on ``base_model`` (the ``quantize.model`` output by default;
   stages/common/vllm_server.py: its own process
   group, bound to 127.0.0.1 unless ``host`` says otherwise, a free port unless ``port`` is set,
   the API key read from the environment variable named by ``api_key_env``) and waits for
   ``/health``. On CPU ``VLLM_CPU_KVCACHE_SPACE`` is ``cpu_kvcache_space_gib``.
2. Checks that ``/v1/completions`` and ``/v1/chat/completions`` answer with non-empty text for
   the first prompts of ``prompts`` (greedy). Chat requests are rendered by the server with the
   tokenizer's chat template; a model dir without one is refused before anything starts.
3. Load-tests it with vLLM's own serving benchmark (``vllm bench serve``, run in-process through
   its CLI flags): ``bench.requests`` prompts drawn from ``prompts`` with ``bench.seed``,
   ``bench.concurrency`` in flight, each generating exactly ``bench.max_tokens`` tokens (EOS
   ignored) over streaming, so time to first token is measured. Returned as metrics: requests/s,
   output and total tokens/s, TTFT mean/p50/p95, end-to-end latency mean/p50/p95, time per output
   token p50/p95, plus the startup time.
4. Writes the ``endpoint`` artifact: a directory with ``endpoint.json`` (model dir, served name,
   dtype, URL it had, the checks' results, the benchmark figures and settings), ``server.log``
   (vLLM's log), ``bench_prompts.jsonl`` and ``bench_result.json`` (vLLM's full benchmark
   result), and attaches endpoint.json and server.log to the MLflow run.
5. Stops the server, unless ``keep_alive`` (execution-only): then it keeps serving in the
   foreground until Ctrl-C or SIGTERM, and stops it cleanly.

Serving a built model in the foreground without the orchestrator (``make serve``;
:func:`serve_foreground`)::

    llmpipe serve [--config-name tiny] [--bench] [overrides...]   # the quantize output of this config
    llmpipe serve --model-dir PATH [overrides...]                  # any HF model dir

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
from stages.common.models import base_model_hooks, check_model_spec, model_dir, parse_model
from stages.common.vllm_server import VllmServer, log_tail

BASE_STAGES = ("quantize", "align", "sft", "pretrain")  # the stages base_model may name

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

    def __post_init__(self) -> None:
        problems = check_model_spec(self.base_model, BASE_STAGES)
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
               bench: BenchConfig) -> list[str]:
    """Flags of ``vllm bench serve`` for our load test (its documented CLI, parsed by its own parser).

    Streaming requests (TTFT), all issued at once (``--request-rate inf``) and ``concurrency`` in
    flight, greedy, EOS ignored so every request generates ``max_tokens``, percentiles 50 and 95.
    Prompts are sent as they are: the chat endpoint applies the chat template server-side.
    """
    chat = bench.endpoint == "chat"
    return [
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


def bench_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Our metrics from vLLM's benchmark result; a missing key (another vLLM version) is a named error."""
    missing = [key for key in BENCH_METRICS.values() if key not in result]
    if missing:
        raise ServeError(f"vLLM's benchmark result lacks {missing}; it has {sorted(result)}")
    return {ours: float(result[theirs]) for ours, theirs in BENCH_METRICS.items()}


# ---------------------------------------------------------------- talking to the server


def _post(server: VllmServer, path: str, body: Mapping[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    import httpx

    response = httpx.post(f"{server.base_url}{path}", json=dict(body), headers=server.headers, timeout=timeout_s)
    if response.status_code != 200:
        raise ServeError(f"POST {server.base_url}{path} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def run_checks(server: VllmServer, cfg: ServeConfig, log: logging.Logger) -> dict[str, dict[str, Any]]:
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


def run_benchmark(server: VllmServer, cfg: ServeConfig, model_dir: Path, out_dir: Path,
                  log: logging.Logger) -> tuple[dict[str, float], dict[str, Any]]:
    """vLLM's serving benchmark against ``server``; (our metrics, vLLM's full result)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    prompts_file = out_dir / BENCH_PROMPTS
    prompts = draw_prompts(cfg.prompts, cfg.bench.requests, cfg.bench.seed)
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    args = parser.parse_args(bench_argv(base_url=server.root_url, served_model_name=server.served_model_name,
                                        tokenizer=model_dir, prompts_file=prompts_file, bench=cfg.bench))
    log.info("benchmark: %d requests, %d in flight, %d tokens each, /v1/%s", cfg.bench.requests,
             cfg.bench.concurrency, cfg.bench.max_tokens, cfg.bench.endpoint)
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
    (out_dir / BENCH_RESULT).write_text(json.dumps(result, indent=2, default=str))
    metrics = bench_metrics(result)
    if metrics["bench_completed"] == 0:
        raise ServeError(f"every benchmark request failed against {server.base_url} (see {out_dir / BENCH_RESULT} "
                         f"and {server.log_file})")
    if metrics["bench_failed"]:
        log.warning("%d of %d benchmark requests failed", int(metrics["bench_failed"]), cfg.bench.requests)
    return metrics, result


def serve_until_stopped(server: VllmServer, log: logging.Logger) -> None:
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
        raise ServeError(f"the vLLM server at {server.base_url} exited by itself with code {code}:\n"
                         f"{log_tail(server.read_log())}")
    except KeyboardInterrupt as exc:
        log.info("stopping the vLLM server (%s)", exc or "interrupted")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def make_server(cfg: ServeConfig, model_dir: Path, log_file: Path) -> VllmServer:
    """A configured (not yet started) server; refuses a model dir whose tokenizer has no chat template."""
    if not Path(model_dir).is_dir():
        raise ServeError(f"model dir {model_dir} does not exist")
    if chat_template_of(model_dir) is None:
        raise ServeError(f"the tokenizer in {model_dir} has no chat template (chat_template.jinja or "
                         f"tokenizer_config.json's chat_template); the sft stage sets it")
    return VllmServer(model_dir, api_key=api_key_from_env(cfg.api_key_env), log_file=log_file,
                      **server_options(cfg, model_dir))


def endpoint_info(server: VllmServer, cfg: ServeConfig, checks: Mapping[str, Any],
                  bench: Mapping[str, float]) -> dict[str, Any]:
    """The content of endpoint.json."""
    from importlib import metadata

    version = next((metadata.version(d) for d in ("vllm", "vllm-cpu") if _installed(d)), None)
    return {
        "model_dir": str(server.model_dir), "served_model_name": server.served_model_name, "dtype": server.dtype,
        "base_url": server.base_url, "host": server.host, "port": server.port,
        "api_key_env": cfg.api_key_env, "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size, "command": server.argv, "vllm_version": version,
        "startup_s": server.startup_s, "checks": dict(checks),
        "benchmark": {"settings": {"requests": cfg.bench.requests, "concurrency": cfg.bench.concurrency,
                                   "max_tokens": cfg.bench.max_tokens, "endpoint": cfg.bench.endpoint,
                                   "warmups": cfg.bench.warmups, "seed": cfg.bench.seed},
                      "metrics": dict(bench)} if bench else None,
        "server_log": SERVER_LOG,
    }


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- the stage


def served_dir(cfg: ServeConfig, inputs: Any) -> Path:
    """The model dir ``base_model`` names; ``inputs`` is a StageContext or a Plan (anything with ``input``
    or ``committed``: `llmpipe serve` serves a committed output without running the stage)."""
    source = parse_model(cfg.base_model, BASE_STAGES)
    if source.input_ref and not hasattr(inputs, "input"):
        return Path(inputs.committed(source.input_ref))
    return model_dir(source, inputs)


def run(cfg: ServeConfig, ctx: StageContext) -> dict[str, float]:
    model_dir = served_dir(cfg, ctx)
    out = ctx.output("endpoint")
    out.mkdir(parents=True, exist_ok=True)
    server = make_server(cfg, model_dir, out / SERVER_LOG)
    try:
        with server:
            checks = run_checks(server, cfg, ctx.log)
            ctx.log.info("checks passed: completion %r, chat %r", checks["completion"]["text"][:60],
                         checks["chat"]["text"][:60])
            bench: dict[str, float] = {}
            if cfg.bench.requests:
                bench, _ = run_benchmark(server, cfg, model_dir, out, ctx.log)
                ctx.log.info("benchmark: %.2f req/s, %.1f output tok/s, TTFT p50 %.0f ms, latency p50/p95 %.0f/%.0f ms",
                             bench["requests_per_s"], bench["output_tokens_per_s"], bench["ttft_ms_p50"],
                             bench["latency_ms_p50"], bench["latency_ms_p95"])
            (out / ENDPOINT_FILE).write_text(json.dumps(endpoint_info(server, cfg, checks, bench), indent=2))
            if cfg.keep_alive:
                serve_until_stopped(server, ctx.log)
    finally:
        for name in (ENDPOINT_FILE, SERVER_LOG):
            if (out / name).is_file():
                ctx.log_artifact(out / name)
    assert server.startup_s is not None
    return {"startup_s": server.startup_s, "checks_passed": float(len(checks)),
            "check_completion_s": checks["completion"]["seconds"], "check_chat_s": checks["chat"]["seconds"],
            **bench}


STAGE = Stage(
    name="serve",
    config=ServeConfig,
    run=run,
    inputs=("quantize.model", "align.model", "sft.model", "pretrain.model"),
    **base_model_hooks(BASE_STAGES),
    outputs=("endpoint",),
    unhashed=frozenset(["host", "port", "api_key_env", "startup_timeout_s", "keep_alive"]),
    description="Serve with vLLM's OpenAI-compatible server; check and load-test it.",
)


# ---------------------------------------------------------------- foreground (`llmpipe serve`)


def serve_foreground(cfg: ServeConfig, model_dir: Path, log_file: Path, bench: bool, log: logging.Logger) -> None:
    """Start the server, check it (and benchmark it if asked), print how to reach it, serve until stopped."""
    server = make_server(cfg, model_dir, log_file)
    with server:
        checks = run_checks(server, cfg, log)
        if bench and cfg.bench.requests:
            metrics, _ = run_benchmark(server, cfg, model_dir, log_file.parent, log)
            print(json.dumps(metrics, indent=2))
        auth = f' -H "Authorization: Bearer ${cfg.api_key_env}"' if cfg.api_key_env else ""
        print(f"\nvLLM is serving {model_dir}\n  model name: {server.served_model_name}\n  base url:   "
              f"{server.base_url}\n  log:        {log_file}\n  chat check: {checks['chat']['text'][:80]!r}\n"
              f"  try: curl {server.base_url}/completions{auth} -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{server.served_model_name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
              f"Ctrl-C stops it.\n", flush=True)
        serve_until_stopped(server, log)
