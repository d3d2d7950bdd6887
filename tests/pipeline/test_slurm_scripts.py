"""The Slurm executor without a cluster: the job scripts it renders (toy, llama-7b on 4 x 8 GPUs),
the array tasks and final job of a stage that maps over shards run as a Slurm job runs them, and
cluster settings never changing a fingerprint. tests/slurm/ runs the same on a real Slurm."""

import json
import threading
from pathlib import Path

import pytest

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.executors import Task, make_executor
from pipeline.executors.slurm import StageJob
from pipeline.plan import make_plan
from pipeline.runner import Runner
from pipeline.sharding import ShardSlice
from pipeline.store import Store
from pipeline.tracking import NullTracker
from tests.pipeline.toy import SHARDED, load_sharded

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
SLURM = ("cluster=slurm",)


def fps(cfg, project):
    return {n: sp.fingerprint for n, sp in make_plan(cfg, project).stages.items()}


def test_cluster_settings_never_change_a_fingerprint(tmp_path):
    from llmpipe.project import PROJECT

    local = config.load(PROJECT, CONF, "tiny", [f"run.root={tmp_path}"])
    slurm = config.load(PROJECT, CONF, "tiny", [f"run.root={tmp_path}", "cluster=slurm", "cluster.slurm.nodes=2",
                                                "cluster.slurm.array_tasks=7", "+cluster.slurm.stages.ingest.qos=x"])
    assert slurm.cluster.executor == "slurm" and slurm.cluster.slurm.for_stage("ingest").qos == "x"
    assert fps(local, PROJECT) == fps(slurm, PROJECT)
    big = config.load(PROJECT, CONF, "llama-7b", [f"run.root={tmp_path}"])
    assert fps(big, PROJECT) == fps(config.load(PROJECT, CONF, "llama-7b", [f"run.root={tmp_path}", "cluster=local"]),
                                    PROJECT)


def test_bad_slurm_settings_are_named_errors():
    from llmpipe.project import PROJECT

    with pytest.raises(ConfigError, match=r"cluster\.slurm\.stages\.pretrian: unknown stage \(did you mean 'pretrain'"):
        config.load(PROJECT, CONF, "tiny", ["cluster=slurm", "+cluster.slurm.stages.pretrian.nodes=2"])
    with pytest.raises(ConfigError, match=r"cluster\.slurm\.stages\.pretrain\.nodes: must be at least 1, got 0"):
        config.load(PROJECT, CONF, "tiny", ["cluster=slurm", "+cluster.slurm.stages.pretrain.nodes=0"])
    with pytest.raises(ConfigError, match=r"cluster\.slurm\.stages\.pretrain\.gpus: unknown key"):
        config.load(PROJECT, CONF, "tiny", ["cluster=slurm", "+cluster.slurm.stages.pretrain.gpus=8"])
    with pytest.raises(ConfigError, match=r"cluster\.executor: 'k8s' is not one of 'local', 'slurm'"):
        config.load(PROJECT, CONF, "tiny", ["cluster.executor=k8s"])


def test_a_stage_that_maps_over_shards_becomes_arrays_then_a_committing_job(tmp_path):
    cfg = load_sharded(tmp_path, "cluster.executor=slurm", "+cluster.slurm.array_tasks=3",
                       "+cluster.slurm.array_parallelism=2", "+cluster.slurm.partition=debug")
    plan = make_plan(cfg, SHARDED)
    ex = make_executor(cfg.cluster, cfg.root)
    sp = plan.stages["shout"]
    jobs = ex.render("shout", sp.fingerprint, sp.stage.shard_phases, [ex.placeholder("parts")])
    assert [(s.label, s.tasks) for s, _ in jobs] == [("shout", 3), ("stamp", 3), ("final", None)]
    (_, split1), (_, split2), (_, final) = jobs
    folder = cfg.root / "shout" / ".slurm" / f"shout-{sp.fingerprint}"
    assert "#SBATCH --array=0-2%2\n" in split1 and "#SBATCH --dependency=afterok:parts_final_jobid\n" in split1
    assert f"#SBATCH --output={folder}/%A_%a_0_log.out\n" in split1
    assert "#SBATCH --job-name=llmpipe.shout.shout\n" in split1 and "#SBATCH --job-name=llmpipe.shout\n" in final
    assert "#SBATCH --dependency=afterok:shout_shout_jobid\n" in split2
    assert "#SBATCH --dependency=afterok:shout_stamp_jobid\n" in final and "--array" not in final
    for script in (split1, split2, final):
        assert "#SBATCH --partition=debug\n" in script and "#SBATCH --kill-on-invalid-dep=yes\n" in script
        assert "#SBATCH --signal=B:USR2@600\n" in script and "--wckey" not in script and "srun" not in script
        assert script.rstrip().endswith(f"-u -m submitit.core._submit {folder}")
        assert "\nexec " in script
    # one array per map is optional: array_tasks=1 runs the stage as one job
    single = make_executor(load_sharded(tmp_path, "cluster.executor=slurm", "+cluster.slurm.array_tasks=1").cluster,
                           cfg.root)
    assert [s.label for s, _ in single.render("shout", sp.fingerprint, ("shout", "stamp"), [])] == ["final"]


def _prepare(cfg, stage_name, runner):
    """Begin an attempt and write its task files as the Slurm executor does: one for the array
    tasks, one (with the commit section) for the final job."""
    plan = make_plan(cfg, SHARDED)
    sp = plan.stages[stage_name]
    store = plan.store
    partial, attempt = store.begin_attempt(sp.name, sp.fingerprint, sp.stage.resumable)
    task = Task(project=SHARDED.import_path, stage=sp.name, fingerprint=sp.fingerprint,
                config=json.loads(json.dumps(sp.payload["config"] | {"workers": 1, "prelude_s": 0.3})),
                output_dir=partial, inputs=sp.inputs, attempt=attempt, log_file=partial / "stage.log",
                metrics_file=partial / "metrics.jsonl", cwd=cfg.project_dir,
                commit={"root": str(store.root), "info": runner.base_info(sp, attempt, None),
                        "record_env": ["SLURM_JOB_ID"]})
    return store, sp, partial, tmp_task(cfg, task, commit=False), tmp_task(cfg, task, commit=True)


def _call(job, errors):
    try:
        job()
    except Exception as exc:  # noqa: BLE001 - collected for the assertion
        errors.append(exc)


def _run_jobs(cfg, stage_name, runner, phases, tasks):
    """Run one stage attempt the way its Slurm jobs do, without Slurm: each array's tasks at once
    (threads, each starting the real worker process), then the final job, which commits."""
    store, sp, partial, array_file, final_file = _prepare(cfg, stage_name, runner)
    for phase in phases:
        jobs = [StageJob(str(array_file), str(partial / f"_logs/{phase}-task{i}.log"),
                         ShardSlice(i, tasks, phase).encode(), True, {}, str(cfg.project_dir)) for i in range(tasks)]
        errors: list[Exception] = []
        threads = [threading.Thread(target=_call, args=(j, errors)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert not store.is_done(sp.name, sp.fingerprint)  # array tasks never commit
    StageJob(str(final_file), str(partial / "stage.log"), None, True, {"SLURM_JOB_ID": "4242"},
             str(cfg.project_dir))()
    return store, sp


def tmp_task(cfg, task, commit):
    data = task.to_json()
    if not commit:
        data.pop("commit")
    path = cfg.root / f"task-{'final' if commit else 'array'}.json"
    path.write_text(json.dumps(data))
    return path


def test_array_tasks_and_final_job_give_what_a_local_run_gives(tmp_path):
    local_cfg = load_sharded(tmp_path / "local")
    local = Runner(local_cfg, SHARDED).run()
    assert local.ok

    cfg = load_sharded(tmp_path / "slurm", "cluster.executor=slurm")
    runner = Runner(cfg, SHARDED, tracker=NullTracker())  # for its stage_info; it submits nothing
    Runner(load_sharded(tmp_path / "slurm", "run.only=[parts]"), SHARDED).run()
    store, sp = _run_jobs(cfg, "shout", runner, phases=("shout", "stamp"), tasks=3)

    assert sp.fingerprint == local.outcomes["shout"].fingerprint
    out = store.final_dir("shout", sp.fingerprint)
    assert (out / "_SUCCESS").is_file() and not store.partial_dir("shout", sp.fingerprint).exists()
    ref = local.outcomes["shout"].output
    names = sorted(p.name for p in (ref / "shouted").iterdir())
    assert names == sorted(p.name for p in (out / "shouted").iterdir()) and len(names) == 5
    for name in names:
        assert (out / "shouted" / name).read_text() == (ref / "shouted" / name).read_text()
    assert (out / "shouted" / "00000.txt").read_text() == "W0X0 W0X1 W0X2 W0X3! (of 30)"

    # Map 1 and map 2 ran in the array tasks (shard i in task i % 3), nothing in the final job.
    up = {p.stem: json.loads(p.read_text())["slice"] for p in (out / "_work" / "up").glob("*.who")}
    stamped = {p.stem: json.loads(p.read_text())["slice"] for p in (out / "_who").glob("*.json")}
    assert up == {f"{i:05d}": f"{i % 3}/3@shout" for i in range(5)}
    assert stamped == {f"{i:05d}": f"{i % 3}/3@stamp" for i in range(5)}
    # The preludes ran one at a time (7 of them: 3 + 3 tasks and the final job).
    spans = sorted((r["began"], r["ended"]) for r in map(json.loads, (out / "prelude.jsonl").read_text().splitlines()))
    assert len(spans) == 7 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))

    info = json.loads((out / "stage_info.json").read_text())
    assert info["metrics"]["words"] == 30 and info["executor"] == {"kind": "slurm", "slurm_job_id": "4242"}
    assert info["payload"] == local.plan.stages["shout"].payload
    task_log = (out / "_logs" / "shout-task1.log").read_text()
    assert "array task 1 of 3 finished its 2 shard(s) of phase 'shout'" in task_log
    # downstream stages see a normal committed output: the local runner takes it as cached
    rest = Runner(load_sharded(tmp_path / "slurm"), SHARDED).run()
    assert {n: o.status for n, o in rest.outcomes.items()} == {"parts": "cached", "shout": "cached", "tally": "ran"}


def test_an_array_task_whose_stage_never_reaches_its_split_map_fails(tmp_path):
    """An array task for a phase the stage never maps: the task fails (after running the stage
    whole, alone under the prelude lock) instead of looking done."""
    from pipeline.executors.slurm import StageJobFailed

    cfg = load_sharded(tmp_path)
    Runner(load_sharded(tmp_path, "run.only=[parts]"), SHARDED).run()
    runner = Runner(cfg, SHARDED, tracker=NullTracker())
    store, sp, partial, array_file, _ = _prepare(cfg, "shout", runner)
    job = StageJob(str(array_file), str(partial / "x.log"), "0/2@shine", True, {}, str(cfg.project_dir))
    with pytest.raises(StageJobFailed, match="returned without reaching its map over shards 'shine'"):
        job()
    assert not store.is_done(sp.name, sp.fingerprint)


def _sbatch_options(script: str) -> dict[str, str]:
    return dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in script.splitlines()
                if line.startswith("#SBATCH --"))


def test_llama_7b_pretrain_sbatch_script_and_launch_on_4_nodes_of_8_gpus_zero3(tmp_path):
    """The exact job script of llama-7b's pretraining, and the rank launch the stage derives from
    the allocation that script asks for: 4 nodes x 8 GPUs = 32 DeepSpeed ranks, ZeRO-3."""
    import shlex
    import sys

    from llmpipe.project import PROJECT
    from stages.common.launch import plan_launch
    from stages.pretrain.stage import LOOP_MODULE, deepspeed_config, make_schedule

    cfg = config.load(PROJECT, CONF, "llama-7b", [f"run.root={tmp_path}"])
    assert cfg.cluster.executor == "slurm"
    plan = make_plan(cfg, PROJECT)
    ex = make_executor(cfg.cluster, cfg.root)
    sp = plan.stages["pretrain"]
    [(spec, script)] = ex.render("pretrain", sp.fingerprint, sp.stage.shard_phases, [ex.placeholder("tokenize")])
    folder = tmp_path / "pretrain" / ".slurm" / f"pretrain-{sp.fingerprint}"
    assert spec.label == "final" and script == f"""#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=96
#SBATCH --dependency=afterok:tokenize_final_jobid
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=llmpipe.pretrain
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mem=1024G
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output={folder}/%j_0_log.out
#SBATCH --signal=B:USR2@600
#SBATCH --time=2880

# setup
export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

# command
export SUBMITIT_EXECUTOR=slurm
exec {shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}
"""
    # What Slurm hands that batch script on node 0, and what the stage launches from there.
    opts = _sbatch_options(script)
    nodes, gpus = int(opts["nodes"]), int(opts["gpus-per-node"])
    env = {"SLURM_JOB_ID": "7001", "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]", "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_NNODES": str(nodes), "SLURM_GPUS_PER_NODE": str(gpus), "SLURM_CPUS_PER_TASK": opts["cpus-per-task"],
           "SLURM_NODEID": "0"}
    pretrain = cfg.stages["pretrain"]
    launch = plan_launch(pretrain.launch, LOOP_MODULE, ["--job", "/out/pretrain_job.json"], cuda_devices=gpus,
                         environ=env, hostfile="/out/hostfile", port=None, python="/venv/bin/python")
    assert launch.mode == "srun" and launch.world_size == 32
    assert launch.hostfile == "".join(f"gpu{i:02d} slots=8\n" for i in range(1, 5))
    assert list(launch.argv[:7]) == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                                     "bash", "-c"]
    assert launch.argv[7] == (
        'exec /venv/bin/python -u -m deepspeed.launcher.runner --hostfile /out/hostfile --no_ssh --node_rank '
        '"$SLURM_NODEID" --num_nodes 4 --num_gpus 8 --master_addr gpu01 --master_port 29500 --module '
        '--no_local_rank stages.pretrain.loop --job /out/pretrain_job.json')
    schedule = make_schedule(pretrain, launch.world_size, 4096)
    assert (schedule.grad_accum, schedule.tokens_per_step) == (4, 512 * 4096)  # 512 = 4 micro x 32 ranks x 4
    zero = deepspeed_config(pretrain, schedule, bf16=True, accelerator=launch.accelerator)["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_log_tail_follows_the_file_through_the_commit_and_never_reads_an_old_output(tmp_path):
    """The runner streams a job's log while the job itself renames partial -> final."""
    import os

    from pipeline.tails import LogTail

    partial, final = tmp_path / ".partial" / "s-1", tmp_path / "s-1"
    final.mkdir(parents=True)
    (final / "stage.log").write_text("old output's log\n")  # a forced re-run replaces this output
    os.utime(final / "stage.log", (0, 0))
    tail = LogTail(partial / "stage.log", final / "stage.log")
    assert tail.lines() == []  # the old output's log is not this attempt's
    partial.mkdir(parents=True)
    with open(partial / "stage.log", "a") as log:
        log.write("one\ntw")
        log.flush()
        assert tail.lines() == ["one"]  # half a line waits
        (final / "stage.log").unlink()
        final.rmdir()
        partial.rename(final)  # the commit, while the job still writes
        log.write("o\nthree\n")
    assert tail.lines() == ["two", "three"] and tail.lines() == []


# ---------------------------------------------------------------- the time limit: a save request, then a requeue


def test_the_time_limit_signal_lead_is_configured_per_stage_and_checked_against_the_time_limit(tmp_path):
    from llmpipe.project import PROJECT

    cfg = config.load(PROJECT, CONF, "tiny", [f"run.root={tmp_path}", "cluster=slurm", "cluster.slurm.time_min=30",
                                              "cluster.slurm.signal_lead_s=300",
                                              "+cluster.slurm.stages.pretrain.signal_lead_s=900",
                                              "+cluster.slurm.stages.pretrain.time_min=120"])
    plan = make_plan(cfg, PROJECT)
    ex = make_executor(cfg.cluster, cfg.root)
    [(_, pretrain)] = ex.render("pretrain", plan.stages["pretrain"].fingerprint, (), [])
    [(_, pii_final)] = [job for job in ex.render("pii", plan.stages["pii"].fingerprint, ("scrub",), [])
                        if job[0].label == "final"]
    assert "#SBATCH --signal=B:USR2@900\n" in pretrain and "#SBATCH --time=120\n" in pretrain
    assert "#SBATCH --signal=B:USR2@300\n" in pii_final and "#SBATCH --time=30\n" in pii_final
    from pipeline.executors.slurm import JobSpec

    limit = ex.time_limit("pretrain", JobSpec("final"))
    assert (limit.limit_s, limit.lead_s, limit.requeues, limit.wait_s) == (7200, 900, 3, 870)
    assert ex.time_limit("pii", JobSpec("final")).lead_s == 300
    for overrides, message in [
        (["cluster.slurm.time_min=5"], r"cluster\.slurm\.signal_lead_s: 600 s is not below the job's time limit "
                                       r"\(time_min=5: 300 s\)"),
        (["+cluster.slurm.stages.sft.time_min=10"], r"cluster\.slurm\.stages\.sft\.signal_lead_s: 600 s is not below "
                                                    r"the job's time limit \(time_min=10: 600 s\)"),
        (["cluster.slurm.signal_lead_s=0"], r"cluster\.slurm\.signal_lead_s: must be at least 1, got 0"),
        (["+cluster.slurm.stages.sft.signal_lead_s=-5"], r"cluster\.slurm\.stages\.sft\.signal_lead_s: must be at "
                                                         r"least 1, got -5"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config.load(PROJECT, CONF, "tiny", ["cluster=slurm", *overrides])


def _counter_job(root, **config):
    """An attempt of the counter stage (tests/pipeline/counter.py) as its Slurm final job would run it."""
    from tests.pipeline.counter import COUNTER

    store = Store(root)
    partial, attempt = store.begin_attempt("count", "c0ffee", True)
    task = Task(project=COUNTER.import_path, stage="count", fingerprint="c0ffee",
                config={"steps": 60, "step_s": 0.1, "ignore_requests": False, **config}, output_dir=partial,
                inputs={}, attempt=attempt, log_file=partial / "stage.log", metrics_file=partial / "metrics.jsonl",
                cwd=REPO, commit={"root": str(root), "info": {"stage": "count", "fingerprint": "c0ffee"}})
    task_file = root / "slurm" / "task-final.json"
    task_file.parent.mkdir(parents=True, exist_ok=True)
    task_file.write_text(json.dumps(task.to_json()))
    return store, partial, task_file


def _signalled(job, when):
    """Run ``job`` as a Slurm job's submitit process does, with submitit's USR2 handler: ``checkpoint()``,
    then the job process exits (SystemExit) after a requeue or not. USR2 comes once ``when()`` holds.
    Returns (what job() returned or raised, what checkpoint() returned, if it returned)."""
    import os
    import signal
    import time

    returned = []

    def handler(signum, frame):
        returned.append(job.checkpoint())
        raise SystemExit(-1)

    def watch():
        while not when():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, handler)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        try:
            outcome = job()
        except SystemExit as exc:
            outcome = exc
        watcher.join(timeout=60)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    return outcome, returned


def test_the_time_limit_signal_asks_for_a_save_then_requeues_counts_and_ends_a_finished_stage(tmp_path,
                                                                                            monkeypatch):
    """StageJob.checkpoint with real stage processes and a real signal, as submitit calls it: the stage is
    asked to save (it saves at its next step and exits with SavedOnRequest) and the job is requeued; a
    stage that does not save is stopped once the wait is over; time limits are counted against
    requeue_timeouts; a stage that finishes while it is waited for ends its job as a success, committed."""
    from submitit.core.utils import DelayedSubmission

    from pipeline.executors.slurm import TimeLimit, save_request_file
    from pipeline.worker import read_error

    store, partial, task_file = _counter_job(tmp_path)
    log, progress = partial / "stage.log", partial / "progress.txt"

    def steps() -> int:
        return int(progress.read_text()) if progress.exists() else 0

    # lead 3 s: the stage gets 2 s after the signal (a third of the lead is kept to stop it and requeue).
    short = TimeLimit(limit_s=60, lead_s=3, requeues=1)
    job = StageJob(str(task_file), str(log), None, True, {}, str(REPO), limit=short)
    outcome, [again] = _signalled(job, lambda: steps() >= 2)
    assert isinstance(outcome, SystemExit) and isinstance(again, DelayedSubmission)
    request = save_request_file(task_file)
    assert json.loads(request.read_text())["why"].startswith("time-limit signal to Slurm job")
    text = log.read_text()
    assert f"save requested ({request}); waiting up to 2 s for the stage to save and exit" in text
    assert "the stage exited; stage stopped; requeued to resume" in text
    saved = steps()
    assert read_error(partial) == (f"SavedOnRequest: saved at step {saved} on the time-limit signal ({progress}); "
                                   "requeued to resume from that step")
    assert again.function.timeouts == 1 and again.function.limit == short  # a signal 60 s before a 60 s limit
    assert 2 <= saved < 60 and not store.is_done("count", "c0ffee")

    # The requeued job, with a stage that does not save: stopped once the wait is over, and at its second time
    # limit it is not requeued. Its request was withdrawn when it started.
    data = json.loads(task_file.read_text())
    task_file.write_text(json.dumps({**data, "config": {**data["config"], "ignore_requests": True}}))
    outcome, [none] = _signalled(again.function, lambda: not request.exists() and steps() >= saved + 2)
    assert isinstance(outcome, SystemExit) and none is None
    text = log.read_text()
    assert ("the stage did not exit in time; stage stopped; not requeued: this is its time limit number 2 "
            "(cluster.slurm.requeue_timeouts=1)") in text
    stopped = steps()

    # Requeued (by hand) with time enough: the stage ends during the wait, the job ends well and commits, and
    # the earlier attempt's "saved at step N" does not travel with the output.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    job = StageJob(str(task_file), str(log), None, True, {}, str(REPO),
                   limit=TimeLimit(limit_s=3600, lead_s=90, requeues=1))
    outcome, returned = _signalled(job, lambda: steps() >= stopped + 3)
    assert outcome == "ok" and returned == []  # checkpoint() ended the wait in __call__, not by returning
    final = store.final_dir("count", "c0ffee")
    assert store.is_done("count", "c0ffee") and (final / "progress.txt").read_text() == "60"
    assert read_error(final) is None and not partial.exists()
    assert "===== Slurm job pid" in (final / "stage.log").read_text().split("requeued 2 time(s)")[0]


# ---------------------------------------------------------------- per-phase jobs and resources


def test_the_tokenizer_gets_a_job_of_its_own_with_the_resources_llama_7b_gives_it(tmp_path):
    """tokenize's single phase 'tokenizer' is an array of one task, before the encode array and the job
    that commits, each job with its phase's resources (llama-7b: cluster.slurm.stages.tokenize.phases)."""
    from llmpipe.project import PROJECT

    cfg = config.load(PROJECT, CONF, "llama-7b", [f"run.root={tmp_path}"])
    plan = make_plan(cfg, PROJECT)
    ex = make_executor(cfg.cluster, cfg.root)
    sp = plan.stages["tokenize"]
    jobs = ex.render("tokenize", sp.fingerprint, sp.stage.shard_phases, ["pii_final_jobid"])
    assert [(s.label, s.tasks, s.phase) for s, _ in jobs] == [("tokenizer", 1, "tokenizer"), ("encode", 32, "encode"),
                                                              ("final", None, None)]
    tokenizer, encode, final = (_sbatch_options(script) for _, script in jobs)
    assert {k: tokenizer[k] for k in ("array", "cpus-per-task", "mem", "time", "job-name", "dependency")} == {
        "array": "0-0%1", "cpus-per-task": "32", "mem": "256G", "time": "240", "job-name": "llmpipe.tokenize.tokenizer",
        "dependency": "afterok:pii_final_jobid"}
    assert {k: encode[k] for k in ("array", "cpus-per-task", "mem", "time", "dependency")} == {
        "array": "0-31%32", "cpus-per-task": "16", "mem": "64G", "time": "240",
        "dependency": "afterok:tokenize_tokenizer_jobid"}
    assert (final["cpus-per-task"], final["mem"], "array" not in final) == ("16", "64G", True)
    # Phases of other stages keep the stage's resources; with array_tasks 1 the stage runs whole in one job.
    dedup = plan.stages["dedup"]
    assert [s.tasks for s, _ in ex.render("dedup", dedup.fingerprint, dedup.stage.shard_phases, [])] == [32, 32, None]
    whole = make_executor(config.load(PROJECT, CONF, "llama-7b", [f"run.root={tmp_path}",
                                                                  "cluster.slurm.array_tasks=1"]).cluster, cfg.root)
    assert [s.label for s, _ in whole.render("tokenize", sp.fingerprint, sp.stage.shard_phases, [])] == ["final"]
    with pytest.raises(ConfigError, match=r"cluster\.slurm\.stages\.tokenize\.phases\.tokeniser: stage 'tokenize' has "
                                          r"no phase 'tokeniser' \(its jobs: tokenizer, encode, final\) \(did you mean "
                                          r"'tokenizer'"):
        config.load(PROJECT, CONF, "llama-7b", ["+cluster.slurm.stages.tokenize.phases.tokeniser.mem_gb=64"])
    with pytest.raises(ConfigError, match=r"cluster\.slurm\.stages\.tokenize\.phases\.tokenizer\.phases: "
                                          r"a phase has no phases of its own"):
        config.load(PROJECT, CONF, "llama-7b", ["+cluster.slurm.stages.tokenize.phases.tokenizer.phases.x.nodes=2"])
