"""The deepspeed config section and the engine config derived from a run config (no processes)."""

from __future__ import annotations

import json

import pytest

from pipeline import config as config_module
from pipeline.deepspeed_engine import engine_config
from pipeline.errors import UserError
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "ddpm.yaml"


def _load(*overrides: str):
    return config_module.load(TINY, ["distributed.strategy=deepspeed", *overrides])


@pytest.mark.parametrize("name,stage,optimizer,param", [
    ("zero1", 1, "none", "none"), ("zero2", 2, "none", "none"), ("zero2_offload", 2, "cpu", "none"),
    ("zero3", 3, "none", "none"), ("zero3_offload", 3, "cpu", "cpu"),
])
def test_ready_files_resolve(name, stage, optimizer, param):
    config = _load(f"deepspeed.config_file={REPO / 'configs' / 'deepspeed' / f'{name}.json'}")
    section = config.deepspeed
    assert (section.resolved_stage(), section.resolved_offload("optimizer"), section.resolved_offload("param")) == (
        stage, optimizer, param)


def test_engine_config_takes_batch_accumulation_clipping_and_precision_from_the_run():
    config = _load("deepspeed.zero_stage=3", "train.grad_accum=4", "data.batch_size=8", "train.mixed_precision=bf16",
                   "train.grad_clip=0.5")
    engine = engine_config(config, world_size=2, device_type="cpu")
    assert engine["train_micro_batch_size_per_gpu"] == 8 and engine["gradient_accumulation_steps"] == 4
    assert engine["train_batch_size"] == 64 and engine["gradient_clipping"] == 0.5
    assert engine["bf16"]["enabled"] and not engine["fp16"]["enabled"]
    assert engine["zero_optimization"]["stage"] == 3


def test_no_bucket_is_larger_than_the_model():
    # DeepSpeed allocates its buckets at every micro-step (and, under train.deterministic, fills
    # them with NaN): 5e8 elements for a model of 45k parameters cost a second per CPU step.
    zero3 = f"deepspeed.config_file={REPO / 'configs' / 'deepspeed' / 'zero3.json'}"
    small = engine_config(_load(zero3), world_size=2, device_type="cpu", parameters=45_000)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["allgather_bucket_size"] == 2**20
    assert small["stage3_prefetch_bucket_size"] == 2**20
    large = engine_config(_load(zero3), world_size=2, device_type="cpu", parameters=113_700_000)["zero_optimization"]
    assert large["reduce_bucket_size"] == large["stage3_prefetch_bucket_size"] == 50_000_000  # the file's
    assert large["allgather_bucket_size"] == 109 * 2**20  # DeepSpeed's 5e8, capped at the model's 108.4 Mi
    unknown = engine_config(_load(zero3), world_size=2, device_type="cpu")["zero_optimization"]
    assert "allgather_bucket_size" not in unknown and unknown["reduce_bucket_size"] == 50_000_000


def test_zero3_keeps_at_most_a_ranks_share_gathered_unless_the_file_says():
    # DeepSpeed's default 1e9 kept every parameter of a smaller model gathered on every rank:
    # ZeRO-3 held more than DDP (configs/ddpm_cifar32.yaml, 2 processes: 1,642 MB against 1,455).
    shipped = f"deepspeed.config_file={REPO / 'configs' / 'deepspeed' / 'zero3.json'}"
    for overrides in ([shipped], ["deepspeed.zero_stage=3"]):
        zero = engine_config(_load(*overrides), world_size=4, device_type="cpu", parameters=35_746_307)[
            "zero_optimization"]
        assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 8_936_577
    lean = f"deepspeed.config_file={REPO / 'benchmarks' / 'configs' / 'zero3_lean.json'}"
    zero = engine_config(_load(lean), world_size=4, device_type="cpu", parameters=35_746_307)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 30_000_000  # the file's
    zero2 = engine_config(_load("deepspeed.zero_stage=2"), world_size=4, device_type="cpu", parameters=35_746_307)
    assert "stage3_max_live_parameters" not in zero2["zero_optimization"]


def test_fp16_under_deepspeed_on_cpu_is_refused():
    with pytest.raises(UserError, match="needs a GPU"):
        engine_config(_load("train.mixed_precision=fp16"), world_size=1, device_type="cpu")


@pytest.mark.parametrize("overrides,message", [
    (["deepspeed.zero_stage=2", f"deepspeed.config_file={REPO / 'configs/deepspeed/zero3.json'}"], "differs from"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_param=cpu"], "needs zero_stage 3"),
    (["deepspeed.config_file=/nonexistent.json"], "not found"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["train.compile=true"], "train.compile is not supported"),
])
def test_config_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        _load(*overrides)


def test_a_file_may_not_set_what_the_run_config_owns(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match="train_batch_size"):
        _load(f"deepspeed.config_file={path}")
