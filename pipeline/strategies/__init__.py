"""Distribution strategies: how the model, its optimizer and its checkpoint are split over processes.

A `Strategy` (base.py) starts the process group it needs, wraps the model and builds the
optimizer, runs the micro-step and the optimizer step, gives whole weights when asked (to
sample, evaluate, export) and writes and restores its own part of a checkpoint. The trainer
holds one and never asks which it is (torchtitan's "parallelize in one place"). ``ddp.py``
replicates; ``deepspeed.py`` (ZeRO 1-3) and ``fsdp.py`` (FSDP2) shard, sharing ``sharded.py``.
"""

from __future__ import annotations

from pipeline.strategies.base import Strategy


def build(config) -> Strategy:
    """The strategy named by ``distributed.strategy`` (no process group yet: see `Strategy.start`)."""
    if config.distributed.strategy == "deepspeed":
        from pipeline.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(config)
    if config.distributed.strategy == "fsdp":
        from pipeline.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(config)
    from pipeline.strategies.ddp import DDPStrategy

    return DDPStrategy(config)


__all__ = ["Strategy", "build"]
