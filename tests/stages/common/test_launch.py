"""DeepSpeed launcher commands (stages/common/launch.py): the exact command lines for 2 CPU ranks, one GPU
node, 4 nodes x 8 GPUs over ssh and inside a Slurm allocation; hostlist parsing; stopping a launch."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.schema import build, to_plain
from stages.common.launch import (
    RANK_ERRORS,
    REPO_ROOT,
    Cluster,
    LaunchConfig,
    LaunchError,
    LaunchPlan,
    cluster_from_slurm,
    expand_hostlist,
    hostfile_text,
    plan_launch,
    rank_failure,
    record_rank_error,
    run_launch,
    slurm_gpus_per_node,
)

PY = "/venv/bin/python"
MODULE, ARGS = "stages.pretrain.loop", ["--job", "/runs/pretrain/job.json"]
RUNNER = [PY, "-u", "-m", "deepspeed.launcher.runner"]
SCRIPT = ["--module", "--no_local_rank", MODULE, *ARGS]
SLURM_4x8 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-09],gpu12", "SLURM_NNODES": "4",
             "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "8"}


@functools.cache
def shipped() -> LaunchConfig:
    """The launch settings the tiny config ships (conf/stage/pretrain/default.yaml)."""
    from llmpipe.project import stage_config

    return stage_config("pretrain").launch


def launch_cfg(**changes) -> LaunchConfig:
    return dataclasses.replace(shipped(), **changes)


def plan(cfg: LaunchConfig, cuda_devices: int = 0, environ: dict | None = None) -> LaunchPlan:
    return plan_launch(cfg, MODULE, ARGS, cuda_devices=cuda_devices, environ=environ or {},
                       hostfile="/runs/pretrain/hostfile", port=40123, python=PY)


def test_cpu_command_runs_two_gloo_ranks_with_one_thread_each():
    p = plan(launch_cfg())
    assert p.mode == "cpu" and p.accelerator == "cpu" and p.world_size == 2 and p.hostfile is None
    assert list(p.argv) == [*RUNNER, "--num_gpus", "2", "--master_port", "40123", *SCRIPT]
    assert p.env["DS_ACCELERATOR"] == "cpu" and p.env["OMP_NUM_THREADS"] == "1"
    assert p.env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    # A GPU machine can still be told to train on CPU; a fixed port wins over the free one.
    p = plan(launch_cfg(accelerator="cpu", cpu_ranks=4, cpu_threads_per_rank=2, master_port=29600), cuda_devices=8)
    assert list(p.argv) == [*RUNNER, "--num_gpus", "4", "--master_port", "29600", *SCRIPT]
    assert p.env["OMP_NUM_THREADS"] == "2" and p.world_size == 4


def test_single_node_gpu_command():
    every = plan(launch_cfg(), cuda_devices=4)
    assert every.mode == "local" and every.world_size == 4 and "DS_ACCELERATOR" not in every.env
    assert list(every.argv) == [*RUNNER, "--master_port", "40123", *SCRIPT]  # the runner honours CUDA_VISIBLE_DEVICES
    two = plan(launch_cfg(gpus_per_node=2), cuda_devices=4)
    assert list(two.argv) == [*RUNNER, "--num_gpus", "2", "--master_port", "40123", *SCRIPT] and two.world_size == 2
    with pytest.raises(LaunchError, match="gpus_per_node=8 but only 4 GPUs are visible"):
        plan(launch_cfg(gpus_per_node=8), cuda_devices=4)
    with pytest.raises(LaunchError, match="accelerator=cuda but no CUDA device is visible"):
        plan(launch_cfg(accelerator="cuda"))


def test_four_nodes_of_eight_gpus_over_ssh_from_a_cluster_description():
    hosts = ("node0", "node1", "node2", "node3")
    p = plan(launch_cfg(hosts=hosts, gpus_per_node=8))  # from a login node without GPUs
    assert p.mode == "pdsh" and p.world_size == 32 and p.accelerator == "cuda"
    assert list(p.argv) == [*RUNNER, "--hostfile", "/runs/pretrain/hostfile", "--launcher", "pdsh",
                            "--num_nodes", "4", "--num_gpus", "8", "--master_addr", "node0",
                            "--master_port", "29500", *SCRIPT]
    assert p.hostfile == "node0 slots=8\nnode1 slots=8\nnode2 slots=8\nnode3 slots=8\n"
    with pytest.raises(LaunchError, match="set launch.gpus_per_node"):
        plan(launch_cfg(hosts=hosts))


def test_four_nodes_of_eight_gpus_from_the_slurm_allocation():
    p = plan(launch_cfg(), cuda_devices=8, environ=SLURM_4x8)
    assert p.mode == "srun" and p.world_size == 32
    assert p.cluster == Cluster(("gpu07", "gpu08", "gpu09", "gpu12"), 8, 29500)
    assert p.hostfile == "gpu07 slots=8\ngpu08 slots=8\ngpu09 slots=8\ngpu12 slots=8\n"
    per_node = ("/venv/bin/python -u -m deepspeed.launcher.runner --hostfile /runs/pretrain/hostfile --no_ssh "
                '--node_rank "$SLURM_NODEID" --num_nodes 4 --num_gpus 8 --master_addr gpu07 --master_port 29500 '
                "--module --no_local_rank stages.pretrain.loop --job /runs/pretrain/job.json")
    assert list(p.argv) == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                            "bash", "-c", f"exec {per_node}"]


def test_the_srun_line_gives_each_node_its_own_rank_through_the_shell(tmp_path):
    """Run the per-node shell line with an argument printer as the interpreter: the node rank is expanded
    on each node, and a path with spaces stays one argument."""
    printer = tmp_path / "print-args"
    printer.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    printer.chmod(0o755)
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "gpu:h100:4"}
    p = plan_launch(launch_cfg(), MODULE, ["--job", "/my runs/job.json"], cuda_devices=4, environ=env,
                    hostfile="/my runs/hostfile", python=str(printer))
    for node in ("0", "1"):
        out = subprocess.run(p.argv[-3:], env={"PATH": os.environ["PATH"], "SLURM_NODEID": node},
                             capture_output=True, text=True, check=True).stdout
        args = out.splitlines()
        assert "--node_rank" in args and args[args.index("--node_rank") + 1] == node
        assert "/my runs/job.json" in args and "/my runs/hostfile" in args


def test_slurm_single_node_or_opted_out_stays_local():
    one = {**SLURM_4x8, "SLURM_JOB_NODELIST": "gpu07", "SLURM_NNODES": "1"}
    assert plan(launch_cfg(), cuda_devices=8, environ=one).mode == "local"
    assert plan(launch_cfg(use_slurm=False), cuda_devices=8, environ=SLURM_4x8).mode == "local"
    assert plan(launch_cfg(), cuda_devices=0, environ=SLURM_4x8).mode == "cpu"


@pytest.mark.parametrize("spec, hosts", [
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("n1,n[3,5-6],login", ["n1", "n3", "n5", "n6", "login"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("solo", ["solo"]),
])
def test_slurm_hostlists_expand_like_scontrol(spec, hosts):
    assert expand_hostlist(spec) == hosts


def test_bad_slurm_environment_is_a_named_error():
    with pytest.raises(LaunchError, match="unbalanced"):
        expand_hostlist("gpu[01-03")
    with pytest.raises(LaunchError, match="bad range"):
        expand_hostlist("gpu[a-b]")
    with pytest.raises(LaunchError, match="expands to 3 hosts but SLURM_NNODES=4"):
        cluster_from_slurm({**SLURM_4x8, "SLURM_JOB_NODELIST": "gpu[1-3]"})
    with pytest.raises(LaunchError, match="set launch.gpus_per_node"):
        cluster_from_slurm({k: v for k, v in SLURM_4x8.items() if k != "SLURM_GPUS_ON_NODE"})
    assert slurm_gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:4"}) == 4
    assert slurm_gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:h100:8(IDX:0-7)"}) == 8
    assert cluster_from_slurm({}) is None
    assert hostfile_text(Cluster(("a",), 2)) == "a slots=2\n"


def test_launch_config_is_validated():
    base = to_plain(shipped())
    with pytest.raises(ConfigError, match=r"stage\.pretrain\.launch\.gpus_per_node: must be at least 1, got 0"):
        build(LaunchConfig, {**base, "gpus_per_node": 0}, path="stage.pretrain.launch")
    with pytest.raises(ConfigError, match=r"launch\.master_port: 70000 is not a TCP port"):
        build(LaunchConfig, {**base, "master_port": 70000}, path="launch")
    with pytest.raises(ConfigError, match="'auto', 'cuda', 'cpu'"):
        build(LaunchConfig, {**base, "accelerator": "tpu"}, path="launch")


def test_run_launch_writes_the_hostfile_and_returns_the_exit_status(tmp_path):
    hostfile = tmp_path / "hostfile"
    code = "import os, sys; print(open(sys.argv[1]).read(), os.environ['MARK']); sys.exit(3)"
    p = LaunchPlan("pdsh", (sys.executable, "-c", code, str(hostfile)), {"MARK": "here"}, 8, "a slots=8\n")
    assert run_launch(p, hostfile) == 3
    assert hostfile.read_text() == "a slots=8\n"


def test_the_first_failing_rank_is_the_one_named(tmp_path):
    """A rank records its exception on the way out; the stage names the earliest (the others usually fail
    because it did), skipping a record cut short as its rank died."""
    assert rank_failure(tmp_path) is None
    try:
        raise RuntimeError("PytorchStreamReader failed reading zip archive")
    except RuntimeError as exc:
        record_rank_error(tmp_path, 1, exc)
    first = json.loads((tmp_path / RANK_ERRORS / "rank1.json").read_text())
    assert first["type"] == "RuntimeError" and "Traceback" in first["traceback"]
    later = {"rank": 0, "t": first["t"] + 1, "type": "DistBackendError", "message": "Connection closed by peer"}
    (tmp_path / RANK_ERRORS / "rank0.json").write_text(json.dumps(later))
    (tmp_path / RANK_ERRORS / "rank2.json").write_text('{"rank": 2, "t"')
    assert rank_failure(tmp_path) == "rank 1: RuntimeError: PytorchStreamReader failed reading zip archive"
