"""DeepSpeed ZeRO behind the trainer: the engine's config, wrapping, and full-state checkpoints.

The trainer drives DeepSpeed through its own API (``deepspeed.initialize``, ``engine.backward``,
``engine.step``), not through Accelerate; docs/deepspeed.md says why. Models know nothing of this
module: the trainer hands it the plain ``nn.Module`` and its AdamW.

Checkpoints stay in the project's format (pipeline/checkpoint.py) instead of DeepSpeed's
``save_checkpoint``, whose files are pickles of Python objects (loss scalers, fragment-address
namedtuples) that ``torch.load(weights_only=True)`` refuses. DeepSpeed's tensor-fragment API
(`safe_get_full_fp32_param`, `safe_get_full_optimizer_state` and their setters) gives every rank
the *full* fp32 master weight and AdamW moments of each parameter, whatever the stage; the
checkpoint stores them as safetensors (all ranks take part in the gathers, rank 0 writes), the
loss scaler and optimizer step as JSON. Weights therefore need no conversion to be used without
DeepSpeed, and nothing loaded is ever unpickled.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")


def prepare_environment() -> None:
    """Before ``import deepspeed``: its CPU accelerator when there is no GPU, and no JIT build.

    On the CPU accelerator, ``deepspeed.comm`` compiles a shared-memory all-reduce extension at
    start-up (used only by ``inference_all_reduce``): minutes on a busy CPU, and a process killed
    mid-build leaves a lock file that makes every later start wait forever. Training never uses
    it, so it is marked incompatible and never built.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for name in ("DeepSpeed", "deepspeed"):
        import logging

        logging.getLogger(name).setLevel(logging.WARNING)


def init_distributed(backend: str) -> None:
    """DeepSpeed's communication layer over the process group (made here for one process)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        # One process started without a launcher: a group of one, on a free local port.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def engine_config(config: RunConfig, world_size: int, device_type: str) -> dict:
    """The DeepSpeed config dict: the file's tuning, the YAML's ZeRO keys, the run's numbers."""
    section = config.deepspeed
    train = config.train
    raw = section.file_dict()
    zero = dict(raw.get("zero_optimization", {}))
    zero["stage"] = section.resolved_stage()
    for which in ("optimizer", "param"):
        device = section.resolved_offload(which)
        options = dict(zero.get(f"offload_{which}") or {})
        options["device"] = device
        if device == "none":
            zero.pop(f"offload_{which}", None)
        else:
            zero[f"offload_{which}"] = options
    if train.mixed_precision == "fp16" and device_type == "cpu":
        raise UserError(
            "train.mixed_precision: fp16 with distributed.strategy: deepspeed needs a GPU "
            "(DeepSpeed's CPU accelerator has no fp16); use bf16 or no on CPU"
        )
    engine = {
        **raw,
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": config.data.batch_size * train.grad_accum * world_size,
        # None means "no clipping" as under DDP: the norm is still computed (and a non-finite
        # one still skips the step), the coefficient just never bites.
        "gradient_clipping": train.grad_clip if train.grad_clip is not None else 1e30,
        "zero_optimization": zero,
        "bf16": {"enabled": train.mixed_precision == "bf16", "check_grad_overflow": True},
        "fp16": {
            "enabled": train.mixed_precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # Offloading on a CPU-only machine keeps torch's AdamW; on GPUs the trainer passes
        # DeepSpeedCPUAdam itself.
        "zero_force_ds_cpu_optimizer": False,
    }
    return engine


def make_optimizer(config: RunConfig, parameters, lr: float, device_type: str) -> torch.optim.Optimizer:
    train = config.train
    kwargs = dict(lr=lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay)
    if config.deepspeed.resolved_offload("optimizer") == "cpu" and device_type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameters, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(parameters, foreach=True, **kwargs)


def wrap(config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int, device_type: str):
    """``(engine, zero_optimizer)``; floating buffers keep their dtype (DeepSpeed casts the whole
    module to bf16/fp16, which would round e.g. a diffusion noise schedule)."""
    import deepspeed

    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=engine_config(config, world_size, device_type)
    )
    restore_buffers(engine.module, buffers)
    return engine, zero_optimizer


def restore_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, buffer in module.named_buffers():
        original = buffers.get(name)
        if original is not None and buffer.dtype != original.dtype:
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            owner._buffers[name.rpartition(".")[2]] = original.to(buffer.device)


@contextlib.contextmanager
def full_parameters(module: nn.Module, stage: int):
    """Inside, every rank sees whole parameters (ZeRO-3 gathers them; a no-op below stage 3).
    Collective: every rank must enter."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The fp32 model state_dict, whole, on every rank (parameters from the fp32 masters, not the
    module's bf16/fp16 copies; buffers from the module). Collective: every rank calls it."""
    return full_state(engine, moments=False)[0]


def full_state(engine, moments: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fp32 model state_dict, AdamW moments ``{moment}/{name}``), whole, on every rank.

    Collective: every rank calls it, in the same order. Parameters are the fp32 master copies,
    not the module's bf16/fp16 ones; buffers come from the module.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module
    stage = engine.zero_optimization_stage()
    weights: dict[str, torch.Tensor] = {}
    gathered: dict[str, torch.Tensor] = {}
    for name, parameter in module.named_parameters():
        weights[name] = safe_get_full_fp32_param(parameter).detach().float().cpu().clone()
        for moment in MOMENTS if moments else ():
            value = safe_get_full_optimizer_state(parameter, moment)
            if value is not None:
                gathered[f"{moment}/{name}"] = value.detach().float().cpu().clone()
    with full_parameters(module, stage):
        for name, tensor in module.state_dict().items():
            if name not in weights:
                weights[name] = tensor.detach().cpu().clone()
    return weights, gathered


def optimizer_step_count(zero_optimizer) -> int:
    """AdamW's own step counter (bias correction), from the wrapped optimizer's state."""
    for state in zero_optimizer.optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def loss_scaler_state(zero_optimizer) -> dict | None:
    scaler = getattr(zero_optimizer, "loss_scaler", None)
    if scaler is None or not getattr(zero_optimizer, "dynamic_loss_scale", False):
        return None
    return {
        key: float(getattr(scaler, key)) if key == "cur_scale" else int(getattr(scaler, key))
        for key in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
        if hasattr(scaler, key)
    }


def loss_scale(zero_optimizer) -> float | None:
    if not getattr(zero_optimizer, "dynamic_loss_scale", False):
        return None
    return float(zero_optimizer.loss_scale)


def load_full_state(engine, zero_optimizer, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor],
                    step: int, scaler: dict | None) -> None:
    """Put a checkpoint's fp32 masters, moments, AdamW step and loss scaler into the engine.

    The module's own (possibly bf16) weights were loaded before ``deepspeed.initialize``; the
    masters are set again here so nothing is rounded through bf16 on resume.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _create_optimizer_state(zero_optimizer)
    stage3 = engine.zero_optimization_stage() == 3
    for name, parameter in engine.module.named_parameters():
        if stage3:
            _set_stage3_partition(zero_optimizer, parameter, weights[name])
        else:
            safe_set_full_fp32_param(parameter, weights[name].clone())
        for moment in MOMENTS:
            key = f"{moment}/{name}"
            if key in moments:
                if stage3:
                    _set_stage3_partition(zero_optimizer, parameter, moments[key], moment)
                else:
                    safe_set_full_optimizer_state(parameter, moments[key].clone(), moment)
    for state in zero_optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step
    if scaler and getattr(zero_optimizer, "loss_scaler", None) is not None:
        for key, value in scaler.items():
            setattr(zero_optimizer.loss_scaler, key, value)


def _create_optimizer_state(zero_optimizer) -> None:
    """AdamW creates its moments lazily at the first step, and DeepSpeed links each parameter's
    fragment of them only then; a resumed engine needs both before the moments can be set. The
    state made here is exactly AdamW's initial one (zeros, step 0)."""
    inner = zero_optimizer.optimizer
    # The fp32 partitions AdamW steps: ZeRO-3 swaps them into its param groups only while stepping.
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or getattr(
        zero_optimizer, "single_partition_of_fp32_groups", None
    )
    if flats is None:
        flats = [flat for group in inner.param_groups for flat in group["params"]]
    torch_adamw = type(inner).__module__.startswith("torch.")
    for flat in flats:
        state = inner.state[flat]
        if not state:
            state["step"] = torch.tensor(0.0) if torch_adamw else 0
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 (a private hook; ZeRO-3 reads the optimizer state directly)
        link()


def _set_stage3_partition(zero_optimizer, parameter, value: torch.Tensor, moment: str | None = None) -> None:
    """This rank's slice of a whole fp32 tensor into ZeRO-3's partition (master or moment).

    DeepSpeed 0.19.8's ``set_full_hp_param`` slices the unpadded value, so a parameter smaller
    than the process count (the last rank's partition is all padding) fails with "start + length
    exceeds dimension size"; this pads the value the way ZeRO-3 pads the parameter.
    """
    if not parameter.requires_grad:
        return
    partition, _ = zero_optimizer._get_fp32_opt_state_partition(
        parameter, release_swap_buffers=False, optim_state_key=moment
    )
    rank = zero_optimizer._get_param_partition_rank(parameter)
    size = partition.numel()
    flat = value.detach().flatten().to(partition.dtype)
    flat = torch.nn.functional.pad(flat, (0, max(0, size * (rank + 1) - flat.numel())))
    partition.data.copy_(flat.narrow(0, size * rank, size).to(partition.device))
