"""Held-out bits/dim: one pass over a process's share of held-out shards, reduced over processes.

Used by ``Trainer.evaluate`` (every ``eval.every_steps``) and by ``launch eval`` (a checkpoint of a
finished or running run), so both report the same number the same way: the mean over images of
the model's per-image ``bits_per_dim`` (exact, an upper bound, or an unbiased estimate of the
bound per image: ``model.bits_per_dim_kind`` and the resolved options say which), with the
image sum, sum of squares and count added up across processes before dividing.

The standard error of that mean is the sample standard deviation of the per-image values over
sqrt(images). The per-image values are independent draws (different images, independent noise),
so their spread holds both the data's spread and any Monte-Carlo noise of the estimator
(diffusion's sampled timesteps and x_t): the standard error of the reported mean, not of an
exact evaluation of the same images.

A class-conditional model (``model.num_classes``) is evaluated conditional on each image's true
label: the pass reads the shards' ``.cls`` labels beside the images, and the number is the mean
of -log2 p(x | y) / D.

The family's choices that depend on the size of the pass (diffusion's exact sum or Monte-Carlo
estimate) are made once, for the number of images the pass will read when the shards' manifest
says (`pass_images`), by ``model.held_out_estimator`` (`pipeline.models.base`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data import ShardSet, eval_batches


@dataclass(frozen=True)
class HeldOutBitsPerDim:
    """The result of a held-out pass over all processes."""

    bits_per_dim: float
    """Mean over images of the per-image bits/dim."""
    stderr: float | None
    """Standard error of that mean (None with fewer than two images)."""
    images: int
    options: dict[str, Any] = field(default_factory=dict)
    """The options bits_per_dim was called with, resolved for this pass (e.g. diffusion's
    {"estimator": "mc-importance", "timesteps_per_image": 16}); JSON-serialisable."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Means over images of the family's other held-out measures (``model.held_out_metrics``,
    named by ``model.held_out_metric_names``: the autoencoder's reconstruction psnr and kl)."""


def pass_images(shards: ShardSet, *, rank: int | None = None, world_size: int = 1,
                max_images: int | None = None) -> int | None:
    """Images a held-out pass reads: all processes' (``rank`` None) or one process's share, or
    None when the shards carry no manifest and ``max_images`` gives no bound."""
    limit = max_images
    if limit is not None and rank is not None:
        limit = limit // world_size + (rank < limit % world_size)
    manifest = shards.manifest
    names = [Path(url).name for url in shards.urls]
    if manifest is None or names != [shard.name for shard in manifest.shards]:
        return limit
    counts = [shard.num_samples for shard in manifest.shards]
    available = sum(counts if rank is None else counts[rank::world_size])
    return available if limit is None else min(available, limit)


@torch.no_grad()
def held_out_evaluation(
    model: torch.nn.Module,
    shards: ShardSet,
    *,
    image_size: int,
    channels: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    max_images: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[float], None] | None = None,
    **bits_per_dim_options,
) -> HeldOutBitsPerDim:
    """Mean bits/dim, its standard error and the images over all processes' shares of ``shards``.

    Each process reads ``shards.urls[rank::world_size]`` (at most its share of ``max_images``);
    with ``world_size > 1`` every process must call this (it all-reduces the sums and the count).
    ``bits_per_dim_options`` go to ``model.held_out_estimator`` (e.g. the VAE's ``iwae_samples``,
    diffusion's ``estimator``). ``progress(images)`` is called with the images this process has
    done since the last call (fractions of a batch within a slow batch, when the family reports
    them; whole once the batch is done). The model is put in eval mode for the pass and left in
    the mode it was found in.
    """
    device = torch.device(device)
    loader = eval_batches(
        shards,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        max_images=max_images,
        labels=getattr(model, "num_classes", None) is not None,
    )
    estimator = model.held_out_estimator(
        pass_images(shards, world_size=world_size, max_images=max_images), **bits_per_dim_options)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # [sum, sum of squares, images]
    # Named on the class, not read off the first batch, so a process with no batch all-reduces
    # the same vector as the others.
    metric_names = tuple(getattr(model, "held_out_metric_names", ()))
    metric_sums = torch.zeros(len(metric_names), dtype=torch.float64, device=device)
    try:
        for batch in loader:
            images, labels = (batch, None) if isinstance(batch, torch.Tensor) else (batch.images, batch.labels)
            reported = _BatchProgress(progress, images.shape[0]) if progress is not None else None
            with autocast:
                if labels is None:
                    bits = estimator(images.to(device), reported).double()
                else:
                    bits = estimator(images.to(device), reported, labels=labels.to(device)).double()
            total[0] += bits.sum()
            total[1] += bits.square().sum()
            total[2] += bits.numel()
            if metric_names:
                measured = model.held_out_metrics(images.to(device), labels=None if labels is None else labels.to(device))
                metric_sums += torch.stack([measured[name].double().sum() for name in metric_names])
            if reported is not None:
                reported.finish()
    finally:
        model.train(was_training)
    if world_size > 1:
        if dist.get_backend() == "gloo" and total.device.type != "cpu":
            total = total.cpu()
        dist.all_reduce(total)
        if metric_names:
            metric_sums = metric_sums.to(total.device)
            dist.all_reduce(metric_sums)
    bits_sum, squares_sum, count = total.tolist()
    mean = bits_sum / max(count, 1)
    stderr = None
    if count >= 2:
        variance = max(squares_sum - count * mean * mean, 0.0) / (count - 1)
        stderr = math.sqrt(variance / count)
    metrics = {name: value / max(count, 1) for name, value in zip(metric_names, metric_sums.tolist())}
    return HeldOutBitsPerDim(mean, stderr, int(count), dict(estimator.options), metrics)


class _BatchProgress:
    """Fractions of a batch as images for ``progress``, adding up to the batch's images exactly
    (float fractions need not sum to one)."""

    def __init__(self, progress: Callable[[float], None], images: int):
        self.progress, self.images, self.done = progress, images, 0.0

    def __call__(self, fraction: float) -> None:
        step = min(fraction * self.images, self.images - self.done)
        if step > 0:
            self.done += step
            self.progress(step)

    def finish(self) -> None:
        if self.done < self.images:
            self.progress(self.images - self.done)
        self.done = self.images


def held_out_bits_per_dim(model: torch.nn.Module, shards: ShardSet, **kwargs) -> tuple[float, int]:
    """(mean bits/dim, images): `held_out_evaluation` without the standard error and options."""
    result = held_out_evaluation(model, shards, **kwargs)
    return result.bits_per_dim, result.images
