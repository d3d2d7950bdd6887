"""``llmpipe run|plan|why|status|lineage|ui|sync|cancel``: the command line over the orchestrator.

Hydra overrides follow the command: ``llmpipe run --config-name llama-7b stage.sft.train.lr=1e-4``.
A project adds its own subcommands (:class:`Command`, e.g. ``llmpipe serve``); they get the same
config loading and error handling as the built-in ones.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import LlmpipeError
from pipeline.secrets import redact_text

log = logging.getLogger("llmpipe")


@dataclass(frozen=True)
class Command:
    """A project's own subcommand: ``run(args, cfg, project)`` returns the exit code; ``arguments``
    adds its options to its parser (the config options and trailing overrides are added for it)."""

    help: str
    run: Callable[[argparse.Namespace, Any, Any], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


def _parser(extra: Mapping[str, Command] = {}) -> argparse.ArgumentParser:  # noqa: B006 - read only
    p = argparse.ArgumentParser(prog="llmpipe", description="Run the LLM lifecycle pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("-c", "--config-name", default=os.environ.get("LLMPIPE_CONF", "tiny"),
                        help="top-level config in the config dir (default: tiny)")
        sp.add_argument("--config-dir", type=Path, default=None, help="config folder (default: ./conf)")
        return sp

    run = add("run", "run the pipeline (cached stages are skipped)")
    run.add_argument("--wait-tracking", action="store_true", help="return only after MLflow has every event")
    run.add_argument("overrides", nargs="*")
    add("sync", "apply tracking journals that did not reach MLflow yet").add_argument("overrides", nargs="*")
    add("plan", "show what would run and why (and, on a cluster, every job script), without running"
        ).add_argument("overrides", nargs="*")
    add("cancel", "cancel the cluster jobs of this config's outputs (those of a run whose orchestrator is gone)"
        ).add_argument("overrides", nargs="*")
    why = add("why", "show what changed since a stage's last successful run")
    why.add_argument("stage")
    why.add_argument("overrides", nargs="*")
    add("status", "show the state of every stage's output").add_argument("overrides", nargs="*")
    lineage = add("lineage", "show what an output was made from, back to the outside files (from stage_info.json)")
    lineage.add_argument("target", help="a stage (its output for this config), an output dir or file in it, "
                                        "or a tracking key (stage or pipeline run key, MLflow run id)")
    lineage.add_argument("--config", dest="full_config", action="store_true", help="print every config value")
    lineage.add_argument("--json", action="store_true", help="print the trees as JSON (a list, one per output)")
    lineage.add_argument("overrides", nargs="*")
    lineage.set_defaults(cwd=Path.cwd())  # a relative path is the user's, not the project folder's (main chdirs)
    ui = add("ui", "start the MLflow UI on the tracking store")
    ui.add_argument("overrides", nargs="*")
    for name, command in extra.items():
        sp = add(name, command.help)
        if command.arguments:
            command.arguments(sp)
        sp.add_argument("overrides", nargs="*")
    return p


def main(argv: Sequence[str] | None = None, *, project_path: str, default_config_dir: Path,
         commands: Mapping[str, Command] = {}) -> int:  # noqa: B006 - read only
    from pipeline.logs import setup_logging
    from pipeline.worker import load_project

    clash = set(commands) & set(COMMANDS)
    if clash:
        raise ValueError(f"project commands {sorted(clash)} would hide llmpipe's own")
    parser = _parser(commands)
    # Overrides may stand before or after options (`run a=1 -c tiny b=2`): argparse hands back the
    # later ones as unknown arguments; anything else unknown is an error.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    setup_logging()
    cfg = None
    try:
        from pipeline import config as config_mod

        project = load_project(project_path)
        config_dir = (args.config_dir or _find_config_dir(default_config_dir)).resolve()
        cfg = config_mod.load(project, config_dir, args.config_name, args.overrides)
        # Relative paths in configs (inputs, sample files) mean "relative to the project folder", for the
        # orchestrator (plan-time source state) exactly as for the stage processes it starts there.
        os.chdir(cfg.project_dir)
        handler = commands[args.command].run if args.command in commands else COMMANDS[args.command]
        return handler(args, cfg, project)
    except LlmpipeError as exc:
        print(f"llmpipe: error: {redact_text(str(exc))}", file=sys.stderr)  # a Hydra error may quote an override
        return 2
    except KeyboardInterrupt:
        print("llmpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmpipe plan | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a full disk under the run root or the tracking journal: said as such, no traceback
        from pipeline.store import disk_full

        where = exc.filename if isinstance(exc.filename, str) else (cfg.root if cfg is not None else ".")
        full = disk_full(where, exc) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
        if full is None:
            raise
        print(f"llmpipe: error: {full} ({exc})", file=sys.stderr)
        return 2


def _find_config_dir(default: Path) -> Path:
    local = Path.cwd() / "conf"
    return local if local.is_dir() else default


def cmd_plan(args, cfg, project) -> int:
    from pipeline.plan import check_inputs, make_plan

    plan = make_plan(cfg, project)
    check_inputs(plan)  # a missing or wrong input file: InputError, exit 2 (main)
    print(f"plan for config '{cfg.name}' (root {cfg.root})")
    print(f"{'stage':<10} {'fingerprint':<13} {'action':<9} reason")
    for sp in plan.stages.values():
        print(f"{sp.name:<10} {sp.fingerprint:<13} {sp.action:<9} {sp.reason}")
    print_outside_inputs(plan)
    if cfg.cluster.executor != "local":
        print_job_scripts(cfg, plan)
    return 0


def print_outside_inputs(plan) -> None:
    """What the stages that run read from outside the pipeline, as their fingerprints hold it: a content
    digest (shortened), or what a name resolved to (a hub id's commit). Only keyed states (a stage's
    ``external`` as a flat mapping) are listed; a run-away list is cut."""
    lines = []
    for sp in plan.to_run():
        external = sp.payload.get("external")
        if isinstance(external, dict):
            for key, value in external.items():
                text = str(value)
                short = text[:len("xxh3_128:") + 12] + "…" if text.startswith("xxh3_128:") else text
                lines.append(f"  {sp.name}.{key}: {short}")
    if lines:
        print("\noutside inputs of the stages that run (in their fingerprints):")
        print("\n".join(lines[:40] + ([f"  ... and {len(lines) - 40} more"] if len(lines) > 40 else [])))


def print_job_scripts(cfg, plan) -> None:
    """Every job script a run would submit, in submission order (job ids are known only once submitted)."""
    from pipeline.executors import make_executor
    from pipeline.secrets import redact_text

    executor = make_executor(cfg.cluster, cfg.root)
    to_run = plan.to_run()
    if not to_run:
        return
    print(f"\n# {cfg.cluster.executor} jobs to submit; <stage>_<job>_jobid stands for the id a job gets when submitted")
    for sp in to_run:
        after = [executor.placeholder(p) for p in plan.dag.parents[sp.name] if plan.stages[p].action == "run"]
        for spec, script in executor.render(sp.name, sp.fingerprint, sp.stage.shard_phases, after):
            kind = f"array of {spec.tasks} tasks, phase '{spec.phase}'" if spec.tasks else "commits the output"
            print(f"\n# ===== {sp.name}: {spec.label} job ({kind}) =====")
            print(redact_text(script.rstrip("\n")))  # setup lines may export a token


def cmd_run(args, cfg, project) -> int:
    import signal

    from pipeline.plan import check_inputs, make_plan
    from pipeline.runner import Runner
    from pipeline.secrets import redact_text

    def stop(signum, frame):  # SIGTERM (kill, a scheduler) stops the run like Ctrl-C: its stages and jobs too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    plan = make_plan(cfg, project)
    check_inputs(plan)  # before the run root, locks or tracking exist: InputError, exit 2 (main)
    result = Runner(cfg, project).run(plan)
    print(redact_text(result.summary()))  # errors quote what the stages raised
    tracker = result.tracker
    if tracker is not None and tracker.journal is not None:
        if args.wait_tracking:
            tracker.wait()
        for warning in tracker.warnings():  # a failed sync: the run's outcome stands, its tracking waits
            print(f"llmpipe: warning: {warning}", file=sys.stderr)
        print(f"MLflow: run llmpipe.run_key={tracker.key} (syncing from {tracker.journal}); `make ui` to browse")
    return 0 if result.ok else 1


def cmd_sync(args, cfg, project) -> int:
    from pipeline.mlflow_sync import sync_pending
    from pipeline.tracking import tracking_locations

    # The journals keep the tracking URI with *** for its credentials: the config gives them back.
    n, failed = sync_pending(cfg.root, tracking_locations(cfg))
    print(f"applied {n} tracking journal(s) under {cfg.root}")
    for journal, error in failed.items():
        print(f"llmpipe: error: tracking journal {journal} did not reach MLflow: {error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_why(args, cfg, project) -> int:
    from pipeline.plan import explain, make_plan

    print(explain(make_plan(cfg, project), args.stage))
    return 0


def cmd_status(args, cfg, project) -> int:
    from pipeline.plan import make_plan
    from pipeline.tracking import sync_summary

    plan = make_plan(cfg, project)
    store = plan.store
    executor = None
    if cfg.cluster.executor != "local":
        from pipeline.executors import make_executor

        executor = make_executor(cfg.cluster, cfg.root)
    print(f"status for config '{cfg.name}' (root {cfg.root})")
    for sp in plan.stages.values():
        fp = sp.fingerprint
        if store.is_done(sp.name, fp):
            info = store.info(sp.name, fp) or {}
            state = f"done     {info.get('finished_at_iso', '')} {store.final_dir(sp.name, fp)}"
        elif executor is not None and (handle := executor.active(sp.name, fp)) is not None:
            state = f"queued   jobs {' '.join(handle.job_ids)} (attempt {handle.attempt})"
        elif store.is_running(sp.name, fp):
            state = f"running  {store.partial_dir(sp.name, fp)}"
        elif failure := store.failure(sp.name, fp):
            state = f"failed   attempt {failure['attempt']}: {failure['reason']} ({store.partial_dir(sp.name, fp)})"
        elif interrupted := store.interrupted(sp.name, fp):  # began, never ended: its run was killed or lost
            state = f"interrupted (attempt {interrupted}) {store.partial_dir(sp.name, fp)}"
        else:
            older = store.successes(sp.name)
            state = "missing" + (f"  (an older output: {older[-1]['fingerprint']})" if older else "")
        print(f"{sp.name:<10} {fp:<13} {state}")
    if (tracking := sync_summary(cfg.root)) is not None:
        print(tracking)
    return 0


def cmd_lineage(args, cfg, project) -> int:
    import json

    from pipeline.lineage import lineage, render

    trees = lineage(args.target, cfg, project, cwd=args.cwd)
    if args.json:
        print(json.dumps([tree.to_json() for tree in trees], indent=2, default=str))
    else:
        print("\n\n".join(render(tree, full_config=args.full_config) for tree in trees))
    return 0


def cmd_cancel(args, cfg, project) -> int:
    """Cancel the jobs recorded for the outputs this config would produce (a run cancels its own on
    Ctrl-C or SIGTERM; this is for jobs whose orchestrator was killed outright or lost its node)."""
    from pipeline.executors import make_executor
    from pipeline.plan import make_plan

    if cfg.cluster.executor == "local":
        print("cluster.executor=local: no jobs to cancel (a local run stops with its process)")
        return 0
    executor = make_executor(cfg.cluster, cfg.root)
    plan = make_plan(cfg, project)
    found = 0
    for sp in plan.stages.values():
        handle = executor.active(sp.name, sp.fingerprint)
        if handle is not None:
            executor.cancel([handle])
            found += 1
            print(f"{sp.name:<10} cancelled jobs {' '.join(handle.job_ids)}")
    print(f"cancelled the jobs of {found} stage(s)" if found else "no queued or running jobs for this config")
    return 0


def cmd_ui(args, cfg, project) -> int:
    from pipeline.tracking import tracking_uri, ui_link

    uri = tracking_uri(cfg)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", cfg.tracking.ui_host, "--port", str(cfg.tracking.ui_port),
           "--workers", str(cfg.tracking.ui_workers)]
    # The link opens the model-training view: MLflow 3.17's UI picks its view from the address (or the sidebar's
    # switch), not from the experiment's kind tag that the sync sets.
    link = ui_link(f"http://{cfg.tracking.ui_host}:{cfg.tracking.ui_port}")
    print(f"MLflow UI on {link} ({redact_text(uri)}); Ctrl-C stops it")
    import signal

    from pipeline.processes import die_with_parent, terminate_group

    # Its own process group: the server's uvicorn and huey workers go with it, whoever stops it.
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent)

    def stop(signum, frame):  # SIGTERM (kill, a scheduler) stops it like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        terminate_group(proc, grace_s=30)  # waits for the workers too, so the port is free on return
        return 0


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "why": cmd_why, "status": cmd_status, "ui": cmd_ui, "sync": cmd_sync,
            "cancel": cmd_cancel, "lineage": cmd_lineage}
