"""Exponential moving average of the weights, with its half-life counted in images seen.

Following EDM (Karras et al. 2022), the decay per step is ``0.5 ** (batch_images / half_life)``,
so a config means the same thing at any batch size or process count; DDPM's 0.9999 at batch 128
is a half-life of 128·ln 0.5 / ln 0.9999 ≈ 887k images. An optional ramp-up caps the half-life at
a fraction of the images seen so far, so early averages are not dominated by the initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, halflife_images: float, rampup_ratio: float | None = None):
        self.halflife_images = halflife_images
        self.rampup_ratio = rampup_ratio
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = [p for p in self.model.parameters()]
        self._ema_buffers = [b for b in self.model.buffers()]

    def decay(self, batch_images: int, images_seen: int) -> float:
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (batch_images / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, batch_images: int, images_seen: int) -> None:
        beta = self.decay(batch_images, images_seen)
        # Under DeepSpeed bf16/fp16 the module's weights are half precision; the average stays
        # fp32 (`.to` is a no-op when the dtypes already agree).
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), self._ema_params)]
        # One fused kernel per dtype group instead of a Python loop over tensors.
        torch._foreach_lerp_(self._ema_params, params, 1.0 - beta)
        for ema_buffer, buffer in zip(self._ema_buffers, model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
