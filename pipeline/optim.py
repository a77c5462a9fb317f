"""The optimizer half of a training step, shared by the trainer and benchmarks/train_step.py.

``make_adamw`` builds AdamW the fastest way the device allows (one fused kernel on CUDA, the
foreach path elsewhere); ``clip_and_step`` unscales (fp16), clips the global gradient norm and
steps unless that norm is non-finite. On CUDA the skip happens on the device: fused AdamW reads
``found_inf`` (GradScaler's own mechanism) and leaves weights, moments and its step count as they
were, so the host never waits for the GPU. The benchmark times exactly these functions, so its
figures are the trainer's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def make_adamw(parameters: Iterable[torch.nn.Parameter], train, lr: float, device_type: str) -> torch.optim.AdamW:
    """AdamW with ``train``'s betas, eps and weight decay (``train`` is a TrainConfig)."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        parameters,
        lr=lr,
        betas=tuple(train.betas),
        eps=train.eps,
        weight_decay=train.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.nn.Parameter],
    grad_clip: float | None,
    scaler: torch.amp.GradScaler,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale, clip, step unless the gradient is non-finite, zero the gradients.

    Returns ``(grad_norm, bad)`` as device tensors; nothing here reads them on the host on CUDA.
    Under data parallelism the gradients are already all-reduced, so a NaN/inf loss on any
    process makes the norm non-finite on every process and all of them skip together.
    """
    scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    bad = ~torch.isfinite(grad_norm)
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips inf/NaN itself (fused: via found_inf)
        scaler.update()
    elif _is_fused(optimizer):
        optimizer.grad_scale = None
        optimizer.found_inf = bad.float()
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
    elif not bool(bad):  # the foreach path has no device-side skip; on CPU the read is free
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(group.get("fused") for group in optimizer.param_groups)
