"""Fast checks of bench/faults.py's parts: comparing outputs, finding a run's processes with ps. The
matrix itself runs the tiny pipeline (bench-faults); these do not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from bench import faults


def _output(root, files):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return root


def test_identical_outputs_ignore_the_run_records(tmp_path):
    common = {"documents/00000.parquet": b"PAR1 rows PAR1", "_shards/00000.json": {"docs_in": 3}}
    ref = _output(tmp_path / "ref", {**common, "stage_info.json": {"host": "a"}, "stage.log": b"x",
                                     "metrics.jsonl": b"1", "_SUCCESS": b"1.0"})
    out = _output(tmp_path / "out", {**common, "stage_info.json": {"host": "b"}, "stage.log": b"y",
                                     "metrics.jsonl": b"2", "_SUCCESS": b"2.0"})
    assert faults.compare_outputs("ingest", ref, out) == []


def test_a_librarys_own_logs_are_run_records_too(tmp_path):
    """gptqmodel writes a log named by a random id and the time into quantize's output, one per attempt."""
    ref = _output(tmp_path / "ref", {"model/config.json": {"bits": 4}, "gptq/logs/gptq_log_ab_time_01h.log": b"a"})
    out = _output(tmp_path / "out", {"model/config.json": {"bits": 4}, "gptq/logs/gptq_log_cd_time_02h.log": b"b",
                                     "gptq/logs/gptq_log_ef_time_03h.log": b"c"})
    assert faults.compare_outputs("quantize", ref, out) == []
    assert faults.compare_outputs("sft", ref, out) != []  # only where the stage's library writes them


def test_every_other_file_is_compared_byte_for_byte(tmp_path):
    ref = _output(tmp_path / "ref", {"model/w.safetensors": b"\x00\x01", "gone.txt": b"a",
                                     "data/stage.log": b"a log deeper down is an output"})
    out = _output(tmp_path / "out", {"model/w.safetensors": b"\x00\x02", "new.tmp": b"left by the kill",
                                     "data/stage.log": b"another"})
    assert faults.compare_outputs("sft", ref, out) == [
        "data/stage.log: differs", "gone.txt: missing", "model/w.safetensors: differs", "new.tmp: not in the reference"]


def test_volatile_files_are_compared_without_their_volatile_fields(tmp_path):
    summary = {"final_eval_loss": 6.69, "steps": 40, "train_time_s": 81.0, "resumed_from_step": 0}
    endpoint = {"model_dir": "/m", "port": 4001, "checks": {"chat": {"text": "hi", "seconds": 0.3}}}
    ref = _output(tmp_path / "ref", {"train_summary.json": summary, "endpoint/endpoint.json": endpoint,
                                     "results/models/sft.json": {"results": {"ppl": 9.5}, "date": 1.0}})
    out = _output(tmp_path / "out", {
        "train_summary.json": {**summary, "train_time_s": 97.5, "resumed_from_step": 20},
        "endpoint/endpoint.json": {**endpoint, "port": 4002, "checks": {"chat": {"text": "hi", "seconds": 0.9}}},
        "results/models/sft.json": {"results": {"ppl": 9.5}, "date": 2.0}})
    assert faults.compare_outputs("pretrain", ref, out)[0] == "endpoint/endpoint.json: differs"  # not pretrain's
    volatile = []
    assert faults.compare_outputs("serve", ref, out, volatile) == ["results/models/sft.json: differs",
                                                                   "train_summary.json: differs"]
    assert volatile == ["endpoint/endpoint.json"]  # it did differ, in the fields the rule leaves out
    _output(tmp_path / "out", {"train_summary.json": {**summary, "final_eval_loss": 6.7}})
    assert faults.compare_outputs("pretrain", ref, out)[-1] == (
        "train_summary.json: differs beyond train_time_s, mean_tokens_per_s, attempt_wall_s, resumed_from_step, "
        "mean_mfu, peak_gpu_mem_gb")
    assert faults.compare_outputs("evaluate", ref, out)[-1] == "train_summary.json: differs"
    _output(tmp_path / "out", {"results/models/sft.json": {"results": {"ppl": 9.6}, "date": 1.0}})
    assert "results/models/sft.json: differs in results" in faults.compare_outputs("evaluate", ref, out)


def test_a_checkpoint_manifest_is_compared_without_the_model_states_hash(tmp_path):
    """DeepSpeed's model-states file pickles wall time: its hash in the manifest differs, the rest must not."""
    files = {"step00000040/mp_rank_00_model_states.pt": {"size": 9, "hash": "a1"},
             "step00000040/zero_pp_rank_0_mp_rank_00_optim_states.pt": {"size": 7, "hash": "b2"}}
    manifest = "checkpoints/step00000040/llmpipe_manifest.json"
    ref = _output(tmp_path / "ref", {manifest: {"files": files, "meta": {"step": 40}}})
    moved = {**files, "step00000040/mp_rank_00_model_states.pt": {"size": 9, "hash": "ff"}}
    out = _output(tmp_path / "out", {manifest: {"files": moved, "meta": {"step": 40}}})
    assert faults.compare_outputs("pretrain", ref, out) == []
    moved["step00000040/zero_pp_rank_0_mp_rank_00_optim_states.pt"] = {"size": 7, "hash": "00"}
    _output(out, {manifest: {"files": moved, "meta": {"step": 40}}})
    assert faults.compare_outputs("pretrain", ref, out) == [
        f"{manifest}: differs beyond files.*mp_rank_*_model_states.pt"]


def test_a_file_that_is_skipped_must_still_exist(tmp_path):
    ref = _output(tmp_path / "ref", {"endpoint/server.log": b"INFO 01:02 started on port 4001"})
    out = _output(tmp_path / "out", {"endpoint/server.log": b"INFO 03:04 started on port 4002"})
    assert faults.compare_outputs("serve", ref, out) == []
    (out / "endpoint" / "server.log").unlink()
    assert faults.compare_outputs("serve", ref, out) == ["endpoint/server.log: missing"]


def test_the_processes_of_a_run_are_found_by_marker_and_by_the_snapshot():
    marker = "test-" + os.urandom(4).hex()
    env = {**os.environ, faults.MARKER_ENV: marker}
    # A leader that starts a child and a grandchild in its own session, as a stage worker does.
    tree = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], env=env, start_new_session=True)
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert faults.wait_until(lambda: len(faults.run_processes(marker, {})) == 3, 10)
        found = faults.run_processes(marker, {})
        assert {p.args.split()[0] for p in found} == {"sh", "sleep"}
        listed = faults.ps()
        assert listed[unmarked.pid].args.endswith("time.sleep(60)") and unmarked.pid not in {p.pid for p in found}
        known = {unmarked.pid: listed[unmarked.pid].started}  # seen below the orchestrator before the kill
        assert unmarked.pid in {p.pid for p in faults.run_processes(marker, known)}
        assert unmarked.pid not in {p.pid for p in faults.run_processes(marker, {unmarked.pid: "another start"})}
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait()
        assert faults.wait_until(lambda: not faults.run_processes(marker, {}), 10)  # zombies do not count
    finally:
        for proc in (tree, unmarked):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_kill_moments_are_seeded_per_stage():
    import random

    draws = {s: random.Random(f"0:{s}").uniform(*faults.KILL_WINDOW) for s in faults.STAGES}
    assert draws == {s: random.Random(f"0:{s}").uniform(*faults.KILL_WINDOW) for s in faults.STAGES}
    assert all(faults.KILL_WINDOW[0] <= d <= faults.KILL_WINDOW[1] for d in draws.values())
    assert len(set(draws.values())) == len(draws)


def test_unknown_stages_are_refused(capsys):
    with pytest.raises(SystemExit):
        faults.main(["--stages", "ingest,tokenise"])
    assert "unknown stage(s) ['tokenise']" in capsys.readouterr().err


def test_a_report_row_says_what_happened():
    t = faults.Trial("pii", 30.0, fraction=0.5, killed_at_s=15.2, processes_at_kill=4, orphans_lived_s=0.4,
                     rerun_rc=0, rerun_s=20.0, fingerprint="abc", reference_fingerprint="abc")
    assert t.reproduced and t.no_orphans
    row = faults.table([t]).splitlines()[1]
    assert row.split()[:7] == ["pii", "30.0s", "15.2s", "(0.50)", "4", "0", "0.4s"]
    assert row.endswith("same  identical")
    late = faults.Trial("ingest", 5.0, note="the run ended (exit 0) 4.1s after the stage started, before the kill")
    assert not late.reproduced and "not killed" in faults.table([late])
    assert faults.tally([t, late]).startswith("1/2 reruns produced the reference fingerprints")
