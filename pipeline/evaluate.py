"""Held-out bits/dim: one pass over a process's share of held-out shards, reduced over processes.

Used by ``Trainer.evaluate`` (every ``eval.every_steps``) and by ``launch eval`` (a checkpoint of a
finished or running run), so both report the same number the same way: the mean over images of
the model's per-image ``bits_per_dim`` (exact or an upper bound, ``model.bits_per_dim_kind``),
with the image sum and count added up across processes before dividing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from pipeline.data import ShardSet, eval_batches


@torch.no_grad()
def held_out_bits_per_dim(
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
    **bits_per_dim_options,
) -> tuple[float, int]:
    """(mean bits/dim, images) over all processes' shares of ``shards``.

    Each process reads ``shards.urls[rank::world_size]`` (at most its share of ``max_images``);
    with ``world_size > 1`` every process must call this (it all-reduces the sum and the count).
    ``bits_per_dim_options`` go to ``model.bits_per_dim`` (e.g. the VAE's ``iwae_samples``).
    The model is put in eval mode for the pass and left in the mode it was found in.
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
    )
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of bits/dim, images]
    try:
        for batch in loader:
            with autocast:
                bits = model.bits_per_dim(batch.to(device), **bits_per_dim_options)
            total[0] += bits.double().sum()
            total[1] += bits.numel()
    finally:
        model.train(was_training)
    if world_size > 1:
        if dist.get_backend() == "gloo" and total.device.type != "cpu":
            total = total.cpu()
        dist.all_reduce(total)
    bits_sum, count = total.tolist()
    return bits_sum / max(count, 1), int(count)
