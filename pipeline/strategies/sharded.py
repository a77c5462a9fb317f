"""What the strategies that shard the training state share (DeepSpeed ZeRO, FSDP2).

Each rank holds a contiguous piece of every parameter's fp32 master weight and of its AdamW
moments (pipeline/sharding.py describes the pieces). On top of that piece-level view of a
subclass (`master_pieces`, `moment_pieces` and their setters), this class provides:

- the EMA: a `ShardedEMA` of the rank's master pieces, a local lerp with no communication;
- whole weights (`whole_model`): the pieces of the masters or of the EMA assembled into a fresh
  plain module, only to sample, evaluate or export: on every rank (evaluations share their work
  among the ranks), or on rank 0 alone (``main_only``: the sample grid), where the other ranks
  only send their pieces and build nothing;
- the checkpoint: every rank writes its own pieces of the weights, the EMA and the moments
  (``model|ema|optimizer.rank-RRRRR.safetensors``), rank 0 the buffers (``model.safetensors``,
  ``ema.safetensors``) and the layout (``shards.json``); nothing is gathered onto one rank.
  Subclasses whose module holds whole weights on every rank anyway (ZeRO-1/2) write the weights
  and the EMA whole instead (``whole_weights_in_checkpoint``), gathered one tensor at a time;
- loading at any process count: each rank reads the ranges it now holds from whichever files
  hold them, so N -> M resharding is the ordinary load path (a whole file, a legacy checkpoint's,
  is just a file with one piece per tensor).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline import sharding, watchdog
from pipeline.ema import ShardedEMA
from pipeline.errors import UserError
from pipeline.sharding import Layout, PartReader
from pipeline.strategies.base import Parts, Strategy, load_module_state, tensor_bytes

MOMENTS = ("exp_avg", "exp_avg_sq")


class ShardedStrategy(Strategy):
    whole_weights_in_checkpoint = False
    """True where every rank's module holds whole weights anyway (ZeRO-1/2): the checkpoint then
    keeps ``model.safetensors`` and ``ema.safetensors`` whole (rank 0), the moments per rank."""

    def __init__(self, config):
        super().__init__(config)
        self.layout: Layout | None = None
        self._build_model: Callable[[], nn.Module] | None = None

    # -- what a subclass provides ----------------------------------------------------------------

    @abc.abstractmethod
    def piece_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
        """``{name: (shape, dtype, offset, length)}`` of every parameter: this rank's piece of its
        fp32 master (length 0 when the rank holds none)."""

    @abc.abstractmethod
    def master_pieces(self) -> dict[str, torch.Tensor]:
        """Live 1-D views of this rank's fp32 master pieces (names it holds a piece of)."""

    @abc.abstractmethod
    def set_master_pieces(self, values: dict[str, torch.Tensor]) -> None:
        """Copy ``values`` (this rank's pieces) into the masters and whatever computes from them."""

    @abc.abstractmethod
    def moment_pieces(self, moment: str) -> dict[str, torch.Tensor]:
        """This rank's pieces of an AdamW moment (zeros before the first step)."""

    @abc.abstractmethod
    def set_moment_pieces(self, moment: str, values: dict[str, torch.Tensor], step: int) -> None:
        """Put this rank's moment pieces and AdamW's step count into the optimizer."""

    @abc.abstractmethod
    def optimizer_step_count(self) -> int: ...

    def whole_module(self) -> nn.Module | None:
        """The live module when it holds whole weights (ZeRO-1/2), else None."""
        return None

    # -- set-up ---------------------------------------------------------------------------------

    def after_wrap(self) -> None:
        """The layout of every rank's pieces (collective; once, the pieces never move)."""
        self.layout = Layout.gather(self.piece_specs(), self.processes)

    def load_weights(self, model: nn.Module, loaded) -> None:
        """Whole weights go into the module now; sharded ones only their buffers (the pieces go
        straight into the shards in `load_state`)."""
        with loaded.timed():
            reader = PartReader(loaded, "model")
            check_fits(model, reader.shapes(), loaded.path)
            if reader.sharded:
                model.load_state_dict(reader.whole_tensors(), strict=False)
            else:
                load_module_state(model, reader.state_dict(), loaded.path)

    def make_ema(self, halflife_images: float, rampup_ratio: float | None) -> ShardedEMA:
        return ShardedEMA(self.master_pieces(), halflife_images, rampup_ratio)

    def load_state(self, loaded, trainer_state: dict, ema) -> None:
        with loaded.timed():
            self._load_pieces(loaded, trainer_state, ema)

    def _load_pieces(self, loaded, trainer_state: dict, ema) -> None:
        mine = self._my_pieces()
        weights = PartReader(loaded, "model")
        self.set_master_pieces({name: weights.range(name, *where) for name, where in mine.items()})
        weights.release()
        moments = PartReader(loaded, "optimizer")
        step = int(trainer_state["optimizer_step"])
        for moment in MOMENTS:
            values = {name: moments.range(f"{moment}/{name}", *where)
                      for name, where in mine.items() if f"{moment}/{name}" in moments}
            self.set_moment_pieces(moment, values, step)
        moments.release()
        if ema is not None:
            averages = PartReader(loaded, "ema")
            for name, piece in ema.pieces.items():
                source = averages.range(name, *mine[name]) if averages.exists else self.master_pieces()[name]
                piece.copy_(source.reshape(-1))  # no EMA saved: it starts from the loaded weights
            averages.release()

    def _my_pieces(self) -> dict[str, tuple[int, int]]:
        rank = self.processes.rank
        return {name: (piece.offset, piece.length) for name, tensor in self.layout.items()
                if (piece := tensor.piece_of(rank)) is not None}

    # -- EMA and whole weights ------------------------------------------------------------------

    def update_ema(self, ema, batch_images: int, images_seen: int) -> None:
        ema.update(self.master_pieces(), batch_images, images_seen)

    @contextlib.contextmanager
    def whole_model(self, ema, use_ema: bool, main_only: bool = False):
        # Sampling and evaluation are legitimately long: not a stall (pipeline/watchdog.py), on
        # the live module too.
        with watchdog.paused():
            here = self.processes.is_main or not main_only
            live = self.whole_module()
            if live is not None and not (use_ema and ema is not None) and all(
                    parameter.dtype == torch.float32 for parameter in live.parameters()):
                # ZeRO-1/2 in fp32: the live module holds the masters themselves. Under bf16 its
                # weights are rounded copies: the masters are assembled instead, as for ZeRO-3.
                yield live if here else None
                return
            pieces = ema.pieces if (use_ema and ema is not None) else self.master_pieces()
            whole, into = None, None
            if here:
                # Building initialises weights from the global RNG: keep training's streams untouched.
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    whole = self._build_model().to(self.device)
                whole.load_state_dict(persistent_buffers(self.model), strict=False)
                into = dict(whole.named_parameters())
            with torch.no_grad():  # each parameter gathered straight into the plain module's
                sharding.assemble(self.layout, pieces, self.processes, into=into, dst=0 if main_only else None)
            if whole is not None:
                whole.eval()
            yield whole

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_parts(self, ema) -> tuple[Parts, dict[str, Any]]:
        processes = self.processes
        rank, is_main = processes.rank, processes.is_main
        cpu = torch.device("cpu")
        buffers = persistent_buffers(self.model)
        parts: Parts = {}
        layouts: dict[str, Layout] = {}
        masters = self.master_pieces()
        weights = {"model": masters, **({"ema": ema.pieces} if ema is not None else {})}
        for part, pieces in weights.items():
            if self.whole_weights_in_checkpoint:
                whole = sharding.assemble(self.layout, pieces, processes, device=cpu, dst=0)
                if is_main:
                    parts[sharding.whole_part_file(part)] = ("tensors", {**whole, **buffers})
            else:
                parts.update(sharding.piece_files(part, pieces, rank))
                layouts[part] = self.layout
                if is_main:
                    parts[sharding.whole_part_file(part)] = ("tensors", buffers)
        moments: dict[str, torch.Tensor] = {}
        for moment in MOMENTS:
            moments.update({f"{moment}/{name}": piece for name, piece in self.moment_pieces(moment).items()})
        parts.update(sharding.piece_files("optimizer", moments, rank))
        layouts["optimizer"] = Layout({**self.layout.renamed("exp_avg/"), **self.layout.renamed("exp_avg_sq/")})
        if is_main:
            parts.update(sharding.shards_file(layouts, processes.world_size))
        return parts, {"optimizer_step": self.optimizer_step_count()}

    def held_bytes(self, ema) -> dict[str, int]:
        moments = [t for moment in MOMENTS for t in self.moment_pieces(moment).values()]
        return {"optimizer_bytes": tensor_bytes(moments), **super().held_bytes(ema)}


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``module.state_dict()`` holds, by name (without touching the parameters)."""
    found = {}
    for prefix, owner in module.named_modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def check_fits(model: nn.Module, shapes: dict[str, tuple[int, ...]], path) -> None:
    """A UserError when a checkpoint's tensors are not this model's (names and shapes)."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(name for name in set(expected) & set(shapes) if tuple(shapes[name]) != expected[name])
    if missing or unexpected or wrong:
        if wrong:
            reason = f"size mismatch for {wrong[0]}: checkpoint {tuple(shapes[wrong[0]])}, model {expected[wrong[0]]}"
        else:
            names = missing or unexpected
            reason = f"{'missing' if missing else 'unexpected'} key(s): {', '.join(names[:3])}"
        raise UserError(
            f"checkpoint {path} does not fit the model of this config ({reason}); "
            "use a new run_dir for a different architecture"
        )
