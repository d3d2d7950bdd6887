"""`llmpipe lineage`: the chain of outputs behind one, read back from real runs' stage_info.json files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import Project, Stage, StageContext, config
from pipeline.cli import main
from pipeline.content import content_digest
from pipeline.lineage import trace
from pipeline.plan import make_plan
from pipeline.runner import Runner
from pipeline.store import Store
from pipeline.tracking import JournalTracker
from tests.pipeline.toy import PROJECT, write_toy_conf


def cli(conf_dir: Path, *args: str, project: str = "tests.pipeline.toy:PROJECT") -> int:
    return main(list(args), project_path=project, default_config_dir=conf_dir)


def fingerprints(root: Path) -> dict[str, str]:
    """stage -> fingerprint, as the committed stage_info.json files under ``root`` say (one output each)."""
    out = {}
    for info in root.glob("*/*-*/stage_info.json"):
        data = json.loads(info.read_text())
        assert data["stage"] not in out, f"two outputs of {data['stage']} under {root}"
        out[data["stage"]] = data["fingerprint"]
    return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The toy project's source -> upper -> count, run once with a tracking journal (no sync process),
    then once more with everything cached: a project dir, its conf dir, root, and both trackers."""
    project_dir = tmp_path_factory.mktemp("lineage")
    conf_dir = write_toy_conf(project_dir)
    cfg = config.load(PROJECT, conf_dir, "toy", ["run.only=[count]", "tracking.enabled=true"],
                      project_dir=project_dir)
    first = JournalTracker(cfg, start_sync=False)
    assert Runner(cfg, PROJECT, tracker=first).run().ok
    cached = JournalTracker(cfg, start_sync=False)
    result = Runner(cfg, PROJECT, tracker=cached).run()
    assert {o.status for o in result.outcomes.values()} == {"cached", "excluded"}
    # The second run's tracker applies the first run's journal to MLflow in the background: real MLflow
    # run ids for the lookup test, and no process left behind.
    for _, proc in cached.earlier_syncs:
        proc.wait(timeout=600)
    return {"dir": project_dir, "conf": conf_dir, "cfg": cfg, "first": first, "cached": cached, "result": result}


def test_lineage_of_the_last_stage_prints_the_whole_chain(toy_run, capsys, monkeypatch):
    monkeypatch.chdir(toy_run["dir"])
    root = toy_run["cfg"].root
    fps = fingerprints(root)
    assert set(fps) == {"source", "upper", "count"}
    assert cli(toy_run["conf"], "lineage", "-c", "toy", "count") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"count {fps['count']}  {root / 'count' / ('count-' + fps['count'])}"
    upper = f"└── upper.text: upper {fps['upper']}  {root / 'upper' / ('upper-' + fps['upper'])}"
    source = f"    └── source.text: source {fps['source']}  {root / 'source' / ('source-' + fps['source'])}"
    assert upper in lines and source in lines and lines.index(upper) < lines.index(source)
    # The fingerprinted settings, not the execution-only ones (source.workers), nor another stage's.
    assert '    │           suffix = "!"\n' in out and '                    text = "hello"\n' in out
    assert "workers" not in out and "log_every" not in out and "value = 7" not in out
    made = json.loads((root / "count" / f"count-{fps['count']}" / "stage_info.json").read_text())
    assert made["project_dir"] == str(toy_run["dir"])
    assert f"run key {made['tracking_key']}" in out and "by config 'toy'" in out

    assert cli(toy_run["conf"], "lineage", "-c", "toy", "count", "--config") == 0
    full = capsys.readouterr().out
    assert "workers = 1" in full and "log_every = 10" in full and 'nested.b = ["x"]' in full


def test_json_form_holds_the_same_tree_with_whole_configs(toy_run, capsys, monkeypatch):
    monkeypatch.chdir(toy_run["dir"])
    fps = fingerprints(toy_run["cfg"].root)
    assert cli(toy_run["conf"], "lineage", "-c", "toy", "count", "--json") == 0
    [tree] = json.loads(capsys.readouterr().out)
    chain, node = [], tree
    while True:
        chain.append((node["stage"], node["fingerprint"], node["ref"], node["status"]))
        if not node["inputs"]:
            break
        [node] = node["inputs"]
    assert chain == [("count", fps["count"], None, "committed"), ("upper", fps["upper"], "upper.text", "committed"),
                     ("source", fps["source"], "source.text", "committed")]
    assert node["config"] == {"text": "hello", "repeat": 2, "workers": 1, "fail": False}
    assert node["outside"] is None and node["pipeline_config"] == "toy"


def test_a_path_inside_an_output_and_a_stage_info_file_trace_the_same(toy_run, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(toy_run["dir"])
    root = toy_run["cfg"].root
    upper = root / "upper" / f"upper-{fingerprints(root)['upper']}"
    outputs = []
    for target in (upper, upper / "text", upper / "stage_info.json", upper.relative_to(toy_run["dir"])):
        assert cli(toy_run["conf"], "lineage", "-c", "toy", str(target), "--json") == 0
        outputs.append(capsys.readouterr().out)
    assert len(set(outputs)) == 1 and json.loads(outputs[0])[0]["stage"] == "upper"
    assert cli(toy_run["conf"], "lineage", "-c", "toy", str(tmp_path)) == 2
    assert f"{tmp_path}: not a committed stage output" in capsys.readouterr().err


def test_tracking_keys_name_outputs(toy_run, capsys, monkeypatch):
    """A stage run's key (in stage_info), a cached run's key (in the journal only), the MLflow run id the
    sync created for one, and a pipeline run's key (its last outputs)."""
    from pipeline.tracking import sync_state

    monkeypatch.chdir(toy_run["dir"])
    root = toy_run["cfg"].root
    fps = fingerprints(root)
    info = json.loads((root / "upper" / f"upper-{fps['upper']}" / "stage_info.json").read_text())
    cached_key = toy_run["result"].outcomes["source"].tracking_key
    assert cached_key and cached_key != info["tracking_key"]

    def root_of(target: str) -> tuple[str, str]:
        assert cli(toy_run["conf"], "lineage", "-c", "toy", target, "--json") == 0
        trees = json.loads(capsys.readouterr().out)
        assert len(trees) == 1
        return trees[0]["stage"], trees[0]["fingerprint"]

    assert root_of(info["tracking_key"]) == ("upper", fps["upper"])
    assert root_of(cached_key) == ("source", fps["source"])
    assert root_of(toy_run["first"].key) == ("count", fps["count"])  # the run's outputs none of its others read
    assert root_of(toy_run["cached"].key) == ("count", fps["count"])

    journal = toy_run["first"].journal
    assert sync_state(journal).get("done"), journal.with_suffix(".sync.log").read_text()[-3000:]
    run_id = sync_state(journal)["runs"][info["tracking_key"]]
    assert run_id != info["tracking_key"]
    assert root_of(run_id) == ("upper", fps["upper"])


def test_a_stage_never_run_and_an_unknown_target_are_named_errors(toy_run, capsys, monkeypatch):
    monkeypatch.chdir(toy_run["dir"])
    assert cli(toy_run["conf"], "lineage", "-c", "toy", "side") == 2
    err = capsys.readouterr().err
    fp = make_plan(toy_run["cfg"], PROJECT).stages["side"].fingerprint
    assert f"stage 'side' has no output for config 'toy' yet (side-{fp}" in err
    assert "run `llmpipe run run.only=[side]`" in err

    # A config edit re-addresses upper: its output for the edited config is not built, the older one is named.
    assert cli(toy_run["conf"], "lineage", "-c", "toy", "upper", "stage.upper.suffix=?") == 2
    err = capsys.readouterr().err
    assert "stage 'upper' has no output for config 'toy' yet" in err
    assert f"upper-{fingerprints(toy_run['cfg'].root)['upper']} (pass that path" in err

    assert cli(toy_run["conf"], "lineage", "-c", "toy", "cout") == 2
    err = capsys.readouterr().err
    assert "'cout' is not a stage of config 'toy' (did you mean 'count'?)" in err and "not a tracking key" in err


def test_a_removed_input_is_shown_missing_and_a_moved_root_still_traces(toy, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(toy.dir)
    cfg = toy("run.only=[count]")
    assert Runner(cfg, toy.project).run().ok
    fps = fingerprints(cfg.root)
    moved = tmp_path / "moved-root"
    shutil.move(cfg.root, moved)  # the recorded input paths are gone: found under the output's own root
    count = moved / "count" / f"count-{fps['count']}"
    upper = trace(count).inputs[0]
    assert [(n.stage, n.path) for n in (upper, upper.inputs[0])] == [
        ("upper", moved / "upper" / f"upper-{fps['upper']}"), ("source", moved / "source" / f"source-{fps['source']}")]

    shutil.rmtree(moved / "upper" / f"upper-{fps['upper']}")  # gc'd to free space
    assert cli(toy.conf_dir, "lineage", "-c", "toy", str(count)) == 0
    out = capsys.readouterr().out
    assert (f"└── upper.text: upper {fps['upper']}  {cfg.root / 'upper' / ('upper-' + fps['upper'])}  "
            "missing: no committed output there") in out
    assert "source.text" not in out and fps["source"] not in out  # nothing is known past a missing output
    assert cli(toy.conf_dir, "lineage", "-c", "toy", str(count), "--json") == 0
    [tree] = json.loads(capsys.readouterr().out)
    assert tree["inputs"] == [{"stage": "upper", "fingerprint": fps["upper"], "ref": "upper.text",
                               "status": "missing", "inputs": [],
                               "path": str(cfg.root / "upper" / f"upper-{fps['upper']}")}]


# ---------------------------------------------------------------- outside inputs and a shared ancestor
#
#     crawl (reads data/*.txt: outside) -> clean -> merge
#          \-----------------------------------/


@dataclass(frozen=True)
class CrawlConfig:
    files: str = "data/*.txt"  # outside files to read, relative to the project folder


def crawl_state(cfg: CrawlConfig) -> dict[str, str]:
    return {f"files[{p}]": content_digest(p) for p in sorted(str(p) for p in Path().glob(cfg.files))}


def run_crawl(cfg: CrawlConfig, ctx: StageContext) -> dict[str, float]:
    ctx.output("text").write_text("".join(p.read_text() for p in sorted(Path().glob(cfg.files))))
    return {}


@dataclass(frozen=True)
class CleanConfig:
    strip: bool = True  # strip whitespace


def run_clean(cfg: CleanConfig, ctx: StageContext) -> dict[str, float]:
    ctx.output("text").write_text(ctx.input("crawl.text").read_text().strip())
    return {}


@dataclass(frozen=True)
class MergeConfig:
    sep: str = "|"  # between the raw and the clean text


def run_merge(cfg: MergeConfig, ctx: StageContext) -> dict[str, float]:
    ctx.output("model").write_text(ctx.input("crawl.text").read_text() + cfg.sep + ctx.input("clean.text").read_text())
    return {}


OUTSIDE = Project(
    name="outside",
    stages=(
        Stage("crawl", CrawlConfig, run_crawl, (), ("text",), external=crawl_state),
        Stage("clean", CleanConfig, run_clean, ("crawl.text",), ("text",)),
        Stage("merge", MergeConfig, run_merge, ("crawl.text", "clean.text"), ("model",)),
    ),
    import_path="tests.pipeline.test_lineage:OUTSIDE",
)

OUTSIDE_YAML = """\
run: {root: runs, only: [], from: null, force: [], lock_wait_s: 60, keep_going: true}
tracking: {enabled: false}
cluster: {executor: local, env: {}}
stage:
  crawl: {files: "data/*.txt"}
  clean: {strip: true}
  merge: {sep: "|"}
"""


def test_outside_inputs_are_listed_with_their_state_and_a_shared_input_once(tmp_path, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    for name, text in (("a.txt", " one "), ("b.txt", "two\n")):
        (tmp_path / "data" / name).write_text(text)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "outside.yaml").write_text(OUTSIDE_YAML)
    monkeypatch.chdir(tmp_path)
    cfg = config.load(OUTSIDE, conf, "outside", [], project_dir=tmp_path)
    assert Runner(cfg, OUTSIDE).run().ok
    assert cli(conf, "lineage", "-c", "outside", "merge", project="tests.pipeline.test_lineage:OUTSIDE") == 0
    out = capsys.readouterr().out
    fps = fingerprints(cfg.root)
    crawl = f"crawl {fps['crawl']}  {cfg.root / 'crawl' / ('crawl-' + fps['crawl'])}"
    assert f"├── clean.text: clean {fps['clean']}" in out
    assert f"│   └── crawl.text: {crawl}\n" in out  # under clean, in full
    assert f"└── crawl.text: {crawl}  (shown above)" in out  # merge's own read of it
    assert out.count(f"outside inputs (relative paths: from {tmp_path}):") == 1
    for name in ("a.txt", "b.txt"):
        assert f"  files[data/{name}]: {content_digest(tmp_path / 'data' / name)}" in out
    assert 'files = "data/*.txt"' in out

    assert cli(conf, "lineage", "-c", "outside", "merge", "--json",
               project="tests.pipeline.test_lineage:OUTSIDE") == 0
    [tree] = json.loads(capsys.readouterr().out)
    crawls = [tree["inputs"][0]["inputs"][0], tree["inputs"][1]]
    assert [c["ref"] for c in crawls] == ["crawl.text", "crawl.text"]
    assert all(c["outside"] == {"files[data/a.txt]": content_digest(tmp_path / "data" / "a.txt"),
                                "files[data/b.txt]": content_digest(tmp_path / "data" / "b.txt")} for c in crawls)
    assert Store(cfg.root).is_done("crawl", fps["crawl"])
