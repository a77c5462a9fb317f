"""DeepSpeed ZeRO 1-3 as a strategy: optimizer state, gradients and (stage 3) parameters partitioned.

The engine is driven through DeepSpeed's own API (pipeline/deepspeed_engine.py has the engine
config, wrapping and each rank's pieces of the fp32 masters and moments; docs/deepspeed.md says
why not through Accelerate). The engine divides the loss by the accumulation count, reduces
gradients at the boundary and steps only there; it skips a non-finite step itself and reports it.

The EMA averages this rank's pieces of the fp32 master weights (never the bf16 module copies), a
local lerp after each step (pipeline/strategies/sharded.py). Checkpoint: every rank writes its
pieces of the AdamW moments and, at ZeRO-3, of the masters and the EMA; at ZeRO-1/2, whose module
holds whole weights on every rank anyway, the masters and the EMA are written whole by rank 0
(``model.safetensors``, ``ema.safetensors``), so weights load without DeepSpeed. The AdamW step
count and the loss scaler go into trainer.json. On resume the module's weights are set before
``deepspeed.initialize`` (ZeRO-3: only its buffers) and each rank's master and moment pieces
afterwards, from whatever process count wrote them; nothing is rounded through bf16.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline import deepspeed_engine, watchdog
from pipeline.errors import UserError
from pipeline.strategies.base import Parts, inputs
from pipeline.strategies.sharded import ShardedStrategy


class DeepSpeedStrategy(ShardedStrategy):
    def __init__(self, config):
        super().__init__(config)
        if config.train.compile:
            raise UserError("train.compile is not supported with distributed.strategy: deepspeed")
        self.zero_stage = config.deepspeed.resolved_stage()
        self.whole_weights_in_checkpoint = self.zero_stage < 3

    @property
    def identity(self) -> dict[str, Any]:
        return {"strategy": "deepspeed", "zero_stage": self.zero_stage}

    def start(self):
        deepspeed_engine.prepare_environment()
        processes = super().start()
        backend = self.config.distributed.backend
        deepspeed_engine.init_distributed("gloo" if processes.device.type == "cpu" else
                                          ("nccl" if backend == "auto" else backend))
        return processes

    def wrap(self, model, build_model, faults) -> None:
        from pipeline.train_step import learning_rate

        self.model = model
        self._build_model = build_model
        optimizer = deepspeed_engine.make_optimizer(
            self.config, model.parameters(), learning_rate(self.train, 0), self.device.type
        )
        self.engine, self.optimizer = deepspeed_engine.wrap(
            self.config, model, optimizer, self.processes.world_size, self.device.type
        )
        self._specs = deepspeed_engine.piece_specs(self.engine, self.optimizer)
        self.after_wrap()

    # -- pieces (pipeline/strategies/sharded.py) -------------------------------------------------

    def piece_specs(self):
        return self._specs

    def master_pieces(self):
        return deepspeed_engine.pieces(self.engine, self.optimizer, self._specs)

    def set_master_pieces(self, values) -> None:
        deepspeed_engine.set_master_pieces(self.engine, self.optimizer, self._specs, values)

    def moment_pieces(self, moment: str):
        return deepspeed_engine.pieces(self.engine, self.optimizer, self._specs, moment)

    def set_moment_pieces(self, moment: str, values, step: int) -> None:
        deepspeed_engine.set_moment_pieces(self.engine, self.optimizer, self._specs, moment, values, step)

    def optimizer_step_count(self) -> int:
        return deepspeed_engine.optimizer_step_count(self.optimizer)

    def whole_module(self):
        return self.model if self.zero_stage < 3 else None

    def load_state(self, loaded, trainer_state: dict, ema) -> None:
        super().load_state(loaded, trainer_state, ema)
        scaler = trainer_state.get("loss_scaler")
        if scaler and getattr(self.optimizer, "loss_scaler", None) is not None:
            for key, value in scaler.items():
                setattr(self.optimizer.loss_scaler, key, value)

    # -- the step -------------------------------------------------------------------------------

    def forward_backward(self, batch, last_micro: bool, make_nan: bool, labels=None):
        watchdog.entered_step()
        with self.autocast():
            loss, metrics = self.engine(*inputs(batch, labels))
        if make_nan:
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()  # steps only at the accumulation boundary
        return loss, metrics

    def optimizer_step(self):
        # The engine already stepped (or skipped a non-finite step) at the boundary; read what it did.
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=self.device)
        return grad_norm, torch.tensor(not self.engine.was_step_applied(), device=self.device)

    def loss_scale(self) -> float | None:
        return deepspeed_engine.loss_scale(self.optimizer)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_parts(self, ema) -> tuple[Parts, dict[str, Any]]:
        parts, fields = super().checkpoint_parts(ema)
        fields.update(scaler=None, loss_scaler=deepspeed_engine.loss_scaler_state(self.optimizer))
        return parts, fields

    def held_bytes(self, ema) -> dict[str, int]:
        return {**deepspeed_engine.partition_bytes(self.engine, self.optimizer), **super().held_bytes(ema)}
