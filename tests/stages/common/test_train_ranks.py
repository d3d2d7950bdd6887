"""sft and align through the launcher (stages/common/train_ranks.py), the fast parts: when the stage trains
in its own process and when it launches ranks, the DeepSpeed config handed to the HF Trainer (checked
against transformers' own filling of its "auto" values), and the stage process's side of a launch (job
file, result, a failing rank named) with a stand-in command in place of the DeepSpeed launcher. The real
2-rank runs are in tests/stages/sft/test_sft_ranks.py and tests/stages/align/test_align_ranks.py."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmpipe.project import stage_config
from pipeline.errors import ConfigError
from pipeline.files import write_manifest
from pipeline.stage import StageContext
from stages.common.launch import LaunchError, LaunchPlan, RanksFailed
from stages.common.train_ranks import (
    JOB_FILE,
    RESULT_FILE,
    layout_metrics,
    plan_ranks,
    rank_context,
    rank_runtime,
    train_in_ranks,
)
from stages.common.training import Runtime, deepspeed_config

SFT = stage_config("sft")
CPU = Runtime(cuda=False, bf16=False, dtype=None, attn_implementation="sdpa")


def plan(stage_cfg=SFT, cuda_devices: int = 0, **launch) -> LaunchPlan | None:
    return plan_ranks(dataclasses.replace(stage_cfg.launch, **launch), stage_cfg.train, Path("/out"),
                      "stages.sft.ranks", stage="sft", cuda_devices=cuda_devices, environ={})


def with_train(cfg, **changes):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


# ---------------------------------------------------------------- in this process, or in ranks


def test_one_rank_trains_in_the_stage_process_and_more_are_launched():
    assert plan() is None  # the tiny default: launch.cpu_ranks 1
    assert plan(cuda_devices=1) is None  # a node with one GPU, as before
    two = plan(cpu_ranks=2)
    assert two.mode == "cpu" and two.world_size == 2 and two.env["DS_ACCELERATOR"] == "cpu"
    assert two.argv[-4:] == ("--no_local_rank", "stages.sft.ranks", "--job", f"/out/{JOB_FILE}")
    eight = plan(cuda_devices=8)
    assert eight.mode == "local" and eight.world_size == 8
    # ZeRO shards over ranks: with one, only offload changes anything, and needs DeepSpeed's engine
    assert plan(with_train(SFT, zero_stage=3)) is None
    offload = plan(with_train(SFT, zero_stage=2, offload_optimizer="cpu"), cuda_devices=1)
    assert offload.mode == "local" and offload.world_size == 1
    with pytest.raises(LaunchError, match=r"stage.sft.launch.accelerator=cpu but 2 GPU\(s\) are visible"):
        plan(cuda_devices=2, accelerator="cpu", cpu_ranks=2)


def test_sft_and_align_take_pretrains_launch_block_and_the_zero_keys():
    align, pretrain = stage_config("align"), stage_config("pretrain")
    assert type(SFT.launch) is type(align.launch) is type(pretrain.launch)
    assert SFT.launch.cpu_ranks == align.launch.cpu_ranks == 1  # the tiny run stays one process
    assert (SFT.train.zero_stage, SFT.train.offload_optimizer) == (0, "none")
    from llmpipe.project import PROJECT

    for name in ("sft", "align"):
        assert {"launch", "train.zero_stage", "train.offload_optimizer"} <= PROJECT.stage(name).unhashed


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=4", "train.zero_stage: must be 0, 1, 2 or 3, got 4"),
    ("train.offload_optimizer=cpu", "train.offload_optimizer: cpu needs zero_stage >= 1 (ZeRO-Offload)"),
    ("train.offload_optimizer=nvme", "'nvme' is not one of 'none', 'cpu'"),
    ("launch.cpu_ranks=0", "launch.cpu_ranks: must be at least 1, got 0"),
])
@pytest.mark.parametrize("stage", ["sft", "align"])
def test_bad_zero_and_launch_settings_name_the_key(stage, override, message):
    with pytest.raises(ConfigError) as err:
        stage_config(stage, f"stage.{stage}.{override}")
    assert message in str(err.value) and f"stage.{stage}." in str(err.value)


def test_global_batch_is_per_rank_batch_times_accumulation_times_ranks():
    train = dataclasses.replace(SFT.train, batch_size=4, grad_accum=8)
    assert layout_metrics(train, 8) == {"world_size": 8.0, "global_batch_size": 256.0}


# ---------------------------------------------------------------- the ZeRO config


def test_zero_0_is_plain_ddp_and_the_rank_runtime_carries_the_config():
    assert deepspeed_config(SFT.train, cuda=True) is None
    rt = rank_runtime(CPU, SFT.train, 2)
    assert rt.world_size == 2 and rt.deepspeed is None
    rt = rank_runtime(CPU, dataclasses.replace(SFT.train, zero_stage=2), 2)
    assert rt.deepspeed["zero_optimization"]["stage"] == 2
    from stages.common.training import training_args

    args = training_args(dict, SFT.train, rt, Path("/ckpt"))
    assert args["ddp_backend"] == "gloo" and args["deepspeed"]["zero_optimization"]["stage"] == 2
    alone = training_args(dict, SFT.train, CPU, Path("/ckpt"))  # one process: the Trainer's defaults, as before
    assert alone["ddp_backend"] is None and alone["deepspeed"] is None


def test_zero_2_and_3_configs_leave_sizes_and_precision_to_the_trainer():
    z2 = deepspeed_config(dataclasses.replace(SFT.train, zero_stage=2), cuda=True)
    assert z2 == {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                              "reduce_bucket_size": "auto"},
    }  # no optimizer or scheduler: the Trainer's AdamW and train.lr_scheduler, as without ZeRO
    z3 = deepspeed_config(dataclasses.replace(SFT.train, zero_stage=3, offload_optimizer="cpu"), cuda=False)
    zero = z3["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert not zero["overlap_comm"]  # gloo on CPU
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert z3["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam: it refuses others on offloaded states


def test_transformers_fills_the_auto_values_from_the_train_block():
    """HF's own integration resolves every "auto": the global batch is micro batch x accumulation x ranks."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    train = dataclasses.replace(SFT.train, zero_stage=3, offload_optimizer="cpu", batch_size=4, grad_accum=2)
    args = SimpleNamespace(world_size=8, per_device_train_batch_size=train.batch_size,
                           gradient_accumulation_steps=train.grad_accum, max_grad_norm=train.max_grad_norm,
                           learning_rate=train.lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                           weight_decay=train.weight_decay, save_on_each_node=False, fp16=False,
                           fp16_full_eval=False, bf16=True, bf16_full_eval=False)
    hf = HfTrainerDeepSpeedConfig(deepspeed_config(train, cuda=True))
    hf.trainer_config_process(args)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=4096))
    hf.trainer_config_finalize(SimpleNamespace(**vars(args), lr_scheduler_type="cosine", warmup_steps=0,
                                               get_warmup_steps=lambda n: 0), model, 100)
    config = hf.config
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (64, 4, 2)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["optimizer"]["params"]["lr"] == train.lr and config["gradient_clipping"] == train.max_grad_norm
    assert config["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    assert "auto" not in json.dumps(config)
    assert hf.is_zero3() and hf.is_offload()


# ---------------------------------------------------------------- the stage process's side of a launch


def stand_in(tmp_path: Path, code: str) -> LaunchPlan:
    """A launch plan running ``code`` (one process, with the job path as argv[1]) instead of DeepSpeed's launcher."""
    return LaunchPlan("cpu", (sys.executable, "-c", code, str(tmp_path / JOB_FILE)), {}, 2)


def context(tmp_path: Path) -> StageContext:
    return StageContext(stage="sft", fingerprint="f", output_dir=tmp_path, inputs={"pretrain.model": Path("/m")},
                        attempt=3, metrics_file=tmp_path / "metrics.jsonl")


def test_the_result_of_rank_0_comes_back_with_what_the_stage_set_aside(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "max_steps": 8}')
    write_manifest(checkpoints / "checkpoint-4")
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")  # changed since: corrupt
    (checkpoints / "checkpoint-6").mkdir()  # no manifest: a save that was cut short
    code = ("import json, sys; from pathlib import Path; job = json.loads(Path(sys.argv[1]).read_text()); "
            "out = Path(job['output_dir']); "
            "(out / 'train_result.json').write_text(json.dumps({"
            "'checkpoint': str(out / 'checkpoints' / 'checkpoint-8'),"
            " 'metrics': {'steps': 8, 'checkpoints_set_aside': 0, 'world': job['world_size']}}))")
    checkpoint, metrics = train_in_ranks(context(tmp_path), SFT, stand_in(tmp_path, code), {"": checkpoints},
                                         base_dir="/base")
    assert checkpoint == checkpoints / "checkpoint-8"
    assert metrics == {"steps": 8.0, "checkpoints_set_aside": 1.0, "world": 2.0}
    assert not (checkpoints / "checkpoint-6").exists() and (checkpoints / "set-aside").is_dir()
    job = json.loads((tmp_path / JOB_FILE).read_text())
    assert (job["stage"], job["attempt"], job["world_size"], job["base_dir"]) == ("sft", 3, 2, "/base")
    assert job["inputs"] == {"pretrain.model": "/m"} and job["metrics_file"] == str(tmp_path / "metrics.jsonl")
    assert job["config"]["launch"]["cpu_ranks"] == 1 and job["config"]["train"]["zero_stage"] == 0
    # rank 0 writes the metrics; the others log nothing there
    assert rank_context(job, 0).metrics_file == tmp_path / "metrics.jsonl"
    assert rank_context(job, 1).metrics_file is None and rank_context(job, 1).attempt == 3


def test_a_failing_rank_is_named_in_the_stage_error(tmp_path):
    code = ("import json, sys, time; from pathlib import Path; "
            "from stages.common.launch import record_rank_error; "
            "out = Path(json.loads(Path(sys.argv[1]).read_text())['output_dir']); "
            "exec('try:\\n raise RuntimeError(\"cannot load checkpoint-4\")\\n'"
            "     'except RuntimeError as e:\\n record_rank_error(out, 1, e)'); "
            "time.sleep(0.01); "
            "exec('try:\\n raise ConnectionError(\"peer closed\")\\n'"
            "     'except ConnectionError as e:\\n record_rank_error(out, 0, e)'); sys.exit(1)")
    (tmp_path / RESULT_FILE).write_text("{}")  # an earlier attempt's: never taken for this one's
    with pytest.raises(RanksFailed, match=r"stage.sft: the DeepSpeed launcher exited with status 1 "
                                          r"\(rank 1: RuntimeError: cannot load checkpoint-4\)"):
        train_in_ranks(context(tmp_path), SFT, stand_in(tmp_path, code), {})
    assert not (tmp_path / RESULT_FILE).exists()
    with pytest.raises(RanksFailed, match="the ranks exited cleanly but rank 0 wrote no"):
        train_in_ranks(context(tmp_path), SFT, stand_in(tmp_path, "pass"), {})


def test_a_save_request_is_no_failure_and_reaches_every_rank(tmp_path, monkeypatch):
    """Before a time limit the ranks save and stop; the stage process says so as an in-process run does."""
    from pipeline.save_request import ENV, SavedOnRequest

    monkeypatch.setenv(ENV, str(tmp_path / "save-request"))
    code = ("import json, sys; from pathlib import Path; job = json.loads(Path(sys.argv[1]).read_text()); "
            "Path(job['output_dir'], 'train_result.json').write_text(json.dumps({'saved_on_request': 7}))")
    with pytest.raises(SavedOnRequest, match="saved at step 7") as saved:
        train_in_ranks(context(tmp_path), SFT, stand_in(tmp_path, code), {})
    assert saved.value.step == 7
    assert json.loads((tmp_path / JOB_FILE).read_text())["save_request"] == str(tmp_path / "save-request")
