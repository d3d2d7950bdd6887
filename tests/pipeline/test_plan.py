"""plan: run/skip per stage with a reason; why: what changed, as a diff."""

from pipeline.plan import EXCLUDED, RUN, SKIP, explain, make_plan
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
    import pytest

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
