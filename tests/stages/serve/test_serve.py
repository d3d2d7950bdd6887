"""The serve stage: config, request building, benchmark metrics, foreground serving, end to end on vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import PROJECT, stage_config
from pipeline import config as pipeline_config
from pipeline.errors import ConfigError
from pipeline.processes import group_alive
from stages.common.vllm_server import VllmServer
from stages.serve.stage import (
    BENCH_METRICS,
    ServeConfig,
    ServeError,
    api_key_from_env,
    bench_argv,
    bench_metrics,
    chat_request,
    chat_template_of,
    completion_request,
    draw_prompts,
    make_server,
    serve_until_stopped,
    server_options,
)
from tests.stages.common.test_vllm_server import STAND_IN, _port_free

REPO = Path(__file__).resolve().parents[3]


def _load(*overrides: str, name: str = "tiny", root: Path | None = None):
    extra = [f"run.root={root}"] if root else []
    return pipeline_config.load(PROJECT, REPO / "conf", name, [*overrides, *extra], project_dir=REPO)


def shipped(**changes) -> ServeConfig:
    """The tiny pipeline's serve config (conf/stage/serve/default.yaml) with ``changes``."""
    return replace(stage_config("serve"), **changes)


def bench(**changes):
    return replace(stage_config("serve").bench, **changes)


# ---------------------------------------------------------------- config


def test_shipped_configs_compose():
    tiny = _load().stages["serve"]
    assert tiny.host == "127.0.0.1" and tiny.port is None and tiny.api_key_env is None
    assert tiny.served_model_name == "tiny-llama" and tiny.max_model_len == 256  # from the model group
    assert len(tiny.prompts) >= 2 and tiny.bench.requests > 0
    big = _load("stage/serve=llama-7b", name="llama-7b").stages["serve"]
    assert big.max_model_len == 4096 and big.bench.concurrency > tiny.bench.concurrency
    assert not big.enforce_eager


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match=r"stage\.serve\.bench\.concurrency: must be >= 1, got 0"):
        _load("stage.serve.bench.concurrency=0")
    with pytest.raises(ConfigError, match=r"stage\.serve\.prompts: must hold at least one non-empty prompt"):
        _load("stage.serve.prompts=[]")
    with pytest.raises(ConfigError, match="stage.serve.dtype"):
        _load("stage.serve.dtype=fp8")


def test_bad_formats_are_named():
    with pytest.raises(ConfigError, match=r"stage\.serve\.formats: 'ggml' is not a quantized format; choose from "
                                          r"gptq, gguf, awq or 'all' \(did you mean 'gguf'\?\)"):
        _load("stage.serve.formats=[gptq,ggml]")
    with pytest.raises(ConfigError, match=r"stage\.serve\.formats: repeats a format"):
        _load("stage.serve.formats=[gguf,gguf]")
    with pytest.raises(ConfigError, match=r"stage\.serve\.formats: \['gguf'\] picks formats of the quantize output, "
                                          r"but base_model is 'sft'"):
        _load("stage.serve.formats=[gguf]", "stage.serve.base_model=sft")
    assert _load("stage.serve.formats=gguf").stages["serve"].formats == "gguf"  # one format, unlisted
    assert _load().stages["serve"].formats == "all"


def _quantize_output(root: Path, entries: list[dict]) -> Path:
    """A quantize output dir with a formats manifest (stages/common/quantized.py) and empty stand-in models."""
    (root / "model").mkdir(parents=True)
    (root / "formats" / "gguf").mkdir(parents=True)
    (root / "formats" / "gguf" / "m-Q4_K_M.gguf").write_bytes(b"GGUF")
    (root / "formats" / "manifest.json").write_text(json.dumps({"formats": entries}))
    return root


class _Inputs:
    def __init__(self, root: Path):
        self.root = root

    def input(self, ref: str) -> Path:
        return self.root / {"quantize.model": "model", "quantize.formats": "formats"}[ref]


def test_served_models_follow_formats(tmp_path):
    from stages.serve.stage import served_models

    root = _quantize_output(tmp_path / "q", [
        {"format": "gptq", "path": "model", "bytes": 10},
        {"format": "gguf", "path": "formats/gguf/m-Q4_K_M.gguf", "bytes": 4},
        {"format": "awq", "skipped": "needs a GPU"}])
    served, skipped = served_models(shipped(), _Inputs(root))
    assert [(m.format, m.path.name, m.tokenizer.name) for m in served] == [
        ("gptq", "model", "model"), ("gguf", "m-Q4_K_M.gguf", "model")]  # the GGUF counts tokens with the primary's
    assert skipped == {"awq": "needs a GPU"}  # reported, not an error
    served, _ = served_models(shipped(formats=("gguf",)), _Inputs(root))
    assert [m.format for m in served] == ["gguf"]
    served, skipped = served_models(shipped(formats=("awq", "gptq")), _Inputs(root))
    assert [m.format for m in served] == ["gptq"] and skipped == {"awq": "needs a GPU"}
    with pytest.raises(ServeError, match=r"quantize produced none of them \(\{'awq': 'needs a GPU'\}\)"):
        served_models(shipped(formats=("awq",)), _Inputs(root))
    only_gptq = _quantize_output(tmp_path / "q2", [{"format": "gptq", "path": "model", "bytes": 10}])
    with pytest.raises(ServeError, match=r"stage\.serve\.formats asks for \['gguf'\], but the quantize output has "
                                         r"only \['gptq'\] \(stage\.quantize\.formats\)"):
        served_models(shipped(formats=("gptq", "gguf")), _Inputs(only_gptq))


def test_a_gguf_server_is_llama_cpp_with_the_primary_tokenizer(tmp_path):
    from stages.common.llama_server import LlamaCppServer
    from stages.serve.stage import bench_extra_body, tokenizer_dir

    root = _quantize_output(tmp_path / "q", [{"format": "gptq", "path": "model", "bytes": 10},
                                             {"format": "gguf", "path": "formats/gguf/m-Q4_K_M.gguf", "bytes": 4}])
    gguf = root / "formats" / "gguf" / "m-Q4_K_M.gguf"
    assert tokenizer_dir(gguf) == root / "model" and tokenizer_dir(root / "model") == root / "model"
    with pytest.raises(ServeError, match="no chat template"):
        make_server(shipped(), gguf, tmp_path / "server.log")
    (root / "model" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    server = make_server(shipped(max_model_len=256, gguf=replace(shipped().gguf, n_threads=2)), gguf,
                         tmp_path / "server.log")
    assert isinstance(server, LlamaCppServer) and server.served_model_name == "tiny-llama"
    flags = dict(zip(server.argv[3::2], server.argv[4::2], strict=True))
    assert flags["--n_ctx"] == "256" and flags["--n_threads"] == "2" and flags["--interrupt_requests"] == "false"
    loose = tmp_path / "loose.gguf"
    loose.write_bytes(b"GGUF")
    with pytest.raises(ServeError, match="GGUF file outside a quantize output"):
        make_server(shipped(), loose, tmp_path / "server.log")
    # llama.cpp's server drops ignore_eos: the benchmark holds EOS back with min_tokens instead
    assert bench_extra_body("llama.cpp", bench(max_tokens=7)) == {"min_tokens": 7, "max_tokens": 7}
    assert bench_extra_body("vllm", bench()) is None


def test_execution_only_fields_do_not_change_the_fingerprint(tmp_path):
    from pipeline.plan import make_plan

    def fp(*overrides):
        return make_plan(_load(*overrides, root=tmp_path), PROJECT).stages["serve"].fingerprint

    base = fp()
    assert fp("stage.serve.port=8000", "stage.serve.keep_alive=true", "stage.serve.api_key_env=KEY") == base
    assert fp("stage.serve.bench.requests=8") != base


def test_api_key_from_env():
    assert api_key_from_env(None, {}) is None
    assert api_key_from_env("LLMPIPE_KEY", {"LLMPIPE_KEY": "abc"}) == "abc"
    with pytest.raises(ServeError, match="'LLMPIPE_KEY'.*unset or empty"):
        api_key_from_env("LLMPIPE_KEY", {})


# ---------------------------------------------------------------- pure helpers


def test_chat_template_of(tmp_path):
    assert chat_template_of(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert chat_template_of(tmp_path) == "{{ messages }}"
    (tmp_path / "chat_template.jinja").write_text("{{ jinja }}")
    assert chat_template_of(tmp_path) == "{{ jinja }}"


def test_start_server_refuses_a_model_without_chat_template(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ServeError, match="no chat template"):
        make_server(shipped(), tmp_path, tmp_path / "server.log")
    with pytest.raises(ServeError, match="does not exist"):
        make_server(shipped(), tmp_path / "missing", tmp_path / "server.log")


def test_server_options():
    opts = server_options(shipped(enforce_eager=True, extra_args=("--seed", "1"), cpu_kvcache_space_gib=2,
                                  served_model_name=None), Path("/models/quantized"))
    assert opts["extra_args"] == ("--seed", "1", "--enforce-eager")
    assert opts["served_model_name"] == "quantized"  # null: the model dir's name
    assert opts["env"] == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert server_options(shipped(enforce_eager=True, extra_args=("--enforce-eager",)),
                          Path("/m"))["extra_args"] == ("--enforce-eager",)


def test_draw_prompts_is_deterministic():
    pool = ["a", "b", "c", "d"]
    first = draw_prompts(pool, 50, seed=3)
    assert first == draw_prompts(pool, 50, seed=3)
    assert len(first) == 50 and set(first) <= set(pool) and len(set(first)) > 1
    assert first != draw_prompts(pool, 50, seed=4)


def test_check_requests_are_greedy_and_force_some_text():
    body = completion_request("tiny", "Hello", 16)
    assert body == {"model": "tiny", "prompt": "Hello", "max_tokens": 16, "temperature": 0.0, "min_tokens": 4}
    chat = chat_request("tiny", "Hi", 2)
    assert chat["messages"] == [{"role": "user", "content": "Hi"}] and chat["min_tokens"] == 2


def test_bench_argv():
    argv = bench_argv(base_url="http://127.0.0.1:9/", served_model_name="tiny", tokenizer=Path("/m"),
                      prompts_file=Path("/p.jsonl"), bench=bench(requests=8, concurrency=2, max_tokens=5))
    flags = dict(zip(argv[::2], argv[1::2], strict=False))
    assert flags["--backend"] == "openai" and flags["--endpoint"] == "/v1/completions"
    assert "--ignore-eos" in argv and "--skip-chat-template" in argv
    chat = bench_argv(base_url="u", served_model_name="tiny", tokenizer=Path("/m"), prompts_file=Path("/p"),
                      bench=bench(endpoint="chat"))
    assert chat[chat.index("--backend") + 1] == "openai-chat"
    assert chat[chat.index("--endpoint") + 1] == "/v1/chat/completions"
    for flag, value in (("--num-prompts", "8"), ("--max-concurrency", "2"), ("--custom-output-len", "5"),
                        ("--metric-percentiles", "50,95"), ("--dataset-path", "/p.jsonl")):
        assert argv[argv.index(flag) + 1] == value


def test_bench_metrics_maps_vllms_result():
    result = {theirs: float(i) for i, theirs in enumerate(BENCH_METRICS.values())}
    result["date"] = "20261122"
    metrics = bench_metrics(result)
    assert set(metrics) == set(BENCH_METRICS)
    assert metrics["requests_per_s"] == result["request_throughput"]
    del result["p95_e2el_ms"]
    with pytest.raises(ServeError, match="p95_e2el_ms"):
        bench_metrics(result)


@pytest.mark.integration
def test_bench_argv_is_accepted_by_vllms_parser():
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(bench_argv(base_url="http://127.0.0.1:9", served_model_name="tiny",
                                        tokenizer=Path("/m"), prompts_file=Path("/p.jsonl"), bench=bench()))
    assert args.max_concurrency == 4 and args.num_prompts == 32 and args.ignore_eos
    assert args.percentile_metrics == "ttft,tpot,itl,e2el"


# ---------------------------------------------------------------- foreground


def test_foreground_refuses_a_model_not_built_yet(tmp_path, capsys):
    from llmpipe.cli import main

    code = main(["serve", "--config-name", "tiny", f"run.root={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "quantize.model of config 'tiny'" in err
    assert "is not built yet: run `make pipeline` or `make stage STAGE=quantize` first" in err


@pytest.fixture
def stand_in_server(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    model = tmp_path / "model"
    model.mkdir()
    env = {"STAND_IN_MODE": "ok", "STAND_IN_PIDS": str(tmp_path / "pids")}
    return VllmServer(model, launcher=[sys.executable, str(script)], env=env, stop_grace_s=5)


def test_sigterm_stops_a_foreground_server_cleanly(stand_in_server):
    import logging

    before = signal.getsignal(signal.SIGTERM)
    with stand_in_server as server:
        leader, port = server.pid, server.port
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        serve_until_stopped(server, logging.getLogger("test"))  # returns on SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert not group_alive(leader) and _port_free(port)


def test_a_server_dying_while_serving_is_an_error(stand_in_server):
    import logging

    with stand_in_server as server:
        threading.Timer(0.5, os.kill, (server.pid, signal.SIGKILL)).start()
        with pytest.raises(ServeError, match="exited by itself with code -9"):
            serve_until_stopped(server, logging.getLogger("test"))


# ---------------------------------------------------------------- on the real vLLM server


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.stages.model_fixtures import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("serve_stage") / "model", train_steps=40)


@pytest.fixture(scope="module")
def tiny_formats(tiny_model, tmp_path_factory):
    """A quantize output of the tiny model: "gptq" (the model dir itself: vLLM serves it the same way), a
    GGUF made by llama.cpp's converter (f32: llama.cpp's quantized kernels are the quantize tests' concern),
    and a skipped awq."""
    from tests.stages.quantized_fixtures import build_tiny_gguf, quantize_output

    root = tmp_path_factory.mktemp("serve_formats")
    gguf = build_tiny_gguf(tiny_model, root / "gguf" / "tiny-f32.gguf")
    return quantize_output(root / "quantize", tiny_model, gguf=gguf, skipped={"awq": "no GPU here"})


@pytest.mark.integration
def test_stage_serves_checks_and_benchmarks_every_format(tiny_formats, tmp_path, monkeypatch):
    """The stage on a quantize output: GPTQ on vLLM, then GGUF on llama.cpp, each started behind the API key,
    checked (completion + chat), load-tested by vLLM's benchmark and stopped; metrics per format, the first
    one's also under the plain names; the skipped awq is reported."""
    import logging

    from pipeline.stage import StageContext
    from stages.serve.stage import run

    monkeypatch.setenv("LLMPIPE_TEST_KEY", "s3cret")
    cfg = shipped(api_key_env="LLMPIPE_TEST_KEY", max_model_len=256,
                  bench=bench(requests=4, concurrency=2, max_tokens=8, warmups=1))
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="serve", fingerprint="test", output_dir=out, log=logging.getLogger("test.serve"),
                       inputs={"quantize.model": tiny_formats / "model", "quantize.formats": tiny_formats / "formats"},
                       metrics_file=out / "metrics.jsonl")
    metrics = run(cfg, ctx)
    assert metrics["formats_served"] == 2 and metrics["formats_skipped"] == 1
    for fmt in ("gptq", "gguf"):
        assert metrics[f"{fmt}.checks_passed"] == 2 and metrics[f"{fmt}.bench_failed"] == 0
        assert metrics[f"{fmt}.bench_completed"] == 4 and metrics[f"{fmt}.output_tokens_per_s"] > 0
        assert 0 < metrics[f"{fmt}.ttft_ms_p50"] <= metrics[f"{fmt}.latency_ms_p50"]
    assert metrics["gptq.bench_output_tokens"] == 4 * 8  # vLLM counts them; EOS ignored
    assert metrics["requests_per_s"] == metrics["gptq.requests_per_s"]  # the first format's, by their old names
    assert metrics["gguf.size_mb"] == (tiny_formats / "formats" / "gguf" / "tiny-f32.gguf").stat().st_size / 1e6

    endpoint = out / "endpoint"
    info = json.loads((endpoint / "endpoint.json").read_text())
    assert info["engine"] == "vllm" and info["format"] == "gptq" and info["skipped"] == {"awq": "no GPU here"}
    gguf = info["formats"]["gguf"]
    assert gguf["engine"] == "llama.cpp" and gguf["model_dir"].endswith("tiny-f32.gguf")
    assert gguf["checks"]["chat"]["ok"] and gguf["benchmark"]["result_file"] == "bench_result.gguf.json"
    assert "s3cret" not in json.dumps(info)  # the key stays in the environment
    assert json.loads((endpoint / "bench_result.gguf.json").read_text())["completed"] == 4
    log = (endpoint / "server.log").read_text()
    assert "vllm.entrypoints" in log and "stages.common.llama_server" in log  # one section per server


@pytest.mark.integration
def test_foreground_serves_until_sigterm(tiny_formats, tmp_path):
    """`llmpipe serve` on a real server, here llama.cpp's over the quantize output's GGUF: it serves the model
    under its name, requires the API key named by api_key_env, and a SIGTERM stops every process of it
    and frees the port. (vLLM's start, checks and benchmark run in the stage test above.)"""
    import httpx

    env = {**os.environ, "LLMPIPE_TEST_KEY": "s3cret"}
    gguf = tiny_formats / "formats" / "gguf" / "tiny-f32.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "llmpipe", "serve", "--model-dir", str(gguf),
                             f"run.root={tmp_path}", "stage.serve.api_key_env=LLMPIPE_TEST_KEY"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    lines: list[str] = []
    try:
        base_url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "base url:" in line:
                base_url = line.split("base url:")[1].strip()
            if "Ctrl-C stops it" in line:
                break
        assert base_url, "".join(lines[-30:])
        key = {"Authorization": "Bearer s3cret"}
        models = httpx.get(f"{base_url}/models", headers=key, timeout=60).json()
        assert [m["id"] for m in models["data"]] == ["tiny-llama"]
        body = {"model": "tiny-llama", "prompt": "The server", "max_tokens": 4, "min_tokens": 4}
        assert httpx.post(f"{base_url}/completions", json=body, timeout=60).status_code == 401  # key required
        answer = httpx.post(f"{base_url}/completions", json=body, headers=key, timeout=120).json()
        assert answer["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
        assert proc.returncode == 0, "".join(lines[-30:])
        assert "stopping the llama.cpp server (SIGTERM)" in rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not group_alive(proc.pid)
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    assert _port_free(port)


def test_foreground_finds_the_committed_quantize_output(tmp_path):
    from pipeline.plan import make_plan

    plan = make_plan(_load(root=tmp_path), PROJECT)
    fp = plan.stages["quantize"].fingerprint
    final = plan.store.final_dir("quantize", fp)
    (final / "model").mkdir(parents=True)
    (final / "_SUCCESS").write_text("1\n")
    assert plan.committed("quantize.model") == final / "model"
