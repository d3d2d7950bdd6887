"""The command line, as a user calls it."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "vllm", "transformers", "mlflow", "trl", "peft", "datasets", "fasttext")


def cli(toy, *args):
    return main(list(args), project_path="tests.pipeline.toy:PROJECT", default_config_dir=toy.conf_dir)


def test_plan_run_status_why(toy, capsys, monkeypatch):
    monkeypatch.chdir(toy.dir)
    assert cli(toy, "plan", "-c", "toy") == 0
    out = capsys.readouterr().out
    assert "source" in out and "never ran" in out

    assert cli(toy, "run", "-c", "toy") == 0
    out = capsys.readouterr().out
    assert "ran" in out and "slow" in out

    assert cli(toy, "status", "-c", "toy", "stage.upper.suffix=?") == 0
    out = capsys.readouterr().out
    assert "source     " in out and "done" in out
    assert "missing  (an older output:" in out

    assert cli(toy, "why", "-c", "toy", "upper", "stage.upper.suffix=?") == 0
    out = capsys.readouterr().out
    assert '- suffix: "!"' in out and '+ suffix: "?"' in out


def test_overrides_may_surround_options(toy, capsys, monkeypatch):
    monkeypatch.chdir(toy.dir)
    assert cli(toy, "plan", "stage.side.value=3", "-c", "toy", "stage.upper.suffix=?") == 0
    out = capsys.readouterr().out
    assert "never ran" in out
    with pytest.raises(SystemExit):
        cli(toy, "plan", "-c", "toy", "--nope")


def test_failed_run_exits_nonzero_and_status_shows_failure(toy, capsys, monkeypatch):
    monkeypatch.chdir(toy.dir)
    assert cli(toy, "run", "-c", "toy", "stage.count.fail=true") == 1
    capsys.readouterr()
    cli(toy, "status", "-c", "toy")
    assert "failed   attempt 1: RuntimeError: count asked to fail" in capsys.readouterr().out


def test_config_errors_exit_2_with_the_key(toy, capsys, monkeypatch):
    monkeypatch.chdir(toy.dir)
    assert cli(toy, "plan", "-c", "toy", "+stage.upper.sufix=x") == 2
    err = capsys.readouterr().err
    assert "stage.upper.sufix: unknown key (did you mean 'suffix'?)" in err


def test_typo_without_plus_gets_did_you_mean_not_hydras_advice(toy, capsys, monkeypatch):
    """Hydra's "To append to your config use +stage.upper.sufix=x" would add the typo."""
    monkeypatch.chdir(toy.dir)
    assert cli(toy, "plan", "-c", "toy", "+stage.upper.sufix=x") == 2
    with_plus = capsys.readouterr().err
    assert cli(toy, "plan", "-c", "toy", "stage.upper.sufix=x", "stage.upper.nested.c=1") == 2
    err = capsys.readouterr().err
    assert with_plus in err and "To append" not in err
    assert "stage.upper.nested.c: unknown key (valid keys: a, b)" in err


def _run_llmpipe(*args, cwd=REPO):
    code = ("import sys; from llmpipe.cli import main; sys.argv = ['llmpipe', *sys.argv[1:]]; rc = main(); "
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _small_corpus(corpus: Path) -> list[str]:
    """Overrides pointing a real config at a one-file crawl and the classifier's samples: `plan` checks
    that its inputs exist and are of their kind (issue 11)."""
    import gzip

    from tests.tiny_run import corpus_overrides

    (corpus / "quality").mkdir(parents=True)
    (corpus / "a.warc.gz").write_bytes(gzip.compress(b"WARC/1.0\r\n"))
    for name in ("positive", "negative"):
        (corpus / "quality" / f"{name}.txt").write_text(f"a {name} sample\n")
    return corpus_overrides(corpus)


@pytest.mark.parametrize("conf", ["tiny", "llama-7b"])
def test_real_plan_works_on_cpu_and_imports_nothing_heavy(conf, tmp_path):
    proc = _run_llmpipe("plan", "--config-name", conf, f"run.root={tmp_path / 'runs'}",
                        *_small_corpus(tmp_path / "corpus"))
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    for stage in ("ingest", "dedup", "quality", "pii", "decontaminate", "tokenize", "pretrain", "sft", "align",
                  "quantize", "serve", "evaluate"):
        assert f"\n{stage} " in proc.stdout


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "llmpipe"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "plan" in proc.stdout and "why" in proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_ui_serves_mlflow_on_localhost(tmp_path):
    port = _free_port()
    exe = Path(sys.executable).parent / "llmpipe"
    proc = subprocess.Popen([str(exe), "ui", "-c", "tiny", f"run.root={tmp_path}", f"tracking.ui_port={port}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = b""
        deadline = time.time() + 300  # ~16 s on an idle 2-core machine; much more under load
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    body = resp.read()
                    break
            except OSError:
                time.sleep(1)
        assert b"MLflow" in body or b"mlflow" in body
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for _ in range(60):  # the server's own processes are gone too: the port is free again
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(1)
    else:
        pytest.fail(f"port {port} still answers after llmpipe ui stopped")
