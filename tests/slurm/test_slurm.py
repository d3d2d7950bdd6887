"""The Slurm executor on a real Slurm: a one-node cluster started on this machine (start_cluster.sh:
Debian's slurm-wlm + munge), the real CLI with cluster.executor=slurm, and Slurm's own record of
every job (``sacct --completion`` over its job completion log: this cluster runs no slurmdbd).

Checked: arrays and chained jobs produce exactly the outputs (and fingerprints) of a local run; a
failure fails its stage with the job's reason, cancels what depended on it, and a re-run resubmits
only what failed; SIGTERM to the pipeline cancels its jobs; a pipeline killed outright leaves jobs
that the next run follows (or ``llmpipe cancel`` cancels). The tiny pipeline's data stages
(ingest -> tokenize) run as job arrays and match a local run byte for byte.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline.toy import SHARDED_YAML, TOY_BASE_YAML
from tests.tiny_run import corpus_overrides, plan_rows

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SLURM = ["cluster.executor=slurm", "+cluster.slurm.array_tasks=2", "+cluster.slurm.poll_s=0.5",
         "+cluster.slurm.time_min=20"]
CLI = ("import sys; from pathlib import Path; from pipeline.cli import main; "
       "sys.exit(main(sys.argv[3:], project_path=sys.argv[1], default_config_dir=Path(sys.argv[2])))")

# Real daemons and jobs (~70 s for the toy tests, ~2.5 min for the tiny data stages): `make test` runs them,
# `make test-unit` does not.
pytestmark = [pytest.mark.slurm, pytest.mark.integration]


@pytest.fixture(scope="module")
def slurm():
    """A running one-node Slurm cluster (started here, as CI does), or a skip that says why not."""
    if os.geteuid() != 0:
        pytest.skip("starting a Slurm cluster (munged, slurmctld, slurmd) needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install slurm-wlm and munge")
    proc = subprocess.run(["bash", str(HERE / "start_cluster.sh")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"start_cluster.sh failed:\n{proc.stdout}\n{proc.stderr}"
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    jobcomp = next(line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("JobCompLoc"))
    return {"jobcomp": Path(jobcomp)}


def cli(project: str, project_dir: Path, *args: str, timeout: float = 900, wait: bool = True):
    cmd = [sys.executable, "-c", CLI, project, str(project_dir / "conf"), *args]
    env = {**os.environ, "LLMPIPE_LOG_LEVEL": "INFO"}
    if not wait:
        return subprocess.Popen(cmd, cwd=project_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
    return subprocess.run(cmd, cwd=project_dir, capture_output=True, text=True, timeout=timeout, env=env)


def project_dir(path: Path, name: str, yaml_text: str) -> Path:
    (path / "conf").mkdir(parents=True)
    (path / "conf" / f"{name}.yaml").write_text(yaml_text)
    return path


def ok(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def jobs_of(root: Path, stage: str) -> dict:
    """The last submission of a stage (its most recent jobs.json: one per fingerprint)."""
    paths = sorted((root / stage / ".slurm").glob("*/jobs.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text())


def completion_records(slurm, ids, tasks_of=()) -> dict[str, str]:
    """Job id -> state from Slurm's job completion log: ``sacct --completion`` for jobs, the log's own
    lines for the tasks of arrays (sacct -c shows one line per array). Waits for the records."""
    want = set(ids)
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,State", "-j", ",".join(sorted(want))],
                             capture_output=True, text=True, check=True).stdout
        states = {line.split("|")[0]: line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line}
        for line in slurm["jobcomp"].read_text().splitlines():
            kv = dict(part.split("=", 1) for part in line.split() if "=" in part)
            if kv.get("ArrayJobId") in tasks_of:
                states[f"{kv['ArrayJobId']}_{kv['ArrayTaskId']}"] = kv["JobState"]
        if want <= set(states) or time.time() > deadline:
            return states
        time.sleep(1)


def outputs(root: Path) -> dict[str, dict[str, bytes]]:
    """Every committed stage folder (by name: stage-fingerprint) -> its artifact files' bytes."""
    out = {}
    for info in root.glob("*/*-*/stage_info.json"):
        folder = info.parent
        files = {}
        for artifact in json.loads(info.read_text())["outputs"]:
            path = folder / artifact
            for f in sorted([path] if path.is_file() else path.rglob("*")):
                if f.is_file():
                    files[str(f.relative_to(folder))] = f.read_bytes()
        out[folder.name] = files
    return out


def queued(job_ids) -> str:
    return subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True).stdout.strip()


def wait_for(predicate, timeout=180, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def test_arrays_and_chained_jobs_give_the_local_outputs_and_slurm_records_them(slurm, tmp_path):
    local = project_dir(tmp_path / "local", "sharded", SHARDED_YAML)
    ok(cli("tests.pipeline.toy:SHARDED", local, "run", "-c", "sharded"))
    here = project_dir(tmp_path / "slurm", "sharded", SHARDED_YAML)
    plan = cli("tests.pipeline.toy:SHARDED", here, "plan", "-c", "sharded", *SLURM).stdout
    out = ok(cli("tests.pipeline.toy:SHARDED", here, "run", "-c", "sharded", *SLURM, "tracking.enabled=true",
                 "--wait-tracking"))
    root = here / "runs"

    # `llmpipe plan` printed the very scripts that were submitted (job ids filled in at submission).
    ids = {f"{stage}_{j['label']}_jobid": j["id"] for stage in ("parts", "shout", "tally")
           for j in jobs_of(root, stage)["jobs"]}
    blocks = plan.split("\n# ===== ")[1:]
    assert len(blocks) == 5
    for block in blocks:
        title, _, script = block.partition("\n")
        stage, label = title.split(":")[0], title.split()[1]
        for placeholder, job_id in ids.items():
            script = script.replace(f":{placeholder}", f":{job_id}")
        submitted = root / stage / ".slurm" / next((root / stage / ".slurm").iterdir()).name
        assert (submitted / f"{ids[f'{stage}_{label}_jobid']}_submission.sh").read_text().rstrip() == script.rstrip()

    # The same outputs, at the same addresses, byte for byte.
    assert outputs(root) == outputs(local / "runs") and len(outputs(root)) == 3

    # shout (two maps over shards) ran as two arrays of 2 tasks, then a job that committed.
    shout = jobs_of(root, "shout")
    assert [(j["label"], j["tasks"]) for j in shout["jobs"]] == [("shout", 2), ("stamp", 2), ("final", None)]
    arrays = [j["id"] for j in shout["jobs"][:2]]
    [folder] = (root / "shout").glob("shout-*")
    info = json.loads((folder / "stage_info.json").read_text())
    assert info["executor"]["kind"] == "slurm" and info["executor"]["array_job_ids"] == arrays
    assert info["executor"]["slurm_job_id"] == shout["jobs"][-1]["id"] and info["metrics"]["words"] == 30
    who = {json.loads(p.read_text())["slice"] for p in (folder / "_who").glob("*.json")}
    assert who == {"0/2@stamp", "1/2@stamp"}
    task_log = (folder / "_logs" / "shout-task1.log").read_text()
    assert "array task 1 of 2 finished its 2 shard(s) of phase 'shout'" in task_log
    assert f"committed {folder}" in (folder / "stage.log").read_text()
    assert "[shout#stamp.1]" in out and "[tally]" in out

    # Slurm's own records: every job and every array task COMPLETED.
    ids = [j["id"] for stage in ("parts", "shout", "tally") for j in jobs_of(root, stage)["jobs"]]
    states = completion_records(slurm, ids + [f"{a}_{i}" for a in arrays for i in (0, 1)], tasks_of=arrays)
    assert states == {i: "COMPLETED" for i in ids + [f"{a}_{i}" for a in arrays for i in (0, 1)]}

    # MLflow has the job ids of each stage run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llmpipe").experiment_id],
                              "tags.`llmpipe.stage` = 'shout'")
    assert [r.data.tags["llmpipe.job_ids"] for r in runs] == [" ".join(j["id"] for j in shout["jobs"])]
    assert runs[0].data.tags["llmpipe.executor"] == "slurm" and runs[0].data.metrics["words"] == 30

    # A second run submits nothing: every output is cached.
    again = cli("tests.pipeline.toy:SHARDED", here, "run", "-c", "sharded", *SLURM)
    assert "submitted" not in ok(again) and jobs_of(root, "shout") == shout
    assert [line.split()[1] for line in again.stdout.splitlines()[1:]] == ["cached"] * 3


def test_a_failed_job_fails_its_stage_cancels_what_needs_it_and_only_that_is_resubmitted(slurm, tmp_path):
    here = project_dir(tmp_path, "toy", TOY_BASE_YAML)
    proc = cli("tests.pipeline.toy:PROJECT", here, "run", "-c", "toy", *SLURM, "stage.source.fail=true")
    assert proc.returncode == 1, proc.stderr[-5000:]
    summary = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[1:]}
    assert summary == {"source": "failed", "upper": "blocked", "count": "blocked", "side": "ran", "slow": "blocked"}
    root = here / "runs"
    source = jobs_of(root, "source")["jobs"][0]["id"]
    assert f"RuntimeError: source asked to fail (Slurm job {source} FAILED" in proc.stdout

    status = ok(cli("tests.pipeline.toy:PROJECT", here, "status", "-c", "toy", *SLURM))
    assert "failed   attempt 1: RuntimeError: source asked to fail" in status
    [partial] = (root / "source" / ".partial").glob("source-*")
    log = (partial / "stage.log").read_text()
    assert "source asked to fail" in log and f"scheduler: RuntimeError: source asked to fail (Slurm job {source}" in log

    waiting = {s: jobs_of(root, s)["jobs"][0]["id"] for s in ("upper", "count", "slow")}
    states = completion_records(slurm, [source, *waiting.values()])
    assert states[source] == "FAILED" and {states[i] for i in waiting.values()} == {"CANCELLED"}

    again = cli("tests.pipeline.toy:PROJECT", here, "run", "-c", "toy", *SLURM)
    ok(again)
    summary = {line.split()[0]: line.split()[1] for line in again.stdout.splitlines()[1:]}
    assert summary == {"source": "ran", "upper": "ran", "count": "ran", "side": "cached", "slow": "ran"}
    [out] = (root / "source").glob("source-*/stage_info.json")
    assert json.loads(out.read_text())["attempt"] == 2


def test_keep_going_false_cancels_every_other_job_after_a_failure(slurm, tmp_path):
    here = project_dir(tmp_path, "toy", TOY_BASE_YAML)
    proc = cli("tests.pipeline.toy:PROJECT", here, "run", "-c", "toy", *SLURM, "stage.count.fail=true",
               "run.keep_going=false", "stage.slow.steps=120", "stage.slow.step_s=0.5")
    assert proc.returncode == 1, proc.stderr[-5000:]
    summary = {line.split()[0]: " ".join(line.split()[1:]) for line in proc.stdout.splitlines()[1:]}
    assert summary["count"].startswith("failed") and summary["side"].startswith("ran")
    assert summary["slow"].startswith("blocked") and "stopped after a failure (run.keep_going=false)" in summary["slow"]
    slow = jobs_of(here / "runs", "slow")["jobs"][0]["id"]
    assert completion_records(slurm, [slow])[slow] == "CANCELLED"


def test_sigterm_to_the_pipeline_cancels_its_jobs(slurm, tmp_path):
    here = project_dir(tmp_path, "toy", TOY_BASE_YAML)
    args = ("run", "-c", "toy", *SLURM, "run.only=[slow]", "stage.slow.steps=200", "stage.slow.step_s=0.5")
    proc = cli("tests.pipeline.toy:PROJECT", here, *args, wait=False)
    root = here / "runs"
    progress = lambda: next((p for p in root.glob("slow/.partial/slow-*/progress.txt")), None)  # noqa: E731
    wait_for(lambda: progress() and int(progress().read_text() or 0) >= 2, what="the slow stage's job to run")
    job = jobs_of(root, "slow")["jobs"][0]["id"]
    stage_pid = int((progress().parent / "pid").read_text())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "cancelling the jobs of slow" in out
    wait_for(lambda: not queued([job]), timeout=120, what=f"job {job} to leave the queue")
    assert completion_records(slurm, [job])[job] == "CANCELLED"
    wait_for(lambda: not Path(f"/proc/{stage_pid}").exists(), timeout=60, what="the stage process to end")
    assert not list(root.glob("slow/slow-*"))
    status = ok(cli("tests.pipeline.toy:PROJECT", here, "status", *args[1:]))
    assert "failed   attempt 1: interrupted: KeyboardInterrupt; jobs cancelled" in status


def test_jobs_outlive_a_killed_pipeline_and_are_followed_or_cancelled_later(slurm, tmp_path):
    here = project_dir(tmp_path, "toy", TOY_BASE_YAML)
    root = here / "runs"
    progress = lambda: next((p for p in root.glob("slow/.partial/slow-*/progress.txt")), None)  # noqa: E731

    def start_and_kill(*extra):
        proc = cli("tests.pipeline.toy:PROJECT", here, "run", "-c", "toy", *SLURM, "run.only=[slow]", *extra,
                   wait=False)
        wait_for(lambda: progress() and int(progress().read_text() or 0) >= 1, what="the slow stage's job to run")
        proc.kill()  # SIGKILL: no chance to cancel anything
        proc.communicate()
        return jobs_of(root, "slow")["jobs"][0]["id"]

    # The next run follows the job still running instead of submitting another.
    job = start_and_kill("stage.slow.steps=16", "stage.slow.step_s=0.5")
    assert queued([job])
    out = ok(cli("tests.pipeline.toy:PROJECT", here, "run", "-c", "toy", *SLURM, "run.only=[slow]",
                 "stage.slow.steps=16", "stage.slow.step_s=0.5"))
    assert f"slow: following jobs {job}, still queued from an earlier run" in out
    assert jobs_of(root, "slow")["jobs"][0]["id"] == job and list(root.glob("slow/slow-*/_SUCCESS"))

    # `llmpipe cancel` cancels the jobs of a run whose orchestrator is gone.
    job = start_and_kill("stage.slow.steps=400", "stage.slow.step_s=0.5")
    out = ok(cli("tests.pipeline.toy:PROJECT", here, "cancel", "-c", "toy", *SLURM, "stage.slow.steps=400"))
    assert f"slow       cancelled jobs {job}" in out
    wait_for(lambda: not queued([job]), timeout=120, what=f"job {job} to leave the queue")
    assert completion_records(slurm, [job])[job] == "CANCELLED"


# ---------------------------------------------------------------- the real data stages


def tiny(*args, root, corpus):
    """The real CLI on the real stages (llmpipe.project), tiny config, this corpus."""
    return cli("llmpipe.project:PROJECT", REPO, *args, "-c", "tiny", f"run.root={root}", *corpus_overrides(corpus),
               "tracking.enabled=false", timeout=1800)


# A short pretraining run (the tiny model, 4 steps): the DeepSpeed launcher with its 2 CPU ranks inside a job.
PRETRAIN_SHORT = ("stage.pretrain.max_steps=4", "stage.pretrain.eval_every=2", "stage.pretrain.checkpoint_every=2",
                  "stage.pretrain.warmup_steps=1")
DATA_STAGES = ("ingest", "dedup", "quality", "pii", "decontaminate", "tokenize")


def test_tiny_data_stages_as_job_arrays_and_pretrain_equal_a_local_run(slurm, tiny_data, tmp_path):
    # The local reference: the session's local run of the data stages on the same corpus (tests/conftest.py).
    corpus, local_root, slurm_root = tiny_data["corpus"], tiny_data["root"], tmp_path / "slurm"
    local_plan = plan_rows(ok(tiny("plan", "run.only=[pretrain]", *PRETRAIN_SHORT, root=local_root, corpus=corpus)))
    plan = ok(tiny("plan", "run.only=[pretrain]", *PRETRAIN_SHORT, "cluster=slurm", "cluster.slurm.array_tasks=2",
                   root=slurm_root, corpus=corpus))
    assert plan.count("#SBATCH --array=0-1%2") == 7  # dedup splits two maps, the five others one
    assert plan.count("#SBATCH --array=0-0%1") == 1  # tokenize trains its tokenizer in a job of its own
    out = ok(tiny("run", "run.only=[pretrain]", *PRETRAIN_SHORT, "cluster=slurm", "cluster.slurm.array_tasks=2",
                  "cluster.slurm.poll_s=0.5", root=slurm_root, corpus=corpus))
    assert "[tokenize#encode.1]" in out and "[tokenize#tokenizer.0]" in out

    # Same fingerprints as the local run (cluster settings are not part of them), same bytes for the data.
    slurm_out, local_out = outputs(slurm_root), outputs(local_root)
    assert sorted(slurm_out) == sorted(f"{s}-{local_plan[s][0]}" for s in (*DATA_STAGES, "pretrain"))
    for name, files in slurm_out.items():
        if name.startswith("pretrain-"):
            continue
        assert files.keys() == local_out[name].keys(), name
        for rel, data in files.items():
            assert local_out[name][rel] == data, f"{name}/{rel} differs from the local run's"
    [info] = (slurm_root / "pretrain").glob("pretrain-*/stage_info.json")
    trained = json.loads(info.read_text())
    assert trained["metrics"]["steps"] == 4 and trained["metrics"]["world_size"] == 2
    assert trained["executor"]["kind"] == "slurm" and (info.parent / "model" / "config.json").is_file()

    ids, arrays, tasks = [], [], []
    phases = {"ingest": ["extract"], "dedup": ["signatures", "buckets"], "quality": ["filter"], "pii": ["scrub"],
              "decontaminate": ["scan"], "tokenize": ["tokenizer", "encode"]}
    for stage in DATA_STAGES:
        jobs = jobs_of(slurm_root, stage)["jobs"]
        assert [j["label"] for j in jobs] == [*phases[stage], "final"]
        ids += [j["id"] for j in jobs]
        # Slurm's completion log records an array of one task (tokenize's tokenizer) as a plain job.
        arrays += [j["id"] for j in jobs if (j["tasks"] or 0) > 1]
        tasks += [f"{j['id']}_{i}" for j in jobs if (j["tasks"] or 0) > 1 for i in range(j["tasks"])]
        [info] = (slurm_root / stage).glob(f"{stage}-*/stage_info.json")
        [ref] = (local_root / stage).glob(f"{stage}-{local_plan[stage][0]}/stage_info.json")
        counts = lambda m: {k: v for k, v in m.items() if not k.endswith(("_s", "per_s")) and "seconds" not in k}  # noqa: E731
        assert counts(json.loads(info.read_text())["metrics"]) == counts(json.loads(ref.read_text())["metrics"])
    [pretrain_job] = jobs_of(slurm_root, "pretrain")["jobs"]
    ids.append(pretrain_job["id"])
    states = completion_records(slurm, ids + tasks, tasks_of=arrays)
    assert states == {i: "COMPLETED" for i in ids + tasks}

    # The tokenizer's job trained it and ended there; the encode tasks and the final job reused it.
    [tokenize] = (slurm_root / "tokenize").glob("tokenize-*/")
    assert "the task of phase 'tokenizer' did the stage's work up to the end of that phase" in \
        (tokenize / "_logs" / "tokenizer-task0.log").read_text()
    for log in ("_logs/encode-task0.log", "_logs/encode-task1.log", "stage.log"):
        assert "reusing the tokenizer of the previous attempt" in (tokenize / log).read_text(), log


# ---------------------------------------------------------------- the time limit: save, requeue, resume

# One attempt's arithmetic. Slurm sends the signal signal_lead_s before time_min, here 50 s after the job
# starts, but early by up to ~30 s (one of its periodic checks; measured: 4 to 31 s early; a USR2 before
# submitit's handler is installed would kill the job). Before that, no attempt can train its 2 steps and export:
# on 2 loaded cores (load 7-8) the stage's start took 57-73 s (launcher, ranks, engine, first eval) and a step
# of 256 sequences 64 s; idle cores should take about a third of that. So attempt 1 saves at step 1 (its next
# step boundary after the signal), with signal_lead_s less 30 s to do it; attempt 2 resumes, trains step 2 (the
# last: no request is acted on there), exports, and its job completes. 4.8 minutes in all, measured loaded.
TIME_LIMIT = ("cluster.slurm.time_min=5", "cluster.slurm.signal_lead_s=250")
PRETRAIN_TWO_STEPS = ("stage.pretrain.max_steps=2", "stage.pretrain.warmup_steps=1",
                      "stage.pretrain.global_batch_size=256", "stage.pretrain.eval_every=100",
                      "stage.pretrain.checkpoint_every=100", "stage.pretrain.eval_sequences=8")


def test_pretrain_saves_on_the_time_limit_signal_is_requeued_and_resumes_from_that_step(slurm, tiny_data, tmp_path):
    """The issue's check, on the real Slurm: a job that cannot finish within its time limit gets the
    signal, the ranks save at their next step boundary and stop, the job is requeued (the same job id,
    SLURM_RESTART_COUNT 1), the next attempt resumes from exactly that step, and the stage commits."""
    root = tmp_path / "runs"
    shutil.copytree(tiny_data["root"], root, symlinks=True)  # the data stages' outputs: cached here
    ok(tiny("run", "run.only=[pretrain]", *PRETRAIN_TWO_STEPS, "cluster=slurm", *TIME_LIMIT,
            "cluster.slurm.poll_s=0.5", root=root, corpus=tiny_data["corpus"]))
    [job] = jobs_of(root, "pretrain")["jobs"]
    [info] = (root / "pretrain").glob("pretrain-*/stage_info.json")
    stage_info = json.loads(info.read_text())
    attempts = (info.parent / "stage.log").read_text().split(f"===== Slurm job {job['id']} on ")
    assert len(attempts) == 3, attempts[-1][-3000:]  # what the orchestrator wrote, then the job's two attempts
    first, second = attempts[1:]

    # Attempt 1: the signal, the request, the save at a step boundary, the named error, the requeue.
    assert "time-limit signal at " in first and "save requested (" in first
    [saved] = {int(n) for n in re.findall(r"saved at step (\d+) on the time-limit signal", first)}
    assert saved == 1 and f"saved step{saved:08d} at step {saved}; stopping without exporting" in first
    assert "the stage exited; stage stopped; requeued to resume" in first and "exported the model" not in first
    # Attempt 2, the same job requeued: it resumes from that very checkpoint, finishes and commits.
    assert ", requeued 1 time(s) at " in second.splitlines()[0]
    assert re.search(rf"resumed from \S+/checkpoints/step{saved:08d} at step {saved} ", second)
    assert stage_info["metrics"]["resumed_from_step"] == saved and stage_info["metrics"]["steps"] == 2
    assert "exported the model" in second and (info.parent / "model" / "config.json").is_file()
    assert stage_info["executor"]["slurm_job_id"] == job["id"] and stage_info["executor"]["slurm_restart_count"] == "1"
    assert not (info.parent / "_error.json").exists()
    assert completion_records(slurm, [job["id"]])[job["id"]] == "COMPLETED"
