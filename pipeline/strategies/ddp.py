"""Data parallelism: every process holds the whole model and optimizer; gradients are all-reduced.

Accelerate wraps the module in DistributedDataParallel (one process: the module itself);
``train.compile`` compiles around the wrapper, so DDP's graph is split at its gradient buckets and
the all-reduce overlaps the backward (DDPOptimizer); one process compiles one graph without
breaks. The optimizer half of the step is `pipeline.optim` (fused AdamW with a device-side skip
of non-finite steps on GPUs); fp16 adds torch's GradScaler. The EMA is a whole copy on every
rank. Checkpoint: the weights (``model.safetensors``), the EMA (``ema.safetensors``) and the
optimizer's state_dict (``optimizer.pt``, loaded with ``weights_only``), written by rank 0: every
rank holds them identically, and whole files load at any process count.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pipeline import optim, watchdog
from pipeline.strategies.base import Parts, Strategy, inputs, load_module_state, tensor_bytes


class DDPStrategy(Strategy):
    @property
    def identity(self) -> dict[str, Any]:
        return {"strategy": "ddp", "zero_stage": None}

    def wrap(self, model, build_model, faults) -> None:
        from pipeline.train_step import learning_rate

        train = self.train
        self.model = model
        self.parameters = list(model.parameters())
        self.grads_bytes = None
        self.optimizer = optim.make_adamw(model.parameters(), train, learning_rate(train, 0), self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.mixed_precision == "fp16")
        accelerator = self.processes.accelerator
        self.ddp_module = accelerator.prepare_model(model) if accelerator is not None else model
        self.forward_module = self.ddp_module
        if train.compile:
            backend = faults.compile_backend or "inductor"
            self.forward_module = torch.compile(
                self.ddp_module,
                fullgraph=self.processes.world_size == 1,
                backend=backend,
                mode=train.compile_mode if backend == "inductor" else None,
            )

    def load_state(self, loaded, trainer_state: dict, ema) -> None:
        with loaded.timed():
            self.optimizer.load_state_dict(loaded.torch_object("optimizer.pt"))
            if ema is not None and loaded.has("ema.safetensors"):
                load_module_state(ema.model, loaded.tensors("ema.safetensors"), loaded.path)
        if trainer_state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(trainer_state["scaler"])

    def forward_backward(self, batch, last_micro: bool, make_nan: bool, labels=None):
        watchdog.entered_step()
        no_sync = getattr(self.ddp_module, "no_sync", None)
        sync = contextlib.nullcontext() if last_micro or no_sync is None else no_sync()
        with sync:
            with self.autocast():
                loss, metrics = self.forward_module(*inputs(batch, labels))
            if make_nan:
                loss = loss * float("nan")
            self.scaler.scale(loss / self.train.grad_accum).backward()
        return loss, metrics

    def optimizer_step(self):
        if self.grads_bytes is None:  # sized once: the gradients' shapes never change
            self.grads_bytes = tensor_bytes(p.grad for p in self.parameters)
        return optim.clip_and_step(self.optimizer, self.parameters, self.train.grad_clip, self.scaler)

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def checkpoint_parts(self, ema) -> tuple[Parts, dict[str, Any]]:
        parts: Parts = {}
        if self.processes.is_main:
            parts["model.safetensors"] = ("tensors", self.model.state_dict())
            if ema is not None:
                parts["ema.safetensors"] = ("tensors", ema.state_dict())
            parts["optimizer.pt"] = ("torch", self.optimizer.state_dict())
        fields = {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        return parts, fields

    def held_bytes(self, ema) -> dict[str, int]:
        moments = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return {"params_bytes": tensor_bytes(self.parameters), "grads_bytes": self.grads_bytes or 0,
                "optimizer_bytes": tensor_bytes(moments), **super().held_bytes(ema)}
