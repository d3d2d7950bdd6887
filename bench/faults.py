"""Fault injection: the kill -9 matrix over every stage of the tiny pipeline (issue 11).

For each stage S, through the real ``llmpipe`` CLI on a freshly built embedded corpus:

1. Reference (once): the tiny pipeline runs uninterrupted into ``WORK/root`` (``run.only`` = the
   selected stages, so every stage before them runs too), while the window of every stage is
   measured: from its worker starting (its ``stage.log`` appears in the partial dir) to its output
   being committed (``_SUCCESS``). The root is then renamed to ``WORK/reference``.
2. ``WORK/root`` is made again from copies of the reference's outputs of every stage before S, so
   everything before S is done, and ``llmpipe run run.only=[S]`` starts on it.
3. At a random moment inside S (``u`` x S's reference window after S's worker started, ``u`` drawn
   from U(0.1, 0.9) by a generator seeded with ``--seed`` and the stage's name, so a subset draws the
   same moments as the full matrix) the orchestrator gets SIGKILL. The run's processes are those
   below the orchestrator just before the kill and any process whose environment carries the run's
   marker (``LLMPIPE_FAULT_RUN``). ``ps`` lists those still alive 2 s after the kill.
4. The same command runs again right away, as an operator would; the killed run's survivors are
   followed until they are gone (how long they lived is reported; after ``--orphan-cap`` seconds
   they are killed, so that the next stage's trial starts clean).
5. The rerun's output must have the reference's fingerprint and be byte-identical to the reference's
   output, except for the run records (stage_info.json, stage.log, metrics.jsonl, _SUCCESS: times,
   hosts, attempt numbers) and the files in VOLATILE, which hold wall-clock times, ports or the
   attempt number by nature; each says why, and JSON ones are compared without those fields only
   (faults.json lists, per trial, the VOLATILE files that did differ).
   Model weights, token shards, documents and everything else are compared byte for byte: training
   on CPU with fixed seeds must be deterministic across a kill and resume too. ``--control``
   also reruns each stage uninterrupted from the same start and compares it with the reference the
   same way, to tell a kill's effect from nondeterminism.

Absolute paths end up in some outputs (sft's adapter_info.json names its base model dir), so every
trial runs in the same ``WORK/root`` as the reference did. The MLflow sync process of the killed run
(pipeline/tracking.py: detached on purpose, it finishes applying the journal) is not a stage process:
its lifetime is reported apart and does not count as an orphan.

Prints a table and the tally (target: every stage); writes ``WORK/faults.json``. Time: the reference
run (the tiny pipeline), then per stage about 1.5x its window plus ~40 s of start-up and tracking for
the two runs (measured under load on 2 cores: ingest 3 s -> 40 s, pretrain 235 s -> 5 min); one more
window per stage with ``--control``. ``--reuse`` keeps WORK's corpus and reference for another seed:

    .venv/bin/python bench/faults.py [--stages ingest,tokenize] [--seed 0] [--work runs/bench-faults]
"""

from __future__ import annotations

import argparse
import filecmp
import fnmatch
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmpipe.project import PROJECT  # noqa: E402
from pipeline.processes import descendants  # noqa: E402
from tests.tiny_run import LLMPIPE, build_corpus, corpus_overrides  # noqa: E402

STAGES = PROJECT.stage_names
MARKER_ENV = "LLMPIPE_FAULT_RUN"  # inherited by every process a run starts: how its orphans are found
KILL_WINDOW = (0.1, 0.9)  # the kill falls in this share of the stage's reference window
ORPHAN_LIMIT_S = 2.0  # issue 11: every stage process is gone this long after the orchestrator died
POLL_S = 0.05
RUN_RECORDS = frozenset({"stage_info.json", "stage.log", "metrics.jsonl", "_SUCCESS"})  # top level of an output
# Logs a library writes into the output, one per attempt, named by a random id and the time (gptqmodel's
# gptq/logs/gptq_log_<id>_time_<date>.log): run records too, so neither their bytes nor their names count.
RUN_RECORD_GLOBS: dict[str, tuple[str, ...]] = {"quantize": ("gptq/logs/*",)}


@dataclass(frozen=True)
class Volatile:
    """A file whose content depends on when or where the stage ran. JSON files are compared without
    the ``without`` keys or on the ``only`` keys (paths of keys, each an fnmatch pattern); a file with
    neither is not compared (it must still exist in both)."""

    why: str
    without: tuple[tuple[str, ...], ...] = ()
    only: tuple[str, ...] = ()


def keys(*dotted: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(d.split(".")) for d in dotted)


VOLATILE: dict[str, dict[str, Volatile]] = {
    "pretrain": {
        "train_summary.json": Volatile("timings of the attempt that finished training, and the step it resumed "
                                       "from", without=keys("train_time_s", "mean_tokens_per_s", "attempt_wall_s",
                                                            "resumed_from_step", "mean_mfu", "peak_gpu_mem_gb")),
        "pretrain_job.json": Volatile("written by each attempt: its number and the checkpoint it resumed from",
                                      without=keys("attempt", "resume_from")),
        "checkpoints/*/mp_rank_*_model_states.pt": Volatile(
            "DeepSpeed pickles the client state into it, whose train_time_s is wall time; the weights are "
            "compared in model/ and the optimizer states in the other checkpoint files"),
        "checkpoints/*/llmpipe_manifest.json": Volatile("it holds the hash of that model-states file",
                                                        without=(("files", "*mp_rank_*_model_states.pt"),)),
    },
    "quantize": {
        "model/quant_log.csv": Volatile("gptqmodel's per-module log: the seconds each module took, rows in the "
                                        "order its threads finished (the weights themselves are compared)"),
        "quantize_info.json": Volatile("GPTQ's wall time, and after how many layers the attempt resumed",
                                       without=keys("quantize/seconds", "quantize/resumed_after_layers")),
        "llama.cpp/*.log": Volatile("llama.cpp's converter and quantizer logs: timings"),
    },
    "serve": {
        "endpoint/server.log": Volatile("vLLM's log: timestamps, process ids, the port"),
        "endpoint/bench_result.json": Volatile("a load test's timings and date"),
        "endpoint/bench_result.*.json": Volatile("the other formats' load tests: timings and date"),
        "endpoint/endpoint.json": Volatile("the free port the server got, its start-up time, the load test's "
                                           "timings (the first format's, and every format's under formats)",
                                           without=keys("base_url", "port", "command", "startup_s",
                                                        "benchmark.metrics", "checks.*.seconds",
                                                        "formats.*.base_url", "formats.*.port", "formats.*.command",
                                                        "formats.*.startup_s", "formats.*.benchmark.metrics",
                                                        "formats.*.checks.*.seconds")),
    },
    "evaluate": {
        "results/models/*.json": Volatile("lm-eval's run record around the scores (dates, durations, the "
                                          "environment, object reprs); the scores are compared", only=("results",)),
        "results/vllm_server.log": Volatile("vLLM's log: timestamps, process ids, the port"),
    },
}


# ---------------------------------------------------------------- comparing outputs


def _drop(value: Any, path: tuple[str, ...]) -> None:
    if not isinstance(value, dict) or not path:
        return
    for key in [k for k in value if fnmatch.fnmatchcase(str(k), path[0])]:
        if len(path) == 1:
            del value[key]
        else:
            _drop(value[key], path[1:])


def _json_view(path: Path, rule: Volatile) -> Any:
    data = json.loads(path.read_text())
    if rule.only:
        return {key: data.get(key) for key in rule.only}
    for path in rule.without:
        _drop(data, path)
    return data


def compare_outputs(stage: str, reference: Path, output: Path, volatile: list[str] | None = None) -> list[str]:
    """What differs between two committed outputs of ``stage``, one line per file ([] when identical).
    ``volatile`` collects the VOLATILE files whose bytes did differ (the rules' evidence)."""
    rules = VOLATILE.get(stage, {})

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()}

    ref, out = files(reference), files(output)
    diffs = []
    for rel in sorted(ref | out):
        if rel in RUN_RECORDS or any(fnmatch.fnmatch(rel, g) for g in RUN_RECORD_GLOBS.get(stage, ())):
            continue
        if rel not in out or rel not in ref:
            diffs.append(f"{rel}: {'missing' if rel not in out else 'not in the reference'}")
            continue
        if filecmp.cmp(reference / rel, output / rel, shallow=False):
            continue
        rule = next((r for pattern, r in rules.items() if fnmatch.fnmatch(rel, pattern)), None)
        if rule is None:
            diffs.append(f"{rel}: differs")
            continue
        if volatile is not None:
            volatile.append(rel)
        if rule.only or rule.without:
            try:
                same = _json_view(reference / rel, rule) == _json_view(output / rel, rule)
            except ValueError as exc:
                same, rel = False, f"{rel} (not JSON: {exc})"
            if not same:
                ignored = rule.only or [".".join(path) for path in rule.without]
                diffs.append(f"{rel}: differs {'in' if rule.only else 'beyond'} {', '.join(ignored)}")
    return diffs


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class Proc:
    pid: int
    started: str  # ps lstart: with the pid, names a process (pids are reused)
    stat: str
    args: str

    @property
    def is_sync(self) -> bool:
        return "pipeline.mlflow_sync" in self.args


def ps() -> dict[int, Proc]:
    """Every process on the machine, as ``ps`` lists it (zombies left out)."""
    out = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,stat=,lstart=,args="], capture_output=True, text=True,
                         check=True).stdout
    procs = {}
    for line in out.splitlines():
        parts = line.split(None, 7)  # pid, stat, lstart (5 words: "Sun Dec  6 01:14:05 2026"), args
        if len(parts) >= 7 and not parts[1].startswith("Z"):
            procs[int(parts[0])] = Proc(int(parts[0]), " ".join(parts[2:7]), parts[1],
                                        parts[7] if len(parts) > 7 else "")
    return procs


def _has_marker(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours
        return False
    return f"{MARKER_ENV}={marker}".encode() in environ.split(b"\0")


def run_processes(marker: str, known: Mapping[int, str]) -> list[Proc]:
    """The live processes of the run marked ``marker``: those in ``known`` (pid -> lstart, taken before
    the kill) and any that carry the marker in their environment."""
    return [p for p in ps().values() if p.pid != os.getpid()
            and (known.get(p.pid) == p.started or _has_marker(p.pid, marker))]


_STARTED: list[subprocess.Popen] = []  # every run this bench started: stopped when it ends early (Ctrl-C)


def start(cmd: list[str], log_file: Path, marker: str) -> subprocess.Popen:
    """A run in its own session (the kill must reach the orchestrator alone), marked with ``marker``."""
    env = {**os.environ, MARKER_ENV: marker, "LLMPIPE_LOG_LEVEL": "INFO"}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    _STARTED.append(proc)
    return proc


def wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def stop(proc: subprocess.Popen) -> None:
    """End a run this bench started: SIGTERM (the orchestrator cancels its stages), then SIGKILL."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_leftovers(marker: str, known: Mapping[int, str]) -> None:
    """SIGKILL what is left of a run, by pid: processes found as run_processes finds them."""
    for p in run_processes(marker, known):
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the runs


def run_command(root: Path, corpus: Path, stages: list[str]) -> list[str]:
    """``llmpipe run`` of the tiny config on ``corpus``; --wait-tracking: it returns once its MLflow sync is
    done, so that nothing writes into the root when the bench moves or removes it."""
    return [LLMPIPE, "run", "--wait-tracking", "-c", "tiny", f"run.root={root}", f"run.only=[{','.join(stages)}]",
            *corpus_overrides(corpus)]


def stage_started(root: Path, stage: str) -> bool:
    return any((root / stage / ".partial").glob(f"{stage}-*/stage.log"))


def committed(root: Path, stage: str) -> Path | None:
    done = sorted((root / stage).glob(f"{stage}-*/_SUCCESS"))
    return done[0].parent if done else None


def run_reference(work: Path, corpus: Path, stages: list[str], timeout_s: float) -> dict[str, Any]:
    """The uninterrupted run of ``stages`` (and everything before them), with each stage's window."""
    root, reference = work / "root", work / "reference"
    for path in (root, reference):
        shutil.rmtree(path, ignore_errors=True)
    proc = start(run_command(root, corpus, stages), work / "logs" / "reference.log",
                 uuid.uuid4().hex)
    began: dict[str, float] = {}
    ended: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"the reference run took over {timeout_s:.0f}s (log: {work / 'logs'})")
            now = time.monotonic()
            for stage in STAGES:
                if stage not in began and stage_started(root, stage):
                    began[stage] = now
                if stage in began and stage not in ended and committed(root, stage):
                    ended[stage] = now
            time.sleep(POLL_S)
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed (exit {proc.returncode}); log: {work / 'logs' / 'reference.log'}")
    info: dict[str, Any] = {"corpus": str(corpus), "stages": {}}
    for stage in STAGES:
        out = committed(root, stage)
        if out is None:
            continue
        record = json.loads((out / "stage_info.json").read_text())
        # A stage too quick for the poll to see start: its own run time (stage_info) is the window.
        window = ended[stage] - began[stage] if stage in began and stage in ended else record["duration_s"]
        info["stages"][stage] = {"fingerprint": record["fingerprint"], "window_s": round(window, 2),
                                 "output": str(reference / stage / out.name)}
    os.rename(root, reference)
    (work / "reference.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def prepare_root(work: Path, stage: str) -> Path:
    """``WORK/root`` holding copies of the reference's outputs of every stage before ``stage``."""
    root, reference = work / "root", work / "reference"
    shutil.rmtree(root, ignore_errors=True)
    for before in STAGES[:STAGES.index(stage)]:
        out = committed(reference, before)
        if out is not None:
            shutil.copytree(out, root / before / out.name, symlinks=True)
    return root


@dataclass
class Trial:
    stage: str
    window_s: float
    fraction: float = 0.0
    killed_at_s: float | None = None  # after the stage's worker started
    processes_at_kill: int = 0
    left_after_2s: list[str] = field(default_factory=list)  # ps lines of stage processes still alive
    orphans_lived_s: float = 0.0  # from the kill until the last stage process was gone
    orphans_killed: bool = False  # still alive after --orphan-cap: killed by the bench
    sync_lived_s: float | None = None  # the killed run's MLflow sync process, if it had one
    rerun_rc: int | None = None
    rerun_s: float = 0.0
    fingerprint: str = ""
    reference_fingerprint: str = ""
    differences: list[str] = field(default_factory=list)
    volatile: list[str] = field(default_factory=list)  # VOLATILE files whose bytes did differ (expected)
    control: list[str] | None = None  # differences of an uninterrupted rerun (--control)
    control_volatile: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def reproduced(self) -> bool:
        return (self.killed_at_s is not None and self.rerun_rc == 0 and self.fingerprint == self.reference_fingerprint
                and not self.differences)

    @property
    def no_orphans(self) -> bool:
        return self.killed_at_s is not None and not self.left_after_2s


def kill_inside(trial: Trial, cmd: list[str], root: Path, log: Path, marker: str,
                timeout_s: float) -> tuple[subprocess.Popen, dict[int, str], float] | None:
    """Start the run and SIGKILL it ``fraction`` x window after the stage's worker started. Returns the
    reaped orchestrator, the processes seen below it just before (pid -> lstart) and the moment of the
    kill; None when the run ended before that moment (nothing was killed)."""
    proc = start(cmd, log, marker)
    if not wait_until(lambda: stage_started(root, trial.stage) or proc.poll() is not None, timeout_s):
        stop(proc)
        raise SystemExit(f"{trial.stage}: its worker did not start within {timeout_s:.0f}s (log: {log})")
    t0 = time.monotonic()
    wait_until(lambda: proc.poll() is not None or time.monotonic() - t0 >= trial.fraction * trial.window_s,
               timeout_s)
    if proc.poll() is not None:
        trial.note = (f"the run ended (exit {proc.returncode}) {time.monotonic() - t0:.1f}s after the stage "
                      f"started, before the kill (log: {log})")
        return None
    listed = ps()
    known = {pid: listed[pid].started for pid in descendants(proc.pid) if pid in listed}
    os.kill(proc.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    proc.wait()
    trial.killed_at_s = round(t_kill - t0, 2)
    trial.processes_at_kill = len(known)
    return proc, known, t_kill


def run_trial(stage: str, work: Path, corpus: Path, reference: dict[str, Any], seed: int, orphan_cap_s: float,
              timeout_s: float, control: bool) -> Trial:
    ref = reference["stages"][stage]
    trial = Trial(stage, ref["window_s"], reference_fingerprint=ref["fingerprint"])
    trial.fraction = round(random.Random(f"{seed}:{stage}").uniform(*KILL_WINDOW), 3)
    cmd = run_command(work / "root", corpus, [stage])
    logs = work / "logs"
    for _ in range(2):  # a stage quicker than in the reference gets a second try, at half the moment
        root = prepare_root(work, stage)
        marker = uuid.uuid4().hex
        killed = kill_inside(trial, cmd, root, logs / f"{stage}-killed.log", marker, timeout_s)
        if killed is not None:
            break
        trial.fraction = round(trial.fraction / 2, 3)
    else:
        return trial
    _, known, t_kill = killed

    last_seen: dict[int, float] = {}  # stage processes of the killed run: pid -> seconds after the kill
    sync_seen: list[float] = []

    def look() -> list[Proc]:
        alive = run_processes(marker, known)
        now = time.monotonic() - t_kill
        for p in alive:
            if p.is_sync:
                sync_seen.append(now)
            else:
                last_seen[p.pid] = now
        return alive

    while time.monotonic() - t_kill < ORPHAN_LIMIT_S:
        look()
        time.sleep(POLL_S)
    alive = look()
    trial.left_after_2s = [f"{p.pid} {p.args[:160]}" for p in alive if not p.is_sync]

    # The rerun starts at once, as an operator's would; the survivors are followed (less often: a
    # ps a tick costs CPU the rerun needs) until they are gone, or killed at the cap.
    rerun_started = time.monotonic()
    rerun = start(cmd, logs / f"{stage}-rerun.log", uuid.uuid4().hex)
    while rerun.poll() is None or alive:
        if alive:
            alive = look()
        if alive and time.monotonic() - t_kill >= orphan_cap_s:
            trial.orphans_killed = any(not p.is_sync for p in alive)
            kill_leftovers(marker, known)
            alive = []
        if rerun.poll() is None and time.monotonic() - rerun_started > timeout_s:
            stop(rerun)
            trial.note = f"the rerun took over {timeout_s:.0f}s"
        time.sleep(0.5)
    trial.orphans_lived_s = round(max(last_seen.values(), default=0.0), 2)
    trial.sync_lived_s = round(max(sync_seen), 1) if sync_seen else None
    trial.rerun_rc, trial.rerun_s = rerun.returncode, round(time.monotonic() - rerun_started, 1)

    out = committed(work / "root", stage)
    if out is not None:
        trial.fingerprint = out.name.removeprefix(f"{stage}-")
        trial.differences = compare_outputs(stage, Path(ref["output"]), out, trial.volatile)
    if control:
        trial.control = run_control(stage, work, cmd, Path(ref["output"]), timeout_s, trial.control_volatile)
    return trial


def run_control(stage: str, work: Path, cmd: list[str], reference_output: Path, timeout_s: float,
                volatile: list[str]) -> list[str]:
    """The same stage again, uninterrupted, from the same start: what differs by nature."""
    root = prepare_root(work, stage)
    proc = start(cmd, work / "logs" / f"{stage}-control.log", uuid.uuid4().hex)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc)
    out = committed(root, stage)
    return compare_outputs(stage, reference_output, out, volatile) if out is not None else ["(no output)"]


# ---------------------------------------------------------------- report


def table(trials: list[Trial]) -> str:
    rows = [f"{'stage':<10} {'window':>7} {'killed at':>15} {'procs':>5} {'left@2s':>7} {'orphans':>8} "
            f"{'sync':>6} {'rerun':>9} {'fp':<5} outputs"]
    for t in trials:
        killed = f"{t.killed_at_s:.1f}s ({t.fraction:.2f})" if t.killed_at_s is not None else "not killed"
        lived = f"{t.orphans_lived_s:.1f}s" + ("!" if t.orphans_killed else "")
        sync = "-" if t.sync_lived_s is None else f"{t.sync_lived_s:.0f}s"
        rerun = "-" if t.rerun_rc is None else f"{t.rerun_s:.0f}s" + ("" if t.rerun_rc == 0 else f" rc{t.rerun_rc}")
        fp = "same" if t.fingerprint == t.reference_fingerprint else ("none" if not t.fingerprint else "DIFF")
        outputs = "identical" if not t.differences else f"{len(t.differences)} differ: " + "; ".join(t.differences[:3])
        if t.control is not None:
            outputs += f" | control: {'identical' if not t.control else '; '.join(t.control[:3])}"
        rows.append(f"{t.stage:<10} {t.window_s:>6.1f}s {killed:>15} {t.processes_at_kill:>5} "
                    f"{len(t.left_after_2s):>7} {lived:>8} {sync:>6} {rerun:>9} {fp:<5} "
                    f"{outputs if t.killed_at_s is not None else t.note}")
    return "\n".join(rows)


def tally(trials: list[Trial]) -> str:
    n = len(trials)
    reproduced = sum(t.reproduced for t in trials)
    clean = sum(t.no_orphans for t in trials)
    return (f"{reproduced}/{n} reruns produced the reference fingerprints and byte-identical outputs (target {n}/{n})\n"
            f"{clean}/{n} kills left no stage process alive after {ORPHAN_LIMIT_S:.0f} s (target {n}/{n})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset (default: all 11)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-faults",
                        help="corpus, reference, trial root and logs (default: runs/bench-faults)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse WORK's corpus and reference when they cover the stages (default: build fresh)")
    parser.add_argument("--control", action="store_true", help="also rerun each stage uninterrupted and compare")
    parser.add_argument("--orphan-cap", type=float, default=120.0, help="seconds before leftover processes are killed")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]  # pipeline order
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"

    info_file = work / "reference.json"
    reference = json.loads(info_file.read_text()) if args.reuse and info_file.is_file() else None
    if reference is None or not set(stages) <= set(reference["stages"]):  # a fresh corpus, a fresh reference
        shutil.rmtree(corpus, ignore_errors=True)
        t0 = time.monotonic()
        build_corpus(corpus)
        print(f"corpus built in {time.monotonic() - t0:.0f}s: {corpus}", flush=True)
        t0 = time.monotonic()
        reference = run_reference(work, corpus, stages, args.timeout)
        print(f"reference run in {time.monotonic() - t0:.0f}s: "
              + ", ".join(f"{s} {v['window_s']:.0f}s" for s, v in reference["stages"].items()), flush=True)

    trials = []
    try:
        for stage in stages:
            trial = run_trial(stage, work, corpus, reference, args.seed, args.orphan_cap, args.timeout, args.control)
            trials.append(trial)
            if not trial.reproduced and (work / "root").is_dir():  # kept for a look at what differs
                shutil.rmtree(work / f"differs-{stage}", ignore_errors=True)
                os.rename(work / "root", work / f"differs-{stage}")
            print(table([trial]).splitlines()[-1], flush=True)
    finally:  # Ctrl-C: the runs live in their own sessions, the terminal's signal does not reach them
        for proc in _STARTED:
            stop(proc)
    shutil.rmtree(work / "root", ignore_errors=True)
    result = {"seed": args.seed, "stages": stages, "trials": [asdict(t) for t in trials],
              "reproduced": sum(t.reproduced for t in trials), "no_orphans": sum(t.no_orphans for t in trials)}
    (work / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(trials))
    print()
    print(tally(trials))
    print(f"(details: {work / 'faults.json'}; logs: {work / 'logs'})")
    return 0 if all(t.reproduced and t.no_orphans for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
