"""Exponential moving average of the weights, with its half-life counted in images seen.

Following EDM (Karras et al. 2022), the decay per step is ``0.5 ** (batch_images / half_life)``,
so a config means the same thing at any batch size or process count; DDPM's 0.9999 at batch 128
is a half-life of 128·ln 0.5 / ln 0.9999 ≈ 887k images. An optional ramp-up caps the half-life at
a fraction of the images seen so far, so early averages are not dominated by the initialisation.

Two forms, chosen by the distribution strategy (pipeline/strategies/):

- `EMA`: a whole copy of the model on every rank (DDP, where every rank holds the whole model).
- `ShardedEMA`: each rank averages only its own pieces of the fp32 master weights (ZeRO, FSDP2):
  a local lerp with no communication in the step, 1/N of the memory. Whole EMA weights are
  assembled from the pieces only to sample, evaluate or export (`Strategy.whole_model`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def decay(halflife_images: float, rampup_ratio: float | None, batch_images: int, images_seen: int) -> float:
    """The EMA decay for one step of ``batch_images`` images, ``images_seen`` counted after it."""
    halflife = halflife_images
    if rampup_ratio is not None:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


class EMA:
    def __init__(self, model: nn.Module, halflife_images: float, rampup_ratio: float | None = None):
        self.halflife_images = halflife_images
        self.rampup_ratio = rampup_ratio
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = [p for p in self.model.parameters()]
        self._ema_buffers = [b for b in self.model.buffers()]

    def decay(self, batch_images: int, images_seen: int) -> float:
        return decay(self.halflife_images, self.rampup_ratio, batch_images, images_seen)

    @torch.no_grad()
    def update(self, model: nn.Module, batch_images: int, images_seen: int) -> None:
        beta = self.decay(batch_images, images_seen)
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), self._ema_params)]
        # One fused kernel per dtype group instead of a Python loop over tensors.
        torch._foreach_lerp_(self._ema_params, params, 1.0 - beta)
        for ema_buffer, buffer in zip(self._ema_buffers, model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


class ShardedEMA:
    """This rank's pieces of the average, one fp32 1-D tensor per parameter name (those of which
    the rank holds a piece), started from the given master pieces."""

    def __init__(self, masters: dict[str, torch.Tensor], halflife_images: float, rampup_ratio: float | None = None):
        self.halflife_images = halflife_images
        self.rampup_ratio = rampup_ratio
        self.pieces = {name: piece.detach().reshape(-1).float().clone() for name, piece in masters.items()}

    def decay(self, batch_images: int, images_seen: int) -> float:
        return decay(self.halflife_images, self.rampup_ratio, batch_images, images_seen)

    @torch.no_grad()
    def update(self, masters: dict[str, torch.Tensor], batch_images: int, images_seen: int) -> None:
        """Lerp each piece towards the same piece of the fp32 masters (local, no communication)."""
        beta = self.decay(batch_images, images_seen)
        names = list(self.pieces)
        torch._foreach_lerp_([self.pieces[n] for n in names], [masters[n].reshape(-1) for n in names], 1.0 - beta)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pieces.values())
