"""llama-cpp-python for ``make setup``: its wheel built once per machine, and llama.cpp's converter put in the venv.

``python requirements/llama_cpp.py VERSION CACHE_DIR VENV`` (the Makefile passes the lock's pin):

1. The sdist ``llama_cpp_python-VERSION.tar.gz`` in ``CACHE_DIR`` (downloaded once from PyPI).
2. A wheel built from it in ``CACHE_DIR`` unless one is there: building compiles llama.cpp, ~13 CPU-minutes
   (26 minutes on a busy 2-core machine). The Makefile then installs the lock with ``--find-links CACHE_DIR``,
   so every later ``make setup`` on this machine (a fresh clone, CI, a rebuilt venv) installs the wheel in
   seconds. pip's own wheel cache would often do the same, but it is dropped by ``--no-cache-dir``/
   ``PIP_NO_CACHE_DIR`` and pruned by ``pip cache purge``; this one is explicit. Skipped when the venv already
   has the pinned version (the Dockerfiles install the lock before ``make setup``).
   The build (:data:`CMAKE_ARGS`) is portable, not llama.cpp's default ``-march=native``: x86-64-v3 (AVX2,
   FMA, F16C), no AVX-512 and no AMX. A native build on this workplace's VMs (Xeons that advertise AMX under
   a hypervisor that does not enable it) dies with SIGILL on llama.cpp's first AMX ``tilezero`` in a Q4_K
   matrix product; and a portable wheel may be shared by a login node and compute nodes of another CPU.
   Text models only (``LLAVA_BUILD=OFF``: no multimodal ``mtmd`` library, a quarter less to compile).
3. llama.cpp's converter, which llama.cpp does not publish as a package, from the same sdist (the
   llama.cpp commit the binding was built from): ``convert_hf_to_gguf.py``, its ``conversion`` package, its
   ``gguf-py`` and llama.cpp's LICENSE, into ``VENV/share/llama.cpp`` (stages/quantize/gguf.py looks there).
   Replaced whole, atomically, so a venv never holds a half-extracted converter.

Standard library and pip only: it runs before the lock is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PREFIX = "vendor/llama.cpp/"
# llama.cpp's CMake options for the wheel (module docstring): GGML_NATIVE=OFF turns on its x86-64-v3 defaults
# (SSE4.2, AVX, AVX2, BMI2, FMA, F16C) and leaves AVX-512 and AMX off.
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
# What the converter needs from vendor/llama.cpp (files, or folders taken whole).
CONVERTER = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")


def installed_version() -> str | None:
    """llama-cpp-python's version in this interpreter's environment (the venv being set up), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def sdist(version: str, cache: Path) -> Path:
    path = cache / f"llama_cpp_python-{version}.tar.gz"
    if not path.is_file():
        pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}",
            "--dest", str(cache))
    if not path.is_file():
        sys.exit(f"llama_cpp.py: pip download left no {path}")
    return path


def wheel(version: str, cache: Path, source: Path) -> Path:
    found = sorted(cache.glob(f"llama_cpp_python-{version}-*.whl"))
    if found:
        return found[0]
    print(f"building llama-cpp-python {version} (compiles llama.cpp: minutes, once per machine) into {cache}",
          flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(source), "--wheel-dir",
                    str(cache)], check=True, env={**os.environ, "CMAKE_ARGS": CMAKE_ARGS})
    built = sorted(cache.glob(f"llama_cpp_python-{version}-*.whl"))
    if not built:
        sys.exit(f"llama_cpp.py: pip wheel left no llama_cpp_python-{version}-*.whl in {cache}")
    print(f"built {built[0].name} in {time.time() - started:.0f} s", flush=True)
    return built[0]


def extract_converter(source: Path, venv: Path) -> Path:
    dest = venv / "share" / "llama.cpp"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as tar, tempfile.TemporaryDirectory(dir=dest.parent, prefix=".llama.cpp-") as tmp:
        top = tar.getmembers()[0].name.split("/")[0]  # llama_cpp_python-<version>
        base = f"{top}/{PREFIX}"
        members = [m for m in tar.getmembers() if m.name.startswith(base)
                   and m.name[len(base):].split("/")[0] in CONVERTER and (m.isfile() or m.isdir())]
        tar.extractall(tmp, members=members, filter="data")
        staged = Path(tmp) / top / PREFIX
        missing = [name for name in CONVERTER if not (staged / name).exists()]
        if missing:
            sys.exit(f"llama_cpp.py: {source} has no {', '.join(PREFIX + m for m in missing)}")
        old = dest.with_name(".llama.cpp-old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        staged.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.exit("usage: llama_cpp.py VERSION CACHE_DIR VENV")
    version, cache, venv = argv[0], Path(argv[1]).expanduser(), Path(argv[2])
    if not version:
        sys.exit("llama_cpp.py: no llama_cpp_python pin in requirements/*.lock")
    cache.mkdir(parents=True, exist_ok=True)
    source = sdist(version, cache)
    if installed_version() == version:  # e.g. the Dockerfiles' first layer installed the lock already
        print(f"llama-cpp-python {version} is installed in {sys.prefix}: no wheel to build")
    else:
        wheel(version, cache, source)
    print(f"llama.cpp's converter: {extract_converter(source, venv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
