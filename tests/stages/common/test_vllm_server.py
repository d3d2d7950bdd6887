"""stages/common/vllm_server.py: command lines, dtype choice, log reading, process hygiene.

Fast tests drive the process management with a stand-in server (a few lines of http.server that
spawns a child, like vLLM's engine process, or dies the way vLLM does); the integration tests
start the real vLLM server on a tiny fixture model.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.processes import group_alive
from stages.common.vllm_server import (
    ServerConfigError,
    ServerStartError,
    VllmServer,
    free_port,
    last_exception,
    launcher_argv,
    log_tail,
    resolve_dtype,
    server_argv,
    server_env,
)

PORT_IN_USE_LOG = """\
(APIServer pid=26088) INFO 11-22 08:08:55 [api_utils.py:286] non-default args: {'port': 18300}
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/vllm/entrypoints/launchers/launcher.py", line 348, in create_server_socket
    sock.bind(addr)
OSError: [Errno 98] Address already in use
"""

BAD_MODEL_LOG = """\
  File "/venv/lib/python3.11/site-packages/pydantic/_internal/_dataclasses.py", line 121, in __init__
    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, Invalid repository ID or local directory specified: '/tmp/empty'.
Please verify the following requirements:
1. Provide a valid Hugging Face repository ID.
/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: leaked objects
"""


def _model_dir(tmp_path: Path, config: dict | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


# ---------------------------------------------------------------- pure helpers


def test_launcher_depends_on_the_installed_vllm():
    assert launcher_argv(full_vllm=True, python="py") == ["py", "-m", "vllm.entrypoints.cli.main", "serve"]
    assert launcher_argv(full_vllm=False, python="py") == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert launcher_argv()[0] == sys.executable  # the same interpreter, whatever PATH says


def test_server_argv_places_the_model_for_each_launcher():
    common = dict(host="127.0.0.1", port=8123, served_model_name="tiny", dtype="bfloat16")
    serve = server_argv(Path("/m"), launcher=["py", "-m", "vllm.entrypoints.cli.main", "serve"], **common)
    assert serve[:5] == ["py", "-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    module = server_argv(Path("/m"), launcher=["py", "-m", "vllm.entrypoints.openai.api_server"],
                         max_model_len=256, tensor_parallel_size=2, extra_args=["--seed", "1"], **common)
    assert module[3:5] == ["--model", "/m"]
    flags = dict(zip(module[5::2], module[6::2], strict=True))
    assert flags == {"--host": "127.0.0.1", "--port": "8123", "--served-model-name": "tiny", "--dtype": "bfloat16",
                     "--tensor-parallel-size": "2", "--max-model-len": "256", "--seed": "1"}
    assert "--max-model-len" not in server_argv(Path("/m"), launcher=["x"], **common)


def test_server_argv_data_parallel_only_above_one():
    common = dict(host="127.0.0.1", port=8123, served_model_name="tiny", dtype="bfloat16",
                  launcher=["py", "-m", "vllm.entrypoints.openai.api_server"])
    flags = lambda argv: dict(zip(argv[5::2], argv[6::2], strict=True))
    assert flags(server_argv(Path("/m"), tensor_parallel_size=2, data_parallel_size=4, **common)) == {
        "--host": "127.0.0.1", "--port": "8123", "--served-model-name": "tiny", "--dtype": "bfloat16",
        "--tensor-parallel-size": "2", "--data-parallel-size": "4"}
    # one replica: the command serve has always run, unchanged
    assert server_argv(Path("/m"), data_parallel_size=1, **common) == server_argv(Path("/m"), **common)
    assert "--data-parallel-size" not in server_argv(Path("/m"), **common)


def test_server_env_carries_the_key_only_in_the_environment():
    env = server_env({"PATH": "/bin", "VLLM_API_KEY": "inherited"}, {"VLLM_CPU_KVCACHE_SPACE": "1"}, None)
    assert "VLLM_API_KEY" not in env  # an open server stays open
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["PATH"] == "/bin"
    assert server_env({}, {"HF_HUB_OFFLINE": "0"}, "k")["HF_HUB_OFFLINE"] == "0"  # the caller wins
    assert server_env({}, None, "s3cret")["VLLM_API_KEY"] == "s3cret"
    assert server_env({}, None, None, cpu_build=True)["VLLM_USE_AOT_COMPILE"] == "0"  # its reload is broken
    assert "VLLM_USE_AOT_COMPILE" not in server_env({}, None, None, cpu_build=False)


def test_resolve_dtype(tmp_path):
    plain = _model_dir(tmp_path, {"dtype": "float32"})
    assert resolve_dtype("auto", plain) == "auto"
    assert resolve_dtype("float32", plain) == "float32"
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"dtype": "float32", "quantization_config": {"bits": 4}}))
    assert resolve_dtype("auto", gptq) == "bfloat16"  # 4-bit CPU kernels reject float32
    assert resolve_dtype("float16", gptq) == "float16"
    with pytest.raises(ServerConfigError, match="float32 cannot serve the quantized model"):
        resolve_dtype("float32", gptq)
    (gptq / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": {"bits": 4}}))
    assert resolve_dtype("auto", gptq) == "auto"
    with pytest.raises(ServerConfigError, match="'fp8' is not one of"):
        resolve_dtype("fp8", gptq)


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_last_exception_finds_vllms_reason():
    assert last_exception(PORT_IN_USE_LOG) == "OSError: [Errno 98] Address already in use"
    assert last_exception(BAD_MODEL_LOG) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "Value error, Invalid repository ID or local directory specified: '/tmp/empty'.")
    prefixed = "(APIServer pid=7) ERROR 11-22 08:25:49 [core.py:1] RuntimeError: Engine core initialization failed"
    assert last_exception(f"INFO starting\n{prefixed}\n") == "RuntimeError: Engine core initialization failed"
    assert last_exception("INFO all good\nWARNING careful\n") is None


def test_log_tail_keeps_the_last_lines_without_colours():
    text = "\n".join(f"\x1b[32mline {i}\x1b[0m" for i in range(100)) + "\n\n"
    assert log_tail(text, lines=3) == "line 97\nline 98\nline 99"


def test_constructor_rejects_bad_arguments(tmp_path):
    with pytest.raises(ServerConfigError, match="does not exist"):
        VllmServer(tmp_path / "missing")
    model = _model_dir(tmp_path, {})
    with pytest.raises(ServerConfigError, match="not a TCP port"):
        VllmServer(model, port=70000)
    with pytest.raises(ServerConfigError, match="tensor_parallel_size"):
        VllmServer(model, tensor_parallel_size=0)
    with pytest.raises(ServerConfigError, match="data_parallel_size must be at least 1, got 0"):
        VllmServer(model, data_parallel_size=0)
    argv = VllmServer(model, port=8123, tensor_parallel_size=2, data_parallel_size=4, launcher=["x"]).argv
    assert argv[argv.index("--data-parallel-size") + 1] == "4" and argv[argv.index("--tensor-parallel-size") + 1] == "2"


def test_urls_and_headers(tmp_path):
    server = VllmServer(_model_dir(tmp_path, {}), host="0.0.0.0", port=8123, api_key="s3cret-key")
    assert server.base_url == "http://127.0.0.1:8123/v1"  # a wildcard bind is reached through loopback
    assert server.headers == {"Authorization": "Bearer s3cret-key"}
    assert server.served_model_name == "model"
    assert "s3cret-key" not in " ".join(server.argv)  # never on the command line
    assert server.env["VLLM_API_KEY"] == "s3cret-key"
    assert VllmServer(_model_dir(tmp_path / "b", {}), port=1).headers == {}


# ---------------------------------------------------------------- process hygiene with a stand-in server

STAND_IN = textwrap.dedent("""\
    # Behaves like vLLM's server as far as VllmServer can tell: a child process in its group
    # (the engine), /health once ready, and a traceback on failure.
    import argparse, http.server, os, signal, subprocess, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--host"); p.add_argument("--port", type=int)
    args, _ = p.parse_known_args()
    mode = os.environ["STAND_IN_MODE"]
    if mode == "die":
        time.sleep(0.5)
        print("Traceback (most recent call last):\\n  File \\"launcher.py\\", line 348\\n"
              "OSError: [Errno 98] Address already in use", flush=True)
        sys.exit(1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["STAND_IN_PIDS"], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if mode != "hang" else 503)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer((args.host, args.port), Health).serve_forever()
""")


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    model = _model_dir(tmp_path, {})
    pids = tmp_path / "pids"

    def make(mode: str, **kwargs) -> VllmServer:
        env = {"STAND_IN_MODE": mode, "STAND_IN_PIDS": str(pids)}
        return VllmServer(model, launcher=[sys.executable, str(script)], env=env, **kwargs)

    make.pids = pids
    return make


def _port_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (as vLLM does, with SO_REUSEADDR: connections
    of the old one in TIME_WAIT do not count, a listener does)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def test_start_and_stop_leave_nothing_behind(stand_in, tmp_path):
    log_file = tmp_path / "logs" / "server.log"
    with stand_in("ok", log_file=log_file) as server:
        leader, child = map(int, stand_in.pids.read_text().split())
        assert server.is_running() and _alive(child)
        assert server.startup_s is not None and server.startup_s < 60
        port = server.port
    assert not _alive(leader) and not _alive(child)
    assert not group_alive(leader)
    assert _port_free(port)
    assert log_file.read_text().startswith("=====")  # the command line heads the log; the log is kept


def test_stubborn_server_is_killed(stand_in):
    server = stand_in("stubborn", stop_grace_s=1.0)
    with server:
        leader, child = map(int, stand_in.pids.read_text().split())
    assert not _alive(leader) and not _alive(child)


def test_exit_while_starting_fails_fast_with_vllms_message(stand_in):
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        with stand_in("die", startup_timeout_s=300):
            pass
    assert time.monotonic() - t0 < 30  # noticed at exit, not at the 300 s timeout
    err = info.value
    assert err.returncode == 1
    assert "vLLM said: OSError: [Errno 98] Address already in use" in str(err)
    assert "exited with code 1" in str(err)
    assert not group_alive(err.pid)
    assert err.log_file is not None and err.log_file.is_file()  # kept after a failure, even a temporary one
    err.log_file.unlink()


def test_timeout_stops_the_server(stand_in):
    with pytest.raises(ServerStartError, match="was not healthy after 2 s"):
        with stand_in("hang", startup_timeout_s=2):
            pass
    leader, child = map(int, stand_in.pids.read_text().split())
    assert not _alive(leader) and not _alive(child)


def test_own_temporary_log_is_removed_after_a_clean_stop(stand_in):
    with stand_in("ok") as server:
        log_file = server.log_file
        assert log_file is not None and log_file.is_file()
    assert not log_file.exists()


# ---------------------------------------------------------------- the real vLLM server


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.stages.model_fixtures import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("serve_model") / "model", train_steps=40)


@pytest.mark.integration
def test_real_server_bad_model_dir_fails_with_vllms_message(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        with VllmServer(empty, startup_timeout_s=900):
            pass
    assert time.monotonic() - t0 < 600
    assert "Invalid repository ID or local directory" in str(info.value)
    assert not group_alive(info.value.pid)


@pytest.mark.integration
def test_real_server_port_in_use_fails_with_vllms_message(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = VllmServer(tiny_model, port=port, startup_timeout_s=900)
        with pytest.raises(ServerStartError, match=r"Address already in use") as info:
            server.start()
        assert info.value.returncode not in (None, 0)
        assert not server.is_running() and not group_alive(info.value.pid)
