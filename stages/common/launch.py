"""DeepSpeed launcher command lines for the training stages, as pure functions, plus running one.

Four ways a training stage starts its ranks, chosen by :func:`plan_launch`:

``cpu``    no GPU here: ``DS_ACCELERATOR=cpu``, ``cpu_ranks`` ranks over gloo, each with
           ``OMP_NUM_THREADS=cpu_threads_per_rank`` (one thread per rank was ~34% faster than
           two ranks sharing two cores).
``local``  one node with GPUs: ``--num_gpus`` (or every visible GPU).
``pdsh``   several nodes named in ``hosts``: DeepSpeed's default multi-node path. It reads a
           hostfile (``host slots=N``) and starts the ranks of every node over passwordless ssh
           (pdsh) from this node, which is node 0 and the rendezvous address.
``srun``   inside a multi-node Slurm allocation (no ssh needed): one ``srun`` task per node runs
           the DeepSpeed launcher with ``--no_ssh`` and that node's rank (``$SLURM_NODEID``,
           expanded on the node), every launcher reading the same hostfile built from
           ``SLURM_JOB_NODELIST``. The stage's own process must run once, on the first node of the
           allocation (as a batch script does), and the hostfile must be on a shared file system.

The launcher is ``python -m deepspeed.launcher.runner`` (what the ``deepspeed`` script runs)
with this interpreter, so the ranks use the same virtual environment wherever PATH points.
Ranks run the training script as a module (``--module``) and read ``LOCAL_RANK`` from the
environment (``--no_local_rank``), so the script needs no argument parsing for the launcher.

A rank that fails records why in ``<output>/rank_errors/rank<N>.json`` (:func:`record_rank_error`);
the stage process names the first failing rank's exception in its error (:func:`rank_failure`),
not only in the log, where the other ranks' "connection closed" noise would bury it.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import Invalid, LlmpipeError
from pipeline.files import write_json_atomic
from pipeline.processes import child_env, terminate_tree

DEFAULT_MULTINODE_PORT = 29500  # torch.distributed's default; every node must agree on it
REPO_ROOT = Path(__file__).resolve().parents[2]  # ranks import stages.* from here
RANK_ERRORS = "rank_errors"  # <output>/rank_errors/rank<N>.json: why a rank failed (record_rank_error)


class LaunchError(LlmpipeError):
    """The launch settings or the cluster environment do not describe a runnable job."""


class RanksFailed(LlmpipeError):
    """The launched ranks exited with an error; the message carries the first failing rank's exception."""


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """How a training stage starts its ranks (``launch:`` in its YAML, which holds the defaults)."""

    accelerator: Literal["auto", "cuda", "cpu"]  # auto: cuda when a GPU is visible, else cpu
    gpus_per_node: int | None  # GPUs used on each node; null: every GPU visible (or Slurm's count)
    cpu_ranks: int  # ranks on a machine without a GPU (gloo)
    cpu_threads_per_rank: int  # OMP_NUM_THREADS of each CPU rank
    hosts: tuple[str, ...]  # multi-node without Slurm, node 0 first (pdsh over ssh); empty: this machine
    use_slurm: bool  # inside a multi-node Slurm allocation, use all of its nodes (srun, no ssh)
    master_port: int | None  # rendezvous port; null: a free port (one node) or 29500 (multi-node)

    def __post_init__(self) -> None:
        problems = [(name, f"must be at least 1, got {value}")
                    for name in ("gpus_per_node", "cpu_ranks", "cpu_threads_per_rank")
                    if (value := getattr(self, name)) is not None and value < 1]
        if self.master_port is not None and not 0 < self.master_port < 65536:
            problems.append(("master_port", f"{self.master_port} is not a TCP port"))
        if len(set(self.hosts)) != len(self.hosts):
            problems.append(("hosts", f"{list(self.hosts)} names a host twice"))
        Invalid.check(problems)


@dataclass(frozen=True)
class Cluster:
    """The nodes of a multi-node job: node 0 first (it hosts the rendezvous)."""

    hosts: tuple[str, ...]
    gpus_per_node: int
    master_port: int = DEFAULT_MULTINODE_PORT

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.gpus_per_node


@dataclass(frozen=True)
class LaunchPlan:
    """What to run: the command, the variables to add to the environment, and the hostfile it reads."""

    mode: Literal["cpu", "local", "pdsh", "srun"]
    argv: tuple[str, ...]
    env: Mapping[str, str]
    world_size: int
    hostfile: str | None = None  # text to write to the hostfile path before running (multi-node)
    cluster: Cluster | None = field(default=None, compare=False)

    @property
    def accelerator(self) -> Literal["cuda", "cpu"]:
        return "cpu" if self.mode == "cpu" else "cuda"

    def describe(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()) if k != "PYTHONPATH")
        return f"{self.mode}, {self.world_size} ranks: {env + ' ' if env else ''}{shlex.join(self.argv)}"


# ---------------------------------------------------------------- Slurm environment


def expand_hostlist(spec: str) -> list[str]:
    """Expand a Slurm hostlist such as ``gpu[01-03,07],login1`` into host names, in order.

    Zero padding of a range is kept (``n[08-10]`` -> n08 n09 n10); several bracket groups in one
    name (``r[1-2]n[1-2]``) expand as a product, the way ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for item in _split_top_level(spec.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"hostlist {spec!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"hostlist {spec!r}: unbalanced '['")
    items.append(spec[start:])
    return items


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[: match.start()], item[match.end():]
    out = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchError(f"hostlist item {item!r}: bad range {part!r}")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_one(f"{head}{n:0{width}d}{tail}"))
    return out


def slurm_gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs per node of the Slurm allocation: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE
    (``8``, ``a100:8`` or ``gpu:a100:8``), else None."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").strip()
        if value:
            count = value.split(",")[0].split("(")[0].rsplit(":", 1)[-1]
            if count.isdigit():
                return int(count)
            raise LaunchError(f"{key}={value!r}: cannot read a GPU count from it")
    return None


def cluster_from_slurm(env: Mapping[str, str], gpus_per_node: int | None = None,
                       master_port: int | None = None) -> Cluster | None:
    """The allocation described by Slurm's variables, or None outside a multi-node allocation.

    Nodes come from SLURM_JOB_NODELIST (SLURM_NODELIST in older versions), checked against
    SLURM_NNODES; the first node is the rendezvous. ``gpus_per_node`` overrides Slurm's count.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    nnodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if not nodelist or not nnodes or int(nnodes) < 2:
        return None
    hosts = tuple(expand_hostlist(nodelist))
    if len(hosts) != int(nnodes):
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} expands to {len(hosts)} hosts but "
                          f"SLURM_NNODES={nnodes}")
    gpus = gpus_per_node or slurm_gpus_per_node(env)
    if not gpus:
        raise LaunchError(f"Slurm allocation of {nnodes} nodes has no GPU count (SLURM_GPUS_ON_NODE / "
                          f"SLURM_GPUS_PER_NODE unset): set launch.gpus_per_node")
    return Cluster(hosts, gpus, master_port or DEFAULT_MULTINODE_PORT)


# ---------------------------------------------------------------- commands


def hostfile_text(cluster: Cluster) -> str:
    """An MPI-style hostfile, the format DeepSpeed's runner reads: ``<host> slots=<gpus>`` per line."""
    return "".join(f"{host} slots={cluster.gpus_per_node}\n" for host in cluster.hosts)


def _runner(python: str) -> list[str]:
    return [python, "-u", "-m", "deepspeed.launcher.runner"]


def _script(module: str, args: Sequence[str]) -> list[str]:
    return ["--module", "--no_local_rank", module, *args]


def _pythonpath(environ: Mapping[str, str]) -> dict[str, str]:
    """The ranks' PYTHONPATH: the repo root first, then whatever ``environ`` has."""
    return {"PYTHONPATH": child_env(pythonpath=[REPO_ROOT], base=environ)["PYTHONPATH"]}


def cpu_plan(module: str, args: Sequence[str], *, ranks: int, threads: int, port: int,
             python: str = sys.executable, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """``ranks`` CPU processes on this machine (gloo), ``threads`` OpenMP threads each."""
    argv = [*_runner(python), "--num_gpus", str(ranks), "--master_port", str(port), *_script(module, args)]
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), **_pythonpath(environ or {})}
    return LaunchPlan("cpu", tuple(argv), env, ranks)


def local_plan(module: str, args: Sequence[str], *, gpus: int, all_visible: bool, port: int,
               python: str = sys.executable, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """One node's GPUs. With ``all_visible`` no ``--num_gpus`` is passed, so the runner honours
    CUDA_VISIBLE_DEVICES (it turns it into ``--include``)."""
    num = [] if all_visible else ["--num_gpus", str(gpus)]
    argv = [*_runner(python), *num, "--master_port", str(port), *_script(module, args)]
    return LaunchPlan("local", tuple(argv), _pythonpath(environ or {}), gpus)


def pdsh_plan(module: str, args: Sequence[str], cluster: Cluster, hostfile: str | Path, *,
              python: str = sys.executable, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """All nodes started from this one over ssh (DeepSpeed's pdsh backend)."""
    argv = [*_runner(python), "--hostfile", str(hostfile), "--launcher", "pdsh",
            "--num_nodes", str(len(cluster.hosts)), "--num_gpus", str(cluster.gpus_per_node),
            "--master_addr", cluster.master_addr, "--master_port", str(cluster.master_port), *_script(module, args)]
    return LaunchPlan("pdsh", tuple(argv), _pythonpath(environ or {}), cluster.world_size,
                      hostfile_text(cluster), cluster)


def srun_plan(module: str, args: Sequence[str], cluster: Cluster, hostfile: str | Path, *,
              python: str = sys.executable, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """One DeepSpeed launcher per node of a Slurm allocation, each told its node rank.

    ``--kill-on-bad-exit`` ends every node's launcher when one fails, so a crashed node does not
    leave the others waiting at a collective until a timeout.
    """
    n = len(cluster.hosts)
    per_node = [*_runner(python), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "$SLURM_NODEID",
                "--num_nodes", str(n), "--num_gpus", str(cluster.gpus_per_node),
                "--master_addr", cluster.master_addr, "--master_port", str(cluster.master_port),
                *_script(module, args)]
    # Quote everything but the node rank, which the shell on each node must expand.
    line = " ".join('"$SLURM_NODEID"' if a == "$SLURM_NODEID" else shlex.quote(a) for a in per_node)
    argv = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "bash", "-c", f"exec {line}"]
    return LaunchPlan("srun", tuple(argv), _pythonpath(environ or {}), cluster.world_size,
                      hostfile_text(cluster), cluster)


def resolve_accelerator(cfg: LaunchConfig, cuda_devices: int) -> Literal["cuda", "cpu"]:
    """The accelerator to train on; asking for cuda without a visible GPU is an error, not a fallback."""
    if cfg.accelerator == "cuda" and cuda_devices == 0:
        raise LaunchError("launch.accelerator=cuda but no CUDA device is visible")
    if cfg.accelerator == "auto":
        return "cuda" if cuda_devices > 0 else "cpu"
    return cfg.accelerator


def plan_launch(cfg: LaunchConfig, module: str, args: Sequence[str], *, cuda_devices: int,
                environ: Mapping[str, str], hostfile: str | Path, port: int | None = None,
                python: str = sys.executable) -> LaunchPlan:
    """Choose how to start the ranks (see the module doc) and build the command.

    Pure: ``cuda_devices`` (GPUs visible here), ``environ`` (for Slurm's variables) and ``port``
    (a free port for single-node runs when ``cfg.master_port`` is null) are passed in.
    """
    if cfg.hosts:  # this node may be a login node without GPUs: the count comes from the config then
        gpus = cfg.gpus_per_node or cuda_devices
        if cfg.accelerator == "cpu" or not gpus:
            raise LaunchError(f"launch.hosts={list(cfg.hosts)} asks for a multi-node GPU run: set "
                              f"launch.gpus_per_node (no GPU is visible here) and launch.accelerator to auto or cuda")
        cluster = Cluster(cfg.hosts, gpus, cfg.master_port or DEFAULT_MULTINODE_PORT)
        return pdsh_plan(module, args, cluster, hostfile, python=python, environ=environ)
    if resolve_accelerator(cfg, cuda_devices) == "cpu":
        return cpu_plan(module, args, ranks=cfg.cpu_ranks, threads=cfg.cpu_threads_per_rank,
                        port=cfg.master_port or port or DEFAULT_MULTINODE_PORT, python=python, environ=environ)
    cluster = cluster_from_slurm(environ, cfg.gpus_per_node, cfg.master_port) if cfg.use_slurm else None
    if cluster is not None:
        return srun_plan(module, args, cluster, hostfile, python=python, environ=environ)
    if cfg.gpus_per_node and cfg.gpus_per_node > cuda_devices:
        raise LaunchError(f"launch.gpus_per_node={cfg.gpus_per_node} but only {cuda_devices} GPUs are visible")
    gpus = cfg.gpus_per_node or cuda_devices
    return local_plan(module, args, gpus=gpus, all_visible=cfg.gpus_per_node is None,
                      port=cfg.master_port or port or DEFAULT_MULTINODE_PORT, python=python, environ=environ)


# ---------------------------------------------------------------- running


def free_port() -> int:
    """A TCP port free on this machine now (the kernel picks it), for a single-node rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launch(plan: LaunchPlan, hostfile: str | Path, cwd: str | Path | None = None) -> int:
    """Run the launcher to completion and return its exit status.

    Its output goes to this process's stdout/stderr (the stage log). It stays in this process's
    group (no new session), so a cancel (SIGTERM to the worker's group) reaches the launcher and
    every rank at once, and the worker's guard stops whatever is left (it stops every process below
    it, SIGKILL after its grace: DeepSpeed's launcher may wait on its ranks for seconds). If this
    call itself is interrupted, the launcher's whole process tree is terminated here: DeepSpeed's
    runner does not forward signals to its children on a single node.
    """
    if plan.hostfile is not None:
        Path(hostfile).write_text(plan.hostfile)
    proc = subprocess.Popen(list(plan.argv), env=child_env(plan.env), cwd=cwd)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            terminate_tree(proc)


# ---------------------------------------------------------------- inside a rank


def rank_start(description: str, argv: list[str] | None = None) -> tuple[dict, int]:
    """What every launched rank does first: read its job file (``--job``, written by the stage process), learn
    its ``RANK`` and set up logging, rank 0 speaking for all (the others log only problems)."""
    import argparse
    import logging
    import os

    from pipeline.logs import setup_logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--job", required=True, help="the job file written by the stage process")
    job = json.loads(Path(parser.parse_args(argv).job).read_text())
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(stream=sys.stdout)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return job, rank


# ---------------------------------------------------------------- rank failures


def record_rank_error(output_dir: Path, rank: int, exc: BaseException) -> None:
    """Why this rank failed, for the stage process (:func:`rank_failure`); call it in the ``except`` block."""
    write_json_atomic(output_dir / RANK_ERRORS / f"rank{rank}.json",
                      {"rank": rank, "t": time.time(), "type": type(exc).__name__, "message": str(exc),
                       "traceback": traceback.format_exc()}, indent=2)


def rank_failure(output_dir: Path) -> str | None:
    """``"rank <N>: <type>: <message>"`` of the rank that failed first in the last launch, or None.

    The first by time: the others usually fail *because* it did (a collective whose peer is gone).
    """
    errors = []
    for path in (output_dir / RANK_ERRORS).glob("rank*.json"):
        try:
            errors.append(json.loads(path.read_text()))
        except ValueError:  # cut short as its rank died: the others still say something
            continue
    if not errors:
        return None
    first = min(errors, key=lambda e: e["t"])
    return f"rank {first['rank']}: {first['type']}: {first['message']}"
