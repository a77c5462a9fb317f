"""The one seam between the trainer and the model families.

Every family is an `nn.Module` with three methods, and the trainer calls nothing else:

- ``loss(x, labels=None) -> (loss, metrics)``: a scalar to minimise and a dict of detached 0-dim
  tensors to log (tensors, not floats, so the training step never waits on the device; the
  trainer reads them every few steps).
- ``sample(n, generator, labels=None, **options) -> uint8 images [n, C, H, W]`` on the model's
  device. All randomness is drawn from ``generator`` (a CPU ``torch.Generator``) and then moved to
  the device, so the same weights and seed give the same images on any device. ``options`` are
  the family's own, typed keyword parameters of its ``sample`` (`pipeline.models.sample_options_model`
  reads them off the signature; ``labels`` is not one of them).
- ``bits_per_dim(x, labels=None, **options) -> [B] float tensor`` (``labels`` always passed by
  keyword: diffusion's second positional parameter is its noise generator): exact for exact-likelihood
  families, an upper bound (``bits_per_dim_kind = "upper_bound"``) for the others, or for a
  family whose bound is itself too slow to sum (diffusion) an unbiased estimate of that bound
  per image; ``"estimate"`` where the number is neither (flow matching's probability-flow ODE
  with a stochastic trace: `pipeline.models.samplers`). Options are the family's own (the VAE's
  ``iwae_samples``, diffusion's ``estimator`` and ``timesteps_per_image``).

Conditioning. A class-conditional model has ``num_classes`` set (from its config's
``model.num_classes``; None: unconditional) and takes ``labels``, int64 [B] in 0..num_classes-1,
beside the images: the trainer passes each batch's labels to ``loss``, held-out bits/dim is
conditional on the true label, and ``sample`` draws images of the given classes. A conditional
model given no labels samples (and computes its loss, e.g. for FLOP counting) with the classes
0..num_classes-1 in turn (`default_labels`), so FID and the digits measures see every class
equally; ``bits_per_dim`` needs the true labels. An unconditional model refuses labels
(`check_labels`).

A held-out pass (`pipeline.evaluate`) calls ``held_out_estimator(images, **options)`` once and the
`HeldOutEstimator` it returns on every batch. Its default calls ``bits_per_dim(x, labels=labels,
**options)``; a family overrides it to make the choices that depend on the size of the pass once
for the whole pass (diffusion: the exact bound or a Monte-Carlo estimate), to keep state between
batches (diffusion: an importance proposal learnt from the batches before) and to report
progress within a slow batch. Its ``options`` are JSON-serialisable and name what was computed;
reports record them.

Batches arrive as uint8 ``[B, C, H, W]`` tensors; each family converts them itself.
``forward`` is ``loss`` so that wrappers which hook ``forward`` (DDP, DeepSpeed) see the training
computation.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from pipeline.errors import UserError

BitsPerDimKind = Literal["exact", "upper_bound", "estimate"]


class GenerativeModel(nn.Module, abc.ABC):
    """Base class of every model family (see the module docstring for the contract)."""

    bits_per_dim_kind: BitsPerDimKind = "exact"
    num_classes: int | None = None
    """Classes of a class-conditional model (labels 0..num_classes-1); None: unconditional."""
    data_dependent_init: bool = False
    """True when the first training forward initialises weights from the data (Glow's ActNorm).
    The trainer then runs that forward once, before wrapping for data parallelism, so every
    process starts from rank 0's initialisation."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(x, labels)

    def fsdp_blocks(self) -> list[nn.Module]:
        """The submodules FSDP2 shards one by one (pipeline/strategies/fsdp.py);
        the root takes the parameters left over. Each must use its parameters only inside its own
        ``forward``. Default: the elements of the model's module lists (nested lists opened),
        those holding parameters: a network's repeated blocks."""
        blocks: list[nn.Module] = []

        def visit(module: nn.Module, in_list: bool) -> None:
            for child in module.children():
                if isinstance(child, nn.ModuleList):
                    visit(child, True)
                elif not in_list:
                    visit(child, False)
                elif any(True for _ in child.parameters()):
                    blocks.append(child)

        visit(self, False)
        return blocks

    @abc.abstractmethod
    def loss(self, x: torch.Tensor, labels: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for a uint8 batch [B, C, H, W] (and its labels), and detached metrics."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               **options) -> torch.Tensor:
        """n uint8 images [n, C, H, W] on the model's device (of the classes ``labels`` [n]), all
        noise drawn from generator."""

    @abc.abstractmethod
    def bits_per_dim(self, x: torch.Tensor, labels: torch.Tensor | None = None, **options
                     ) -> torch.Tensor:
        """Per-image bits per dimension of a uint8 batch, conditional on ``labels`` for a
        conditional model (exact, an upper bound, or an estimate: ``bits_per_dim_kind``)."""

    def check_labels(self, labels: torch.Tensor | None, count: int, *, required: bool = False
                     ) -> torch.Tensor | None:
        """``labels`` checked against the model: None or int labels [count] for a conditional
        model (None when ``required`` is an error), None for an unconditional one. The values
        are not read (that would wait for the device): the data and ``launch sample`` check the
        range against ``num_classes`` before they get here."""
        if self.num_classes is None:
            if labels is not None:
                raise UserError("this model is unconditional (model.num_classes is not set): it "
                                "takes no class labels")
            return None
        if labels is None:
            if required:
                raise UserError(f"this model is class-conditional ({self.num_classes} classes): "
                                "the labels of the images are needed")
            return None
        if labels.shape != (count,):
            raise ValueError(f"labels must be shaped [{count}], got {tuple(labels.shape)}")
        return labels

    def default_labels(self, count: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The classes 0..num_classes-1 in turn, [count] int64: every class equally often."""
        return torch.arange(count, device=device) % self.num_classes

    def held_out_estimator(self, images: int | None, **options) -> HeldOutEstimator:
        """bits_per_dim for the batches of one held-out pass over ``images`` images (None when
        unknown); the default calls ``bits_per_dim(x, labels=labels, **options)``."""
        return HeldOutEstimator(self, dict(options))


class HeldOutEstimator:
    """Per-image bits/dim for the batches of one held-out pass (`GenerativeModel.held_out_estimator`).

    ``options``: what ``bits_per_dim`` is called with, JSON-serialisable (reports record it).
    ``__call__(x, progress, labels)``: bits/dim [B] of a uint8 batch (conditional on its labels
    for a conditional model); ``progress(fraction)``, if given, is called with fractions of the
    batch that add up to one by the time it returns.
    """

    def __init__(self, model: GenerativeModel, options: dict):
        self.model = model
        self.options = options

    def __call__(self, x: torch.Tensor, progress: Callable[[float], None] | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        options = self.options if labels is None else {**self.options, "labels": labels}
        bits = self.model.bits_per_dim(x, **options)
        if progress is not None:
            progress(1.0)
        return bits


def full_precision(x: torch.Tensor):
    """A context where ``x``'s device computes without autocast (likelihood terms, log-determinants).
    None is needed on the meta device, where a model built for its shapes and FLOP count runs."""
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def to_unit_interval(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the scale diffusion and flows work in."""
    return x.float().mul_(2.0 / 255.0).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to the nearest level."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)
