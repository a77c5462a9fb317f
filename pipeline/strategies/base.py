"""The contract every distribution strategy fulfils, and what they share.

Life of a strategy in a training process (pipeline/trainer.py)::

    strategy = strategies.build(config)      # nothing started yet
    processes = strategy.start()             # the process group this strategy needs
    strategy.load_weights(model, loaded)     # a checkpoint's whole weights (or buffers) into the plain module
    strategy.wrap(model, build_model, faults)  # wrapper + optimizer (DDP, a ZeRO engine, FSDP2)
    ema = strategy.make_ema(half_life, ramp)   # whole (DDP) or this rank's pieces (sharded)
    strategy.load_state(loaded, trainer_state, ema)  # the rest of the checkpoint, after wrapping
    ... loss, metrics = strategy.forward_backward(batch, last_micro, nan)
        grad_norm, bad = strategy.optimizer_step()
        strategy.update_ema(ema, images, images_seen)

Checkpoint parts: `checkpoint_parts` returns the files *this rank* writes (``{name: (kind,
object)}``, pipeline/checkpoint.py's encoding) and the fields it adds to ``trainer.json``. Every
rank calls it: DDP returns its whole files on rank 0 only; the sharded strategies
(pipeline/strategies/sharded.py) return each rank's own pieces (pipeline/sharding.py).
`identity` is recorded in the checkpoint and compared on resume.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipeline import watchdog
from pipeline.checkpoint import LoadedCheckpoint
from pipeline.distributed import Processes
from pipeline.ema import EMA, ShardedEMA
from pipeline.errors import UserError

Parts = dict[str, tuple[str, Any]]


class Strategy(abc.ABC):
    """One way of spreading training over processes (see the module docstring for the life cycle)."""

    def __init__(self, config):
        self.config = config
        self.train = config.train
        self.processes: Processes | None = None
        self.model: nn.Module | None = None
        """The plain model (the family's module) whose parameters this strategy trains."""
        self.autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
            config.train.mixed_precision
        ]

    # -- identity -------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a checkpoint records of the strategy (``strategy``, ``zero_stage``)."""

    @property
    def name(self) -> str:
        return describe(self.identity)

    def check_compatible(self, saved: dict[str, Any], path) -> None:
        """A UserError when a checkpoint written under another strategy cannot be resumed here."""
        saved = {"strategy": saved.get("strategy", "ddp"), "zero_stage": saved.get("zero_stage")}
        if saved != self.identity:
            raise UserError(
                f"checkpoint {path} was written under {describe(saved)}, this config trains under "
                f"{self.name}; resume with the same distributed.strategy (and deepspeed.zero_stage), "
                "or start a new run_dir from its weights (launch export)"
            )

    # -- set-up ---------------------------------------------------------------------------------

    def start(self) -> Processes:
        self.processes = Processes.start(self.config.distributed)
        return self.processes

    @property
    def device(self) -> torch.device:
        return self.processes.device

    def load_weights(self, model: nn.Module, loaded: LoadedCheckpoint) -> None:
        """A checkpoint's weights into the plain module, before `wrap`."""
        with loaded.timed():
            load_module_state(model, loaded.tensors("model.safetensors"), loaded.path)

    def make_ema(self, halflife_images: float, rampup_ratio: float | None) -> EMA | ShardedEMA:
        """The EMA of the weights as they are after `wrap` (the checkpoint's, once `load_state` ran)."""
        return EMA(self.model, halflife_images, rampup_ratio)

    @abc.abstractmethod
    def wrap(self, model: nn.Module, build_model: Callable[[], nn.Module], faults) -> None:
        """Wrap ``model`` for training and build its optimizer. ``build_model`` makes a fresh plain
        model of the same architecture (used to hold whole weights where the live one is sharded)."""

    @abc.abstractmethod
    def load_state(self, loaded: LoadedCheckpoint, trainer_state: dict, ema: EMA | ShardedEMA | None) -> None:
        """The rest of a checkpoint after `wrap`: optimizer (moments, step counts, loss scale), the
        EMA (left as `make_ema` started it when the checkpoint has none) and, for strategies
        whose weights live in shards, the weights."""

    # -- the step -------------------------------------------------------------------------------

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def set_learning_rate(self, lr: float) -> None:
        """Every strategy's optimizer (torch's, or DeepSpeed's around one) has param_groups."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @abc.abstractmethod
    def forward_backward(self, batch: torch.Tensor, last_micro: bool, make_nan: bool) -> tuple[torch.Tensor, dict]:
        """One micro-batch: the loss (its forward under autocast) and its backward; gradients are
        synchronised across processes on the last micro-batch of the step. For a class-conditional
        model the step also passes ``labels=`` (int64 [B]), for the forward ``model(batch, labels)``."""

    @abc.abstractmethod
    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and step unless the gradient is non-finite: ``(grad_norm, bad)`` on the device."""

    def loss_scale(self) -> float | None:
        """The dynamic loss scale (fp16), else None. May read the device: call at log boundaries."""
        return None

    # -- whole weights --------------------------------------------------------------------------

    def update_ema(self, ema: EMA, batch_images: int, images_seen: int) -> None:
        ema.update(self.model, batch_images, images_seen)

    @contextlib.contextmanager
    def whole_model(self, ema: EMA | None, use_ema: bool, main_only: bool = False) -> Iterator[nn.Module | None]:
        """A plain module with whole weights on every rank, safe to run on one rank alone
        (sampling) or on each rank independently (evaluation); with ``main_only``, on rank 0
        alone (the others get None: a sharded strategy then gathers onto rank 0 only).
        Collective: every rank enters. What runs inside is legitimately long
        (pipeline/watchdog.py does not time it)."""
        with watchdog.paused():
            if main_only and not self.processes.is_main:
                yield None
                return
            yield ema.model if (use_ema and ema is not None) else self.model

    # -- checkpoints ----------------------------------------------------------------------------

    @abc.abstractmethod
    def checkpoint_parts(self, ema: EMA | ShardedEMA | None) -> tuple[Parts, dict[str, Any]]:
        """(files this rank writes, fields for trainer.json). Collective: every rank calls it."""

    def held_bytes(self, ema: EMA | ShardedEMA | None) -> dict[str, int]:
        """Bytes of training state this rank holds between steps: ``params_bytes``,
        ``grads_bytes`` (as sized at the last optimizer step), ``optimizer_bytes``, ``ema_bytes``
        (benchmarks/sharding_memory.py reports them)."""
        return {"ema_bytes": ema.held_bytes() if ema is not None else 0}


def describe(identity: dict[str, Any]) -> str:
    if identity.get("strategy") == "deepspeed":
        return f"deepspeed ZeRO-{identity.get('zero_stage')}"
    return {"fsdp": "FSDP2"}.get(identity.get("strategy"), str(identity.get("strategy")))


def inputs(batch: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The model's forward arguments: the images, and the labels only for a conditional model."""
    return (batch,) if labels is None else (batch, labels)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """``module.load_state_dict(state)``, or a UserError saying the checkpoint is another model's."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        reason = lines[1].strip() if len(lines) > 1 else str(exc)
        raise UserError(
            f"checkpoint {path} does not fit the model of this config ({reason}); "
            "use a new run_dir for a different architecture"
        ) from None
