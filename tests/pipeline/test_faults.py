"""Faults the orchestrator must survive or clean up after, with real processes and real file systems.

- kill -9 of the orchestrator: within 2 s no process of the stage is left (its helpers in other
  sessions included), a rerun started at once waits for the old processes before it touches the
  partial dir, and the attempt shows as interrupted (``status``, the next plan's reason). The
  integration tests do it to the real quantize and serve (vLLM) stages.
- a full disk: the stage's error says so and names the stage and the path, whichever way the
  library reported it; the orchestrator records the failure (or logs it, when even that does not
  fit) and goes on; the partial output resumes once there is room. The disk tests mount small
  tmpfs file systems (root only: skipped elsewhere).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest

from pipeline import config
from pipeline.cli import main as cli_main
from pipeline.plan import make_plan
from pipeline.processes import descendants, pid_alive
from pipeline.runner import Runner
from pipeline.store import Store
from tests.pipeline.toy import FAULTS, FAULTS_YAML, SLOW, orchestrator_running_slow

MARK = "LLMPIPE_FAULT_TEST"  # in the environment of every process a killed orchestrator started
LIMIT_S = 2.0  # the bound: every stage process gone this long after the orchestrator's SIGKILL


def survivors(mark: str, pids: Iterable[int]) -> set[int]:
    """Processes still running (zombies aside) among ``pids``, or with ``MARK=mark`` in their environment."""
    alive = {p for p in pids if pid_alive(p)}
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes() and pid_alive(int(entry.name)):
                    alive.add(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return alive


def kill_orchestrator(proc: subprocess.Popen, mark: str, limit_s: float = 30.0) -> tuple[float, set[int]]:
    """SIGKILL the orchestrator; (seconds until none of its processes is left, those left after ``limit_s``)."""
    tree = [proc.pid, *descendants(proc.pid)]
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    proc.wait()
    while (left := survivors(mark, tree)) and time.monotonic() - t0 < limit_s:
        time.sleep(0.02)
    return time.monotonic() - t0, left


def marked_env() -> tuple[str, dict[str, str]]:
    mark = uuid.uuid4().hex
    return mark, {**os.environ, MARK: mark}


def cli(toy, *args: str) -> int:
    return cli_main(list(args), project_path=toy.project.import_path, default_config_dir=toy.conf_dir)


# ---------------------------------------------------------------- kill -9


def test_a_killed_orchestrator_leaves_no_process_and_its_stage_holds_the_job_lock_until_then(toy):
    """The slow stage runs a helper that ignores SIGTERM in a session of its own (as vLLM's server is)."""
    mark, env = marked_env()
    proc, store, fp, _ = orchestrator_running_slow(toy, 3, "stage.slow.helper=true", env=env)
    helper = int((store.partial_dir("slow", fp) / "helper.pid").read_text())
    assert pid_alive(helper)
    samples: list[tuple[bool, bool]] = []

    def watch() -> None:  # from the kill on; the job lock first: once it is free, nothing of the stage may run
        while proc.returncode is None:
            time.sleep(0.005)
        deadline = time.monotonic() + 30
        while (sample := (store.is_running("slow", fp), pid_alive(helper))) != (False, False):
            samples.append(sample)
            assert time.monotonic() < deadline
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    after, left = kill_orchestrator(proc, mark)
    watcher.join()
    assert not left and after < LIMIT_S, (after, left)
    assert not [s for s in samples if s == (False, True)], "the job lock was free while the helper still ran"
    assert (True, True) in samples  # the helper took its SIGKILL after the grace, the lock held meanwhile
    result = Runner(toy("stage.slow.steps=40"), toy.project).run()  # no step_s: the same fingerprint, quicker
    assert result.outcomes["slow"].status == "ran" and result.outcomes["slow"].metrics["resumed_from"] >= 3
    assert (result.outcomes["slow"].output / "attempt-2-old-helper-alive").read_text() == "no"


def test_a_run_waits_for_the_processes_of_an_earlier_attempt(toy):
    """A job lock still held (an earlier attempt's processes, stopping): the run begins nothing until it is free."""
    from pipeline.store import hold_job_lock

    cfg = toy("run.only=[side]")
    store = Store(cfg.root)
    fp = make_plan(cfg, toy.project).stages["side"].fingerprint
    store.job_lock_path("side", fp).parent.mkdir(parents=True)
    old = hold_job_lock(store.job_lock_path("side", fp), shared=False, wait_s=1)
    results = []
    run = threading.Thread(target=lambda: results.append(Runner(cfg, toy.project).run()))
    run.start()
    time.sleep(1.5)
    assert run.is_alive() and not store.partial_dir("side", fp).exists()  # no attempt begun beside the old one
    released = time.time()
    old.close()
    run.join(timeout=60)
    assert results[0].outcomes["side"].status == "ran"
    info = store.info("side", fp)
    assert info["attempt"] == 1 and info["started_at"] > released


def test_an_interrupted_attempt_is_shown_and_resumed(toy, capsys, monkeypatch):
    monkeypatch.chdir(toy.dir)
    mark, env = marked_env()
    proc, store, fp, _ = orchestrator_running_slow(toy, 2, env=env)
    after, left = kill_orchestrator(proc, mark)
    assert not left and after < LIMIT_S
    assert not store.is_running("slow", fp) and store.interrupted("slow", fp) == 1
    assert cli(toy, "status", "-c", "toy", *SLOW) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("slow "))
    assert "interrupted (attempt 1)" in row
    plan = make_plan(toy(*SLOW), toy.project)
    assert plan.stages["slow"].reason == "resuming after an interrupted attempt (attempt 1)"
    result = Runner(toy("stage.slow.steps=40"), toy.project).run()
    assert result.outcomes["slow"].status == "ran" and store.interrupted("slow", fp) is None


def test_a_non_resumable_stage_is_retried_after_an_interrupted_attempt(toy):
    cfg = toy()
    store = Store(cfg.root)
    fp = make_plan(cfg, toy.project).stages["side"].fingerprint
    partial = store.partial_dir("side", fp)
    partial.mkdir(parents=True)
    (partial / "_ATTEMPTS").write_text("1\n")  # began, and nothing says how it ended
    assert make_plan(cfg, toy.project).stages["side"].reason == "retry after an interrupted attempt (attempt 1)"
    with store.lock("side", fp, wait_s=1):  # a run at work on it: running, not interrupted
        assert store.interrupted("side", fp) is None
        assert make_plan(cfg, toy.project).stages["side"].reason == "never ran"


def test_a_stage_blocked_before_it_started_is_neither_interrupted_nor_counted(toy):
    result = Runner(toy("stage.source.fail=true"), toy.project).run()
    store = Store(toy().root)
    for name in ("upper", "count", "slow"):  # submitted behind source, cancelled when it failed
        fp = result.outcomes[name].fingerprint
        assert result.outcomes[name].status == "blocked"
        assert store.attempts(name, fp) == 0 and store.interrupted(name, fp) is None
    assert make_plan(toy(), toy.project).stages["upper"].reason == "never ran"


# ---------------------------------------------------------------- a full disk


def test_disk_full_reads_every_way_a_library_says_it(tmp_path):
    from pipeline.store import disk_full

    assert disk_full(tmp_path) is None  # room to spare, and nothing said
    assert disk_full(tmp_path, ValueError("Vector::mul: size mismatch")) is None
    enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "file.bin"))
    assert disk_full(tmp_path / "out", enospc).startswith(f"disk full: {tmp_path / 'x' / 'file.bin'} has ")
    short = OSError("96512 requested and 26624 written")  # numpy's tofile
    assert disk_full(tmp_path, short).startswith(f"disk full: {tmp_path} has ")
    try:  # what stands behind the error counts too: a pool worker's OSError re-raised as the caller's
        try:
            raise enospc
        except OSError as exc:
            raise RuntimeError("map over shards failed") from exc
    except RuntimeError as chained:
        assert disk_full(tmp_path, chained).startswith("disk full: ")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert disk_full(tmp_path, quota).startswith(f"disk quota exceeded: {tmp_path} has ")


@pytest.fixture
def tmpfs():
    """mount(path, size) a tmpfs there (``mount.resize(path, size)`` grows it); unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    def resize(path: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

    mount.resize = resize
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def faults(tmp_path: Path, *overrides: str):
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "faults.yaml").write_text(FAULTS_YAML)
    return config.load(FAULTS, conf, "faults", list(overrides), project_dir=tmp_path)


@pytest.mark.parametrize("disguise", [False, True], ids=["ENOSPC", "a library's own words"])
def test_a_full_disk_is_named_recorded_and_the_partial_output_resumes(tmp_path, tmpfs, disguise):
    """4 parts of 1 MiB on a 3 MiB file system. The stage fails with ENOSPC, or (``disguise``) with a
    ValueError, leaving its cut-short file, as fastText does; the error names the full disk either way."""
    root = tmpfs(tmp_path / "runs", "3m")
    cfg = faults(tmp_path, f"run.root={root}", f"stage.fill.disguise={str(disguise).lower()}")
    result = Runner(cfg, FAULTS).run()  # returns: the orchestrator survives the full disk
    fill = result.outcomes["fill"]
    partial = Store(root).partial_dir("fill", fill.fingerprint)
    assert fill.status == "failed"
    assert fill.error.startswith(f"DiskFull: disk full: {partial} has ") and "bytes free" in fill.error
    said = "ValueError: Vector::mul" if disguise else "OSError: [Errno 28]"
    assert f"stage 'fill' failed with {said}" in fill.error
    failure = Store(root).failure("fill", fill.fingerprint)  # recorded: the worker's reserve made room
    assert failure and failure["reason"].startswith("DiskFull: disk full:")
    done = sorted(p.name for p in (partial / "parts").glob("part-*"))
    assert done and len(done) < 4

    tmpfs.resize(root, "8m")
    again = Runner(faults(tmp_path, f"run.root={root}"), FAULTS).run()
    assert again.outcomes["fill"].status == "ran" and again.outcomes["fill"].metrics["reused"] == len(done)
    parts = sorted((again.outcomes["fill"].output / "parts").iterdir())
    assert [p.name for p in parts] == [f"part-{i}" for i in range(4)]
    assert all(p.stat().st_size == 1024 * 1024 for p in parts)
    assert not (again.outcomes["fill"].output / "_RESERVE").exists()


def test_a_stage_that_dies_on_a_full_disk_without_a_word_is_still_named(tmp_path, tmpfs, caplog, capsys,
                                                                       monkeypatch):
    """The stage exits at once on ENOSPC, leaving the disk full (no error report, no room freed): the
    runner names the full disk itself, logs the failure it cannot record, and the attempt shows as
    interrupted."""
    root = tmpfs(tmp_path / "runs", "3m")
    cfg = faults(tmp_path, f"run.root={root}", "stage.fill.hard=true")
    result = Runner(cfg, FAULTS).run()
    fill = result.outcomes["fill"]
    partial = Store(root).partial_dir("fill", fill.fingerprint)
    assert fill.status == "failed"
    assert fill.error.startswith(f"DiskFull: disk full: {partial} has ")
    assert fill.error.endswith("stage 'fill' left no error report (stage process exited with status 3)")
    assert "could not record the failure of attempt 1" in caplog.text
    monkeypatch.chdir(tmp_path)
    assert cli_main(["status", "-c", "faults", f"run.root={root}"], project_path=FAULTS.import_path,
                    default_config_dir=tmp_path / "conf") == 0
    assert "interrupted (attempt 1)" in capsys.readouterr().out

    tmpfs.resize(root, "8m")
    again = Runner(faults(tmp_path, f"run.root={root}"), FAULTS).run()
    assert again.outcomes["fill"].status == "ran"


def test_tracking_that_cannot_write_does_not_stop_the_run(toy, caplog):
    from tests.pipeline.test_runner import Recorder

    class FullDisk(Recorder):
        journal = Path("/nowhere/journal.jsonl")

        def stage_finished(self, key, ok, metrics, tags, files):
            raise OSError(errno.ENOSPC, "No space left on device")

    tracker = FullDisk()
    result = Runner(toy("run.only=[source]"), toy.project, tracker=tracker).run()
    assert result.ok and result.tracker is tracker
    assert caplog.text.count("tracking: cannot write the journal") == 1


# ---------------------------------------------------------------- the real data stage on a full disk


@pytest.mark.integration
def test_tokenize_on_a_full_disk(tiny_data, tmp_path, tmpfs):
    """The tiny pipeline's tokenize stage (numpy: "... requested and ... written") on a 1 MiB file
    system: a named failure, then, with room, the same output as the session's run, byte for byte."""
    from tests.tiny_run import llmpipe

    root = tmp_path / "runs"
    root.mkdir()
    for stage in ("ingest", "dedup", "quality", "pii"):  # committed by the session's run
        (root / stage).symlink_to(tiny_data["root"] / stage)
    tmpfs(root / "tokenize", "1m")
    args = ("run", "run.only=[tokenize]", "tracking.enabled=false")
    proc = llmpipe(*args, root=root, corpus=tiny_data["corpus"])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("tokenize "))
    [partial] = (root / "tokenize" / ".partial").iterdir()
    assert "failed" in row and f"DiskFull: disk full: {partial} has " in row and "stage 'tokenize'" in row, row
    assert "Traceback" not in proc.stderr.split("tokenize: failed")[-1]  # the orchestrator's own: none

    tmpfs.resize(root / "tokenize", "64m")
    proc = llmpipe(*args, root=root, corpus=tiny_data["corpus"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [reference] = (tiny_data["root"] / "tokenize").glob("tokenize-*")
    out = root / "tokenize" / reference.name  # the same fingerprint
    for sub in ("tokens", "heldout", "tokenizer"):
        files = sorted(p.relative_to(reference) for p in (reference / sub).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(out) for p in (out / sub).rglob("*") if p.is_file())
        for rel in files:
            assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel


# ---------------------------------------------------------------- kill -9 during the real model stages


@pytest.fixture(scope="module")
def models_conf(tmp_path_factory) -> Path:
    """A conf dir for tests/pipeline/models_project.py over a tiny fixture model and its corpus."""
    from tests.pipeline.models_project import write_models_conf
    from tests.stages.model_fixtures import build_tiny_model, corpus_texts, write_documents

    base = tmp_path_factory.mktemp("models")
    texts = corpus_texts(240)
    return write_models_conf(base, build_tiny_model(base / "model", train_steps=30, texts=texts),
                             write_documents(base / "documents", texts[:200]),
                             write_documents(base / "heldout", texts[200:], prefix="held"))


def kill_during(conf: Path, stage: str, until: str) -> tuple[float, set[int], str]:
    """Run ``stage`` (and what it needs) in an orchestrator process, SIGKILL it once the stage's log
    says ``until``: (seconds until no process of it was left, the survivors, the stage log)."""
    from tests.pipeline.models_project import MODELS
    from tests.pipeline.toy import start_orchestrator

    cfg = config.load(MODELS, conf, "models", [], project_dir=conf.parent)
    log = Store(cfg.root).partial_dir(stage, make_plan(cfg, MODELS).stages[stage].fingerprint) / "stage.log"
    mark, env = marked_env()
    proc = start_orchestrator(MODELS, conf, "models", [f"run.only=[{stage}]"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not (log.is_file() and until in log.read_text(errors="replace")):
        assert proc.poll() is None and time.time() < deadline, f"{stage} never got to {until!r}: {log}"
        time.sleep(0.2)
    after, left = kill_orchestrator(proc, mark)
    return after, left, log.read_text(errors="replace")


@pytest.mark.integration
def test_kill_during_quantize_and_serve_leaves_nothing_and_the_rerun_finishes(models_conf):
    """kill -9 of the orchestrator while gptqmodel quantizes and while vLLM's server (its own session,
    an engine process) answers the serve stage's checks; `ps` after 2 s; then the reruns finish."""
    from tests.pipeline.models_project import MODELS
    from tests.stages.common.test_vllm_server import _port_free

    def load(*overrides: str):
        return config.load(MODELS, models_conf, "models", list(overrides), project_dir=models_conf.parent)

    after, left, _ = kill_during(models_conf, "quantize", "calibrating on")
    assert not left and after < LIMIT_S, (after, left)
    plan = make_plan(load("run.only=[quantize]"), MODELS)
    assert plan.stages["quantize"].reason == "resuming after an interrupted attempt (attempt 1)"
    result = Runner(load("run.only=[quantize]"), MODELS).run()
    assert result.outcomes["quantize"].status == "ran", result.outcomes["quantize"].error

    after, left, log = kill_during(models_conf, "serve", "vLLM server ready at ")
    assert not left and after < LIMIT_S, (after, left)
    port = int(log.split("vLLM server ready at ")[1].split("/v1")[0].rsplit(":", 1)[1])
    assert _port_free(port)
    plan = make_plan(load(), MODELS)
    assert plan.stages["serve"].reason == "retry after an interrupted attempt (attempt 1)"
    result = Runner(load(), MODELS).run()
    assert result.outcomes["serve"].status == "ran", result.outcomes["serve"].error
    assert result.outcomes["serve"].metrics["checks_passed"] == 2
