"""The one seam between the trainer and the model families.

Every family is an `nn.Module` with three methods, and the trainer calls nothing else:

- ``loss(x) -> (loss, metrics)``: a scalar to minimise and a dict of detached 0-dim tensors to log
  (tensors, not floats, so the training step never waits on the device; the trainer reads them
  every few steps).
- ``sample(n, generator, **options) -> uint8 images [n, C, H, W]`` on the model's device. All
  randomness is drawn from ``generator`` (a CPU ``torch.Generator``) and then moved to the
  device, so the same weights and seed give the same images on any device.
- ``bits_per_dim(x) -> [B] float tensor``: exact for exact-likelihood families, an upper bound
  (``bits_per_dim_kind = "upper_bound"``) for the others.

Batches arrive as uint8 ``[B, C, H, W]`` tensors; each family converts them itself.
``forward`` is ``loss`` so that wrappers which hook ``forward`` (DDP, DeepSpeed) see the training
computation.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch
from torch import nn

BitsPerDimKind = Literal["exact", "upper_bound"]


class GenerativeModel(nn.Module, abc.ABC):
    """Base class of every model family (see the module docstring for the contract)."""

    bits_per_dim_kind: BitsPerDimKind = "exact"
    data_dependent_init: bool = False
    """True when the first training forward initialises weights from the data (Glow's ActNorm).
    The trainer then runs that forward once, before wrapping for data parallelism, so every
    process starts from rank 0's initialisation."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(x)

    @abc.abstractmethod
    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for a uint8 batch [B, C, H, W], and detached metrics to log."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator, **options) -> torch.Tensor:
        """n uint8 images [n, C, H, W] on the model's device, all noise drawn from generator."""

    @abc.abstractmethod
    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image bits per dimension of a uint8 batch (exact or an upper bound)."""


def to_unit_interval(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the scale diffusion and flows work in."""
    return x.float().mul_(2.0 / 255.0).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)
