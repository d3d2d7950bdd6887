"""The runner: caching, failure handling, resume, atomic commit, locks."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.executors import LocalExecutor, Task
from pipeline.plan import make_plan
from pipeline.processes import pid_alive
from pipeline.runner import Runner
from pipeline.schema import to_plain
from pipeline.store import Store
from pipeline.tracking import NullTracker
from pipeline.worker import read_error
from tests.pipeline.toy import PROJECT, orchestrator_running_slow

REPO = Path(__file__).resolve().parents[2]


def statuses(result):
    return {n: o.status for n, o in result.outcomes.items()}


def test_outputs_are_committed_with_stage_info_and_log(toy):
    cfg = toy()
    result = Runner(cfg, toy.project).run()
    assert result.ok
    out = result.outcomes["upper"].output
    assert out.name == f"upper-{result.outcomes['upper'].fingerprint}" and out.parent.name == "upper"
    assert (out / "text").read_text() == "HELLOHELLO!"
    assert (out / "_SUCCESS").is_file() and (out / "stage.log").is_file()
    info = json.loads((out / "stage_info.json").read_text())
    assert info["config"]["suffix"] == "!"
    assert info["input_fingerprints"] == {"source.text": result.outcomes["source"].fingerprint}
    assert info["metrics"]["chars"] == 11
    assert {"git_commit", "host", "started_at", "finished_at", "duration_s", "payload"} <= set(info)
    assert not (cfg.root / "upper" / ".partial" / out.name).exists()
    assert info["executor"] == {"kind": "local"} and info["tracking_key"] is None


def test_failure_blocks_descendants_only_and_next_run_resumes(toy):
    result = Runner(toy("stage.count.fail=true"), toy.project).run()
    assert not result.ok
    assert statuses(result) == {"source": "ran", "upper": "ran", "count": "failed", "side": "ran", "slow": "ran"}
    assert "count asked to fail" in result.outcomes["count"].error
    store = Store(toy().root)
    fp = result.outcomes["count"].fingerprint
    assert store.failure("count", fp)["reason"].startswith("RuntimeError: count asked to fail")
    assert not store.is_done("count", fp)

    plan = make_plan(toy(), toy.project)  # fail is execution-only: same fingerprint, retried
    assert plan.stages["count"].reason == "retry: attempt 1 failed"
    again = Runner(toy(), toy.project).run()
    assert statuses(again)["count"] == "ran" and statuses(again)["upper"] == "cached"
    log = (again.outcomes["count"].output / "stage.log").read_text()
    assert "attempt 1" in log and "attempt 2" in log and "count asked to fail" in log


def test_failed_upstream_blocks_and_keep_going_false_stops(toy):
    result = Runner(toy("stage.source.fail=true"), toy.project).run()
    assert statuses(result) == {"source": "failed", "upper": "blocked", "count": "blocked",
                                "side": "ran", "slow": "blocked"}
    assert result.outcomes["count"].error == "upstream source failed"
    # side (a new value: not cached) is queued behind source, and never starts after source fails.
    stop = Runner(toy("stage.source.fail=true", "run.keep_going=false", "stage.side.value=8"), toy.project).run()
    assert statuses(stop)["side"] == "blocked"
    assert stop.outcomes["side"].error == "stopped after a failure (run.keep_going=false)"


def _broken(tmp_path):
    from pipeline import config
    from tests.pipeline.toy import BROKEN, BROKEN_YAML, write_toy_conf

    conf = write_toy_conf(tmp_path, BROKEN_YAML)
    return config.load(BROKEN, conf, "toy", [], project_dir=tmp_path), BROKEN


def test_missing_declared_output_is_a_failure_and_nothing_pretends(tmp_path):
    cfg, project = _broken(tmp_path)
    result = Runner(cfg, project).run()
    assert statuses(result) == {"lazy": "failed", "after": "blocked"}
    assert "without writing its declared outputs ['data']" in result.outcomes["lazy"].error
    assert result.outcomes["after"].error == "upstream lazy failed"
    assert not list(cfg.root.glob("lazy/lazy-*")) and not list(cfg.root.glob("after/after-*"))


def test_resumable_stage_killed_mid_run_resumes_from_partial_output(toy):
    """Kill the orchestrator itself (SIGKILL) mid-stage: no _SUCCESS; the next run continues."""
    proc, store, fp, progress = orchestrator_running_slow(toy, steps=3)
    os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only; its stage child must follow it
    proc.wait()
    stage_pid = int((store.partial_dir("slow", fp) / "pid").read_text())
    for _ in range(100):
        if not pid_alive(stage_pid):
            break
        time.sleep(0.1)
    assert not pid_alive(stage_pid), "the stage process outlived the orchestrator"
    assert not store.is_done("slow", fp)
    done_before = int(progress.read_text())
    assert 3 <= done_before < 40

    result = Runner(toy("stage.slow.steps=40"), toy.project).run()
    assert statuses(result)["slow"] == "ran"
    assert result.outcomes["slow"].metrics["resumed_from"] == done_before
    assert store.is_done("slow", fp)


def test_killed_stage_process_is_a_failure_and_non_resumable_restarts_clean(toy):
    store = Store(toy().root)
    cfg = toy()
    fp = make_plan(cfg, toy.project).stages["side"].fingerprint
    partial = store.partial_dir("side", fp)
    partial.mkdir(parents=True)
    (partial / "leftover.tmp").write_text("half")  # what a crashed attempt left
    (partial / "_ATTEMPTS").write_text("1\n")
    result = Runner(cfg, toy.project).run()
    out = result.outcomes["side"].output
    assert not (out / "leftover.tmp").exists()  # non-resumable: restarted from an empty dir
    assert json.loads((out / "stage_info.json").read_text())["attempt"] == 2


def test_concurrent_runs_produce_one_fingerprint_once(toy):
    """Two runners racing on the same outputs: each stage is produced exactly once."""
    cfg = toy("stage.slow.step_s=0.05")
    results = []

    def go():
        results.append(Runner(cfg, toy.project).run())

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in results)
    for stage in ("source", "upper", "count", "side", "slow"):
        kinds = sorted(r.outcomes[stage].status for r in results)
        assert kinds == ["cached", "ran"], (stage, kinds)
    assert not list(cfg.root.glob("*/.superseded"))


def test_lock_waits_for_holder_and_times_out(tmp_path):
    from pipeline.errors import LockTimeout

    store = Store(tmp_path)
    with store.lock("a", "f00", wait_s=1):
        assert store.is_locked("a", "f00")
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipeline.store import Store; "
                f"s = Store({str(tmp_path)!r})\nwith s.lock('a', 'f00', wait_s=0.5): pass")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "LockTimeout" in proc.stderr
        assert LockTimeout.__name__ in proc.stderr
    assert not store.is_locked("a", "f00")


class Recorder(NullTracker):
    """Tracking events in the order the runner sends them."""

    def __init__(self):
        self.events = []

    def stage_started(self, name, params, tags):
        self.events.append(("start", name, tags["llmpipe.status"]))
        return name

    def log_records(self, key, records):
        self.events.append(("metrics", key, [r["metrics"] for r in records]))

    def stage_finished(self, key, ok, metrics, tags, files):
        self.events.append(("end", key, tags.get("llmpipe.status")))


def test_stage_output_is_echoed_with_its_name_and_metrics_reach_tracking_before_the_end(toy, capfd):
    tracker = Recorder()
    result = Runner(toy("run.only=[source]"), toy.project, tracker=tracker).run()
    assert result.ok
    err = capfd.readouterr().err
    assert "[source] ===== source attempt 1 at " in err
    assert any(line.startswith("[source] ") and "llmpipe.source: committed" in line for line in err.splitlines())
    progress = [m["progress"] for e in tracker.events if e[:2] == ("metrics", "source") for m in e[2]]
    assert progress == [0.0, 0.5, 1.0]
    assert tracker.events.index(("end", "source", "ran")) > max(
        i for i, e in enumerate(tracker.events) if e[:2] == ("metrics", "source"))


def test_independent_stages_run_one_at_a_time_by_default(toy):
    result = Runner(toy("run.only=[source,side]"), toy.project).run()
    spans = sorted((json.loads((o.output / "stage_info.json").read_text())["started_at"],
                    json.loads((o.output / "stage_info.json").read_text())["finished_at"])
                   for o in result.outcomes.values() if o.status == "ran")
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]


def _task(cfg, plan, runner, name):
    sp = plan.stages[name]
    partial, attempt = plan.store.begin_attempt(name, sp.fingerprint, sp.stage.resumable)
    return Task(project=PROJECT.import_path, stage=name, fingerprint=sp.fingerprint, config=to_plain(sp.config),
                output_dir=partial, inputs=sp.inputs, attempt=attempt, log_file=partial / "stage.log",
                metrics_file=partial / "metrics.jsonl", cwd=cfg.project_dir,
                commit={"root": str(cfg.root), "info": runner.base_info(sp, attempt, None)})


def test_local_executor_queues_by_dependency_and_holds_the_dependants_of_a_failure(toy):
    cfg = toy("stage.source.fail=true")
    plan, runner = make_plan(cfg, toy.project), Runner(cfg, toy.project)
    ex = LocalExecutor(cfg.root)
    jobs = {"source": ex.submit(_task(cfg, plan, runner, "source"), [])}
    jobs["side"] = ex.submit(_task(cfg, plan, runner, "side"), [])
    jobs["upper"] = ex.submit(_task(cfg, plan, runner, "upper"), [jobs["source"].final_id])
    states = ex.poll(jobs)
    assert {n: (s.state, s.reason.split()[0]) for n, s in states.items()} == {
        "source": ("RUNNING", "pid"), "side": ("PENDING", "Resources"), "upper": ("PENDING", "Dependency")}
    deadline = time.time() + 60
    while not (states := ex.poll(jobs))["side"].finished and time.time() < deadline:
        time.sleep(0.1)
    assert states["source"].finished and not states["source"].ok
    assert states["source"].reason == "stage process exited with status 1"
    assert states["side"].ok and Store(cfg.root).is_done("side", plan.stages["side"].fingerprint)  # it committed
    assert (states["upper"].state, states["upper"].reason) == ("PENDING", "DependencyNeverSatisfied")
    ex.cancel([jobs["upper"]])
    assert ex.poll(jobs)["upper"].state == "CANCELLED"
    assert read_error(plan.store.partial_dir("source", plan.stages["source"].fingerprint)) == (
        "RuntimeError: source asked to fail")


def test_ctrl_c_stops_the_running_stage_and_records_the_failure(toy):
    proc, store, fp, _ = orchestrator_running_slow(toy, steps=2, stderr=subprocess.PIPE, text=True)
    stage_pid = int((store.partial_dir("slow", fp) / "pid").read_text())
    t0 = time.time()
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the orchestrator; the stage has its own session
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert time.time() - t0 < 15 and not pid_alive(stage_pid)
    assert "cancelling the jobs of slow" in err
    assert store.failure("slow", fp)["reason"] == "interrupted: KeyboardInterrupt; jobs cancelled"
    assert not store.is_done("slow", fp) and not store.is_locked("slow", fp)
