"""An OpenAI-compatible inference server as a child process: started, waited for, stopped without a trace.

The part vLLM's server (stages/common/vllm_server.py) and llama.cpp's (stages/common/llama_server.py)
share. A subclass says what to run (``argv``, ``env``), which URL answers 200 once the model is
loaded (``health_path``) and how it names itself in errors (``label``); :class:`ServerProcess`
does the rest, the same way for both, so the serve and evaluate stages hold either one without
branching::

    with make_the_server(...) as server:            # a VllmServer or a LlamaCppServer
        httpx.post(f"{server.base_url}/completions", headers=server.headers,
                   json={"model": server.served_model_name, "prompt": "Hello"})

Process hygiene, the reason this module exists rather than a bare ``subprocess.Popen``:

- The server gets its own session (process group), so stopping it is one ``killpg`` that also
  reaches its worker processes (vLLM's engine core); SIGTERM first, SIGKILL for whatever is left
  after the grace period. :meth:`ServerProcess.stop` returns only when no process of the group is
  left, so the port is free again (``pipeline.processes.terminate_group``).
- The server gets SIGTERM when the process that started it dies, even by SIGKILL (Linux
  ``PR_SET_PDEATHSIG``, ``pipeline.processes.die_with_parent``). Note: the signal follows the
  *thread* that started the server; enter the context in a thread that lives as long as the
  server (the main thread, normally). Inside a stage, the worker's guard stops it too.
- A server that dies while starting (bad model, port taken, out of memory...) is noticed at the
  next health poll rather than at the timeout, and reported as :class:`ServerStartError` carrying
  the server's own last words (the tail of its log).

An API key travels in the environment (each subclass names the variable its server reads), never
on the command line, where ``ps`` would show it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pipeline.errors import LlmpipeError
from pipeline.processes import die_with_parent, terminate_group

log = logging.getLogger("llmpipe.server")

TAIL_LINES = 30  # lines of the server's log quoted in an error
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last exception line of a Python traceback, possibly behind vLLM's "(APIServer pid=1) ERROR ..." prefix.
_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\)\s+\w+\s+[\d-]+ [\d:]+ \[[^\]]*\]\s+)?"
                             r"((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b.*)$")


class ServerConfigError(LlmpipeError, ValueError):
    """The server cannot be started as asked (missing model, unknown dtype, bad port...)."""


class ServerStartError(LlmpipeError):
    """The server exited or never became healthy; the message quotes the tail of its log."""

    def __init__(self, message: str, log_tail: str = "", returncode: int | None = None,
                 log_file: Path | None = None, pid: int | None = None):
        super().__init__(message)
        self.log_tail = log_tail  # the last lines of the server's log
        self.returncode = returncode  # the server's exit code; None when it was stopped after a timeout
        self.log_file = log_file  # the server's whole log (kept after a failure)
        self.pid = pid  # the server process (the leader of its process group, gone by now)


# ---------------------------------------------------------------- pure helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick); the server binds it moments later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(text: str, lines: int = TAIL_LINES, width: int = 400) -> str:
    """The last ``lines`` non-empty lines of a log, colour codes removed, each cut at ``width`` chars."""
    kept = [_ANSI.sub("", line)[:width] for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def last_exception(text: str, max_lines: int = 8) -> str | None:
    """The last ``SomethingError: message`` of a log (the server's own reason for dying), if any.

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


def check_port(port: int | None) -> None:
    if port is not None and not 0 < port < 65536:
        raise ServerConfigError(f"port {port} is not a TCP port (1-65535)")


# ---------------------------------------------------------------- the server


class ServerProcess:
    """An OpenAI-compatible server over ``model_path``, as a context manager.

    ``__enter__`` starts the server and returns once ``health_path`` answers 200; if the process
    exits first, or ``startup_timeout_s`` passes, it stops what is left and raises
    :class:`ServerStartError` with the tail of the server's log. ``__exit__`` (or :meth:`stop`)
    stops the whole process group and waits until it is gone. ``port=None`` picks a free port;
    ``host`` is the bind address (127.0.0.1 keeps the server private to this machine).
    ``log_file`` receives the server's stdout and stderr (appended); None: a temporary file,
    deleted after a clean stop.

    A subclass sets ``self.argv`` and ``self.env`` in its ``__init__`` (after this one's), and may
    override ``label``, ``engine``, ``health_path`` and :meth:`describe`.
    """

    label = "server"  # how errors and logs name it ("vLLM", "llama.cpp")
    engine = "server"  # the `engine` recorded in endpoint.json and evaluate's results ("vllm", "llama.cpp")
    health_path = "/health"  # answers 200 once the model is loaded

    def __init__(self, model_path: Path | str, *, host: str, port: int | None, api_key: str | None,
                 served_model_name: str, log_file: Path | str | None, startup_timeout_s: float,
                 stop_grace_s: float):
        check_port(port)
        self.model_path = Path(model_path).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host or "0.0.0.0")
        self.api_key = api_key
        self.served_model_name = served_model_name
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self._own_log = log_file is None
        self.log_file = Path(log_file) if log_file is not None else None
        self.startup_s: float | None = None  # seconds from launch to the first healthy answer
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def describe(self) -> dict[str, Any]:
        """What endpoint.json and evaluate's results record of this server beyond its address."""
        return {"engine": self.engine}

    # -- addresses -----------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        # A wildcard bind is reached through loopback from this machine.
        if self.host in ("0.0.0.0", "", "::"):
            return "127.0.0.1"
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (the health URL lives here)."""
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
    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch the server and block until it is healthy (see the class docstring for failures)."""
        if self._proc is not None:
            raise ServerConfigError(f"the {self.label} server for {self.model_path} is already started "
                                    f"(pid {self.pid})")
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix=f"{self.engine.replace('.', '')}-server-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
        self._log.flush()
        log.info("starting %s server on %s for %s (log %s)", self.label, self.root_url, self.model_path,
                 self.log_file)
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
        log.info("%s server ready at %s after %.1f s", self.label, self.base_url, self.startup_s)

    def _wait_healthy(self, t0: float) -> None:
        import httpx

        next_note = 30.0
        with httpx.Client(timeout=5.0, headers=self.headers) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                elapsed = time.monotonic() - t0
                if code is not None:
                    raise self._start_error(f"exited with code {code} after {elapsed:.0f} s", code)
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.root_url}{self.health_path}").status_code == 200:
                        return
                if elapsed > self.startup_timeout_s:
                    raise self._start_error(f"was not healthy after {self.startup_timeout_s:.0f} s "
                                            f"(startup_timeout_s)", None)
                if elapsed > next_note:
                    log.info("waiting for the %s server (%.0f s so far, log %s)", self.label, elapsed, self.log_file)
                    next_note += 30.0
                time.sleep(1.0)

    def _start_error(self, what: str, code: int | None) -> ServerStartError:
        text = self.read_log()
        tail = log_tail(text)
        reason = last_exception(text)
        message = f"{self.label} server for {self.model_path} on port {self.port} {what}"
        if reason:
            message += f"\n{self.label} said: {reason}"
        message += f"\n--- last lines of {self.log_file} ---\n{tail}"
        return ServerStartError(message, log_tail=tail, returncode=code, log_file=self.log_file, pid=self.pid)

    def read_log(self) -> str:
        """Everything the server has written so far (empty before start)."""
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
        # start_new_session: the server leads its own group, with its worker processes.
        terminate_group(proc, self.stop_grace_s, 10.0)  # logs what it had to kill, or could not
        proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_log and not keep_log and self.log_file is not None:
            self.log_file.unlink(missing_ok=True)
        log.info("%s server on port %d stopped", self.label, self.port)


def command_version(dists: Sequence[str]) -> str | None:
    """The version of the first installed distribution of ``dists`` (endpoint.json records it)."""
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
