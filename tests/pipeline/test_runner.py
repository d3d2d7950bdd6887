"""The runner: caching, failure handling, resume, atomic commit, locks."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.plan import make_plan
from pipeline.runner import Runner
from pipeline.store import Store

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
    stop = Runner(toy("stage.source.fail=true", "run.keep_going=false"), toy.project).run()
    assert statuses(stop)["side"] == "blocked"


def _broken(tmp_path):
    from pipeline import config
    from tests.pipeline.toy import BROKEN, BROKEN_YAML, write_toy_conf

    conf = write_toy_conf(tmp_path, BROKEN_YAML)
    return config.load(BROKEN, conf, "toy", [], project_dir=tmp_path), BROKEN


def test_not_implemented_stage_fails_clearly_and_nothing_pretends(tmp_path):
    cfg, project = _broken(tmp_path)
    plan = make_plan(cfg, project)
    assert plan.stages["future"].action == "run"  # plan still shows it
    result = Runner(cfg, project).run()
    assert statuses(result)["future"] == "failed"
    assert "stage 'future' is registered but not implemented yet" in result.outcomes["future"].error
    assert statuses(result)["after"] == "blocked"
    assert not list(cfg.root.glob("future/future-*")) and not list(cfg.root.glob("after/after-*"))


def test_missing_declared_output_is_a_failure(tmp_path):
    cfg, project = _broken(tmp_path)
    result = Runner(cfg, project).run()
    assert statuses(result)["lazy"] == "failed"
    assert "without writing its declared outputs ['data']" in result.outcomes["lazy"].error
    assert not Store(cfg.root).is_done("lazy", result.outcomes["lazy"].fingerprint)


def test_resumable_stage_killed_mid_run_resumes_from_partial_output(toy):
    """Kill the orchestrator itself (SIGKILL) mid-stage: no _SUCCESS; the next run continues."""
    cfg = toy("stage.slow.step_s=0.3", "stage.slow.steps=40")
    Runner(toy("run.only=[upper]"), toy.project).run()
    fp = make_plan(cfg, toy.project).stages["slow"].fingerprint
    store = Store(cfg.root)
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from pipeline import config\nfrom pipeline.runner import Runner\nfrom tests.pipeline.toy import PROJECT\n"
        f"cfg = config.load(PROJECT, {str(toy.conf_dir)!r}, 'toy', ['stage.slow.step_s=0.3', "
        f"'stage.slow.steps=40'], project_dir={str(toy.dir)!r})\n"
        "Runner(cfg, PROJECT).run()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    progress = store.partial_dir("slow", fp) / "progress.txt"
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.exists() and int(progress.read_text() or 0) >= 3):
        time.sleep(0.1)
    assert progress.exists(), "the slow stage never started"
    os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only; its stage child must follow it
    proc.wait()
    stage_pid = int((store.partial_dir("slow", fp) / "pid").read_text())
    for _ in range(100):
        if not _alive(stage_pid):
            break
        time.sleep(0.1)
    assert not _alive(stage_pid), "the stage process outlived the orchestrator"
    assert not store.is_done("slow", fp)
    done_before = int(progress.read_text())
    assert 3 <= done_before < 40

    result = Runner(toy("stage.slow.steps=40"), toy.project).run()
    assert statuses(result)["slow"] == "ran"
    assert result.outcomes["slow"].metrics["resumed_from"] == done_before
    assert store.is_done("slow", fp)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as dead
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


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
