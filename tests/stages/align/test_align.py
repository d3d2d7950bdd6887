"""align stage: preference pairs, config checks, and real TRL runs on a tiny Llama.

The "SFT model" fixture is a 2-layer, hidden-64 Llama fitted for a few steps on the fixture corpus,
with a byte-level BPE tokenizer trained here and llmpipe's chat template (the shared builder in
tests/stages/model_fixtures.py), saved as a model dir; the corpus is generated text written as
Parquet shards. Nothing is downloaded. Configs come from the shipped YAML (``stage_config``) with
test-sized overrides. The default DPO run is interrupted once after a checkpoint and resumed (one
run proves both resume and learning), then must score the held-out pairs better than chance. Each
other method runs two steps (reward model + RLOO included); GRPO and full tuning are integration
tests. The shared training toolkit has its own tests (tests/stages/common/test_training.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.align import stage as align
from stages.align.config import AlignConfig
from stages.align.data import PreferenceDataError, build_pairs, write_pairs
from stages.common import training
from stages.common.chat import CHAT_TEMPLATE, END
from stages.common.training import TrainingDataError
from tests.stages.model_fixtures import build_tiny_model, torch_threads

ADJ = "red green blue small large quick slow bright dark old new warm cold soft loud".split()
NOUN = "cat dog bird fish tree river stone house road cloud star ship horse garden lamp".split()
VERB = "sees finds follows carries watches paints builds moves hears calls".split()

# The shipped default (DPO, LoRA) at test size: small pairs so a step is cheap (16 + 8 words, 3 windows from
# each of 60 documents, every corruption kind), a rank-8 adapter, 20 steps.
BASE = stage_config("align", "stage.align.data.prompt_words=16", "stage.align.data.completion_words=8",
                    "stage.align.data.pairs_per_doc=3", "stage.align.data.max_pairs=180",
                    "stage.align.data.eval_fraction=0.2", "stage.align.data.corruptions=[shuffle,other_doc,repeat]",
                    "stage.align.lora.r=8", "stage.align.lora.alpha=16", "stage.align.train.max_steps=20",
                    "stage.align.train.eval_steps=10", "stage.align.train.max_length=128",
                    "stage.align.sample_max_new_tokens=8")
DATA, TRAIN = BASE.data, BASE.train
# The variants only have to run: 2 steps on 60 pairs (12 held out).
SHORT = dataclasses.replace(TRAIN, max_steps=2, eval_steps=2, save_steps=2, logging_steps=1)
FEW = dataclasses.replace(DATA, max_pairs=60)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    yield from torch_threads(1)


def corpus_docs(n_docs: int = 60, sentences: int = 14, seed: int = 0) -> list[dict[str, str]]:
    """Documents of grammatical toy sentences: word order and vocabulary are regular, so corrupted
    continuations are learnably different from true ones."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        text = " ".join(f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} a {rng.choice(ADJ)} "
                        f"{rng.choice(NOUN)} ." for _ in range(sentences))
        docs.append({"id": f"doc-{i:03d}", "url": f"http://example.test/{i}", "text": text})
    return docs


def write_corpus(out: Path, docs: list[dict], shards: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        part = docs[k::shards]
        pq.write_table(pa.table({c: [d[c] for d in part] for c in ("id", "url", "text")}),
                       out / f"shard-{k:05d}.parquet")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("align_corpus") / "documents", corpus_docs())


@pytest.fixture(scope="module")
def inputs(corpus, tmp_path_factory) -> dict[str, Path]:
    """The stage's inputs: the corpus and an "SFT model" (fitted 20 steps on the corpus, chat template set)."""
    sft = build_tiny_model(tmp_path_factory.mktemp("align_sft") / "sft_model", hidden=64, intermediate=128,
                           layers=2, heads=4, vocab_size=400, texts=[d["text"] for d in corpus_docs()],
                           train_steps=20)
    return {"sft.model": sft, "pii.documents": corpus}


def make_ctx(tmp_path: Path, inputs: dict[str, Path], attempt: int = 1) -> StageContext:
    out = tmp_path / "align-out"
    out.mkdir(exist_ok=True)
    return StageContext(stage="align", fingerprint="test", output_dir=out, inputs=inputs, attempt=attempt,
                        metrics_file=tmp_path / "metrics.jsonl")


def config(**changes) -> AlignConfig:
    """The test-sized config: small pairs, a rank-8 adapter, 20 steps."""
    return dataclasses.replace(BASE, **changes)


def curves(tmp_path: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec["metrics"].items():
            out.setdefault(k, []).append((rec["step"], v))
    return out


def assert_loadable_model(path: Path) -> None:
    """The aligned model dir loads with the Auto classes (no adapter files), keeps the chat template, generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (path / "config.json").exists() and (path / "generation_config.json").exists()
    assert not (path / "adapter_config.json").exists()  # merged, not an adapter
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(path)
    enc = tok.apply_chat_template([{"role": "user", "content": "the red cat"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert len(new) == 5 or new[-1] in (tok.eos_token_id, tok.convert_tokens_to_ids(END))


def assert_weights_moved(sft: Path, aligned: Path) -> None:
    """The adapter was merged: a targeted weight differs from the SFT model's, an untargeted one does not."""
    from safetensors.torch import load_file

    before, after = load_file(sft / "model.safetensors"), load_file(aligned / "model.safetensors")
    assert set(before) == set(after)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not before[name].equal(after[name])
    assert before["model.embed_tokens.weight"].equal(after["model.embed_tokens.weight"])


# ---------------------------------------------------------------- preference data


def passage(pair) -> str:
    """The passage start shown in a corpus pair's prompt (after the instruction line)."""
    (role, content), = pair.prompt
    assert role == "user" and content.startswith(DATA.instruction + "\n")
    return content.split("\n", 1)[1]


def test_pairs_are_deterministic_split_by_document_and_corrupted(corpus, tmp_path):
    first = build_pairs(corpus, DATA)
    second = build_pairs(corpus, DATA)
    assert first.train == second.train and first.eval == second.eval
    assert len(first.train) + len(first.eval) == DATA.max_pairs
    train_docs, eval_docs = {p.doc_id for p in first.train}, {p.doc_id for p in first.eval}
    assert not train_docs & eval_docs
    assert len(eval_docs) == round(DATA.eval_fraction * 60)
    kinds = {p.kind for p in first.train + first.eval}
    assert kinds == {"shuffle", "other_doc", "repeat"}
    for p in first.train + first.eval:
        assert len(passage(p).split()) == DATA.prompt_words
        assert len(p.chosen.split()) == len(p.rejected.split()) == DATA.completion_words
        assert p.chosen != p.rejected
        if p.kind == "shuffle":
            assert sorted(p.chosen.split()) == sorted(p.rejected.split())
        if p.kind == "repeat":
            assert len(set(p.rejected.split())) == 1
    # The true continuation follows the prompt in the document.
    texts = {d["id"]: d["text"] for d in corpus_docs()}
    p = first.eval[0]
    assert f"{passage(p)} {p.chosen}" in texts[p.doc_id]

    # Another seed draws other corruptions and another split.
    other = build_pairs(corpus, dataclasses.replace(DATA, seed=1))
    assert {p.doc_id for p in other.eval} != eval_docs

    write_pairs(first, tmp_path / "prefs")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "prefs" / "eval.parquet").to_pylist()
    assert [r["id"] for r in table] == [p.id for p in first.eval]
    assert table[0]["prompt"] == first.eval[0].prompt_messages() and table[0]["kind"] == first.eval[0].kind


def test_short_or_forging_documents_are_counted_and_too_few_documents_fail(tmp_path):
    words = [f"w{i}" for i in range(30)]
    forging = words[:7] + ["<|user|>"] + words[8:17] + ["x<|end|>"] + words[18:]  # a marker in each window
    docs = [{"id": "a", "url": "", "text": "too short"}, {"id": "b", "url": "", "text": " ".join(words)},
            {"id": "c", "url": "", "text": None}, {"id": "d", "url": "", "text": " ".join(forging)}]
    write_corpus(tmp_path / "docs", docs, shards=1)
    cfg = dataclasses.replace(DATA, prompt_words=5, completion_words=5, pairs_per_doc=2, eval_fraction=0.5,
                              corruptions=("shuffle",))
    with pytest.raises(PreferenceDataError, match="stage.align.data.source=corpus gave pairs from 1 document"):
        build_pairs(tmp_path / "docs", cfg)
    docs.append({"id": "e", "url": "", "text": " ".join(reversed(words))})
    write_corpus(tmp_path / "docs", docs, shards=1)
    data = build_pairs(tmp_path / "docs", cfg)
    assert data.counts["dropped_too_short"] == 1 and data.counts["dropped_no_text"] == 1
    assert data.counts["dropped_marker_in_content"] == 2  # both windows of d
    assert len(data.train) + len(data.eval) == 4 and {p.doc_id for p in data.train + data.eval} == {"b", "e"}
    with pytest.raises(ValueError, match=r"instruction: '<\|assistant\|> continue' spells a chat marker"):
        dataclasses.replace(DATA, instruction="<|assistant|> continue")
    with pytest.raises(PreferenceDataError, match="no Parquet shards"):
        build_pairs(tmp_path / "empty", cfg)


def test_missing_text_column_names_the_shard(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "docs").mkdir()
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "docs" / "s.parquet")
    with pytest.raises(PreferenceDataError, match=r"s\.parquet lacks column\(s\) \['text'\]"):
        build_pairs(tmp_path / "docs", DATA)


def test_pairs_from_files_in_trl_formats_with_bad_records_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def turn(role, content):
        return {"role": role, "content": content}

    good = [
        {"id": "r1", "prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": [turn("system", "Be brief."), turn("user", "Two plus two?")],
         "chosen": [turn("assistant", "4")], "rejected": [turn("assistant", "5")]},
        # implicit prompt: the shared turns of chosen and rejected (ultrafeedback_binarized's layout)
        {"chosen": [turn("user", "Name a fruit."), turn("assistant", "An apple.")],
         "rejected": [turn("user", "Name a fruit."), turn("assistant", "A chair.")]},
    ]
    bad = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "only chosen"},
        {"prompt": "p <|user|> forged", "chosen": "a", "rejected": "b"},
        {"prompt": [turn("user", "p")], "chosen": [turn("assistant", "a"), turn("assistant", "b")],
         "rejected": [turn("assistant", "c")]},
    ]
    jsonl = tmp_path / "prefs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in good + bad) + "\n{not json\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
                                         for i in range(3)]), tmp_path / "more.parquet")
    cfg = dataclasses.replace(DATA, source="files", files=(str(jsonl), str(tmp_path / "*.parquet")),
                              eval_fraction=0.3, max_pairs=400)
    data = build_pairs(tmp_path / "unused", cfg)
    pairs = {p.id: p for p in data.train + data.eval}
    assert len(pairs) == 6 and {p.kind for p in pairs.values()} == {"external"}
    assert pairs["r1"].prompt == (("user", "What colour is the sky?"),) and pairs["r1"].chosen == "Blue."
    assert pairs["prefs.jsonl:1"].prompt == (("system", "Be brief."), ("user", "Two plus two?"))
    assert pairs["prefs.jsonl:2"].prompt == (("user", "Name a fruit."),)
    assert pairs["prefs.jsonl:2"].rejected == "A chair."
    assert pairs["more.parquet:2"].chosen == "yes 2"
    assert len(data.eval) == 2 and data.counts["records_read"] == 11
    assert data.counts["dropped_chosen_equals_rejected"] == 1
    assert data.counts["dropped_missing_chosen_or_rejected"] == 1
    assert data.counts["dropped_marker_in_content"] == 1
    assert data.counts["dropped_reply_not_one_assistant_message"] == 1
    assert data.counts["dropped_bad_record"] == 1  # the broken JSON line

    with pytest.raises(TrainingDataError, match=r"stage.align.data.files: '.*nothing\*.jsonl' matches no file"):
        build_pairs(tmp_path, dataclasses.replace(cfg, files=(str(tmp_path / "nothing*.jsonl"),)))
    (tmp_path / "only_bad.jsonl").write_text("\n".join(json.dumps(r) for r in bad))
    with pytest.raises(PreferenceDataError, match="no usable .*dropped_chosen_equals_rejected=1"):
        build_pairs(tmp_path, dataclasses.replace(cfg, files=(str(tmp_path / "only_bad.jsonl"),)))


def test_pairs_from_a_local_datasets_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "prefs" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
                                         for i in range(10)]), tmp_path / "prefs" / "data" / "train-0.parquet")
    cfg = dataclasses.replace(DATA, source="dataset", dataset=str(tmp_path / "prefs"), max_pairs=8,
                              eval_fraction=0.25)
    data = build_pairs(tmp_path / "unused", cfg)
    assert len(data.train) == 6 and len(data.eval) == 2
    with pytest.raises(PreferenceDataError, match="stage.align.data.dataset=.* split 'nope' cannot be loaded"):
        build_pairs(tmp_path, dataclasses.replace(cfg, dataset_split="nope"))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (["stage.align.method=ppo"], "stage.align.method: ppo: trl 1.16.0 has no PPO trainer"),
    (["stage.align.dpo.loss_type=[sigmod]"], "stage.align.dpo.loss_type: ['sigmod']: each must be one of"),
    (["stage.align.dpo.loss_type=[sigmoid,ipo]", "stage.align.dpo.loss_weights=[1.0]"],
     "stage.align.dpo.loss_weights: has 1 values for 2 loss_type entries"),
    (["stage.align.dpo.loss_type=[exo_pair]"], "stage.align.dpo.label_smoothing: loss_type exo_pair needs"),
    (["stage.align.method=kto", "stage.align.train.batch_size=1"],
     "stage.align.train.batch_size: must be >= 2 for method kto"),
    (["stage.align.method=rloo", "stage.align.train.batch_size=6"], "not a multiple of rl.num_generations=4"),
    (["stage.align.method=grpo", "stage.align.rl.num_generations=1"],
     "stage.align.rl.num_generations: grpo needs >= 2 completions"),
    (["stage.align.beta=0.0"], "stage.align.beta: method dpo needs beta > 0, got 0.0"),
    (["stage.align.lora.target_modules=[q_proj,lm_head]"], "stage.align.lora.target_modules: must not contain lm_head"),
    (["stage.align.data.corruptions=[]"], "stage.align.data.corruptions: is empty"),
    (["stage.align.data.corruptions=[scramble]"], "'scramble' is not one of"),
    (["stage.align.data.source=files"], "stage.align.data.files: is empty but source is 'files'"),
    (["stage.align.data.source=dataset"], "stage.align.data.dataset: is null but source is 'dataset'"),
    (["stage.align.data.files=[a.jsonl]"], "stage.align.data.files: is set but source is 'corpus'"),
    (["stage.align.method=simpo"], "'simpo' is not one of"),
])
def test_bad_configs_fail_naming_the_flag(overrides, message):
    with pytest.raises(ConfigError) as err:
        stage_config("align", *overrides)
    assert message in str(err.value)


def test_every_align_yaml_composes():
    conf = Path(__file__).resolve().parents[3] / "conf"
    expected = {"default": ("dpo", ("sigmoid",)), "ipo": ("dpo", ("ipo",)), "orpo": ("orpo", ("sigmoid",)),
                "kto": ("kto", ("sigmoid",)), "rloo": ("rloo", ("sigmoid",)), "grpo": ("grpo", ("sigmoid",)),
                "llama-7b": ("dpo", ("sigmoid",))}
    for option in sorted(p.stem for p in (conf / "stage" / "align").glob("*.yaml")):
        top = "llama-7b" if option == "llama-7b" else "tiny"
        cfg = stage_config("align", f"stage/align={option}", conf=top)
        assert (cfg.method, cfg.dpo.loss_type) == expected[option], option
        if top == "tiny":
            assert cfg.train.max_length == 256  # ${model.max_seq_len} of the tiny model
            assert cfg.launch.cpu_ranks == 1 and cfg.train.zero_stage == 0  # one process, as before
        else:  # a node of 8 GPUs, LoRA under ZeRO-2: 32 pairs a step
            assert cfg.train.zero_stage == 2 and cfg.train.batch_size * cfg.train.grad_accum * 8 == 32


def test_execution_only_fields_do_not_change_the_fingerprint():
    from pipeline.fingerprint import fingerprint, fingerprint_payload, without
    from pipeline.schema import to_plain

    def address(cfg: AlignConfig) -> str:
        return fingerprint(fingerprint_payload("align", align.STAGE.version,
                                               without(to_plain(cfg), align.STAGE.unhashed), {}))

    base = stage_config("align")
    same = [dataclasses.replace(base, sample_max_new_tokens=5),
            dataclasses.replace(base, train=dataclasses.replace(base.train, save_steps=7, logging_steps=1,
                                                                save_total_limit=5, keep_checkpoints=True))]
    different = [dataclasses.replace(base, beta=0.2), dataclasses.replace(base, method="kto"),
                 dataclasses.replace(base, data=dataclasses.replace(base.data, seed=3)),
                 dataclasses.replace(base, dpo=dataclasses.replace(base.dpo, loss_type=("ipo",))),
                 dataclasses.replace(base, train=dataclasses.replace(base.train, eval_batch_size=8))]
    assert {address(c) for c in same} == {address(base)}
    assert len({address(c) for c in [base, *different]}) == 1 + len(different)


# ---------------------------------------------------------------- the default DPO run, interrupted and resumed


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def dpo_run(inputs, tmp_path_factory) -> dict:
    """The default method on the test config, killed after the step-10 checkpoint, then run again.

    The second attempt must pick up at step 10 and finish the 20 steps; its metrics, log and model
    are what the tests below check.
    """
    tmp_path = tmp_path_factory.mktemp("dpo_run")
    forward = training.metrics_callback

    def crashing_callback(ctx, **kwargs):
        class CrashAfterCheckpoint(type(forward(ctx, **kwargs))):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 11:  # the checkpoint of step 10 is on disk
                    raise Crash("simulated node failure")
                return super().on_step_end(args, state, control, **kw)

        return CrashAfterCheckpoint()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "metrics_callback", crashing_callback)
        with pytest.raises(Crash):
            align.run(config(), make_ctx(tmp_path, inputs))
    checkpoints = sorted(p.name for p in (tmp_path / "align-out" / "checkpoints" / "dpo").glob("checkpoint-*"))
    ctx = make_ctx(tmp_path, inputs, attempt=2)
    return {"metrics": align.run(config(), ctx), "ctx": ctx, "tmp_path": tmp_path, "checkpoints": checkpoints}


def test_a_failed_attempt_resumes_from_its_last_checkpoint(dpo_run):
    assert dpo_run["checkpoints"] == ["checkpoint-10"]
    metrics = dpo_run["metrics"]
    assert metrics["resumed_from_step"] == 10 and metrics["steps"] == TRAIN.max_steps
    logged = curves(dpo_run["tmp_path"])
    # Attempt 1 logged steps 1, 5 and 10, attempt 2 steps 15 and 20: no step trained twice.
    assert [s for s, _ in logged["train_loss"]] == [1, 5, 10, 15, 20]
    assert logged["resume_step"] == [(10, 10.0)]
    # The final checkpoint's history spans both attempts, its last evaluation included.
    assert [s for s, _ in logged["eval_loss"]] == [10, 20]
    assert metrics["final_eval_loss"] == logged["eval_loss"][-1][1]


def test_dpo_raises_held_out_reward_accuracy_above_chance(dpo_run):
    metrics = dpo_run["metrics"]
    assert metrics["heldout/reward_accuracy"] > 0.5
    assert metrics["heldout/reward_margin"] > 0
    assert metrics["heldout/pairs"] == metrics["data/pairs_eval"] == 36
    # Repeated words are the easiest corruption to tell apart.
    assert metrics["heldout/reward_accuracy_repeat"] > 0.5
    assert {"heldout/reward_accuracy_shuffle", "heldout/reward_accuracy_other_doc"} <= set(metrics)
    assert metrics["final_eval_rewards/accuracies"] > 0.5
    # Before (step 0, the SFT model against itself) the implicit reward is 0: accuracy 0, margin 0.
    logged = curves(dpo_run["tmp_path"])
    assert logged["heldout/reward_accuracy"] == [(0, 0.0), (20, metrics["heldout/reward_accuracy"])]
    assert logged["heldout/reward_margin"][0] == (0, 0.0)
    assert logged["heldout/logp_accuracy"][0] == (0, metrics["heldout_sft/logp_accuracy"])
    assert 0.0 <= metrics["heldout/logp_accuracy"] <= 1.0
    # Training widened the train-batch margin between chosen and rejected.
    assert logged["rewards/margins"][-1][1] > logged["rewards/margins"][0][1]
    assert "eval_rewards/margins" in logged


def test_dpo_output_is_a_merged_model_that_loads_and_generates(dpo_run, inputs):
    ctx = dpo_run["ctx"]
    assert dpo_run["metrics"]["sample/new_tokens"] >= 1
    assert_loadable_model(ctx.output("model"))
    assert_weights_moved(inputs["sft.model"], ctx.output("model"))
    assert (ctx.output_dir / "preferences" / "train.parquet").exists()
    assert not (ctx.output_dir / "checkpoints").exists()  # removed once the model is saved


def test_preference_scores_are_exact_means_over_pairs():
    logps = {"policy_chosen": [-1.0, -5.0, -2.0], "policy_rejected": [-3.0, -4.0, -2.5],
             "sft_chosen": [-2.0, -4.0, -2.0], "sft_rejected": [-2.0, -4.0, -2.0], "kind": ["a", "b", "a"]}
    after = align.preference_scores(logps, "policy", beta=0.5)
    # margins: 0.5 * ((1) - (-1)) = 1.0, 0.5 * ((-1) - 0) = -0.5, 0.5 * (0 - (-0.5)) = 0.25
    assert after["heldout/reward_accuracy"] == pytest.approx(2 / 3)
    assert after["heldout/reward_margin"] == pytest.approx((1.0 - 0.5 + 0.25) / 3)
    assert after["heldout/reward_accuracy_a"] == 1.0 and after["heldout/reward_accuracy_b"] == 0.0
    assert after["heldout/logp_accuracy"] == pytest.approx(2 / 3)
    before = align.preference_scores(logps, "sft", beta=0.5)
    assert before["heldout/reward_accuracy"] == 0.0 and before["heldout/reward_margin"] == 0.0


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize("method, changes, eval_key", [
    ("dpo", {"dpo": dataclasses.replace(BASE.dpo, loss_type=("ipo",))}, "final_eval_rewards/accuracies"),
    ("orpo", {}, "final_eval_rewards/accuracies"),
    ("kto", {}, "final_eval_rewards/margins"),
])
def test_offline_variants_train_and_save(inputs, tmp_path, method, changes, eval_key):
    metrics = align.run(config(method=method, train=SHORT, data=FEW, **changes), make_ctx(tmp_path, inputs))
    assert metrics["steps"] == 2 and eval_key in metrics
    assert 0.0 <= metrics["heldout/reward_accuracy"] <= 1.0 and metrics["heldout/pairs"] == 12
    assert_loadable_model(tmp_path / "align-out" / "model")


def rl_config(method: str) -> AlignConfig:
    """Reward model 4 steps, then 2 policy steps of 2 prompts x 2 sampled completions of <= 8 tokens."""
    return config(method=method, train=dataclasses.replace(SHORT, batch_size=4, eval_batch_size=4), data=FEW,
                  reward_model=dataclasses.replace(BASE.reward_model, lr=2e-3, max_steps=4, batch_size=8),
                  rl=dataclasses.replace(BASE.rl, num_generations=2, max_completion_length=8))


def check_reward_model_then_online_rl(inputs, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    ctx = make_ctx(tmp_path, inputs)
    metrics = align.run(rl_config(method), ctx)
    assert metrics["reward_model/steps"] == 4 and 0.0 <= metrics["reward_model/final_eval_accuracy"] <= 1.0
    assert "reward_model/final_eval_margin" in metrics
    assert metrics["steps"] == 2
    logged = curves(tmp_path)
    # The policy's curves under the shared names and TRL's own; the reward model's behind its prefix.
    assert {"reward", "kl", "train_loss", "lr", "reward_model/train_loss", "reward_model/eval_loss"} <= set(logged)
    rm = AutoModelForSequenceClassification.from_pretrained(ctx.output_dir / "reward_model")
    assert rm.config.num_labels == 1
    assert_loadable_model(ctx.output("model"))


def test_reward_model_then_rloo(inputs, tmp_path):
    check_reward_model_then_online_rl(inputs, tmp_path, "rloo")


@pytest.mark.integration
def test_reward_model_then_grpo(inputs, tmp_path):
    check_reward_model_then_online_rl(inputs, tmp_path, "grpo")


@pytest.mark.integration
def test_full_tuning_dpo_trains_every_weight(inputs, tmp_path):
    ctx = make_ctx(tmp_path, inputs)
    metrics = align.run(config(tuning="full", train=SHORT, data=FEW), ctx)
    assert metrics["steps"] == 2
    assert_loadable_model(ctx.output("model"))
    from safetensors.torch import load_file

    before = load_file(inputs["sft.model"] / "model.safetensors")
    after = load_file(ctx.output("model") / "model.safetensors")
    assert not before["model.embed_tokens.weight"].equal(after["model.embed_tokens.weight"])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_runtime_uses_bf16_on_a_cuda_gpu():
    import torch

    rt = align.resolve_runtime(stage_config("align"))
    assert not rt.use_cpu and rt.bf16 == torch.cuda.is_bf16_supported()


def test_align_starts_from_a_model_dir_on_the_example_preference_files(inputs, tmp_path):
    """base_model: a local model dir (no sft input), data: both shipped preference files (text and messages)."""
    examples = Path(__file__).resolve().parents[3] / "examples" / "data"
    files = (str(examples / "preferences.jsonl"), str(examples / "preferences-messages.jsonl"))
    data = dataclasses.replace(FEW, source="files", files=files)
    cfg = config(base_model=str(inputs["sft.model"]), train=SHORT, data=data)
    assert align.STAGE.needed_inputs(cfg) == ()
    metrics = align.run(cfg, make_ctx(tmp_path, {}))  # the context holds no input at all
    assert metrics["steps"] == 2 and metrics["data/records_read"] >= FEW.max_pairs
    assert_loadable_model(tmp_path / "align-out" / "model")
