"""DeepSpeed ZeRO 1-3 as a strategy: optimizer state, gradients and (stage 3) parameters partitioned.

The engine is driven through DeepSpeed's own API (pipeline/deepspeed_engine.py has the engine
config, wrapping and the tensor-fragment reads and writes; docs/deepspeed.md says why not through
Accelerate). The engine divides the loss by the accumulation count, reduces gradients at the
boundary and steps only there; it skips a non-finite step itself and reports it.

Checkpoint: the full fp32 master weights (``model.safetensors``) and AdamW moments
(``optimizer.safetensors``), gathered by every rank and written by rank 0, so weights load
without DeepSpeed; the AdamW step count and loss scaler go into trainer.json. On resume the
module's weights are set before ``deepspeed.initialize`` and the masters again afterwards, so
nothing is rounded through bf16.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pipeline import deepspeed_engine
from pipeline.errors import UserError
from pipeline.strategies.base import Parts, Strategy


class DeepSpeedStrategy(Strategy):
    def __init__(self, config):
        super().__init__(config)
        if config.train.compile:
            raise UserError("train.compile is not supported with distributed.strategy: deepspeed")
        self.zero_stage = config.deepspeed.resolved_stage()
        self._build_model = None

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

    def load_state(self, loaded, trainer_state: dict) -> None:
        deepspeed_engine.load_full_state(
            self.engine, self.optimizer,
            loaded.tensors("model.safetensors"), loaded.tensors("optimizer.safetensors"),
            int(trainer_state["optimizer_step"]), trainer_state.get("loss_scaler"),
        )

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, batch, last_micro: bool, make_nan: bool):
        with self.autocast():
            loss, metrics = self.engine(batch)
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

    def update_ema(self, ema, batch_images: int, images_seen: int) -> None:
        with deepspeed_engine.full_parameters(self.model, self.zero_stage):
            ema.update(self.model, batch_images, images_seen)

    @contextlib.contextmanager
    def whole_model(self, ema, use_ema: bool):
        if (use_ema and ema is not None) or self.zero_stage < 3:
            yield ema.model if (use_ema and ema is not None) else self.model
            return
        # ZeRO-3's module gathers its parameters inside forward: a collective that a rank
        # sampling alone would wait on forever. A plain copy of the fp32 masters runs anywhere.
        weights = deepspeed_engine.full_weights(self.engine)
        whole = self._build_model().to(self.device)
        whole.load_state_dict(weights)
        whole.eval()
        yield whole

    def checkpoint_parts(self) -> tuple[Parts, dict[str, Any]]:
        # Collective: every rank gathers each parameter's fp32 master and AdamW moments.
        weights, moments = deepspeed_engine.full_state(self.engine)
        parts: Parts = {
            "model.safetensors": ("tensors", weights),
            "optimizer.safetensors": ("tensors", moments),
        }
        fields = {
            "scaler": None,
            "optimizer_step": deepspeed_engine.optimizer_step_count(self.optimizer),
            "loss_scaler": deepspeed_engine.loss_scaler_state(self.optimizer),
        }
        return parts, fields
