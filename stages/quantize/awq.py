"""quantize's AWQ format: activation-aware weight quantization with gptqmodel.

Why gptqmodel and not llmcompressor: llmcompressor 0.14 (the registry's newest) pins
``compressed-tensors==0.19.0`` and ``transformers<=5.17``, while vLLM 0.32 (CPU and CUDA builds) pins
``compressed-tensors==0.17.0`` and the lock has transformers 5.19: it cannot join either environment.
gptqmodel, already pinned for GPTQ, implements AWQ (``AWQConfig``: scale search on the calibration
activations, then 4-bit packing in the AutoAWQ GEMM layout, ``quant_method: awq``), runs it on CPU
with its portable torch kernel (``BACKEND.AWQ_TORCH``) and on CUDA with its AWQ GEMM kernels, and
transformers loads the result through its gptqmodel integration. So the awq format is never skipped
for want of a GPU.

The calibration samples are GPTQ's (``stage.quantize.calibration``); gptqmodel runs in the same work
dir and with the same CPU worker count as GPTQ (stage.py ``gptq_environment``). No layer checkpoint:
gptqmodel's resumable store is GPTQ's; an interrupted AWQ starts over (the finished model dir of an
earlier attempt is reused).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from stages.quantize.config import AwqSettings, Calibration, QuantizeConfig, QuantizeError, gptq_environment


def awq_config(settings: AwqSettings) -> Any:
    from gptqmodel import AWQConfig

    return AWQConfig(bits=settings.bits, group_size=settings.group_size, sym=settings.sym, offload_to_disk=False)


def run_awq(src: Path, dest: Path, cal: Calibration, cfg: QuantizeConfig, work: Path) -> float:
    """Quantize ``src`` into ``dest`` with gptqmodel's AWQ; return the seconds it took."""
    import torch

    started = time.time()
    with gptq_environment(work, cfg.cpu_workers):
        from gptqmodel import BACKEND, GPTQModel

        # AUTO picks the CUDA-only AWQ GEMM kernel for the packing check; on CPU the torch kernel.
        backend = BACKEND.AUTO if torch.cuda.is_available() else BACKEND.AWQ_TORCH
        model = GPTQModel.load(str(src), awq_config(cfg.awq))
        model.quantize(cal.samples, backend=backend, batch_size=cfg.calibration.batch_size,
                       calibration_data_min_length=1)
        model.save(str(dest))
        del model
        gc.collect()
    return time.time() - started


def check_output(dest: Path, settings: AwqSettings) -> None:
    """Fail unless ``dest`` declares the AWQ quantization asked for."""
    qc = json.loads((dest / "config.json").read_text()).get("quantization_config") or {}
    if (qc.get("quant_method"), qc.get("bits"), qc.get("group_size"), qc.get("zero_point")) != (
            "awq", settings.bits, settings.group_size, not settings.sym):
        raise QuantizeError(f"{dest / 'config.json'}: quantization_config {qc} does not record AWQ with "
                            f"bits={settings.bits}, group_size={settings.group_size}, sym={settings.sym}")
