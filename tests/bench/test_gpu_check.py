"""bench/gpu_check.py runs its checks on the CPU here (the GPU-only ones skip) and fails on a broken one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def test_the_checks_run_on_the_cpu_and_report_each(tmp_path):
    out = tmp_path / "checks.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert list(results) == list(gpu_check.CHECKS)
    assert {n: r["status"] for n, r in results.items()} == {
        "cuda": "skip", "runtime": "pass", "launch": "pass", "llama-7b layer": "skip", "lora step": "pass",
        "evaluate gpus": "skip"}
    assert "tokens/s" in results["llama-7b layer"]["detail"]  # the CPU baseline was measured


def test_a_failing_check_counts_in_the_exit_status(monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.CHECKS, "launch", lambda device: (_ for _ in ()).throw(RuntimeError("no ranks")))
    monkeypatch.setitem(gpu_check.CHECKS, "llama-7b layer", lambda device: (gpu_check.SKIP, "not here"))
    monkeypatch.setitem(gpu_check.CHECKS, "lora step", lambda device: (gpu_check.FAIL, "loss nan"))
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "failed: launch, lora step" in capsys.readouterr().out
