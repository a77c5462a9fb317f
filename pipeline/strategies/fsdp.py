"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and AdamW state sharded.

Wrapping follows torchtitan: each block the family names (``model.fsdp_blocks()``, see
pipeline/models/base.py; a module list is one group of modules) is sharded on its own, then the
root takes the parameters left over.
Every parameter becomes a DTensor sharded on dim 0 over a one-dimensional device mesh of all
processes; a block's parameters are all-gathered just before its forward (and again for its
backward, with ``fsdp.reshard_after_forward``) and its gradients reduce-scattered right after
its backward, on every micro-batch, so nothing whole outlives a block. Mixed precision is FSDP2's
own policy: ``train.mixed_precision: bf16`` computes with bf16 parameters and reduces gradients
in fp32, while the sharded parameters, the fp32 masters AdamW steps on, stay fp32; otherwise
everything is fp32. fp16 (which would need a sharded loss scaler) is refused. The forward still
runs under autocast, as under DDP, so the family's own fp32 tensors meet bf16 weights correctly.

``train.compile`` compiles each block in place (``module.compile``: parameter names unchanged)
before sharding, as torchtitan does; FSDP2's hooks stay outside the compiled graphs.

Clipping works on the sharded gradients: the global norm is one all-reduce of the shards' squared
norms (``get_total_norm`` on DTensors, made whole), then every shard is scaled by the same
coefficient; a non-finite norm skips the step on every rank alike (weights, moments and step
counts untouched). The EMA, whole weights and the checkpoint are the sharded strategies' common
ones (pipeline/strategies/sharded.py): each rank's piece of a parameter is its local shard.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline import optim, watchdog
from pipeline.errors import UserError
from pipeline.strategies.base import Parts, inputs, tensor_bytes
from pipeline.strategies.sharded import ShardedStrategy


class FSDPStrategy(ShardedStrategy):
    def __init__(self, config):
        super().__init__(config)
        if config.train.mixed_precision == "fp16":
            raise UserError("train.mixed_precision: fp16 is not supported with distributed.strategy: fsdp "
                            "(it would need a sharded loss scaler); use bf16")
        self.grads_bytes = None

    @property
    def identity(self) -> dict[str, Any]:
        return {"strategy": "fsdp", "zero_stage": None}

    def start(self):
        processes = super().start()
        backend = self.config.distributed.backend
        processes.ensure_group("gloo" if processes.device.type == "cpu" else ("nccl" if backend == "auto" else backend))
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(processes.device.type, (processes.world_size,))
        return processes

    def wrap(self, model: nn.Module, build_model, faults) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from pipeline.train_step import learning_rate

        train = self.train
        self.model = model
        self._build_model = build_model
        if train.mixed_precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        options = dict(mesh=self.mesh, mp_policy=policy, reshard_after_forward=self.config.fsdp.reshard_after_forward)
        for block in model.fsdp_blocks():
            # A module list (a residual block and its attention) is one group of modules sharded
            # and gathered together: its elements have the forwards that FSDP2's hooks follow.
            modules = list(block) if isinstance(block, nn.ModuleList) else [block]
            if train.compile:
                backend = faults.compile_backend or "inductor"
                for module in modules:
                    module.compile(backend=backend, mode=train.compile_mode if backend == "inductor" else None)
            fully_shard(modules if isinstance(block, nn.ModuleList) else block, **options)
        fully_shard(model, **options)
        self.parameters = list(model.parameters())
        self.optimizer = optim.make_adamw(self.parameters, train, learning_rate(train, 0), self.device.type)
        self.after_wrap()

    # -- pieces (pipeline/strategies/sharded.py): a piece is a parameter's local shard -----------

    def piece_specs(self):
        rank, world_size = self.processes.rank, self.processes.world_size
        specs = {}
        for name, parameter in self.model.named_parameters():
            check_row_sharded(name, parameter)
            rows = parameter.shape[0]
            row = parameter.numel() // rows if rows else 0
            first_row = min(rank * -(-rows // world_size), rows)  # torch.chunk's split, as FSDP2's
            length = parameter.to_local().numel()
            specs[name] = (tuple(parameter.shape), parameter.dtype, first_row * row, length)
        return specs

    def _local(self, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {name: tensor.to_local().detach().view(-1) for name, tensor in tensors.items()
                if name in self._holding}

    def after_wrap(self) -> None:
        super().after_wrap()
        rank = self.processes.rank
        self._holding = {name for name, tensor in self.layout.items() if tensor.piece_of(rank) is not None}
        self._named = dict(self.model.named_parameters())

    def master_pieces(self):
        return self._local(self._named)

    def set_master_pieces(self, values) -> None:
        with torch.no_grad():
            for name, piece in self.master_pieces().items():
                piece.copy_(values[name].reshape(-1))

    def moment_pieces(self, moment: str):
        pieces = {}
        for name, parameter in self._named.items():
            state = self.optimizer.state.get(parameter)
            if name not in self._holding:
                continue
            if state and moment in state:
                pieces[name] = state[moment].to_local().detach().view(-1)
            else:  # before the first step: AdamW's initial state
                pieces[name] = torch.zeros(parameter.to_local().numel(), dtype=parameter.dtype, device=self.device)
        return pieces

    def set_moment_pieces(self, moment: str, values, step: int) -> None:
        group = self.optimizer.param_groups[0]
        on_device = group.get("fused") or group.get("capturable")
        with torch.no_grad():
            for name, parameter in self._named.items():
                state = self.optimizer.state[parameter]
                if moment not in state:  # AdamW creates its state lazily at the first step: as it would
                    state[moment] = torch.zeros_like(parameter)
                if name in values:
                    state[moment].to_local().view(-1).copy_(values[name].reshape(-1))
                state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                             device=self.device if on_device else None)

    def optimizer_step_count(self) -> int:
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    # -- the step -------------------------------------------------------------------------------

    def forward_backward(self, batch, last_micro: bool, make_nan: bool, labels=None):
        watchdog.entered_step()
        with self.autocast():
            loss, metrics = self.model(*inputs(batch, labels))
        if make_nan:
            loss = loss * float("nan")
        (loss / self.train.grad_accum).backward()  # reduce-scatters each block's gradients
        return loss, metrics

    def optimizer_step(self):
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.parameters if p.grad is not None]
        if self.grads_bytes is None:
            self.grads_bytes = tensor_bytes(g.to_local() for g in grads)
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()  # one all-reduce of the shards' squared norms
        bad = ~torch.isfinite(grad_norm)
        if self.train.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.parameters, self.train.grad_clip, grad_norm, foreach=True)
        # A host read, on every device: the fused kernel's device-side skip (found_inf) is not
        # offered for DTensor parameters here. Every rank reads the same all-reduced norm.
        if not bool(bad):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, bad

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_parts(self, ema) -> tuple[Parts, dict[str, Any]]:
        parts, fields = super().checkpoint_parts(ema)
        fields["scaler"] = None
        return parts, fields

    def held_bytes(self, ema) -> dict[str, int]:
        return {"params_bytes": tensor_bytes(self.master_pieces().values()), "grads_bytes": self.grads_bytes or 0,
                **super().held_bytes(ema)}


def check_row_sharded(name: str, parameter) -> None:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(parameter, DTensor) or tuple(parameter.placements) != (Shard(0),):
        raise RuntimeError(f"FSDP2 left parameter {name} as {type(parameter).__name__} "
                           f"{getattr(parameter, 'placements', '')}; expected a DTensor sharded on dim 0")
