"""stages/common/llama_server.py: llama-cpp-python's server command and environment, and the process
handling it shares with vLLM's (stages/common/server_process.py), on a stand-in server."""

from __future__ import annotations

import sys

import pytest

from pipeline.processes import group_alive
from stages.common.llama_server import LlamaCppServer, llama_server_argv, llama_server_env
from stages.common.server_process import ServerConfigError, ServerStartError
from tests.stages.common.test_vllm_server import STAND_IN, _port_free


def test_argv_keeps_every_position_scored_and_requests_whole(tmp_path):
    argv = llama_server_argv(tmp_path / "m.gguf", host="127.0.0.1", port=8123, served_model_name="tiny", n_ctx=256,
                             extra_args=("--n_gpu_layers", "-1"), launcher=["py", "-m", "llama_cpp.server"])
    assert argv[:3] == ["py", "-m", "llama_cpp.server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags == {"--model": str(tmp_path / "m.gguf"), "--model_alias": "tiny", "--host": "127.0.0.1",
                     "--port": "8123", "--n_ctx": "256", "--logits_all": "true", "--interrupt_requests": "false",
                     "--n_gpu_layers": "-1"}
    threads = llama_server_argv(tmp_path / "m.gguf", host="h", port=1, served_model_name="t", n_ctx=0, n_threads=3)
    assert threads[-4:] == ["--n_threads", "3", "--n_threads_batch", "3"]


def test_env_carries_the_key_and_drops_settings_that_would_override_flags():
    env = llama_server_env({"PATH": "/bin", "PORT": "9999", "host": "0.0.0.0", "API_KEY": "inherited", "MODEL": "x"},
                           {"OMP_NUM_THREADS": "1"}, api_key=None)
    assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert not {"PORT", "host", "API_KEY", "MODEL"} & set(env)  # an inherited key would protect an open server
    assert llama_server_env({}, None, api_key="s3cret")["API_KEY"] == "s3cret"


def test_config_errors_are_named(tmp_path):
    with pytest.raises(ServerConfigError, match="GGUF file .*missing.gguf does not exist"):
        LlamaCppServer(tmp_path / "missing.gguf")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ServerConfigError, match="n_ctx must be at least 1, got -1"):
        LlamaCppServer(gguf, n_ctx=-1)
    with pytest.raises(ServerConfigError, match="not a TCP port"):
        LlamaCppServer(gguf, port=70000)
    server = LlamaCppServer(gguf, api_key="s3cret-key", launcher=["x"])
    assert "s3cret-key" not in " ".join(server.argv) and server.env["API_KEY"] == "s3cret-key"
    assert server.served_model_name == "m" and server.describe()["engine"] == "llama.cpp"


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def make(mode: str, **kwargs) -> LlamaCppServer:
        env = {"STAND_IN_MODE": mode, "STAND_IN_PIDS": str(tmp_path / "pids")}
        return LlamaCppServer(gguf, launcher=[sys.executable, str(script)], env=env, stop_grace_s=5, **kwargs)

    return make


def test_stand_in_starts_answers_on_models_and_stops_whole(stand_in):
    with stand_in("ok") as server:
        leader, port = server.pid, server.port
        assert server.is_running() and server.startup_s is not None
    assert not group_alive(leader) and _port_free(port)


def test_a_failed_start_names_llama_cpp_and_quotes_its_log(stand_in):
    with pytest.raises(ServerStartError) as info:
        with stand_in("die"):
            pass
    assert "llama.cpp server for" in str(info.value) and "exited with code 1" in str(info.value)
    assert "llama.cpp said: OSError: [Errno 98] Address already in use" in str(info.value)
    assert not group_alive(info.value.pid)
    info.value.log_file.unlink()
