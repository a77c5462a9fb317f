"""FSDP2 (``distributed.strategy: fsdp``) on CPU processes with gloo, through ``launch local``.

The tiny DDPM (tests/runs.py's shrunk version, deterministic kernels) trained by two processes
under FSDP2 is compared with the same run under DDP (the run bank's `ddp_reference`): same seed,
same batches, same per-rank noise, so the losses agree to the order of floating-point sums
(relative 1e-4; reason in tests/test_deepspeed.py's docstring); rank 0's loss is NaN at step 4 in both, and both skip that
step (sharded gradients clipped and the skip decided on the all-reduced norm). A run stopped by
SIGTERM at step 3 and relaunched ends with pieces bit-identical to the uninterrupted run's.
``torch.compile`` (aot_eager: graphs without code generation) of the blocks gives the same losses;
under bf16 the EMA averages the fp32 shards (an EMA that follows at once equals them bit for bit);
every family trains under the default per-block wrapping; a checkpoint of another strategy and
fp16 are refused with one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint, faults
from pipeline.preemption import EXIT_PREEMPTED
from runs import NAN_AT_4, SHARDED, Job, finish, held
from tests.conftest import REPO, run_cli, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = SHARDED["train.max_steps"]
LOSS_RTOL = 1e-4
COMMON, NAN = SHARDED, NAN_AT_4
FSDP = {"distributed.strategy": "fsdp"}


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines) if "loss" in record}


def _pieces(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(path) for path in sorted(step_dir.glob("*.rank-*.safetensors"))
            if not path.name.startswith("rank-")}


@pytest.fixture(scope="module")
def fsdp_run(digits_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    finish(digits_dir, run_dir, env=NAN, **COMMON, **FSDP)
    return run_dir


@pytest.mark.quick
def test_losses_match_ddp_and_the_nan_step_is_skipped(fsdp_run, ddp_reference):
    fsdp, ddp = _metrics(fsdp_run), _metrics(ddp_reference)
    for step in (1, 2, 3, 5, 6):
        assert math.isclose(fsdp[step]["loss"], ddp[step]["loss"], rel_tol=LOSS_RTOL), (step, fsdp[step], ddp[step])
        assert math.isclose(fsdp[step]["grad_norm"], ddp[step]["grad_norm"], rel_tol=LOSS_RTOL), step
    assert fsdp[4]["bad_steps"] == 1 and math.isnan(fsdp[4]["loss"])
    assert [fsdp[step]["bad_steps"] for step in (1, 2, 3, 5, 6)] == [0] * 5
    assert fsdp[STEPS]["bad_steps_total"] == 1
    # MFU is logged as on a GPU whose peak is known (its FLOPs counted on a meta twin, not on the
    # sharded module, which cannot be copied), and agrees with DDP's count.
    assert all(0 < fsdp[step]["mfu"] < 1 for step in fsdp)
    manifest = json.loads((checkpoint.checkpoints_dir(fsdp_run) / f"step-{STEPS:09d}" / "manifest.json").read_text())
    assert manifest["strategy"] == "fsdp"
    trainer_state = json.loads(
        (checkpoint.checkpoints_dir(fsdp_run) / f"step-{STEPS:09d}" / "trainer.json").read_text()
    )
    assert trainer_state["optimizer_step"] == STEPS - 1  # the skipped step left AdamW's count alone


def test_stop_signal_then_resume_is_bit_exact(fsdp_run, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = Job(digits_dir, run_dir, env={**faults.env(hold_after_step=3, nan_at_steps=[4])}, **COMMON, **FSDP)
    job.wait_until(lambda: held(run_dir), "the hold after step 3")
    job.terminate()
    code = job.wait()
    if code != EXIT_PREEMPTED:
        job.fail(f"a stop signal should end the job with {EXIT_PREEMPTED}, got {code}")
    assert checkpoint.latest_valid(run_dir)[1]["step"] == 3
    resumed = finish(digits_dir, run_dir, env=NAN, **COMMON, **FSDP)
    assert "resumed from" in resumed.output()
    final = f"step-{STEPS:09d}"
    got = _pieces(checkpoint.checkpoints_dir(run_dir) / final)
    want = _pieces(checkpoint.checkpoints_dir(fsdp_run) / final)
    assert got.keys() == want.keys() and len(got) == 6  # model, ema, optimizer on each of 2 ranks
    for name in want:
        different = [key for key in want[name] if not torch.equal(got[name][key], want[name][key])]
        assert not different, f"{name}: {different[:5]} differ from the uninterrupted run"


def test_compiled_blocks_give_the_same_losses(fsdp_run, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = finish(digits_dir, run_dir, env={**faults.env(compile_backend="aot_eager", nan_at_steps=[4])},
                 **{**COMMON, "train.max_steps": 3, "train.compile": "true"}, **FSDP)
    assert "Traceback" not in job.output()
    eager, compiled = _metrics(fsdp_run), _metrics(run_dir)
    for step in (1, 2, 3):
        assert math.isclose(compiled[step]["loss"], eager[step]["loss"], rel_tol=LOSS_RTOL), step


def test_bf16_ema_averages_the_fp32_shards(digits_dir, tmp_path):
    # An EMA whose half-life is far below one batch follows the weights at once: it must equal the
    # fp32 shards AdamW steps on, which bf16 copies of them would not.
    run_dir = tmp_path / "run"
    finish(digits_dir, run_dir, nproc=1, **{**COMMON, "train.max_steps": 2, "train.grad_accum": 1,
                                            "train.mixed_precision": "bf16", "train.ema_halflife_images": 1e-9,
                                            "train.ema_rampup_ratio": "null"}, **FSDP)
    step_dir = checkpoint.checkpoints_dir(run_dir) / "step-000000002"
    model, ema = (
        load_file(step_dir / "model.rank-00000.safetensors"),
        load_file(step_dir / "ema.rank-00000.safetensors"),
    )
    assert all(tensor.dtype == torch.float32 for tensor in [*model.values(), *ema.values()])
    assert all(torch.equal(model[name], ema[name]) for name in model)
    changed = [name for name, tensor in model.items() if not torch.equal(tensor, tensor.bfloat16().float())]
    assert changed, "the masters should hold fp32 values a bf16 copy cannot"


@pytest.mark.parametrize("config", ["flow", "pixelcnn", "vae"])
def test_every_family_trains_under_per_block_sharding(config, digits_dir, tmp_path):
    run_dir = tmp_path / config
    overrides = tiny_overrides(digits_dir, run_dir, **{
        "train.max_steps": 2, "data.batch_size": 4, "checkpoint.every_steps": 2, "sample.at_end": "false",
        "eval.every_steps": 0, **FSDP})
    result = run_cli("launch", "local", str(REPO / "configs" / "tiny" / f"{config}.yaml"), *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    assert all(math.isfinite(record["loss"]) for record in _metrics(run_dir).values())
    assert (checkpoint.checkpoints_dir(run_dir) / "step-000000002" / "model.rank-00000.safetensors").is_file()


def test_another_strategys_checkpoint_and_fp16_are_refused(fsdp_run, digits_dir):
    overrides = tiny_overrides(digits_dir, fsdp_run, **{"train.max_steps": STEPS + 1})
    result = run_cli(
        "launch",
        "local",
        str(REPO / "configs" / "tiny" / "ddpm.yaml"),
        *overrides,
        "model.base_channels=8",
        "model.norm_groups=4",
        "model.channel_mult=[1,2]",
        "model.attention_resolutions=[16]",
        "data.image_size=32",
        "data.batch_size=16",
        "train.grad_accum=2",
    )  # same global batch
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was written under FSDP2, this config trains under ddp" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("launch", "local", str(REPO / "configs" / "tiny" / "ddpm.yaml"),
                     *tiny_overrides(digits_dir, fsdp_run.parent / "fp16"), "distributed.strategy=fsdp",
                     "train.mixed_precision=fp16")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "launch: error: train.mixed_precision: fp16 is not supported with distributed.strategy: fsdp "
        "(it would need a sharded loss scaler); use bf16")
