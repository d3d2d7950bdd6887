"""A Slurm run refuses, before it submits anything, GPU stages whose jobs would run a CPU-only torch
(pipeline/executors/interpreter.py), through the real runner and CLI on the toy SHARDED project.

No cluster: ``sbatch`` on PATH is a script that records its call and fails, so a run that passes the check
ends in the runner's own "sbatch failed" error, with the call recorded; a refused run never calls it. The
interpreters are scripts too, printing a torch version and recording that they were asked, except in the
test of the real environment's interpreter.
"""

import importlib.metadata
import logging
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.executors.interpreter import CpuOnlyInterpreter, Probe
from pipeline.executors.slurm_queue import SlurmError
from pipeline.runner import Runner
from pipeline.tracking import NullTracker
from tests.pipeline.toy import SHARDED, SHARDED_YAML, load_sharded

GPUS = "+cluster.slurm.gpus_per_node=1"


@pytest.fixture
def sbatch(tmp_path, monkeypatch):
    """A failing ``sbatch`` first on PATH; returns the file where its calls are recorded."""
    calls = tmp_path / "sbatch-calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "sbatch: error: no cluster here" >&2\nexit 1\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return calls


def fake_python(tmp_path: Path, torch: str) -> tuple[Path, Path]:
    """An interpreter with torch ``torch`` ("" for none); returns it and the file recording each time it is asked."""
    asked = tmp_path / f"asked-{torch or 'none'}"
    python = tmp_path / f"python-{torch or 'none'}"
    python.write_text(f"#!/bin/sh\necho asked >> {asked}\necho '{torch}'\n")
    python.chmod(0o755)
    return python, asked


def run_slurm(tmp_path: Path, *overrides: str):
    cfg = load_sharded(tmp_path, "cluster.executor=slurm", "+cluster.slurm.array_tasks=1", *overrides)
    return cfg, Runner(cfg, SHARDED, tracker=NullTracker()).run()


def submitted_nothing(cfg, sbatch: Path) -> bool:
    return not sbatch.exists() and not any((cfg.root / s).exists() for s in ("parts", "shout", "tally"))


@pytest.mark.parametrize("torch", ["2.13.0+cpu", ""])
def test_gpu_stages_on_a_cpu_only_interpreter_are_refused_before_any_submission(tmp_path, sbatch, torch):
    python, asked = fake_python(tmp_path, torch)
    cfg = load_sharded(tmp_path, "cluster.executor=slurm", GPUS, f"+cluster.slurm.python={python}")
    with pytest.raises(CpuOnlyInterpreter) as err:
        Runner(cfg, SHARDED, tracker=NullTracker()).run()
    message = str(err.value)
    assert f"GPU stages parts, shout, tally (gpus_per_node > 0) would run in jobs whose interpreter, {python} " \
           f"(cluster.slurm.python), {f'has torch {torch}, a CPU-only build' if torch else 'has no torch'}" in message
    assert "cluster.slurm.python=/path/to/gpu/venv/bin/python (a venv built with `make setup PROFILE=gpu`)" in message
    assert "cluster.slurm.container_image=<an image with a CUDA torch>" in message
    assert submitted_nothing(cfg, sbatch)
    assert asked.read_text() == "asked\n"  # once for the three stages


@pytest.mark.parametrize("torch", ["2.13.0", "2.13.0+cu126"])
def test_a_cuda_torch_is_accepted_and_the_run_goes_on_to_submit(tmp_path, sbatch, torch):
    python, asked = fake_python(tmp_path, torch)
    with pytest.raises(SlurmError, match="stage 'parts': sbatch failed"):
        run_slurm(tmp_path, GPUS, f"+cluster.slurm.python={python}")
    assert asked.exists() and len(sbatch.read_text().splitlines()) == 1


def test_stages_without_gpus_are_not_checked(tmp_path, sbatch):
    python, asked = fake_python(tmp_path, "2.13.0+cpu")
    with pytest.raises(SlurmError, match="sbatch failed"):
        run_slurm(tmp_path, f"+cluster.slurm.python={python}")  # cluster.slurm.gpus_per_node: 0
    assert not asked.exists() and sbatch.exists()
    # one stage asks for GPUs: only it is named
    with pytest.raises(CpuOnlyInterpreter, match=r"GPU stage tally \(gpus_per_node > 0\)"):
        run_slurm(tmp_path / "one", f"+cluster.slurm.python={python}", "+cluster.slurm.stages.tally.gpus_per_node=2")


def test_stages_in_a_container_image_are_not_checked(tmp_path, sbatch, caplog):
    python, asked = fake_python(tmp_path, "2.13.0+cpu")
    caplog.set_level(logging.INFO, logger="llmpipe.slurm")
    with pytest.raises(SlurmError, match="sbatch failed"):
        run_slurm(tmp_path, GPUS, f"+cluster.slurm.python={python}", "+cluster.slurm.container_image=/img/gpu.sqsh")
    assert not asked.exists()
    assert "tally: its interpreter is inside the container image /img/gpu.sqsh; its torch is not checked" in caplog.text
    # an image for one stage: the others are still checked
    with pytest.raises(CpuOnlyInterpreter, match=r"GPU stages parts, shout \(gpus_per_node"):
        run_slurm(tmp_path / "one", GPUS, f"+cluster.slurm.python={python}",
                  "+cluster.slurm.stages.tally.container_image=/img/gpu.sqsh")


@pytest.mark.parametrize(("python", "said"), [
    ("/nowhere/bin/python", "cannot ask /nowhere/bin/python which torch it has here"),
    ("'apptainer exec /img/gpu.sif python'", "is a command, not an interpreter"),
])
def test_an_interpreter_that_cannot_be_asked_here_is_let_through_with_a_word(tmp_path, sbatch, caplog, python, said):
    caplog.set_level(logging.INFO, logger="llmpipe.slurm")
    with pytest.raises(SlurmError, match="sbatch failed"):
        run_slurm(tmp_path, GPUS, f"+cluster.slurm.python={python}")
    assert said in caplog.text


def test_the_orchestrators_own_interpreter_when_cluster_slurm_python_is_null(tmp_path, sbatch):
    """The real environment's interpreter, asked for real: this CPU venv's torch is 2.13.0+cpu (refused); in a
    GPU venv (make setup PROFILE=gpu) the same run goes on to submit."""
    torch = importlib.metadata.version("torch")
    cfg = load_sharded(tmp_path, "cluster.executor=slurm", GPUS)
    assert cfg.cluster.slurm.python is None
    if torch.endswith("+cpu"):
        with pytest.raises(CpuOnlyInterpreter) as err:
            Runner(cfg, SHARDED, tracker=NullTracker()).run()
        assert (f"interpreter, {sys.executable} (cluster.slurm.python is null: the orchestrator's own), has torch "
                f"{torch}, a CPU-only build") in str(err.value)
        assert submitted_nothing(cfg, sbatch)
    else:
        with pytest.raises(SlurmError, match="sbatch failed"):
            Runner(cfg, SHARDED, tracker=NullTracker()).run()


def test_local_runs_are_not_checked(tmp_path):
    python, asked = fake_python(tmp_path, "2.13.0+cpu")
    cfg = load_sharded(tmp_path, "run.only=[parts]", GPUS, f"+cluster.slurm.python={python}")
    assert cfg.cluster.executor == "local"
    assert Runner(cfg, SHARDED, tracker=NullTracker()).run().ok
    assert not asked.exists()


def test_llmpipe_run_reports_the_refusal_as_a_config_error(tmp_path, sbatch, capsys, monkeypatch):
    python, _ = fake_python(tmp_path, "2.13.0+cpu")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "sharded.yaml").write_text(SHARDED_YAML)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "-c", "sharded", "cluster.executor=slurm", GPUS, f"+cluster.slurm.python={python}"],
              project_path=SHARDED.import_path, default_config_dir=conf)
    assert rc == 2
    assert "llmpipe: error: GPU stages parts, shout, tally (gpus_per_node > 0)" in capsys.readouterr().err
    assert not sbatch.exists()


@pytest.mark.parametrize(("probe", "cpu_only"), [
    (Probe("p", "2.13.0+cpu"), True), (Probe("p", None), True), (Probe("p", "2.13.0"), False),
    (Probe("p", "2.13.0+cu126"), False), (Probe("p", "2.13.0+rocm6.4"), False), (Probe("p", error="gone"), False),
])
def test_which_torch_builds_are_cpu_only(probe, cpu_only):
    assert probe.cpu_only is cpu_only
