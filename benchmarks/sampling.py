"""Sampling throughput of our DiffusionModel against diffusers' DDIMPipeline / DDPMPipeline with
the same network (issue 8).

Method. For each network (``--networks``, the names of benchmarks/train_step.py: ``cifar32``,
``256``, ``tiny``), each mode (``--modes`` eager, compiled) and each side, in one process, the
network is built once: ours from the config under its seed, its weights then randomised
(``diffusers_baseline.randomize_weights_``: our zero-initialised output layers would make every
sample the same), and copied into diffusers' UNet2DModel (``copy_weights``, which fails on any
parameter that does not map). Both are in eval mode (the cifar32 network has dropout). Then one
untimed DDIM run (``--warmup-steps``, default 50) at the row's batch (``first_run_s``:
compilation and cuDNN autotuning happen here), then each sampler (``--samplers``) run
``--repeats`` times, timed with the device synchronised before and after. Each side runs one
batch shape, so nothing recompiles between samplers.

- ``ours``: ``DiffusionModel.sample(batch, generator, sampler=..., steps=...)`` as ``launch
  sample`` and the trainer's sample grids call it, under ``torch.autocast(bfloat16)`` with fp32
  weights (as the trainer's sample grids and FID do; ``launch sample`` itself runs fp32). The
  sampler state is fp32 and all noise is drawn from a CPU generator (the model's contract: the
  same images on any device) and copied to the GPU from pinned memory without blocking; whatever
  that costs is part of the figure.
  Compiled: ``model.net = torch.compile(model.net, mode=--compile-mode)``.
- ``diffusers``: the unet cast to bfloat16 (weights and latents, what ``from_pretrained(...,
  torch_dtype=torch.bfloat16)`` gives, the precision diffusers documents for inference), a
  generator on the device, ``output_type="pt"`` (images stay on the device, as ours do).
  ``DDIMPipeline(unet, DDIMScheduler(1000, linear betas 1e-4..0.02, clip_sample=True,
  timestep_spacing="linspace", set_alpha_to_one=True))`` called with ``num_inference_steps=50,
  eta=0, use_clipped_model_output=True``; ``DDPMPipeline(unet, DDPMScheduler(1000, the same
  betas, variance_type=<the config's model.variance, fixed_large>, clip_sample=True))`` with
  ``num_inference_steps=1000``. Compiled: ``pipe.unet = torch.compile(pipe.unet, mode=...)``.
  ``--diffusers-precision autocast`` instead keeps fp32 weights and latents under bf16 autocast,
  like ours.

A forward hook on the network each pipeline calls counts its evaluations per batch; each row
must count exactly its sampler's steps (50 for DDIM, T for DDPM), the same on both sides.
Each row reports img/s, seconds per batch, network evaluations/s, peak allocated CUDA memory
over the timed runs (null on CPU) and ``ratio_vs_diffusers``: our img/s over diffusers' for the
same network, sampler and mode. Rows are printed and appended as JSON lines to ``--out``
(default docs/benchmarks/sampling_<device>.jsonl).

``--ddpm-steps K`` gives the DDPM rows a K-step model instead (linear betas 1e-4..0.02 over K
steps, on both sides) and records ``steps: K``: full runs of a shorter chain, for CPU smoke runs.

Correctness check (``sampler_check`` rows, before the timed rows; ``--no-check`` skips it): on
the tiny network, fp32 on CPU, batch 2, both sides draw x_T (and DDPM's noise) from CPU
generators with the same seed, so they start from the same noise:

- DDIM-50 with the timed rows' diffusers options: diffusers evaluates the network at exactly our
  timesteps (``linspace``: round(linspace(0, 999, 50)) = our ``ddim_timesteps``) and
  ``use_clipped_model_output=True`` is our convention (eps recomputed from the clipped x0), but
  ``DDIMScheduler.step`` always steps to ``t - 1000 // 50 = t - 20`` rather than to the next
  timestep of the grid (spacing 999/49 = 20.39): on 19 of the 49 steps (41 -> 21 instead of 20,
  82 -> 62 instead of 61, ...) its alpha_bar_prev is that of one timestep later than ours. The
  outputs differ by that much; no DDIMScheduler option removes it (the step rule is fixed).
- DDIM-50 on diffusers' ``trailing`` grid (999, 979, ..., 19, where t - 20 is the next grid
  point), ours run on the same grid (``ddim_timesteps`` replaced for this check only): the
  arithmetic is then the same and the outputs agree to float rounding.
- DDPM with a T-step chain, T = min(--ddpm-steps, 100) to keep the check cheap: the same chain
  and noise on both sides; agree to float rounding.

On the GPU::

    python benchmarks/sampling.py --networks cifar32,256 --batch cifar32=256 --batch 256=4

Every row is a full run. The 256 network at batch 4, not its default 16: one DDPM-1000 batch of
16 is 1000 x 16 x 497 GFLOP = 8 PFLOP, 30-50 s on an H100, four times over (two sides, two
modes); batch 4 (2 PFLOP, still 2 TFLOP per step, enough to fill the GPU) keeps the command near
5 minutes, of which the four compilations are about half. The DDIM rows at the default batch::

    python benchmarks/sampling.py --networks 256 --samplers ddim50 --no-check

CPU smoke run (tiny network, fp32: bf16 convolutions are 10x slower than fp32 on this CPU; shows
that it runs, says nothing about GPU speed)::

    OMP_NUM_THREADS=1 python benchmarks/sampling.py --networks tiny --batch 4 --ddpm-steps 100 \\
        --precision fp32 --modes eager,compiled
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from diffusers_baseline import copy_weights, diffusers_unet_for, import_diffusers, randomize_weights_
from train_step import COMPILE_MODES, NETWORKS, REPO, choices, release, start_run, synchronize

from pipeline import config as config_module
from pipeline import models
from pipeline.models import diffusion

# name -> (our sampler, network evaluations); DDPM's count is T (--ddpm-steps overrides it).
SAMPLERS = {"ddim50": ("ddim", 50), "ddpm1000": ("ddpm", 1000)}
MODES = ("eager", "compiled")
# Sampling batch per network. cifar32: 256, so that one evaluation (12.4 GFLOP per image, 3.2
# TFLOP per step) keeps an H100 busy instead of waiting on kernel launches, as sampling many
# images for FID would. 256: 16, the config's sample grid (sample.n), 8 TFLOP per step.
DEFAULT_BATCH = {"tiny": 8, "cifar32": 256, "256": 16}
CHECK_BATCH = 2
CHECK_SEED = 0
CHECK_DDPM_STEPS = 100  # at most; per-step arithmetic is what the check compares


# --------------------------------------------------------------------------------------------
# The two sides


def diffusers_schedulers(model_config, ddpm_steps: int) -> dict:
    """{"ddim": (DDIMScheduler, call kwargs), "ddpm": (DDPMScheduler, call kwargs)} with our
    schedule, variance and clipping (see the module docstring)."""
    diffusers = import_diffusers()
    beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[model_config.schedule]
    common = {"beta_start": model_config.beta_start, "beta_end": model_config.beta_end,
              "beta_schedule": beta_schedule, "prediction_type": "epsilon",
              "clip_sample": model_config.clip_denoised, "clip_sample_range": 1.0}
    ddim = diffusers.DDIMScheduler(num_train_timesteps=model_config.timesteps, **common,
                                   timestep_spacing="linspace", set_alpha_to_one=True,
                                   steps_offset=0)
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=ddpm_steps, **common,
                                   variance_type=model_config.variance)
    return {"ddim": (ddim, {"eta": model_config.ddim_eta, "use_clipped_model_output": True}),
            "ddpm": (ddpm, {})}


def build_networks(config, device: torch.device):
    """(ours: DiffusionModel, theirs: UNet2DModel), same random weights, eval mode, built on
    the device (initialising 2 x 114M parameters on the CPU would take seconds per side)."""
    image_size, channels = config.data.image_size, config.data.channels
    torch.manual_seed(config.seed)
    with torch.device(device):
        ours = models.build(config.model, image_size, channels)
        randomize_weights_(ours.net, config.seed)
        theirs = diffusers_unet_for(config.model, image_size, channels)
    copy_weights(ours.net, theirs)
    return ours.eval(), theirs.eval()


def with_timesteps(model, timesteps: int):
    """A DiffusionModel sharing `model`'s network, with a `timesteps`-step schedule."""
    if timesteps == model.schedule.timesteps:
        return model
    channels, image_size, _ = model.image_shape
    shorter = models.build(model.config.model_copy(update={"timesteps": timesteps}), image_size,
                           channels)
    shorter.net = model.net  # the freshly built network is dropped
    return shorter.to(model.schedule.betas.device).eval()


class EvalCounter:
    """Counts calls of a module (a forward hook), and optionally records their timesteps."""

    def __init__(self, module: torch.nn.Module, record_timesteps: bool = False):
        self.calls = 0
        self.timesteps: list[int] = []
        self.record_timesteps = record_timesteps
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        if self.record_timesteps:
            self.timesteps.append(int(torch.as_tensor(args[1]).flatten()[0]))


class Side:
    """One implementation on one network in one mode: ``run(sampler, steps, batch)`` samples one
    batch; ``counter`` counts its network evaluations."""

    def __init__(self, impl: str, config, ddpm_steps: int, compiled: bool, args,
                 device: torch.device):
        self.impl, self.device = impl, device
        ours, theirs = build_networks(config, device)
        self.parameters = sum(p.numel() for p in ours.net.parameters())
        if impl == "ours":
            del theirs
            if compiled:
                ours.net = torch.compile(ours.net, mode=args.compile_mode)
            self.models = {"ddim": ours, "ddpm": with_timesteps(ours, ddpm_steps)}
            self.counter = EvalCounter(ours.net)
            self.autocast = args.precision == "bf16"
            self.scheduler_options = None
            return
        del ours
        diffusers = import_diffusers()
        self.autocast = args.precision == "bf16" and args.diffusers_precision == "autocast"
        if args.precision == "bf16" and not self.autocast:
            theirs.to(torch.bfloat16)
        schedulers = diffusers_schedulers(config.model, ddpm_steps)
        self.pipelines = {"ddim": diffusers.DDIMPipeline(unet=theirs, scheduler=schedulers["ddim"][0]),
                          "ddpm": diffusers.DDPMPipeline(unet=theirs, scheduler=schedulers["ddpm"][0])}
        self.call_options = {name: options for name, (_, options) in schedulers.items()}
        self.scheduler_options = {name: {**dict(scheduler.config), **self.call_options[name]}
                                  for name, (scheduler, _) in schedulers.items()}
        network = torch.compile(theirs, mode=args.compile_mode) if compiled else theirs
        for pipeline in self.pipelines.values():
            pipeline.set_progress_bar_config(disable=True)
            if compiled:
                pipeline.unet = network
        self.counter = EvalCounter(network)

    def run(self, sampler: str, steps: int, batch: int) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
                    else contextlib.nullcontext())
        with autocast, torch.no_grad():
            if self.impl == "ours":
                generator = torch.Generator().manual_seed(0)  # CPU: the model's contract
                return self.models[sampler].sample(batch, generator, sampler=sampler,
                                                   steps=steps if sampler == "ddim" else None)
            generator = torch.Generator(self.device).manual_seed(0)
            return self.pipelines[sampler](batch_size=batch, generator=generator,
                                           num_inference_steps=steps, output_type="pt",
                                           **self.call_options[sampler]).images


def timed_runs(side: Side, sampler: str, steps: int, batch: int, repeats: int
               ) -> tuple[float, int, float | None]:
    """(seconds per batch, network evaluations per batch, peak allocated MiB or None on CPU)."""
    device = side.device
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    side.counter.calls = 0
    started = time.perf_counter()
    for _ in range(repeats):
        side.run(sampler, steps, batch)
    synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    evals, remainder = divmod(side.counter.calls, repeats)
    if remainder:
        raise RuntimeError(f"{side.impl}: {side.counter.calls} network evaluations in {repeats} runs")
    return seconds, evals, peak


# --------------------------------------------------------------------------------------------
# Correctness check: same noise, fp32, tiny network, CPU


def compare(ours_x0: torch.Tensor, theirs_images: torch.Tensor) -> dict:
    """Differences between our x0 in [-1, 1] and a pipeline's "pt" images in [0, 1]."""
    theirs_x0 = theirs_images * 2 - 1
    ours_uint8 = diffusion.to_uint8(ours_x0).int()
    theirs_uint8 = diffusion.to_uint8(theirs_x0).int()
    return {"max_abs_diff": (ours_x0.clamp(-1, 1) - theirs_x0).abs().max().item(),
            "uint8_max_diff": (ours_uint8 - theirs_uint8).abs().max().item(),
            "uint8_values_differing": int((ours_uint8 != theirs_uint8).sum()),
            "uint8_values": ours_uint8.numel()}


def sampler_check(ddpm_steps: int) -> list[dict]:
    """Our samplers against diffusers' from the same noise (see the module docstring)."""
    diffusers = import_diffusers()
    path, overrides, _ = NETWORKS["tiny"]
    config = config_module.load(REPO / path, overrides)
    ours, theirs = build_networks(config, torch.device("cpu"))
    ours_steps = EvalCounter(ours.net, record_timesteps=True)
    their_steps = EvalCounter(theirs, record_timesteps=True)
    schedulers = diffusers_schedulers(config.model, ddpm_steps)
    trailing = diffusers.DDIMScheduler.from_config(schedulers["ddim"][0].config,
                                                   timestep_spacing="trailing")
    trailing.set_timesteps(50)
    trailing_grid = sorted(trailing.timesteps.tolist())  # 19, 39, ..., 999
    cases = [("ddim", "linspace: our timesteps, diffusers' t - 20 step", schedulers["ddim"][0],
              None),
             ("ddim", "trailing: the same grid on both sides", trailing,
              trailing_grid),
             ("ddpm", "the same chain", schedulers["ddpm"][0], None)]
    rows = []
    for sampler, case, scheduler, grid in cases:
        steps = 50 if sampler == "ddim" else ddpm_steps
        model = with_timesteps(ours, steps) if sampler == "ddpm" else ours
        ours_steps.timesteps.clear()
        their_steps.timesteps.clear()
        shape = (CHECK_BATCH, *model.image_shape)
        generator = torch.Generator().manual_seed(CHECK_SEED)
        patch = (mock.patch.object(diffusion, "ddim_timesteps", lambda timesteps, count, grid=grid: grid)
                 if grid is not None else contextlib.nullcontext())
        with torch.no_grad(), patch:  # model.sample's own steps, but x0 before uint8
            x_T = torch.randn(shape, generator=generator, dtype=torch.float32)
            ours_x0 = diffusion.SAMPLERS[sampler](
                model.eps, model.schedule, x_T, generator,
                steps=steps if sampler == "ddim" else None, eta=config.model.ddim_eta,
                clip_denoised=config.model.clip_denoised)
        pipeline_class = diffusers.DDIMPipeline if sampler == "ddim" else diffusers.DDPMPipeline
        pipeline = pipeline_class(unet=theirs, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        options = schedulers[sampler][1]
        theirs_images = pipeline(batch_size=CHECK_BATCH,
                                 generator=torch.Generator().manual_seed(CHECK_SEED),
                                 num_inference_steps=steps, output_type="pt", **options).images
        rows.append({
            "kind": "sampler_check", "network": "tiny", "sampler": sampler, "steps": steps,
            "batch": CHECK_BATCH, "precision": "fp32", "case": case,
            "diffusers_scheduler": {**dict(scheduler.config), **options},
            "same_timesteps": ours_steps.timesteps == their_steps.timesteps,
            "evals": {"ours": len(ours_steps.timesteps), "diffusers": len(their_steps.timesteps)},
            **compare(ours_x0, theirs_images)})
    return rows


# --------------------------------------------------------------------------------------------
# Command line


def parse_batch(entries: list[str], networks: list[str]) -> dict[str, int]:
    """``--batch 4`` (every network) or ``--batch cifar32=128`` (one network; repeatable)."""
    batches = {network: DEFAULT_BATCH[network] for network in networks}
    for entry in entries:
        target, _, size = entry.rpartition("=")
        if target and target not in networks:
            raise SystemExit(f"sampling.py: --batch {entry!r} names network {target!r}, which is "
                             f"not in --networks {','.join(networks)}")
        if not size.isdigit() or int(size) < 1:
            raise SystemExit(f"sampling.py: --batch {entry!r}: expected a positive integer, "
                             f"optionally after NETWORK=")
        for network in [target] if target else networks:
            batches[network] = int(size)
    return batches


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="cifar32,256",
                        help=f"comma-separated, of {','.join(NETWORKS)}")
    parser.add_argument("--samplers", default=",".join(SAMPLERS),
                        help=f"comma-separated, of {','.join(SAMPLERS)}")
    parser.add_argument("--batch", action="append", default=[],
                        help="N for every network or NETWORK=N (repeatable); defaults: "
                        + ", ".join(f"{n} {b}" for n, b in DEFAULT_BATCH.items()))
    parser.add_argument("--modes", default="eager,compiled", help="eager,compiled or one of them")
    parser.add_argument("--compile-mode", default="default", help=", ".join(COMPILE_MODES))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                        help="bf16: ours under autocast, diffusers per --diffusers-precision")
    parser.add_argument("--diffusers-precision", default="weights", choices=("weights", "autocast"),
                        help="with --precision bf16: unet and latents cast to bf16 (weights), or "
                        "fp32 under bf16 autocast like ours")
    parser.add_argument("--ddpm-steps", type=int, default=1000,
                        help="T of the DDPM rows' chain (a K-step linear schedule; for CPU smoke)")
    parser.add_argument("--repeats", type=int, default=1, help="timed batches per row")
    parser.add_argument("--warmup-steps", type=int, default=50,
                        help="steps of the untimed DDIM run before a side's timed rows")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare our DDIM and DDPM outputs to diffusers' first (tiny, CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON lines appended here (default docs/benchmarks/sampling_<device>.jsonl)")
    args = parser.parse_args(argv)
    args.networks = choices(args.networks, tuple(NETWORKS), "--networks")
    args.samplers = choices(args.samplers, tuple(SAMPLERS), "--samplers")
    args.modes = choices(args.modes, MODES, "--modes")
    args.batch = parse_batch(args.batch, args.networks)
    if args.compile_mode not in COMPILE_MODES:
        raise SystemExit(f"sampling.py: --compile-mode {args.compile_mode!r}: expected one of "
                         f"{', '.join(COMPILE_MODES)}")
    if not 2 <= args.ddpm_steps <= 1000:
        raise SystemExit(f"sampling.py: --ddpm-steps must be between 2 and 1000, got "
                         f"{args.ddpm_steps}")
    if args.repeats < 1 or not 1 <= args.warmup_steps <= 1000:
        raise SystemExit(f"sampling.py: --repeats must be at least 1 and --warmup-steps between 1 "
                         f"and 1000 (got {args.repeats} and {args.warmup_steps})")
    return args


def sampler_label(sampler: str, steps: int) -> str:
    return f"{sampler}{steps}"


def print_row(row: dict) -> None:
    ratio = "-" if row["ratio_vs_diffusers"] is None else f"{row['ratio_vs_diffusers']:.3f}"
    peak = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
    print(f"{row['network']:>8} {row['batch']:>5} {sampler_label(row['sampler'], row['steps']):>9} "
          f"{row['impl']:>9} {'compiled' if row['compiled'] else 'eager':>8} {row['img_s']:>9.2f} "
          f"{row['s_per_batch']:>9.3f} {row['evals']:>6} {row['evals_s']:>8.1f} {peak:>8} "
          f"{ratio:>6} {row['first_run_s']:>8.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, out, common = start_run("sampling", args.out)
    with out.open("a") as sink:
        if args.check:
            for row in sampler_check(min(args.ddpm_steps, CHECK_DDPM_STEPS)):
                print(f"# check {row['sampler']}{row['steps']} ({row['case']}): same timesteps "
                      f"{row['same_timesteps']}, max |ours - diffusers| {row['max_abs_diff']:.3g} "
                      f"in [-1, 1]; uint8 values differing {row['uint8_values_differing']} of "
                      f"{row['uint8_values']} (by at most {row['uint8_max_diff']})", flush=True)
                sink.write(json.dumps({**row, **common}) + "\n")
            sink.flush()
        print(f"{'network':>8} {'batch':>5} {'sampler':>9} {'impl':>9} {'mode':>8} {'img/s':>9} "
              f"{'s/batch':>9} {'evals':>6} {'evals/s':>8} {'peak_MB':>8} {'ratio':>6} "
              f"{'first_s':>8}", flush=True)
        for network in args.networks:
            path, overrides, _ = NETWORKS[network]
            config = config_module.load(REPO / path, overrides)
            batch = args.batch[network]
            for mode in args.modes:
                baseline: dict[str, tuple[float, int]] = {}  # sampler -> diffusers (img/s, evals)
                for impl in ("diffusers", "ours"):
                    side = Side(impl, config, args.ddpm_steps, mode == "compiled", args, device)
                    synchronize(device)
                    started = time.perf_counter()
                    side.run("ddim", args.warmup_steps, batch)
                    synchronize(device)
                    first_run_s = time.perf_counter() - started
                    for name in args.samplers:
                        sampler, steps = SAMPLERS[name]
                        steps = args.ddpm_steps if sampler == "ddpm" else steps
                        seconds, evals, peak = timed_runs(side, sampler, steps, batch, args.repeats)
                        if evals != steps:
                            raise RuntimeError(f"{impl} {sampler}: {evals} network evaluations per "
                                               f"batch, expected {steps}")
                        img_s = batch / seconds
                        if impl == "diffusers":
                            baseline[sampler] = (img_s, evals)
                        elif sampler in baseline and baseline[sampler][1] != evals:
                            raise RuntimeError(f"{sampler}: ours evaluates the network {evals} "
                                               f"times, diffusers {baseline[sampler][1]}")
                        row = {
                            "kind": "sampling", "impl": impl, "network": network,
                            "sampler": sampler, "steps": steps, "batch": batch,
                            "compiled": mode == "compiled", "compile_mode": args.compile_mode,
                            "precision": (f"{args.precision} autocast" if side.autocast else
                                          f"{args.precision} weights"),
                            "img_s": img_s, "s_per_batch": seconds, "evals": evals,
                            "evals_s": evals / seconds, "peak_mem_mb": peak,
                            "ratio_vs_diffusers": (img_s / baseline[sampler][0]
                                                   if impl == "ours" and sampler in baseline
                                                   else None),
                            "first_run_s": first_run_s, "warmup_steps": args.warmup_steps,
                            "repeats": args.repeats,
                            "params": side.parameters,
                            "diffusers_scheduler": (side.scheduler_options[sampler]
                                                    if side.scheduler_options else None),
                            **common,
                        }
                        print_row(row)
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                    del side
                    release(device)
    print(f"# appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
