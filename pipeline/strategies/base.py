"""The contract every distribution strategy fulfils, and what they share.

Life of a strategy in a training process (pipeline/trainer.py)::

    strategy = strategies.build(config)      # nothing started yet
    processes = strategy.start()             # the process group this strategy needs
    strategy.load_weights(model, loaded)     # a checkpoint's weights into the plain module
    strategy.wrap(model, build_model, faults)  # wrapper + optimizer (DDP, a ZeRO engine, ...)
    strategy.load_state(loaded)              # the optimizer's half of the checkpoint
    ... loss, metrics = strategy.forward_backward(batch, last_micro, nan)
        grad_norm, bad = strategy.optimizer_step()

Checkpoint parts: `checkpoint_parts` returns the files this strategy contributes
(``{name: (kind, object)}``, pipeline/checkpoint.py's encoding) and the fields it adds to
``trainer.json``; every rank calls it (some strategies gather), and only rank 0's files are
written for the shared state. `identity` is recorded in the checkpoint and compared on resume.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pipeline.checkpoint import LoadedCheckpoint
from pipeline.distributed import Processes
from pipeline.ema import EMA
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
                f"{self.name}; resume with the same distributed.strategy and deepspeed.zero_stage, "
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
        load_module_state(model, loaded.tensors("model.safetensors"), loaded.path)

    @abc.abstractmethod
    def wrap(self, model: nn.Module, build_model: Callable[[], nn.Module], faults) -> None:
        """Wrap ``model`` for training and build its optimizer. ``build_model`` makes a fresh plain
        model of the same architecture (used to hold whole weights where the live one is sharded)."""

    @abc.abstractmethod
    def load_state(self, loaded: LoadedCheckpoint, trainer_state: dict) -> None:
        """The optimizer's half of a checkpoint (moments, step counts, loss scale), after `wrap`."""

    # -- the step -------------------------------------------------------------------------------

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @abc.abstractmethod
    def set_learning_rate(self, lr: float) -> None: ...

    @abc.abstractmethod
    def forward_backward(self, batch: torch.Tensor, last_micro: bool, make_nan: bool) -> tuple[torch.Tensor, dict]:
        """One micro-batch: the loss (its forward under autocast) and its backward; gradients are
        synchronised across processes on the last micro-batch of the step."""

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
    def whole_model(self, ema: EMA | None, use_ema: bool) -> Iterator[nn.Module]:
        """A plain module with whole weights on every rank, safe to run on one rank alone
        (sampling) or on each rank independently (evaluation). Collective: every rank enters."""
        yield ema.model if (use_ema and ema is not None) else self.model

    # -- checkpoints ----------------------------------------------------------------------------

    @abc.abstractmethod
    def checkpoint_parts(self) -> tuple[Parts, dict[str, Any]]:
        """(files to write on rank 0, fields for trainer.json). Every rank calls it."""


def describe(identity: dict[str, Any]) -> str:
    if identity.get("strategy") == "deepspeed":
        return f"deepspeed ZeRO-{identity.get('zero_stage')}"
    return str(identity.get("strategy"))


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
