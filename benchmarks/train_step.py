"""Training-step throughput of our DDPM U-Net against diffusers' UNet2DModel (issue 8).

Method. For each network (``--networks``) and batch size (``--batches``), in one process, four
rows: {diffusers, ours} x {eager, compiled} (``--modes``), the compiled diffusers row first.
Each row builds a fresh model on the device, with the same initial weights on both sides (ours built from the config under its seed,
copied into the diffusers network by benchmarks/diffusers_baseline.py, which fails on any
parameter that does not map). Before timing, the parameter counts must be equal and the FLOPs of
one training forward+backward per image, counted by ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matmuls and attention, the last through the math SDPA kernel so that it is counted
the same on every device), must agree within 5 %; once per network the two networks' fp32 eps on
random input, after the copy, must agree (``diffusers_baseline.check_same_outputs``).

A row times full training steps: forward, backward, gradient clipping at 1.0, AdamW (both sides
built by ``pipeline.optim.make_adamw``: fused on CUDA, foreach on CPU), EMA. The first step (which compiles, in compiled mode) is timed alone and
reported as ``first_step_s``; then ``--warmup`` steps; then ``--steps`` steps timed with CUDA
events (``time.perf_counter`` around a synchronised loop on CPU). Batches are synthetic, made
once and already on the device (the data path is benchmarked by benchmarks/loader.py). On CUDA,
``cudnn.benchmark`` is on for every row (the trainer sets it; a careful diffusers user would too).

- ``diffusers``: the step of diffusers' examples/unconditional_image_generation/
  train_unconditional.py with ``--mixed_precision bf16``: float images in [-1, 1] cast to bf16,
  bf16 noise, ``DDPMScheduler(1000, linear betas 1e-4..0.02).add_noise``, ``unet(noisy,
  t).sample`` under bf16 autocast, ``F.mse_loss`` in fp32, backward, ``clip_grad_norm_``, AdamW
  (fused on CUDA, as the issue's baseline), ``EMAModel.step`` (the example's EMA: decay 0.9999
  with warm-up, inv_gamma 1, power 3/4; with ``foreach=True``, its fast path). Compiled mode is
  ``torch.compile(unet, mode=--compile-mode)``.
- ``ours``: `OurTrainStep`, the trainer's own ``TrainStep`` (pipeline/train_step.py) through
  its DDP strategy on one process, on uint8 batches: ``model.loss`` under bf16 autocast, backward,
  ``pipeline.optim.clip_and_step`` (clip, AdamW skipping non-finite steps on the device via
  ``found_inf``), ``pipeline.ema.EMA``, the device-side metric sums. Compiled mode compiles what the trainer's
  ``train.compile`` compiles: the model's loss forward (noise sampling, q_sample, network, MSE),
  ``fullgraph=True``. ``--channels-last`` puts its weights and batch in NHWC (as
  ``train.channels_last``). Learning rate constant at the config's ``train.lr`` (both sides).

Each row reports img/s, TFLOP/s achieved (counted FLOPs x img/s), MFU against ``--peak-tflops``
(default 800 on CUDA, the H100's measured bf16 dense peak; none on CPU unless given), peak
allocated CUDA memory over the timed steps (null on CPU) and ``ratio_vs_diffusers_compiled``:
img/s over that of the compiled diffusers row of the same network and batch. Rows are printed as
a table and appended as JSON lines to ``--out`` (default docs/benchmarks/train_step_<device>.jsonl,
e.g. ``h100``, ``cpu``).

``--loss-check N`` then trains ours N steps in fp32 (without TF32) and N steps in bf16 autocast
(eager, each network's first batch size) from the same initial weights, on the same synthetic images
(smooth random colour fields) and the same timesteps, noise and dropout masks at every step,
and appends one ``loss_check`` line: the mean loss of each curve over its last N/4 steps, their
difference, the fp32 curve's step-to-step standard deviation there and the standard error of its
mean; ``within_noise`` when the difference is within two standard errors.

On the GPU, in three commands of under 10 minutes each (8 compilations in all, one per compiled
row: with static shapes a new batch size needs its own graph; 1-2 minutes each)::

    python benchmarks/train_step.py --networks cifar32 --loss-check 400
    python benchmarks/train_step.py --networks 256 --batches 16 --steps 30 --warmup 5
    python benchmarks/train_step.py --networks 256 --batches 32 --steps 30 --warmup 5

CPU smoke run (tiny network; shows that it runs, says nothing about GPU speed)::

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --networks tiny --batches 8 \\
        --modes eager,compiled --steps 5 --warmup 2 --loss-check 40
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers_baseline import check_same_outputs, copy_weights, diffusers_unet_for, import_diffusers, no_tf32
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline import config as config_module
from pipeline import models, optim
from pipeline.distributed import Processes
from pipeline.ema import EMA
from pipeline.faults import Faults
from pipeline.strategies.ddp import DDPStrategy
from pipeline.train_step import MetricWindow, Progress, TrainStep

REPO = Path(__file__).resolve().parent.parent

# name -> (config file, overrides, default batch sizes)
NETWORKS = {
    "tiny": ("configs/ddpm_cifar32.yaml",
             ["model.base_channels=32", "model.channel_mult=[1,2]", "data.image_size=16",
              "model.attention_resolutions=[8]"], (8,)),
    "cifar32": ("configs/ddpm_cifar32.yaml", [], (128, 512)),
    "256": ("configs/ddpm_256.yaml", [], (16, 32)),
}
IMPLS = ("diffusers", "ours")
MODES = ("eager", "compiled")
# The compiled diffusers row first: every later row is written with its ratio to it at once.
ROW_ORDER = (("diffusers", "compiled"), ("diffusers", "eager"), ("ours", "eager"),
             ("ours", "compiled"))
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
FLOP_TOLERANCE = 0.05
AUTOCAST_DTYPE = torch.bfloat16
H100_BF16_PEAK_TFLOPS = 800.0


# --------------------------------------------------------------------------------------------
# The two training steps


class OurTrainStep:
    """The trainer's own step (`pipeline.train_step.TrainStep`, through the DDP strategy on one
    process: grad_accum 1, a constant learning rate), fed one batch already on the device per call.

    ``compiled`` compiles exactly as the trainer does (``train.compile`` in the strategy); the
    returned loss is the step's detached loss on the device.
    """

    def __init__(self, config, model: torch.nn.Module, device: torch.device,
                 autocast_dtype: torch.dtype | None, compiled: bool = False,
                 compile_mode: str = "default", channels_last: bool = False):
        precision = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
        train = config.train.model_copy(update={
            "mixed_precision": precision, "compile": compiled, "compile_mode": compile_mode,
            "channels_last": channels_last, "grad_accum": 1, "warmup_steps": 0, "lr_schedule": "constant",
        })
        self.strategy = DDPStrategy(config.model_copy(update={"train": train}))
        self.strategy.processes = Processes(rank=0, world_size=1, local_rank=0, device=device)
        self.strategy.wrap(model, build_model=None, faults=Faults())
        self.parameters = self.strategy.parameters
        self.ema = EMA(model, train.ema_halflife_images or 1e6, train.ema_rampup_ratio)
        self.progress, self.window = Progress(), MetricWindow(device)
        self._batch: torch.Tensor | None = None
        self.step = TrainStep(self.strategy, self, train, global_batch=0, ema=self.ema)

    def __next__(self) -> torch.Tensor:  # the step's batch source
        return self._batch

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self._batch = batch
        self.step.global_batch = batch.shape[0]
        return self.step(self.progress, self.window)["loss"]


class DiffusersTrainStep:
    """The training step of diffusers' train_unconditional.py example (epsilon prediction)."""

    def __init__(self, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, ema,
                 grad_clip: float, device: torch.device, autocast_dtype: torch.dtype | None):
        self.network = unet  # replaced by its torch.compile wrapper in compiled mode
        self.parameters = list(unet.parameters())
        self.optimizer = optimizer
        self.ema = ema
        self.grad_clip = grad_clip
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.weight_dtype = autocast_dtype or torch.float32
        self.scheduler = import_diffusers().DDPMScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        clean = images.to(self.weight_dtype)
        noise = torch.randn(clean.shape, dtype=self.weight_dtype, device=clean.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  device=clean.device).long()
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            output = self.network(noisy, timesteps).sample
        return F.mse_loss(output.float(), noise.float())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        loss = self.loss(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.parameters)
        return loss.detach()


# --------------------------------------------------------------------------------------------
# Measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops_per_image(loss_fn, batch: torch.Tensor, parameters) -> float:
    """FLOPs of one forward+backward of ``loss_fn(batch)`` per image; gradients cleared after.
    Attention runs through the math SDPA kernel, whose matmuls are counted on every device."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss_fn(batch).backward()
    for parameter in parameters:
        parameter.grad = None
    return counter.get_total_flops() / batch.shape[0]


def uint8_images(batch: int, channels: int, size: int, device: torch.device, memory_format,
                 seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8,
                           generator=generator)
    return images.to(device).contiguous(memory_format=memory_format)


def build_ours(config, batch: int, compiled: bool, args, device: torch.device):
    """(step, batch, parameter count, FLOPs per image) of our side, on the device."""
    image_size, channels = config.data.image_size, config.data.channels
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = models.build(config.model, image_size, channels)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    images = uint8_images(batch, channels, image_size, device, memory_format)
    parameters = list(model.parameters())
    with torch.autocast(device.type, dtype=AUTOCAST_DTYPE):
        flops = training_flops_per_image(lambda x: model.loss(x)[0], images[:2], parameters)
    step = OurTrainStep(config, model, device, AUTOCAST_DTYPE, compiled=compiled,
                        compile_mode=args.compile_mode, channels_last=args.channels_last)
    return step, images, sum(p.numel() for p in parameters), flops


def build_diffusers(config, batch: int, compiled: bool, args, device: torch.device):
    """(step, batch, parameter count, FLOPs per image) of the diffusers side, on the device,
    with our initial weights copied in."""
    import_diffusers()
    from diffusers.training_utils import EMAModel

    image_size, channels = config.data.image_size, config.data.channels
    torch.manual_seed(config.seed)
    with torch.device(device):
        ours = models.build(config.model, image_size, channels)
        unet = diffusers_unet_for(config.model, image_size, channels)
    copy_weights(ours.net, unet)
    del ours
    images = uint8_images(batch, channels, image_size, device, torch.contiguous_format)
    images = images.float().mul_(2 / 255).sub_(1)  # the example's loader: float in [-1, 1]
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=3 / 4, foreach=True)
    optimizer = optim.make_adamw(unet.parameters(), config.train, config.train.lr, device.type)
    step = DiffusersTrainStep(unet, optimizer, ema, config.train.grad_clip, device,
                              AUTOCAST_DTYPE)
    with torch.autocast(device.type, dtype=AUTOCAST_DTYPE):
        flops = training_flops_per_image(step.loss, images[:2], step.parameters)
    if compiled:  # after counting: FLOPs are the network's, whether compiled or not
        step.network = torch.compile(unet, mode=args.compile_mode)
    return step, images, sum(p.numel() for p in step.parameters), flops


def time_row(step, images: torch.Tensor, warmup: int, steps: int,
             device: torch.device) -> tuple[float, float, float | None]:
    """(first step seconds, seconds of the timed steps, peak allocated MiB or None on CPU)."""
    started = time.perf_counter()
    step(images)
    synchronize(device)
    first_step_s = time.perf_counter() - started
    for _ in range(warmup):
        step(images)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(images)
        end.record()
        end.synchronize()
        return first_step_s, start.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated(device) / 2**20
    started = time.perf_counter()
    for _ in range(steps):
        step(images)
    return first_step_s, time.perf_counter() - started, None


def profile_row(step, images: torch.Tensor, device: torch.device, path: Path, title: str,
                steps: int = 5) -> None:
    """Append the kernels that dominate ``steps`` more steps (self device time) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step(images)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=90)
    with path.open("a") as sink:
        sink.write(f"## {title}: {steps} steps, sorted by {sort_by}\n{table}\n")


def release(device: torch.device) -> None:
    """Forget compiled graphs and free the last row's memory before the next row."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def smooth_images(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """uint8 images a network can learn: 4x4 random colour fields upsampled bilinearly."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, 4, 4, generator=generator)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (fine * 255).round().to(torch.uint8)


def loss_check(network: str, config, batch: int, steps: int, device: torch.device) -> dict:
    """fp32 and bf16 loss curves of ours from the same weights, images, timesteps and noise."""
    image_size, channels = config.data.image_size, config.data.channels
    curves = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(config.seed)
        with torch.device(device):
            model = models.build(config.model, image_size, channels)
        step = OurTrainStep(config, model, device, dtype)
        losses = []
        with no_tf32() if dtype is None else contextlib.nullcontext():
            for index in range(steps):
                images = smooth_images(batch, channels, image_size, seed=index).to(device)
                torch.manual_seed(config.seed + 1 + index)  # same t, noise, dropout in both runs
                losses.append(step(images))
        curves[precision] = torch.stack(losses).float().cpu()
        del model, step
        release(device)
    window = max(2, steps // 4)
    fp32, bf16 = curves["fp32"][-window:], curves["bf16"][-window:]
    step_std = fp32.std().item()
    standard_error = step_std / math.sqrt(window)
    difference = (bf16.mean() - fp32.mean()).item()
    return {
        "kind": "loss_check", "impl": "ours", "network": network, "batch": batch,
        "steps": steps, "window": window, "lr": config.train.lr,
        "mean_fp32": fp32.mean().item(), "mean_bf16": bf16.mean().item(),
        "difference": difference, "step_std": step_std, "standard_error": standard_error,
        "within_noise": abs(difference) <= 2 * standard_error,
        "first_loss_fp32": curves["fp32"][0].item(), "first_loss_bf16": curves["bf16"][0].item(),
    }


# --------------------------------------------------------------------------------------------
# Command line


def device_slug(device: torch.device) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3", ``cpu`` on CPU; else the name made file-safe."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    model = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    if model:
        return model.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def parse_batches(entries: list[str], networks: list[str]) -> dict[str, list[int]]:
    """``--batches 4,8`` (every network) or ``--batches cifar32=128,512`` (one network)."""
    batches = {network: list(NETWORKS[network][2]) for network in networks}
    for entry in entries:
        target, _, sizes = entry.rpartition("=")
        if target and target not in networks:
            raise SystemExit(f"train_step.py: --batches {entry!r} names network {target!r}, "
                             f"which is not in --networks {','.join(networks)}")
        try:
            values = [int(size) for size in sizes.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise SystemExit(f"train_step.py: --batches {entry!r}: expected positive integers "
                             f"separated by commas, optionally after NETWORK=")
        for network in [target] if target else networks:
            batches[network] = values
    return batches


def choices(value: str, allowed, flag: str) -> list[str]:
    chosen = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"train_step.py: {flag} {value!r}: expected a comma-separated subset of "
                         f"{','.join(allowed)}")
    return chosen


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="cifar32,256",
                        help=f"comma-separated, of {','.join(NETWORKS)}")
    parser.add_argument("--batches", action="append", default=[],
                        help="B1,B2 for every network or NETWORK=B1,B2 (repeatable); defaults: "
                        + "; ".join(f"{n} {','.join(map(str, b))}" for n, (_, _, b) in NETWORKS.items()))
    parser.add_argument("--modes", default="eager,compiled",
                        help="eager,compiled, one of them, or none (only --loss-check)")
    parser.add_argument("--compile-mode", default="default", help=", ".join(COMPILE_MODES))
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and batch (ours)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps after the first")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per row")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak FLOP/s for MFU (default {H100_BF16_PEAK_TFLOPS:g} on CUDA, "
                        "none on CPU)")
    parser.add_argument("--loss-check", type=int, default=0, metavar="N",
                        help="also train ours N steps in fp32 and in bf16 and compare the losses")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="append each row's top kernels (torch.profiler, 5 more steps) to FILE")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON lines appended here (default docs/benchmarks/train_step_<device>.jsonl)")
    args = parser.parse_args(argv)
    args.networks = choices(args.networks, tuple(NETWORKS), "--networks")
    args.batches = parse_batches(args.batches, args.networks)
    args.modes = [] if args.modes == "none" else choices(args.modes, MODES, "--modes")
    if args.compile_mode not in COMPILE_MODES:
        raise SystemExit(f"train_step.py: --compile-mode {args.compile_mode!r}: expected one of "
                         f"{', '.join(COMPILE_MODES)}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"train_step.py: --steps must be at least 1 and --warmup at least 0 "
                         f"(got {args.steps} and {args.warmup})")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise SystemExit(f"train_step.py: --peak-tflops must be positive, got {args.peak_tflops}")
    if not args.modes and not args.loss_check:
        raise SystemExit("train_step.py: --modes none measures nothing without --loss-check N")
    if args.loss_check and args.loss_check < 8:
        raise SystemExit(f"train_step.py: --loss-check needs at least 8 steps (a window of 2), "
                         f"got {args.loss_check}")
    return args


def print_row(row: dict) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(f"{row['network']:>8} {row['batch']:>5} {row['impl']:>9} "
          f"{'compiled' if row['compiled'] else 'eager':>8} {row['img_s']:>9.1f} "
          f"{row['step_ms']:>9.2f} {row['tflops']:>8.3f} {fmt(row['mfu'], '>6.3f'):>6} "
          f"{fmt(row['peak_mem_mb'], '>8.0f'):>8} {fmt(row['ratio_vs_diffusers_compiled'], '>6.3f'):>6} "
          f"{row['first_step_s']:>8.1f}", flush=True)


def start_run(kind: str, out: Path | None) -> tuple[torch.device, Path, dict]:
    """The device (cuDNN autotuning on, as the trainer; a careful diffusers user too), the JSON
    lines file (default docs/benchmarks/<kind>_<device>.jsonl) and the fields every row carries."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = out or REPO / "docs" / "benchmarks" / f"{kind}_{device_slug(device)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {
        "device": device_slug(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "diffusers": import_diffusers().__version__,
    }
    return device, out, common


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, out, common = start_run("train_step", args.out)
    common["compile_mode"] = args.compile_mode
    peak_tflops = args.peak_tflops or (H100_BF16_PEAK_TFLOPS if device.type == "cuda" else None)
    print(f"{'network':>8} {'batch':>5} {'impl':>9} {'mode':>8} {'img/s':>9} {'step_ms':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak_MB':>8} {'ratio':>6} {'first_s':>8}")
    with out.open("a") as sink:
        for network in args.networks if args.modes else ():
            path, overrides, _ = NETWORKS[network]
            config = config_module.load(REPO / path, overrides)
            difference, scale = check_same_outputs(config.model, config.data.image_size,
                                                   config.data.channels, batch=1, device=device)
            release(device)
            print(f"# {network}: diffusers eps equals ours after the weight copy (fp32, max "
                  f"|difference| {difference:.2g} for outputs up to {scale:.2g})", flush=True)
            work: dict[str, tuple[int, float]] = {}  # impl -> (params, FLOPs per image)
            for batch in args.batches[network]:
                baseline = None  # img/s of the compiled diffusers row, measured first
                for impl, mode in ROW_ORDER:
                    if mode not in args.modes:
                        continue
                    build = build_ours if impl == "ours" else build_diffusers
                    step, images, params, flops = build(config, batch, mode == "compiled", args,
                                                        device)
                    check_same_work(work, impl, params, flops, network)
                    first_step_s, seconds, peak_mb = time_row(step, images, args.warmup,
                                                              args.steps, device)
                    if args.profile:
                        profile_row(step, images, device, args.profile,
                                    f"{network} batch {batch} {impl} {mode}")
                    del step, images
                    release(device)
                    img_s = batch * args.steps / seconds
                    if impl == "diffusers" and mode == "compiled":
                        baseline = img_s
                    row = {
                        "kind": "train_step", "impl": impl, "network": network, "batch": batch,
                        "compiled": mode == "compiled",
                        "channels_last": impl == "ours" and args.channels_last,
                        "img_s": img_s, "step_ms": 1000 * seconds / args.steps,
                        "tflops": img_s * flops / 1e12,
                        "mfu": img_s * flops / (peak_tflops * 1e12) if peak_tflops else None,
                        "peak_mem_mb": peak_mb, "params": params, "flops_per_image": flops,
                        "ratio_vs_diffusers_compiled": img_s / baseline if baseline else None,
                        "first_step_s": first_step_s, "warmup": args.warmup, "steps": args.steps,
                        "max_eps_difference": difference, **common,
                    }
                    print_row(row)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
        for network in args.networks if args.loss_check else ():
            path, overrides, _ = NETWORKS[network]
            config = config_module.load(REPO / path, overrides)
            batch = args.batches[network][0]
            record = {**loss_check(network, config, batch, args.loss_check, device), **common}
            print(f"# loss check {network} batch {batch}, last {record['window']} of "
                  f"{record['steps']} steps: fp32 {record['mean_fp32']:.4f}, bf16 "
                  f"{record['mean_bf16']:.4f}, difference {record['difference']:+.4f}, "
                  f"step std {record['step_std']:.4f}, standard error "
                  f"{record['standard_error']:.4f}: "
                  f"{'within' if record['within_noise'] else 'NOT within'} noise", flush=True)
            sink.write(json.dumps(record) + "\n")
    print(f"# appended to {out}")
    return 0


def check_same_work(work: dict[str, tuple[int, float]], impl: str, params: int, flops: float,
                    network: str) -> None:
    """Record a side's parameter count and FLOPs per image (they depend on neither batch nor
    mode); once both sides are known, print them and stop unless the parameter counts are equal
    and the FLOPs within 5 %."""
    if impl in work:
        return
    work[impl] = (params, flops)
    if len(work) < len(IMPLS):
        return
    (ours_params, ours_flops), (their_params, their_flops) = work["ours"], work["diffusers"]
    print(f"# {network}: parameters ours {ours_params:,}, diffusers {their_params:,}; training "
          f"FLOPs per image (forward+backward) ours {ours_flops / 1e9:.4f} G, diffusers "
          f"{their_flops / 1e9:.4f} G", flush=True)
    if ours_params != their_params:
        raise RuntimeError(f"{network}: parameter counts differ: ours {ours_params:,}, "
                           f"diffusers {their_params:,}")
    if abs(ours_flops / their_flops - 1) > FLOP_TOLERANCE:
        raise RuntimeError(f"{network}: FLOPs per image differ by more than "
                           f"{FLOP_TOLERANCE:.0%}: ours {ours_flops:.4g}, diffusers {their_flops:.4g}")


if __name__ == "__main__":
    sys.exit(main())
