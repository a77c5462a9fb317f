"""DeepSpeed ZeRO behind the trainer: the engine's config, wrapping, and each rank's pieces of the
fp32 master weights and AdamW moments.

The trainer drives DeepSpeed through its own API (``deepspeed.initialize``, ``engine.backward``,
``engine.step``), not through Accelerate; docs/deepspeed.md says why. Models know nothing of this
module: the trainer hands it the plain ``nn.Module`` and its AdamW.

Checkpoints stay in the project's format (pipeline/checkpoint.py, pipeline/sharding.py) instead of
DeepSpeed's ``save_checkpoint``, whose files are pickles of Python objects (loss scalers,
fragment-address namedtuples) that ``torch.load(weights_only=True)`` refuses. What a rank holds
is read and written here as *pieces*: a contiguous range of each parameter seen flat, as a live
view into ZeRO's fp32 partition (the master weight) or into AdamW's state of that partition:

- ZeRO-1/2: the parameter's tensor fragment (``param._hp_mapping``: its ``lp_fragment_address``
  within the parameter, its ``hp_fragment`` within the rank's flat fp32 partition);
- ZeRO-3: partition ``r`` of the parameter, elements ``[r·p, r·p + p)`` of it (``p`` its
  partition size; the padding at the end of the last partitions is left out).

The pieces never leave their rank for a checkpoint; `pipeline/strategies/deepspeed.py` writes them.
"""

from __future__ import annotations

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


BUCKETS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}
"""DeepSpeed's bucket sizes (elements) and their defaults where a config leaves them out."""

LIVE_PARAMETERS = ("stage3_max_live_parameters", "stage3_max_reuse_distance")
"""ZeRO-3's bounds (elements) on the parameters a rank keeps gathered; sized from the model."""


def engine_config(config: RunConfig, world_size: int, device_type: str, parameters: int | None = None) -> dict:
    """The DeepSpeed config dict: the file's tuning, the YAML's ZeRO keys, the run's numbers.

    With the model's ``parameters`` count, no bucket is larger than the model (rounded up to whole
    MiB of elements): a larger one never fills, yet it is allocated at every micro-step (and filled with NaN there when
    ``train.deterministic`` asks PyTorch to fill fresh memory: 2 GB at DeepSpeed's default 5e8,
    a second of a CPU step). Under ZeRO-3, `LIVE_PARAMETERS` the file leaves out are one rank's
    share of the model (``parameters / world_size``), so that the parameters are sharded."""
    section = config.deepspeed
    train = config.train
    raw = section.file_dict()
    zero = dict(raw.get("zero_optimization", {}))
    zero["stage"] = section.resolved_stage()
    if parameters:
        model_size = -(-parameters // 2**20) * 2**20  # whole MiB of elements: DeepSpeed wants aligned buckets
        for key, default in BUCKETS.items():
            zero[key] = int(min(float(zero.get(key, default)), model_size))
        if zero["stage"] == 3:
            # DeepSpeed keeps up to 1e9 gathered parameters alive between uses by default: the whole
            # of any smaller model on every rank, which is then not sharded at all. Unless the file
            # says otherwise, a rank keeps at most its own share gathered (as FSDP2 reshards after
            # forward): parameters are gathered again for the backward.
            share = -(-parameters // world_size)
            for key in LIVE_PARAMETERS:
                zero.setdefault(key, share)
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
        model=model, optimizer=optimizer,
        config=engine_config(config, world_size, device_type, sum(p.numel() for p in model.parameters())),
    )
    restore_buffers(engine.module, buffers)
    return engine, zero_optimizer


def restore_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, buffer in module.named_buffers():
        original = buffers.get(name)
        if original is not None and buffer.dtype != original.dtype:
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            owner._buffers[name.rpartition(".")[2]] = original.to(buffer.device)


# ---------------------------------------------------------------------------------------------
# This rank's pieces of the fp32 masters and AdamW moments


def piece_specs(engine, zero_optimizer) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
    """``{name: (shape, float32, offset, length)}`` of this rank's master piece of every parameter."""
    specs = {}
    for name, parameter in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 3:
            size = parameter.ds_tensor.ds_numel
            offset = zero_optimizer._get_param_partition_rank(parameter) * size
            length = max(0, min(size, parameter.ds_numel - offset))
            specs[name] = (tuple(parameter.ds_shape), torch.float32, min(offset, parameter.ds_numel), length)
        else:
            mapping = parameter._hp_mapping
            where = (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel) if mapping else (0, 0)
            specs[name] = (tuple(parameter.shape), torch.float32, *where)
    return specs


def pieces(engine, zero_optimizer, specs, moment: str | None = None) -> dict[str, torch.Tensor]:
    """Live 1-D views of this rank's pieces of the fp32 masters (``moment`` None) or of an AdamW
    moment (created as AdamW's zero initial state if no step has run yet)."""
    if moment is not None:
        _create_optimizer_state(zero_optimizer)
    found = {}
    for name, parameter in engine.module.named_parameters():
        length = specs[name][3]
        if length == 0:
            continue
        if engine.zero_optimization_stage() == 3:
            if not parameter.requires_grad:
                raise RuntimeError(f"ZeRO-3: frozen parameter {name}: pieces exist only for trained parameters")
            partition, _ = zero_optimizer._get_fp32_opt_state_partition(
                parameter, release_swap_buffers=False, optim_state_key=moment)
            found[name] = partition.narrow(0, 0, length)
        else:
            mapping = parameter._hp_mapping
            found[name] = mapping.hp_fragment if moment is None else mapping.get_optim_state_fragment(moment)
    return found


def set_master_pieces(engine, zero_optimizer, specs, values: dict[str, torch.Tensor]) -> None:
    """This rank's master pieces from ``values``; at ZeRO-3 also its partition of the module's
    (possibly bf16) weights, which below stage 3 were loaded whole before ``initialize``."""
    masters = pieces(engine, zero_optimizer, specs)
    stage3 = engine.zero_optimization_stage() == 3
    parameters = dict(engine.module.named_parameters())
    with torch.no_grad():
        for name, master in masters.items():
            value = values[name].reshape(-1)
            master.copy_(value)
            if stage3:
                partition = parameters[name].ds_tensor
                partition.narrow(0, 0, master.numel()).copy_(value.to(partition.dtype))


def set_moment_pieces(engine, zero_optimizer, specs, moment: str, values: dict[str, torch.Tensor], step: int) -> None:
    """This rank's pieces of an AdamW moment, and AdamW's step count."""
    with torch.no_grad():
        for name, piece in pieces(engine, zero_optimizer, specs, moment).items():
            if name in values:
                piece.copy_(values[name].reshape(-1))
    for state in zero_optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step


def partition_bytes(engine, zero_optimizer) -> dict[str, int]:
    """Bytes of the module's own parameter storage on this rank (ZeRO-3: its partitions) and of the
    fp32 masters; gradients are counted as one fp32 partition (what the optimizer steps on)."""
    if engine.zero_optimization_stage() == 3:
        module = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters())
        flats = zero_optimizer.fp32_partitioned_groups_flat
    else:
        module = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        flats = zero_optimizer.single_partition_of_fp32_groups
    masters = sum(flat.numel() * flat.element_size() for flat in flats)
    return {"params_bytes": module + masters, "grads_bytes": masters}


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
