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
