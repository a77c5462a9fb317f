"""The fast training step: device-side skipping in the optimizer, torch.compile, channels-last.

The compiled tests trace with the ``aot_eager`` backend (Dynamo's graph capture and AOT autograd,
then the captured ATen graphs run eagerly): everything torch.compile does to our code except
generating kernels, which takes minutes with Inductor on two CPU cores. The fault seam's
``compile_backend`` (pipeline/faults.py) does the same inside the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, tiny_overrides
from pipeline import checkpoint, faults, models, optim
from pipeline import config as config_module
from pipeline.models.unet import UNet

TINY = "configs/tiny/ddpm.yaml"
SMALL = {
    "model.base_channels": 8,
    "model.norm_groups": 4,
    "model.channel_mult": "[1,2]",
    "model.attention_resolutions": "[16]",
    "data.image_size": 32,  # (the config trains at 8: attention at 16 needs 32)
    "model.sample_steps": 3,
    "data.batch_size": 8,
    "data.shuffle_buffer": 64,
    "train.warmup_steps": 2,
    "train.lr_schedule": "constant",  # a run stopped early and resumed follows the same schedule
    "train.max_steps": 12,
    "train.log_every_steps": 4,
    "checkpoint.every_steps": 6,
    "eval.every_steps": 0,
}


def _train_config(**changes):
    return config_module.load(REPO / TINY, [f"{k}={v}" for k, v in {**SMALL, **changes}.items()]).train


def _params_with_grads(grad_value: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.full_like(p, grad_value)
    return params


# --- the optimizer half of the step ------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_non_finite_gradient_leaves_weights_moments_and_step_count_alone(fused):
    train = _train_config()
    params = _params_with_grads(0.5)
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused or None, foreach=None if fused else True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    norm, bad = optim.clip_and_step(optimizer, params, train.grad_clip, scaler)
    assert not bool(bad) and torch.isfinite(norm)
    after_good = [p.detach().clone() for p in params]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in params]
    assert all(float(optimizer.state[p]["step"]) == 1 for p in params)

    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    norm, bad = optim.clip_and_step(optimizer, params, train.grad_clip, scaler)
    assert bool(bad) and not torch.isfinite(norm)
    assert all(torch.equal(p, q) for p, q in zip(params, after_good))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments))
    assert all(float(optimizer.state[p]["step"]) == 1 for p in params)
    assert all(p.grad is None for p in params)


def test_fused_and_foreach_steps_agree():
    """The device-side skip (fused AdamW + found_inf) changes nothing when the step is good."""
    train = _train_config()
    results = []
    for fused in (False, True):
        params = _params_with_grads(3.0)  # norm > grad_clip: clipping is exercised
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused or None, foreach=None if fused else True)
        optim.clip_and_step(optimizer, params, train.grad_clip, torch.amp.GradScaler("cpu", enabled=False))
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_make_adamw_takes_the_configured_hyperparameters():
    train = _train_config(**{"train.weight_decay": 0.01, "train.betas": "[0.8,0.95]", "train.eps": 1e-6})
    optimizer = optim.make_adamw([torch.nn.Parameter(torch.zeros(2))], train, 3e-4, "cpu")
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.01)
    assert group["foreach"] and not group["fused"]


# --- torch.compile and memory layout -----------------------------------------------------------------


def _small_model():
    config = config_module.load(REPO / TINY, [f"{k}={v}" for k, v in SMALL.items()])
    torch.manual_seed(0)
    model = models.build(config.model, 32, 1)
    # Open the zero-initialised output layers so every parameter gets a gradient.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    return model


def _loss_and_grads(model, call, batch, seed):
    torch.manual_seed(seed)  # the same timesteps and noise in both runs
    loss, _ = call(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads


def test_compiled_loss_is_one_graph_matches_eager_and_never_recompiles():
    torch._dynamo.reset()
    model = _small_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    batches = [torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8) for _ in range(3)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, batch in enumerate(batches):
            eager_loss, eager_grads = _loss_and_grads(model, model, batch, seed)
            loss, grads = _loss_and_grads(model, compiled, batch, seed)
            torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
            for g, e in zip(grads, eager_grads):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_channels_last_gives_the_same_network_function():
    torch.manual_seed(0)
    net = UNet(3, 3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
               image_size=16, num_heads=2, norm_groups=4)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([1, 10, 100, 999])
    expected = net(x, t)
    net.to(memory_format=torch.channels_last)
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- the trainer with both switched on ---------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_trainer_compiled_channels_last_trains_checkpoints_and_resumes(digits_dir, tmp_path):
    env = {**faults.env(compile_backend="aot_eager"), "TORCH_LOGS": "recompiles"}
    fast = {**SMALL, "train.compile": "true", "train.channels_last": "true"}
    run_dir = tmp_path / "fast"
    first = run_cli("launch", "local", TINY, *tiny_overrides(digits_dir, run_dir, **{**fast, "train.max_steps": 6}),
                    env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("launch", "local", TINY, *tiny_overrides(digits_dir, run_dir, **fast), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "(step 6," in second.stderr
    for result in (first, second):
        assert "Recompiling" not in result.stderr, result.stderr[-3000:]
    records = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [4, 6, 8, 12]
    assert all(r["loss"] == r["loss"] and r["bad_steps"] == 0 for r in records)

    # The same run eagerly and contiguous: the same checkpoint layout, and the same training up to
    # floating-point reordering.
    plain_dir = tmp_path / "plain"
    plain = run_cli("launch", "local", TINY, *tiny_overrides(digits_dir, plain_dir, **SMALL))
    assert plain.returncode == 0, plain.stderr[-3000:]
    fast_path, plain_path = (d / "checkpoints" / "step-000000012" for d in (run_dir, plain_dir))
    fast_ckpt = checkpoint.LoadedCheckpoint(fast_path, checkpoint.verify(fast_path))
    plain_ckpt = checkpoint.LoadedCheckpoint(plain_path, checkpoint.verify(plain_path))
    fast_weights, plain_weights = fast_ckpt.tensors("model.safetensors"), plain_ckpt.tensors("model.safetensors")
    assert fast_weights.keys() == plain_weights.keys()
    for name in plain_weights:
        torch.testing.assert_close(fast_weights[name], plain_weights[name], rtol=1e-3, atol=1e-4, msg=name)
    plain_losses = {r["step"]: r["loss"] for r in _read_jsonl(plain_dir / "metrics.jsonl") if "loss" in r}
    fast_losses = {r["step"]: r["loss"] for r in records}
    assert [fast_losses[4], fast_losses[12]] == pytest.approx([plain_losses[4], plain_losses[12]], rel=1e-4)


@pytest.mark.slow
def test_two_process_compiled_training_keeps_ranks_identical(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", TINY, *tiny_overrides(digits_dir, run_dir, **{**SMALL, "train.compile": "true",
                                                                         "train.max_steps": 6}),
        "--nproc", "2", env=faults.env(compile_backend="aot_eager"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ends = [_read_jsonl(run_dir / "ranks" / f"rank-{rank:05d}.jsonl")[-1] for rank in (0, 1)]
    assert [e["step"] for e in ends] == [6, 6]
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]
