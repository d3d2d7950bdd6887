"""plan: run/skip per stage with a reason; why: what changed, as a diff."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.plan import EXCLUDED, RUN, SKIP, check_inputs, explain, make_plan
from pipeline.runner import Runner


def actions(cfg, project):
    return {n: sp.action for n, sp in make_plan(cfg, project).stages.items()}


def ran(result):
    return {n for n, o in result.outcomes.items() if o.status == "ran"}


def test_fresh_plan_runs_everything_with_reason(toy):
    plan = make_plan(toy(), toy.project)
    assert {sp.action for sp in plan.stages.values()} == {RUN}
    assert all(sp.reason == "never ran" for sp in plan.stages.values())


def test_config_edit_reruns_exactly_the_stage_and_its_descendants(toy):
    first = Runner(toy(), toy.project).run()
    assert first.ok and ran(first) == {"source", "upper", "count", "side", "slow"}
    assert set(actions(toy(), toy.project).values()) == {SKIP}

    edited = toy("stage.upper.suffix=?")
    plan = make_plan(edited, toy.project)
    assert {n for n, sp in plan.stages.items() if sp.action == RUN} == {"upper", "count", "slow"}
    assert plan.stages["upper"].reason == "config changed: suffix"
    assert plan.stages["count"].reason == "upstream changed: upper"
    assert plan.stages["source"].reason == "cached: output exists"

    second = Runner(edited, toy.project).run()
    assert ran(second) == {"upper", "count", "slow"}
    assert {n for n, o in second.outcomes.items() if o.status == "cached"} == {"source", "side"}


def test_run_only_selects_stage_and_what_it_needs(toy):
    plan = make_plan(toy("run.only=[upper]"), toy.project)
    assert {n: sp.action for n, sp in plan.stages.items()} == {
        "source": RUN, "upper": RUN, "count": EXCLUDED, "side": EXCLUDED, "slow": EXCLUDED}


def test_run_from_forces_stage_and_descendants_only(toy):
    Runner(toy(), toy.project).run()
    plan = make_plan(toy("run.from=upper"), toy.project)
    assert {n for n, sp in plan.stages.items() if sp.action == RUN} == {"upper", "count", "slow"}
    assert plan.stages["count"].reason == "forced by run.from=upper"


def test_run_force_reruns_named_stage_only_and_keeps_previous_output(toy):
    cfg = toy()
    Runner(cfg, toy.project).run()
    store = make_plan(cfg, toy.project).store
    result = Runner(toy("run.force=[side]"), toy.project).run()
    assert ran(result) == {"side"}
    superseded = list((store.root / "side" / ".superseded").iterdir())
    assert len(superseded) == 1 and (superseded[0] / "_SUCCESS").exists()


def test_unknown_stage_in_selection_is_a_config_error(toy):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="run.only: unknown stage 'uper'.*did you mean 'upper'"):
        make_plan(toy("run.only=[uper]"), toy.project)


def test_why_shows_config_diff_and_upstream(toy):
    Runner(toy(), toy.project).run()
    edited = toy("stage.upper.nested.a=5")
    plan = make_plan(edited, toy.project)
    text = explain(plan, "upper")
    assert "- nested.a: 1" in text and "+ nested.a: 5" in text
    down = explain(plan, "count")
    assert "- upstream upper.text: " in down and "+ upstream upper.text: " in down
    assert "llmpipe why upper" in down
    assert "up to date" in explain(plan, "source")


def test_why_before_any_run(toy):
    assert "never ran" in explain(make_plan(toy(), toy.project), "side")


# ---------------------------------------------------------------- input checks before anything runs


def _missing_text(cfg):
    """A preflight: the source stage's ``text`` names a file (here: 'missing' never exists)."""
    return [("text", f"{cfg.text!r} matches no file")] if cfg.text == "missing" else []


def _checked(project):
    """The toy project with input checks on 'source' and on 'side' (which always complains)."""
    checks = {"source": _missing_text, "side": lambda cfg: [("", "side's input is never there")]}
    return replace(project, stages=tuple(replace(s, preflight=checks.get(s.name)) for s in project.stages))


def test_check_inputs_lists_every_problem_of_the_stages_that_would_run(toy):
    project = _checked(toy.project)
    with pytest.raises(InputError) as err:
        check_inputs(make_plan(toy("stage.source.text=missing"), project))
    assert err.value.problems == ["stage.source.text: 'missing' matches no file",
                                  "stage.side: side's input is never there"]
    assert str(err.value).startswith("inputs of config 'toy' cannot be used; nothing was run (relative paths are "
                                     f"read from {Path.cwd()}):\n  stage.source.text: 'missing' matches no file\n")
    check_inputs(make_plan(toy("run.only=[upper]"), project))  # side is not selected: not checked
    assert not (toy.dir / "runs").exists()  # planning and checking created nothing


def test_cached_stages_are_not_checked(toy):
    project = _checked(toy.project)
    assert Runner(toy(), project).run().ok  # a run through Runner itself does not check (the CLI does)
    check_inputs(make_plan(toy(), project))  # side is cached: its input is not read again


def _llmpipe(*args, cwd):
    exe = Path(sys.executable).parent / "llmpipe"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_plan_and_run_refuse_bad_inputs_before_creating_anything(tmp_path):
    """Issue 11, finding 6: a glob that matches nothing and a file that is not a WARC are reported by
    `plan` and `run` at once, with exit code 2, no traceback, and no trace in the run root."""
    (tmp_path / "notes.warc.gz").write_text("my notes, not a crawl\n")
    for name in ("positive", "negative"):
        (tmp_path / f"{name}.txt").write_text(f"a {name} sample\n")
    inputs = [f"data.warc=[{tmp_path}/crawl/*.warc.gz,{tmp_path}/notes.warc.gz]",
              f"stage.quality.classifier.positive={tmp_path}/positive.txt",
              f"stage.quality.classifier.negative={tmp_path}/negative.txt"]
    expected = [f"stage.ingest.input: '{tmp_path}/crawl/*.warc.gz' matches no file",
                f"stage.ingest.input: '{tmp_path}/notes.warc.gz' is not a WARC file: it starts with b'my no', "
                "not with b'WARC/' or gzip's magic"]
    root = tmp_path / "fresh"
    used = tmp_path / "used"
    (used / "ingest").mkdir(parents=True)
    (used / "notes.md").write_text("an earlier run's root")
    before = sorted(used.rglob("*"))
    for command, run_root in (("plan", root), ("run", used)):
        proc = _llmpipe(command, "-c", "tiny", f"run.root={run_root}", *inputs, cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.splitlines()
        assert lines[0] == ("llmpipe: error: inputs of config 'tiny' cannot be used; nothing was run (relative "
                            f"paths are read from {Path(__file__).resolve().parents[2]}):"), proc.stderr
        assert [line.strip() for line in lines[1:]] == expected, proc.stderr
        assert "Traceback" not in proc.stderr and not proc.stdout
    assert not root.exists()
    assert sorted(used.rglob("*")) == before  # no .partial, .locks, .tracking, mlflow.db
