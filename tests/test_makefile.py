"""The make targets map to the CLI as the README says."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def make_n(*args):
    # -o: treat the setup stamp as up to date, so only the target's own commands print.
    proc = subprocess.run(["make", "-n", "-o", ".venv/.setup-done", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_pipeline_passes_conf_and_args():
    out = make_n("pipeline", "CONF=llama-7b", "ARGS=stage.sft.train.lr=1e-4")
    assert ".venv/bin/llmpipe run --config-name llama-7b stage.sft.train.lr=1e-4" in out


def test_default_conf_is_tiny():
    assert ".venv/bin/llmpipe run --config-name tiny" in make_n("pipeline")


@pytest.mark.parametrize(("target", "expected"), [
    ("stage", "llmpipe run --config-name tiny \"run.only=[tokenize]\""),
    ("plan", "llmpipe plan --config-name tiny"),
    ("ui", "llmpipe ui --config-name tiny"),
    ("status", "llmpipe status --config-name tiny"),
    ("why", "llmpipe why --config-name tiny tokenize"),
    ("test", "-m pytest"),
    ("bench", "bench/"),
    ("clean", "rm -rf runs"),
])
def test_targets(target, expected):
    assert expected in make_n(target, "STAGE=tokenize")


def test_every_target_depends_on_setup():
    text = (REPO / "Makefile").read_text()
    for target in ("pipeline", "stage", "plan", "why", "status", "ui", "test", "bench"):
        assert f"\n{target}: setup" in text


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()


# ---------------------------------------------------------------- PROFILE: the cpu or gpu environment


def make_setup(tmp_path, *args, nvidia_smi=None, dry=True):
    """``make [-n -B] setup ARGS`` with a fake ``nvidia-smi`` on PATH (exiting ``nvidia_smi``; None: none at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\nexit {nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    flags = ["-n", "-B"] if dry else []  # -B: the recipe as it would run, even where this machine's stamp is there
    return subprocess.run(["make", *flags, "setup", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)})


GPU_INSTALL = ".venv/bin/python -m pip install --no-deps --requirement requirements/gpu.lock"
CPU_INSTALL = (".venv/bin/python -m pip install --constraint requirements/constraints-cpu.txt --no-deps "
               "--requirement requirements/cpu.lock")


@pytest.mark.parametrize(("nvidia_smi", "profile"), [(0, "gpu"), (9, "cpu"), (None, "cpu")])
def test_setup_builds_the_gpu_profile_where_nvidia_smi_answers(tmp_path, nvidia_smi, profile):
    out = make_setup(tmp_path, nvidia_smi=nvidia_smi).stdout
    if profile == "gpu":
        assert GPU_INSTALL in out and "constraints-cpu" not in out and "touch .venv/.setup-done-gpu" in out
        assert "sys.exit(0 if torch.version.cuda else" in out
    else:
        assert CPU_INSTALL in out and "gpu.lock" not in out and "touch .venv/.setup-done\n" in out
        assert "v.endswith('+cpu')" in out


def test_profile_chosen_by_hand_wins_and_a_wrong_one_is_named(tmp_path):
    assert GPU_INSTALL in make_setup(tmp_path, "PROFILE=gpu").stdout
    assert CPU_INSTALL in make_setup(tmp_path, "PROFILE=cpu", nvidia_smi=0).stdout
    bad = make_setup(tmp_path, "PROFILE=cuda")
    assert bad.returncode == 2 and "PROFILE=cuda: the profiles are cpu and gpu" in bad.stderr


@pytest.mark.parametrize(("have", "want"), [("cpu", "gpu"), ("gpu", "cpu")])
def test_setup_never_mixes_the_profiles_in_one_venv(tmp_path, have, want):
    """The real recipe, run: a venv whose torch is the other profile's stops it before any install. The venv's
    python is a script answering the Makefile's question (which build its torch is), and nothing else."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho {have}\n")
    (venv / "bin" / "python").chmod(0o755)
    proc = make_setup(tmp_path, f"PROFILE={want}", f"VENV={venv}", dry=False)
    assert proc.returncode == 2
    assert f"make: {venv} holds the {have} environment: PROFILE={want} would mix the two." in proc.stderr
    assert f"rm -rf {venv}" in proc.stderr and f"make setup PROFILE={want} VENV={venv}-{want}" in proc.stderr
    assert "pip install" not in proc.stdout
    assert not list(venv.glob(".setup-done*"))
    # the same profile goes on (shown with -n: it would install)
    assert "--requirement requirements/" in make_setup(tmp_path, f"PROFILE={have}", f"VENV={venv}").stdout


def test_lock_gpu_resolves_with_the_makefiles_tool_pins():
    out = make_n("lock-gpu")
    assert '.venv/bin/python requirements/lock_gpu.py "pip==26.3" "setuptools==78.1.1" "wheel==0.48.0"' in out
