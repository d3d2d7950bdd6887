"""Few-shot counts and which tasks each model runs: the published count of each standard task with
``num_fewshot: null`` and a forced count otherwise (the local tasks always 0-shot), the untrained baseline
kept off the standard tasks, and the counts reaching lm-eval per task (set on loaded groups and tasks,
checked on the prompts a stand-in model receives), the comparison table, and the stage run on a tiny
model. No download: the "standard" tasks here are lm-eval tasks written next to the local ones."""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import load_config, stage_config
from pipeline.schema import Invalid
from pipeline.stage import StageContext
from stages.common.benchmarks import LOCAL_TASKS, MC_TASK, PPL_TASK
from stages.evaluate.stage import UNTRAINED, group_shots, load_tasks, model_tasks, run, task_shots, write_table
from stages.evaluate.tasks import PUBLISHED_FEWSHOT, build_local_tasks, fewshot_plan
from tests.stages.model_fixtures import build_tiny_model, write_documents

SHIPPED = stage_config("evaluate")
SMALL = replace(SHIPPED.heldout, docs=8, max_chars=400, context_words=12, continuation_words=4, choices=4, seed=0)
LOG = logging.getLogger("test.evaluate.fewshot")


# ---------------------------------------------------------------- the plan


def test_null_gives_each_task_its_published_count():
    tasks = ("mmlu", "gsm8k", "hellaswag", PPL_TASK)
    assert SHIPPED.num_fewshot is None  # the shipped default
    assert fewshot_plan(tasks, None) == {"mmlu": 5, "gsm8k": 8, "hellaswag": 0, PPL_TASK: 0}
    assert fewshot_plan(("boolq", MC_TASK), None) == {"boolq": None, MC_TASK: 0}  # not in the table: lm-eval's own


def test_an_integer_forces_every_standard_task_but_not_the_local_ones():
    tasks = ("mmlu", "gsm8k", "hellaswag", PPL_TASK)
    assert fewshot_plan(tasks, 3) == {"mmlu": 3, "gsm8k": 3, "hellaswag": 3, PPL_TASK: 0}
    assert fewshot_plan(tasks, 0) == dict.fromkeys(tasks, 0)


@pytest.mark.parametrize("conf", ["tiny", "llama-7b", "tiny-finetune", "llama-7b-finetune"])
def test_every_standard_task_of_the_recipes_has_a_published_count(conf):
    tasks = load_config(conf).stages["evaluate"].tasks
    assert [t for t in tasks if t not in LOCAL_TASKS and t not in PUBLISHED_FEWSHOT] == []


def test_config_checks():
    with pytest.raises(Invalid, match=r"num_fewshot: must be at least 0 or null"):
        replace(SHIPPED, num_fewshot=-1)
    with pytest.raises(Invalid, match=r"models: the untrained baseline runs only the local tasks"):
        replace(SHIPPED, models=("untrained",), tasks=("mmlu", "gsm8k"))
    replace(SHIPPED, models=("untrained", "pretrain"), tasks=("mmlu",), num_fewshot=0)  # pretrain runs mmlu


# ---------------------------------------------------------------- which tasks each model runs


def test_the_untrained_baseline_runs_the_local_tasks_only():
    tasks = ("heldout_ppl", "mmlu", "heldout_mc", "gsm8k", "hellaswag")
    assert model_tasks(UNTRAINED, tasks) == ("heldout_ppl", "heldout_mc")
    assert model_tasks(UNTRAINED, ("mmlu",)) == ()
    for model in ("pretrain", "sft", "align", "quantize", "base"):  # base: an outside model (base=<dir>)
        assert model_tasks(model, tasks) == tasks


# ---------------------------------------------------------------- the counts reach lm-eval


def prompt_recorder():
    """An lm-eval LM that scores nothing and keeps the context of every loglikelihood request."""
    from lm_eval.api.model import LM

    class PromptRecorder(LM):
        def __init__(self):
            super().__init__()
            self.contexts: list[str] = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.contexts += [r.args[0] for r in requests]
            return [(-float(len(r.args[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return [-float(len(r.args[0])) for r in requests]

        def generate_until(self, requests, disable_tqdm=False):
            return ["" for _ in requests]

    return PromptRecorder()


def write_group(folder: Path, name: str, members: list[str]) -> None:
    import yaml

    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "group": name, "task": members, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 1}}))


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """The local tasks, and stand-ins for standard ones made of the heldout_mc data: tasks ``toy_a``,
    ``toy_b`` and ``toy_pinned`` (whose config pins num_fewshot 0, as truthfulqa's does); groups
    ``toy_group`` (toy_a, toy_pinned), ``toy_pair`` (toy_a, toy_b) and ``toy_nested`` (groups of one
    task each, as mmlu is a group of mmlu_stem, mmlu_other...)."""
    import yaml

    root = tmp_path_factory.mktemp("fewshot")
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 80))) for _ in range(12)]
    folder = build_local_tasks(write_documents(root / "docs", texts), root / "tasks", SMALL).include_path
    mc = yaml.safe_load((folder / f"{MC_TASK}.yaml").read_text())
    for name, extra in (("toy_a", {}), ("toy_b", {}), ("toy_pinned", {"num_fewshot": 0})):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**mc, "task": name, **extra}))
    write_group(folder, "toy_group", ["toy_a", "toy_pinned"])
    write_group(folder, "toy_pair", ["toy_a", "toy_b"])
    write_group(folder, "toy_sub_a", ["toy_a"])
    write_group(folder, "toy_sub_b", ["toy_b"])
    write_group(folder, "toy_nested", ["toy_sub_a", "toy_sub_b"])
    return folder


def run_tasks(folder: Path, tasks: tuple[str, ...], num_fewshot: int | None) -> tuple[dict, list[str]]:
    """lm-eval's results and the prompts the stand-in model saw, with the tasks loaded the stage's way."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm = prompt_recorder()
    results = lm_eval.simple_evaluate(model=lm, tasks=load_tasks(manager, tasks, num_fewshot, LOG), num_fewshot=None,
                                      task_manager=manager, limit=3, bootstrap_iters=0, log_samples=False,
                                      fewshot_random_seed=0)
    return results, lm.contexts


def shots_in(context: str) -> int:
    """Few-shot examples before the passage: lm-eval joins them with its fewshot delimiter, a blank line
    (the generated passages are words and single spaces)."""
    return context.count("\n\n")


def test_each_task_gets_its_own_count_in_one_lm_eval_call(task_folder, monkeypatch):
    monkeypatch.setitem(PUBLISHED_FEWSHOT, "toy_group", 2)
    monkeypatch.setitem(PUBLISHED_FEWSHOT, "toy_b", 1)
    results, contexts = run_tasks(task_folder, (PPL_TASK, MC_TASK, "toy_group", "toy_b"), None)
    # toy_pinned keeps its config's 0; so the group's members disagree and the group has no count
    assert results["n-shot"] == {PPL_TASK: 0, MC_TASK: 0, "toy_a": 2, "toy_pinned": 0, "toy_b": 1}
    assert task_shots(results) == {PPL_TASK: 0, MC_TASK: 0, "toy_b": 1}
    assert {shots_in(c) for c in contexts} == {0, 1, 2}

    forced, contexts = run_tasks(task_folder, (MC_TASK, "toy_group", "toy_b"), 3)
    assert forced["n-shot"] == {MC_TASK: 0, "toy_a": 3, "toy_pinned": 0, "toy_b": 3}
    assert {shots_in(c) for c in contexts} == {0, 3}


def test_a_group_reports_its_members_count(task_folder, monkeypatch):
    unlisted, contexts = run_tasks(task_folder, ("toy_pair",), None)  # not in the table: the configs' (none: 0)
    assert task_shots(unlisted) == {"toy_pair": 0} and {shots_in(c) for c in contexts} == {0}
    monkeypatch.setitem(PUBLISHED_FEWSHOT, "toy_pair", 2)
    results, contexts = run_tasks(task_folder, (MC_TASK, "toy_pair"), None)
    assert task_shots(results) == {MC_TASK: 0, "toy_pair": 2}  # the table's tasks: the group, not its members
    assert {shots_in(c) for c in contexts} == {0, 2}


def test_a_group_of_groups_gets_its_count_too(task_folder, monkeypatch):
    """lm-eval 0.4.13 leaves such a group (mmlu) out of "n-shot"; group_shots fills it in."""
    monkeypatch.setitem(PUBLISHED_FEWSHOT, "toy_nested", 5)
    results, contexts = run_tasks(task_folder, ("toy_nested",), None)
    assert {shots_in(c) for c in contexts} == {5}
    assert group_shots(results) == {"toy_a": 5, "toy_b": 5, "toy_nested": 5, "toy_sub_a": 5, "toy_sub_b": 5}
    assert task_shots(results) == {"toy_nested": 5}


def test_group_shots_on_mmlus_layout():
    results = {"results": {}, "n-shot": {"mmlu_a": 5, "mmlu_b": 5, "mmlu_c": 5, "other": 0, "other_x": 3},
               "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["mmlu_a", "mmlu_b"],
                                  "mmlu_other": ["mmlu_c"], "mixed": ["other", "other_x"]}}
    shots = group_shots(results)
    assert shots["mmlu"] == shots["mmlu_stem"] == shots["mmlu_other"] == 5 and "mixed" not in shots


def test_the_table_lists_each_tasks_count_and_leaves_untrained_blank(tmp_path):
    per_model = {
        "untrained": {"untrained.heldout_ppl.word_perplexity": 900.0, "untrained.eval_s": 1.0},
        "pretrain": {"pretrain.heldout_ppl.word_perplexity": 8.0, "pretrain.mmlu.acc": 0.3,
                     "pretrain.gsm8k.exact_match_strict-match": 0.05, "pretrain.eval_s": 2.0},
    }
    shots = {"heldout_ppl": {0}, "mmlu": {5}, "gsm8k": {8}}
    _, md_path = write_table(per_model, tmp_path, shots=shots)
    md = md_path.read_text().splitlines()
    assert md[2] == "| untrained | 900 |  |  |"
    assert md[-2:] == ["", "Few-shot examples per prompt (lm-eval n-shot): heldout_ppl 0, mmlu 5, gsm8k 8"]
    _, md_path = write_table(per_model, tmp_path)
    assert "Few-shot" not in md_path.read_text()


# ---------------------------------------------------------------- the stage


def test_the_stage_runs_untrained_on_the_local_tasks_only(tmp_path, task_folder, monkeypatch, caplog):
    """run() on a tiny model with heldout_ppl and a stand-in standard task (toy_b, 1-shot by the table):
    the untrained baseline is not run on toy_b (an INFO line says so, its cell is blank), pretrain is,
    and comparison.md lists both counts."""
    from lm_eval.tasks import TaskManager

    standard = tmp_path / "standard"
    standard.mkdir()
    shutil.copy(task_folder / "toy_b.yaml", standard)  # its data file is named by absolute path
    monkeypatch.setattr("stages.evaluate.stage.task_manager", lambda cfg, include: TaskManager(
        include_path=[str(include), str(standard)], include_defaults=False))
    monkeypatch.setitem(PUBLISHED_FEWSHOT, "toy_b", 1)
    rng = random.Random(1)
    texts = [" ".join(f"w{rng.randrange(300)}" for _ in range(rng.randint(20, 60))) for _ in range(12)]
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="evaluate", fingerprint="test", output_dir=out, attempt=1, log=LOG,
                       inputs={"pretrain.model": build_tiny_model(tmp_path / "model"),
                               "tokenize.heldout": write_documents(tmp_path / "heldout", texts)},
                       metrics_file=out / "metrics.jsonl")
    cfg = replace(SHIPPED, models=("untrained", "pretrain"), tasks=(PPL_TASK, "toy_b"), heldout=SMALL, limit=3,
                  bootstrap_iters=0)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        metrics = run(cfg, ctx)

    assert "model 'untrained': skipping the standard tasks ['toy_b']" in caplog.text
    assert "few-shot examples per prompt: heldout_ppl 0, toy_b 1" in caplog.text
    assert "untrained.toy_b.acc" not in metrics and "pretrain.toy_b.acc" in metrics
    results = out / "results"
    assert json.loads((results / "models" / "untrained.json").read_text())["n-shot"] == {PPL_TASK: 0}
    assert json.loads((results / "models" / "pretrain.json").read_text())["n-shot"] == {PPL_TASK: 0, "toy_b": 1}
    rows = {r["model"]: r for r in csv.DictReader((results / "comparison.csv").open())}
    assert rows["untrained"]["toy_b.acc"] == "" and rows["pretrain"]["toy_b.acc"] != ""
    md = (results / "comparison.md").read_text().splitlines()
    assert md[-1] == "Few-shot examples per prompt (lm-eval n-shot): heldout_ppl 0, toy_b 1"
