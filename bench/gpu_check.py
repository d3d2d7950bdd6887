"""A prepared check of the GPU path, one short run on a machine with NVIDIA GPUs: `make gpu-check`.

The cluster recipe (conf/llama-7b.yaml) has to get past what failed or was never tried on a GPU. This
runs llmpipe's own code for each of those steps on the GPUs it sees, and prints one line per check with
its figures, then a summary; the exit status is the number of failed checks.

1. ``cuda``: torch's CUDA build, the driver, the GPUs, bf16.
2. ``runtime``: sft/align's ``resolve_runtime`` with ``precision: auto`` picks the GPU and bf16 (the
   recipe's sft failed on bf16 in a CPU environment).
3. ``launch``: pretrain/sft/align's ``plan_launch`` with ``accelerator: auto`` starts one rank per GPU
   (``launch.accelerator=cuda but no CUDA device is visible`` before).
4. ``llama-7b layer``: one decoder layer of the recipe's model shape (conf/model/llama-7b.yaml), forward and
   backward in bf16 on the GPU, tokens/s against the same layer in fp32 on this machine's CPU (the
   baseline, measured in the same run).
5. ``lora step``: the training toolkit's LoRA settings (stages/common/training.py ``lora_config``) on a tiny
   Llama, one AdamW step in bf16 autocast on the GPU, the loss finite.
6. ``evaluate gpus``: the llama-7b evaluate recipe's tensor x data parallel GPUs against the visible ones
   (stages/evaluate stops before its first model when they do not fit).

It needs torch, transformers and peft only (not DeepSpeed, TRL or vLLM), reads the YAML with PyYAML, and
downloads nothing: the models are built from their configs with random weights. ``--device cpu`` runs the
same checks on the CPU (the GPU-only ones report ``skip``), which is how the tests run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP = "pass", "FAIL", "skip"


def check_cuda(device: str) -> tuple[str, str]:
    import torch

    if device == "cpu":
        return SKIP, f"--device cpu (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    if not torch.cuda.is_available():
        return FAIL, (f"torch {torch.__version__} sees no GPU (CUDA build {torch.version.cuda}): a CPU torch, or a "
                      f"driver older than this CUDA needs (README: GPU clusters)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return PASS, (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}; "
                  f"bf16 {torch.cuda.is_bf16_supported()}")


def check_runtime(device: str) -> tuple[str, str]:
    from stages.common.training import resolve_runtime

    rt = resolve_runtime("sft", "auto", "sdpa", frozen_base=True)
    want_cuda = device != "cpu"
    ok = rt.cuda == want_cuda and rt.bf16 == want_cuda
    return (PASS if ok else FAIL), f"sft precision auto -> cuda={rt.cuda} bf16={rt.bf16} base dtype {rt.dtype}"


def check_launch(device: str) -> tuple[str, str]:
    import torch

    from stages.common.launch import LaunchConfig, plan_launch

    gpus = torch.cuda.device_count() if device != "cpu" else 0
    cfg = LaunchConfig(accelerator="auto", gpus_per_node=None, cpu_ranks=2, cpu_threads_per_rank=1, hosts=(),
                       use_slurm=True, master_port=None)
    plan = plan_launch(cfg, "stages.pretrain.loop", ["--job", "job.json"], cuda_devices=gpus, environ={},
                       hostfile="hostfile", port=29500)
    want = ("local", gpus) if gpus else ("cpu", 2)
    ok = (plan.mode, plan.world_size) == want
    return (PASS if ok else FAIL), f"{plan.mode}, {plan.world_size} rank(s), accelerator {plan.accelerator}"


def llama_layer(device: str, dtype: Any) -> Any:
    import torch
    import yaml
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    shape = yaml.safe_load((REPO / "conf" / "model" / "llama-7b.yaml").read_text())
    config = LlamaConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                         max_position_embeddings=shape["max_seq_len"], rope_theta=shape["rope_theta"],
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return config, LlamaDecoderLayer(config, 0).to(device=device, dtype=dtype), LlamaRotaryEmbedding(config).to(device)


def layer_tokens_per_s(device: str, dtype: Any, seq: int, batch: int, steps: int) -> float:
    import torch

    config, layer, rope = llama_layer(device, dtype)
    x = torch.randn(batch, seq, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq, device=device).unsqueeze(0)
    embeddings = rope(x, positions)

    def step() -> None:
        out = layer(x, position_embeddings=embeddings, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()

    step()  # warm-up: kernels, allocator
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device != "cpu":
        torch.cuda.synchronize()
    return steps * batch * seq / (time.perf_counter() - start)


def check_layer(device: str) -> tuple[str, str]:
    import torch

    cpu = layer_tokens_per_s("cpu", torch.float32, seq=64, batch=1, steps=1)
    if device == "cpu":
        return SKIP, f"baseline only: one llama-7b layer fwd+bwd, seq 64, fp32 on the CPU: {cpu:,.0f} tokens/s"
    gpu = layer_tokens_per_s(device, torch.bfloat16, seq=4096, batch=2, steps=5)
    memory = torch.cuda.max_memory_allocated() / 2**30
    return PASS, (f"one llama-7b layer fwd+bwd, seq 4096: bf16 on {device} {gpu:,.0f} tokens/s vs fp32 on the CPU "
                  f"(seq 64) {cpu:,.0f} tokens/s (baseline): {gpu / cpu:,.0f}x; peak {memory:.1f} GiB")


def check_lora(device: str) -> tuple[str, str]:
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.common.training import LoraSettings, lora_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256))
    lora = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    model = get_peft_model(model, lora_config(lora)).to(device)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 512, (4, 128), device=device)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device != "cpu" else torch.autocast(
        device_type="cpu", enabled=False)
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optim.step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ok = bool(torch.isfinite(loss))
    return (PASS if ok else FAIL), f"loss {loss.item():.3f} on {device}, {trainable:,} trainable parameters"


def check_evaluate(device: str) -> tuple[str, str]:
    import torch
    import yaml

    recipe = yaml.safe_load((REPO / "conf" / "stage" / "evaluate" / "llama-7b.yaml").read_text())["server"]
    need = recipe["tensor_parallel_size"] * recipe["data_parallel_size"]
    have = torch.cuda.device_count() if device != "cpu" else 0
    if not have:
        return SKIP, f"the recipe's vLLM servers take {need} GPUs; none visible"
    return (PASS if have >= need else FAIL), (f"the recipe's vLLM servers take {need} GPUs, {have} visible"
                                              + ("" if have >= need else ": set stage.evaluate.server."
                                                 "data_parallel_size to fit this node"))


CHECKS: dict[str, Callable[[str], tuple[str, str]]] = {
    "cuda": check_cuda, "runtime": check_runtime, "launch": check_launch, "llama-7b layer": check_layer,
    "lora step": check_lora, "evaluate gpus": check_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the GPU-only checks are skipped)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = {}
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            status, detail = check(args.device)
        except Exception as exc:  # noqa: BLE001 - a check that raises has failed; the others still run
            status, detail = FAIL, f"{type(exc).__name__}: {exc}"
        results[name] = {"status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}
        print(f"{status:4}  {name:14} {detail}  ({results[name]['seconds']} s)", flush=True)
    failed = [n for n, r in results.items() if r["status"] == FAIL]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed or skipped" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
