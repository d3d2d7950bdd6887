"""requirements/llama_cpp.py, `make setup`'s llama-cpp-python step: the converter taken from the sdist into the
venv (only its parts, replacing an older one whole), the wheel cache reused, and the Makefile's wiring."""

from __future__ import annotations

import io
import runpy
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = runpy.run_path(str(REPO / "requirements" / "llama_cpp.py"), run_name="llama_cpp_setup")


def fake_sdist(path: Path, version: str = "9.9.9") -> Path:
    """An sdist laid out as llama-cpp-python's: vendor/llama.cpp with the converter and much else."""
    top = f"llama_cpp_python-{version}/vendor/llama.cpp"
    files = {f"{top}/convert_hf_to_gguf.py": "print('convert')\n", f"{top}/conversion/__init__.py": "",
             f"{top}/conversion/llama.py": "", f"{top}/gguf-py/gguf/__init__.py": "", f"{top}/LICENSE": "MIT\n",
             f"{top}/ggml/src/ggml.c": "int x;\n", f"{top}/convert_lora_to_gguf.py": "",
             f"llama_cpp_python-{version}/pyproject.toml": ""}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_converter_alone_is_extracted_and_replaces_an_older_one(tmp_path):
    venv = tmp_path / "venv"
    old = venv / "share" / "llama.cpp"
    old.mkdir(parents=True)
    (old / "stale.py").write_text("")
    dest = SCRIPT["extract_converter"](fake_sdist(tmp_path / "s.tar.gz"), venv)
    assert dest == old
    found = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert found == ["LICENSE", "conversion/__init__.py", "conversion/llama.py", "convert_hf_to_gguf.py",
                     "gguf-py/gguf/__init__.py"]
    assert sorted(p.name for p in (venv / "share").iterdir()) == ["llama.cpp"], "no staging dir left behind"


def test_a_cached_wheel_is_not_built_again(tmp_path):
    cached = tmp_path / "llama_cpp_python-9.9.9-cp311-cp311-linux_x86_64.whl"
    cached.write_bytes(b"")
    assert SCRIPT["wheel"]("9.9.9", tmp_path, tmp_path / "unused.tar.gz") == cached


def test_setup_builds_the_wheel_once_into_a_cache_and_installs_from_it(tmp_path):
    for profile in ("cpu", "gpu"):
        out = subprocess.run(["make", "-n", "-B", "setup", f"PROFILE={profile}", f"WHEEL_CACHE={tmp_path}"],
                             cwd=REPO, capture_output=True, text=True, timeout=60).stdout
        lock = (REPO / "requirements" / f"{profile}.lock").read_text()
        assert "llama_cpp_python==0.3.36" in lock
        step = next(line for line in out.splitlines() if "requirements/llama_cpp.py" in line)
        assert f'"0.3.36" "{tmp_path}/llama-cpp-python-0.3.36-x86-64-v3"' in step
        wheels = step.split('"')[3]
        install = next(line for line in out.splitlines() if f"--requirement requirements/{profile}.lock" in line)
        assert install.endswith(f'--find-links "{wheels}"')
        assert out.index("requirements/llama_cpp.py") < out.index(f"--requirement requirements/{profile}.lock")
