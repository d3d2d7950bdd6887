"""align: preference alignment of the SFT model with TRL (DPO by default).

Inputs: ``sft.model`` (the merged SFT model dir; its tokenizer gets llmpipe's chat template) and
``pii.documents`` (the cleaned corpus, from which the tiny default builds its preference pairs;
``data.source`` can instead read (prompt, chosen, rejected) records from files or a ``datasets``
dataset: see ``stages.align.data``). Output ``model``: the aligned model, merged (no adapter),
saved as a Hugging Face model dir with its tokenizer and generation config, loadable with
``AutoModelForCausalLM`` / ``AutoTokenizer``. Next to it in the stage's output dir:
``preferences/{train,eval}.parquet`` (the pairs used) and, for the online RL methods,
``reward_model/`` (the trained reward model, merged).

Methods (``method``), each a TRL trainer, LoRA on the SFT model (``tuning: lora``) or the whole
model (``tuning: full``):

- ``dpo`` (default): ``trl.DPOTrainer`` on (prompt, chosen, rejected). The loss family is
  ``dpo.loss_type`` (sigmoid = DPO, ipo, hinge, robust, ... every value of trl 1.16; several with
  ``dpo.loss_weights`` combine, e.g. MPO). The reference is the SFT model: with LoRA, TRL
  computes it with the adapter disabled (no second copy in memory); with full tuning TRL loads
  a frozen copy from the SFT dir (or precomputes its log-probs, ``dpo.precompute_ref_log_probs``).
- ``orpo``: ``trl.experimental.orpo.ORPOTrainer`` (ORPO moved to ``trl.experimental`` in trl 1.x):
  SFT loss plus an odds-ratio preference term (``orpo.odds_ratio_weight``); no reference model.
- ``kto``: ``trl.KTOTrainer`` on unpaired data derived from the pairs (chosen -> desirable,
  rejected -> undesirable, shuffled with the data seed so batches mix both), reference as in DPO.
- ``rloo`` / ``grpo``: RLHF proper, in two phases (``stages.align.rl``): a reward model
  (``trl.RewardTrainer``, ``AutoModelForSequenceClassification`` with ``num_labels=1`` initialised
  from the SFT model) trained on the pairs, then online RL of the policy against it with
  ``trl.RLOOTrainer`` or ``trl.GRPOTrainer`` (completions sampled for the pair prompts, a KL
  penalty of weight ``beta`` to the SFT reference). trl 1.16 has no PPO trainer (not in
  ``trl.experimental`` either): ``method: ppo`` is rejected with that explanation.

Training (stages/common/training.py, shared with sft): the ``lora:`` and ``train:`` blocks, runtime
and precision, the tokenizer, checkpoints and the merged, atomically written model.

Metrics. Curves of the policy under the names every training stage uses (``train_loss``,
``eval_loss``, ``lr``, ``grad_norm``, ``tokens_per_s``), each method's own figures under TRL's
names (``rewards/margins``, ``eval_rewards/accuracies``, ``kl``, ``reward``...); the reward model
phase's behind ``reward_model/`` (``reward_model/train_loss``, ``reward_model/eval_accuracy``).
Final metrics: ``steps``, ``final_train_loss``, ``final_eval_*`` (the last evaluation) and
``mean_tokens_per_s``, the same as sft's. At the end, for every method alike, the aligned model is
loaded back from disk, greedily completes one held-out prompt (logged: it must generate), and every
held-out pair is scored under it and under the SFT model (TRL's own tokenization and log-prob
computation, see :func:`heldout_logps`): ``heldout/reward_accuracy`` and ``heldout/reward_margin``
(DPO's implicit reward ``beta * (log pi(y|x) - log pi_sft(y|x))``, share of pairs where chosen beats
rejected and mean difference) and ``heldout/logp_accuracy`` (share of pairs where the model itself
gives chosen the higher log-probability), overall and per kind of pair (``..._shuffle``...), as
exact means over the pairs. The same names are logged at step 0 for the SFT model ("before": reward
0 by construction) and at the last step for the aligned model ("after"); the SFT model's log-prob
accuracy is also returned as ``heldout_sft/logp_accuracy``. The trainers' periodic ``eval_*``
figures are means of batch means (a short last batch weighs more), so they can differ a little.

Resumable: each phase keeps Trainer checkpoints under ``<output_dir>/checkpoints/<phase>``
(``train.save_steps``); a new attempt resumes from the newest complete one whose files match its
manifest (``resumed_from_step``, ``reward_model/resumed_from_step``), incomplete ones are dropped,
corrupt ones set aside with a warning (``checkpoints_set_aside``), a phase whose last step is
checkpointed is not trained again, and a reward model already saved is reused. The checkpoints are
deleted at the end of a successful attempt unless ``train.keep_checkpoints``.

Device and precision are chosen at run time: CUDA when present (bf16 where supported with
``precision: auto``), else CPU (``use_cpu=True``, float32). Ranks (``launch:``, the same block and
launcher as pretrain's, stages/common/train_ranks.py): one rank trains in this process (the tiny
default, a one-GPU node); several GPUs, nodes or ``launch.cpu_ranks`` start
``python -m stages.align.ranks`` in each rank for each training phase, as DDP or under DeepSpeed
ZeRO (``train.zero_stage`` >= 1). This process prepares the pairs, saves the reward model between
the phases, and merges, samples and scores the final model as above. ``train.batch_size`` is per
rank: a step takes ``batch_size x grad_accum x ranks`` examples (``global_batch_size`` in the
metrics, with ``world_size``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import Stage, StageContext
from stages.align.config import (
    BASE_STAGES,
    CHECKPOINTS,
    ONLINE_METHODS,
    PREFERENCES,
    SFT,
    AlignConfig,
    base_model_dir,
    peft_config,
)
from stages.align.data import PreferenceData, build_pairs, conversational, datasets_for, write_pairs
from stages.common.models import training_stage_hooks
from stages.common.training import UNHASHED_TRAIN, Runtime

RANKS_MODULE = "stages.align.ranks"  # what each launched rank runs
POLICY = "policy"  # the training phase of every method (rloo/grpo: after the reward model's)


def resolve_runtime(cfg: AlignConfig) -> Runtime:
    from stages.common.training import resolve_runtime as shared_runtime

    return shared_runtime("align", cfg.precision, cfg.attn_implementation, frozen_base=cfg.tuning == "lora")


# ---------------------------------------------------------------- offline preference methods


def dpo_trainer(cfg: AlignConfig, rt: Runtime, tok: Any, data: PreferenceData, policy: Any, out: Path) -> Any:
    from trl import DPOConfig, DPOTrainer

    from stages.common.training import training_args

    train, held_out = datasets_for(data)
    args = training_args(DPOConfig, cfg.train, rt, out, beta=cfg.beta, loss_type=list(cfg.dpo.loss_type),
                         loss_weights=list(cfg.dpo.loss_weights) if cfg.dpo.loss_weights else None,
                         label_smoothing=cfg.dpo.label_smoothing, max_length=cfg.train.max_length,
                         precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs)
    # ref_model=None: with LoRA the reference is the adapter-disabled SFT model; with full tuning TRL loads
    # a frozen copy from the SFT dir (the policy's name_or_path).
    return DPOTrainer(model=policy, ref_model=None, args=args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tok, peft_config=peft_config(cfg))


def orpo_trainer(cfg: AlignConfig, rt: Runtime, tok: Any, data: PreferenceData, policy: Any, out: Path) -> Any:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from stages.common.training import training_args

    train, held_out = datasets_for(data)
    args = training_args(ORPOConfig, cfg.train, rt, out, beta=cfg.orpo.odds_ratio_weight,
                         max_length=cfg.train.max_length, remove_unused_columns=False)
    return ORPOTrainer(model=policy, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tok,
                       peft_config=peft_config(cfg))


def kto_trainer(cfg: AlignConfig, rt: Runtime, tok: Any, data: PreferenceData, policy: Any, out: Path) -> Any:
    from trl import KTOConfig, KTOTrainer, unpair_preference_dataset

    from stages.common.training import training_args

    train, held_out = datasets_for(data)
    # chosen -> label True, rejected -> label False; unpairing lists a batch's chosen rows before its rejected
    # ones, and KTO samples sequentially, so shuffle to mix desirable and undesirable examples in each batch.
    train = unpair_preference_dataset(train).shuffle(seed=cfg.data.seed)
    held_out = unpair_preference_dataset(held_out).shuffle(seed=cfg.data.seed)
    args = training_args(KTOConfig, cfg.train, rt, out, beta=cfg.beta, loss_type=cfg.kto.loss_type,
                         desirable_weight=cfg.kto.desirable_weight, undesirable_weight=cfg.kto.undesirable_weight,
                         max_length=cfg.train.max_length)
    return KTOTrainer(model=policy, ref_model=None, args=args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tok, peft_config=peft_config(cfg))


OFFLINE_TRAINERS = {"dpo": dpo_trainer, "orpo": orpo_trainer, "kto": kto_trainer}


def train_offline(cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any,
                  data: PreferenceData) -> tuple[Path, dict]:
    """DPO, ORPO or KTO on the pairs, resumably; the final checkpoint and the metrics."""
    from stages.common.train_ranks import synced
    from stages.common.training import check_model, load_model, train_or_resume

    sft = base_model_dir(cfg, ctx)
    checkpoints = ctx.output_dir / CHECKPOINTS / cfg.method

    def build(resume: Any) -> Any:
        policy = load_model(sft, SFT, rt)
        check_model(policy, tok, sft, stage="align", source=SFT, max_length=cfg.train.max_length,
                    lora=cfg.lora if cfg.tuning == "lora" else None)
        return OFFLINE_TRAINERS[cfg.method](cfg, rt, tok, data, policy, checkpoints)

    return train_or_resume(synced(build, rt), checkpoints, ctx)


def train_phase(phase: str, cfg: AlignConfig, ctx: StageContext, rt: Runtime, tok: Any,
                data: PreferenceData) -> tuple[Path, dict]:
    """One training phase (POLICY, or rl.REWARD_MODEL) in this process or in a launched rank
    (stages/align/ranks.py): its final checkpoint and metrics."""
    from stages.align.rl import REWARD_MODEL, train_online, train_reward_model

    if phase == REWARD_MODEL:
        return train_reward_model(cfg, ctx, rt, tok, data)
    if cfg.method in ONLINE_METHODS:
        return train_online(cfg, ctx, rt, tok, data)
    return train_offline(cfg, ctx, rt, tok, data)


def phase_checkpoints(phase: str, cfg: AlignConfig, ctx: StageContext) -> dict[str, Path]:
    """The checkpoint dir of a phase by its metric prefix (what stages/common/train_ranks.py cleans before a launch)."""
    from stages.align.rl import REWARD_MODEL

    if phase == REWARD_MODEL:
        return {f"{REWARD_MODEL}/": ctx.output_dir / CHECKPOINTS / REWARD_MODEL}
    return {"": ctx.output_dir / CHECKPOINTS / cfg.method}


# ---------------------------------------------------------------- final checks

def heldout_logps(cfg: AlignConfig, ctx: StageContext, rt: Runtime, policy: Any,
                  data: PreferenceData) -> dict[str, list[float]]:
    """Summed completion log-probs of every held-out pair under ``policy`` and under the SFT model.

    TRL does the scoring: a DPOTrainer built on the held-out pairs tokenizes them with the chat
    template and pads them with its collator (exactly as in training), and its
    ``compute_ref_log_probs`` gives log pi(chosen|x) and log pi(rejected|x) for a batch under any
    model it has prepared. Nothing is trained. Returns lists aligned with the pairs kept by TRL (a
    pair whose prompt alone fills ``train.max_length`` is dropped), plus their kinds (corruption).
    """
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from trl import DPOConfig, DPOTrainer

    from stages.common.training import load_model, load_tokenizer, training_args

    rows = [{**conversational(p), "kind": p.kind} for p in data.eval]
    args = training_args(DPOConfig, replace(cfg.train, max_steps=1), rt, ctx.output_dir / CHECKPOINTS / "heldout_eval",
                         has_eval=False, beta=cfg.beta, max_length=cfg.train.max_length, save_strategy="no")
    scorer = DPOTrainer(model=policy, ref_model=load_model(base_model_dir(cfg, ctx), SFT, rt), args=args,
                        train_dataset=Dataset.from_list(rows),
                        processing_class=load_tokenizer(ctx.output("model"), "output model", padding_side="left"))
    pairs = scorer.train_dataset  # tokenized; keeps the kind column
    loader = DataLoader(pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]),
                        batch_size=cfg.train.eval_batch_size, collate_fn=scorer.data_collator, shuffle=False)
    out: dict[str, list] = {"policy_chosen": [], "policy_rejected": [], "sft_chosen": [], "sft_rejected": []}
    scorer.model.eval()
    scorer.ref_model.eval()
    for batch in loader:
        batch = {k: v.to(scorer.accelerator.device) for k, v in batch.items()}
        for name, model in (("policy", scorer.model), ("sft", scorer.ref_model)):
            chosen, rejected = scorer.compute_ref_log_probs(model, batch)
            out[f"{name}_chosen"] += chosen.float().cpu().tolist()
            out[f"{name}_rejected"] += rejected.float().cpu().tolist()
    out["kind"] = list(pairs["kind"])
    return out


def preference_scores(logps: dict[str, list], policy: str, beta: float) -> dict[str, float]:
    """Held-out preference figures of ``policy`` ("policy" or "sft") from per-pair log-probs.

    ``reward_*``: DPO's implicit reward r(y) = beta * (log pi(y|x) - log pi_sft(y|x)), as TRL's
    ``rewards/accuracies`` (share of pairs with r(chosen) > r(rejected)) and ``rewards/margins``
    (mean r(chosen) - r(rejected)), but exact means over the pairs. For the SFT model itself the
    reward is 0 by construction (accuracy 0, margin 0): the starting point of every method.
    ``logp_accuracy``: share of pairs where the model gives the chosen continuation the higher
    log-probability, a measure that needs no reference (meaningful before training too).
    Each overall and per kind of pair (the corruption: ``reward_accuracy_shuffle``...).
    """
    kinds = logps["kind"]
    groups = {"": range(len(kinds))}
    for kind in sorted(set(kinds)):
        groups[f"_{kind}"] = [i for i, k in enumerate(kinds) if k == kind]
    pc, pr = logps[f"{policy}_chosen"], logps[f"{policy}_rejected"]
    sc, sr = logps["sft_chosen"], logps["sft_rejected"]
    metrics = {}
    for suffix, idx in groups.items():
        margins = [beta * ((pc[i] - sc[i]) - (pr[i] - sr[i])) for i in idx]
        metrics[f"heldout/reward_accuracy{suffix}"] = sum(m > 0 for m in margins) / len(margins)
        metrics[f"heldout/reward_margin{suffix}"] = sum(margins) / len(margins)
        metrics[f"heldout/logp_accuracy{suffix}"] = sum(pc[i] > pr[i] for i in idx) / len(idx)
    metrics["heldout/pairs"] = float(len(kinds))
    return metrics


def heldout_metrics(cfg: AlignConfig, ctx: StageContext, rt: Runtime, policy: Any, data: PreferenceData,
                    step: int) -> dict[str, float]:
    """Score the held-out pairs before (the SFT model, logged at step 0) and after (``policy``, logged at ``step``).

    Both points carry the same metric names, so each is a two-point curve in MLflow; the "after"
    figures are also the stage's final metrics, the "before" ones are returned as ``heldout_sft/*``.
    """
    from stages.common.training import free_memory

    logps = heldout_logps(cfg, ctx, rt, policy, data)
    free_memory()
    if not logps["kind"]:
        ctx.log.warning("no held-out pair left to score: every prompt fills stage.align.train.max_length=%d",
                        cfg.train.max_length)
        return {"heldout/pairs": 0.0}
    before, after = preference_scores(logps, "sft", cfg.beta), preference_scores(logps, "policy", cfg.beta)
    ctx.log_metrics(before, step=0)
    ctx.log_metrics(after, step=step)
    ctx.log.info("held-out pairs (%d): reward accuracy %.3f, margin %.4f; log-prob accuracy %.3f (SFT model %.3f)",
                 len(logps["kind"]), after["heldout/reward_accuracy"], after["heldout/reward_margin"],
                 after["heldout/logp_accuracy"], before["heldout/logp_accuracy"])
    return {**after, **{k.replace("heldout/", "heldout_sft/"): v for k, v in before.items() if "logp" in k}}


# ---------------------------------------------------------------- stage


def run(cfg: AlignConfig, ctx: StageContext) -> dict[str, float]:
    from stages.common.hub import require_cached_data
    from stages.common.inputs import log_training_data
    from stages.common.train_ranks import cuda_device_count, layout_metrics, plan_ranks, train_in_ranks
    from stages.common.training import (
        free_memory,
        load_model,
        load_tokenizer,
        merged_model,
        offline_hub,
        remove_checkpoints,
        sample_reply,
        write_model,
    )

    started = time.perf_counter()
    offline_hub()
    require_cached_data(cfg.data, "stage.align.data")  # a hub dataset not fetched: HubError saying `llmpipe fetch`
    rt = resolve_runtime(cfg)
    ctx.log.info("align: method=%s tuning=%s on %s, dtype %s, bf16 autocast %s", cfg.method, cfg.tuning,
                 "cpu" if rt.use_cpu else "cuda", rt.dtype, rt.bf16)
    sft = base_model_dir(cfg, ctx)
    # Left padding for the trainers: generation needs it; the preference collators pad themselves.
    tok = load_tokenizer(sft, SFT, padding_side="left")
    data = build_pairs(ctx.input("pii.documents") if cfg.data.source == "corpus" else None, cfg.data)
    write_pairs(data, ctx.output_dir / PREFERENCES)
    metrics = data.metrics()
    ctx.log.info("preference pairs: %d train, %d held out (%s)", len(data.train), len(data.eval),
                 ", ".join(f"{k}={v}" for k, v in sorted(data.counts.items())))

    plan = plan_ranks(cfg.launch, cfg.train, ctx.output_dir, RANKS_MODULE, stage="align",
                      cuda_devices=cuda_device_count())
    layout = layout_metrics(cfg.train, plan.world_size if plan else 1)
    ctx.log.info("%d rank(s)%s, %d examples per step", layout["world_size"],
                 f" (ZeRO-{cfg.train.zero_stage})" if plan and cfg.train.zero_stage else "",
                 layout["global_batch_size"])

    def train(phase: str) -> tuple[Path, dict]:
        if plan is None:
            return train_phase(phase, cfg, ctx, rt, tok, data)
        return train_in_ranks(ctx, cfg, plan, phase_checkpoints(phase, cfg, ctx), phase=phase)

    if cfg.method in ONLINE_METHODS:
        from stages.align.rl import reward_model

        metrics.update(reward_model(cfg, ctx, rt, train))
        free_memory()  # the reward model's copies, before the policy, its reference and the reward model load
    trained, phase_metrics = train(POLICY)
    metrics.update(phase_metrics)
    metrics.update(layout)
    model = merged_model(trained, sft, lambda path: load_model(path, "model", rt, dtype=rt.export_dtype))
    write_model(model, load_tokenizer(sft, SFT), ctx.output("model"))  # the tokenizer as saved, padding included
    del model
    free_memory()

    # Load the saved model back: it must load and generate, and it is what the held-out score measures.
    policy = load_model(ctx.output("model"), "output model", rt)
    if rt.cuda:
        policy.to("cuda")  # the trainers place their models; this one generates before any trainer sees it
    if cfg.sample_max_new_tokens:
        text, new_tokens = sample_reply(policy, tok, data.eval[0].prompt_messages(), cfg.sample_max_new_tokens)
        ctx.log.info("sample from the aligned model: %r", text)
        metrics["sample/new_tokens"] = float(new_tokens)
    metrics.update(heldout_metrics(cfg, ctx, rt, policy, data, int(phase_metrics["steps"])))
    remove_checkpoints(ctx.output_dir / CHECKPOINTS, cfg.train)
    metrics["total_s"] = time.perf_counter() - started
    # MLflow lineage: the data (files, dataset or corpus) and the preference pairs made of it; the model.
    log_training_data(ctx, cfg.data, {"training": (ctx.output_dir / PREFERENCES / "train.parquet", len(data.train)),
                                      "eval": (ctx.output_dir / PREFERENCES / "eval.parquet", len(data.eval))})
    ctx.log_model("align", ctx.output("model"), params={"base_model": cfg.base_model, "method": cfg.method})
    return metrics


DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".parquet")  # what stages/align/data.py reads (_file_records)


STAGE = Stage(
    name="align",
    config=AlignConfig,
    run=run,
    inputs=("sft.model", "pretrain.model", "pii.documents"),
    **training_stage_hooks(BASE_STAGES, DATA_SUFFIXES),
    outputs=("model",),
    # launch: where the ranks run; their number sets the global batch (train.batch_size is per rank), but it is
    # the machine's to decide (every visible GPU by default), like the cluster settings, which never count.
    unhashed=frozenset([*UNHASHED_TRAIN, "sample_max_new_tokens", "launch"]),
    resumable=True,
    description="Preference alignment (DPO by default) with TRL.",
)
