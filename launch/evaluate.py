"""``launch eval``: held-out bits/dim (and with ``--fid N`` FID/KID) of a run's checkpoint, as JSON.

The run's resolved config names the model and, unless ``--shards`` is given, the held-out shards
(``data.eval_shards``). The newest intact checkpoint (or ``--checkpoint``) is evaluated with the
EMA weights when the run has them (``--no-ema``: the raw weights), by the same reduction the
trainer logs as ``eval/bits_per_dim`` (`pipeline.evaluate`). The result is printed to stdout and
written to ``RUN_DIR/eval/step-XXXXXXXXX.json``.

With ``--nproc N`` this command starts N processes (``python -m launch.evaluate``, torchrun-style
environment, gloo) that each evaluate their share of the shards and all-reduce the sums; the
checkpoint is chosen once, here, so every process loads the same one. Stochastic bounds (VAE,
flow dequantisation, diffusion) draw their noise from a seed per process (``--seed``), so a
result is reproducible for a given process count; the exact likelihood (autoregressive) does not
depend on it. ``bits_per_dim_stderr`` is the standard error of the mean over images (it includes
any Monte-Carlo noise of the estimator, `pipeline.evaluate`).

Diffusion's bound sums T terms per image, B * T network evaluations; ``--estimator`` chooses
between that exact sum and an unbiased Monte-Carlo estimate per image from
``--timesteps-per-image`` K timesteps (B * (K + 1)), stratified ("mc-stratified") or stratified
in an importance proposal learnt over the pass ("mc-importance"); "auto" (the run's
``model.vlb_estimator`` unless set) takes the exact sum only for a small pass
(`pipeline.models.diffusion`). The JSON names the estimator used (``estimator``,
``timesteps_per_image``).

A progress bar with the time left (images done, and within a diffusion batch its parts) goes to
stderr from rank 0; stdout carries the JSON only.

``--fid N`` also generates N images (shared out over the processes, seeded per process) and
computes FID and KID against the same held-out shards with the run's ``eval`` settings
(``eval.inception_weights``, ``eval.fid_feature_network``; ``--inception-weights`` and
``--fid-network`` override them); the reference statistics are cached beside the shards'
manifest (`pipeline.fid`).

``--sample-quality [N]`` (default 1000) also generates N images (seeded as for ``--fid``, the run's
``sample.options``) and reports the digits measures of `pipeline.digits_quality` (``digits_fd``,
``digits_is``, ``digits_confidence``, ``digits_classes_covered``, ``digits_class_entropy``,
``digits_class_histogram``) with the held-out digits' values beside them (``digits_reference``);
the classifier comes from beside the run's ``data.shards`` (trained there first if absent).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.errors import UserError, one_line, rank_tag

# torch, the data readers and the models are imported where used, so that building the
# ``launch`` argument parser (which registers this command) stays quick.

SAMPLE_QUALITY_IMAGES = 1000
"""Generated images of ``--sample-quality`` without a number."""

# Options of one family's bits_per_dim: (command-line attribute, the family it applies to).
_BITS_PER_DIM_OPTIONS = {"iwae_samples": "vae", "estimator": "diffusion",
                         "timesteps_per_image": "diffusion"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``launch eval`` (shared with the worker entry point)."""
    parser.add_argument("run_dir")
    parser.add_argument("--shards", default=None,
                        help="held-out shards (directory, brace pattern or tar); default: the "
                             "run's data.eval_shards")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights when the run has them (default)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="evaluate at most this many images (default: all)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch per process (default: eval.batch_size or data.batch_size)")
    parser.add_argument("--nproc", type=int, default=1, help="evaluation processes")
    parser.add_argument("--iwae-samples", type=int, default=None,
                        help="vae only: importance samples K of the IWAE bound (1: the ELBO)")
    parser.add_argument("--estimator", choices=("auto", "exact", "mc-stratified", "mc-importance"),
                        default=None,
                        help="diffusion only: the exact bound over all T timesteps, an unbiased "
                             "Monte-Carlo estimate of it, or auto (exact for a small pass, else "
                             "mc-importance; default: the run's model.vlb_estimator)")
    parser.add_argument("--timesteps-per-image", type=int, default=None, metavar="K",
                        help="diffusion only: timesteps per image of the Monte-Carlo estimate "
                             "(default: the run's model.vlb_timesteps_per_image)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress bar on stderr (rank 0; default)")
    parser.add_argument("--checkpoint", default=None, help="a specific checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bounds' noise")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, or auto (cuda:LOCAL_RANK when a GPU is present)")
    parser.add_argument("--fid", type=int, default=None, metavar="N",
                        help="also FID and KID of N generated images against the held-out shards")
    parser.add_argument("--inception-weights", default=None,
                        help="local FID Inception weights file (default: the run's eval.inception_weights)")
    parser.add_argument("--fid-network", choices=("inception", "random_conv"), default=None,
                        help="feature network of FID/KID (default: the run's eval.fid_feature_network)")
    parser.add_argument("--sample-quality", type=_image_count, nargs="?", const=SAMPLE_QUALITY_IMAGES,
                        default=None, metavar="N",
                        help="also the digits sample-quality measures (classifier FD, IS, confidence, "
                             f"class coverage) of N generated images (default {SAMPLE_QUALITY_IMAGES}), "
                             "beside the held-out digits' values")


def _image_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of images, got {text!r} (put the run directory before --sample-quality)") from None


def _check_arguments(args) -> None:
    for name in ("max_images", "batch_size", "nproc", "iwae_samples", "timesteps_per_image"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if args.fid is not None and args.fid < 2:
        raise UserError(f"--fid must be at least 2 (got {args.fid})")
    if args.sample_quality is not None and args.sample_quality < 2:
        raise UserError(f"--sample-quality must be at least 2 images (got {args.sample_quality})")


def _choose_checkpoint(run_dir: str, checkpoint_path: str | None) -> Path:
    from launch.weights import load_run_config
    from pipeline import checkpoint

    load_run_config(run_dir)  # a clear error for a path that is not a run directory
    if checkpoint_path is not None:
        return checkpoint.open_checkpoint(checkpoint_path).path
    found = checkpoint.latest_valid(run_dir)
    if found is None:
        raise UserError(f"{run_dir}: no intact checkpoint to evaluate (has it trained yet?)")
    return found[0]


def _device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def _process_seed(seed: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(("eval", seed, rank)).encode()).digest()[:4], "little")


def evaluate_run(args) -> dict | None:
    """Evaluate in this process (one of WORLD_SIZE); the result on rank 0, None on the others."""
    import torch

    from launch.weights import load_model
    from pipeline.data import check_shards_match, resolve_shards
    from pipeline.latents import image_view

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.checkpoint is None:
        args.checkpoint = str(_choose_checkpoint(args.run_dir, None))
    device = _device(args.device)
    model, manifest, config = load_model(args.run_dir, args.ema, args.checkpoint, str(device))
    used_ema = bool(args.ema and "ema.safetensors" in manifest.get("files", {}))

    family = config.model.family
    options = {}
    for name, applies_to in _BITS_PER_DIM_OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if family != applies_to:
            raise UserError(f"--{name.replace('_', '-')} applies to the {applies_to} family only "
                            f"(this run is {family})")
        options[name] = value
    model.held_out_estimator(args.max_images, **options)  # a conflict fails here, before any bar

    data = config.data
    if args.shards is not None:
        spec, key = args.shards, "--shards"
    elif data.eval_shards is not None:
        spec, key = data.eval_shards, "data.eval_shards"
    else:
        raise UserError(f"{args.run_dir}: the run's config has no data.eval_shards; pass --shards")
    shards = resolve_shards(spec, key)
    check_shards_match(shards, data.image_size, data.channels, key)
    if len(shards.urls) < world_size:
        raise UserError(
            f"{key}: {len(shards.urls)} shard(s) for {world_size} processes; every process needs "
            "at least one shard: lower --nproc"
        )

    extractor = _fid_extractor(args, config, device) if args.fid is not None else None  # fails early
    # Decoded samples are compared with images: a latent run's are those its latents came from.
    images = image_view(data, spec, key)
    if args.sample_quality is not None:  # unlabelled splits fail early too
        from pipeline import digits_quality

        digits_quality.check_splits(images.train_spec, resolve_shards(images.test_spec, key), key)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(_process_seed(args.seed, rank))
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.train.mixed_precision]
    likelihood = _bits_per_dim_report(args, model, config, shards, device, rank, world_size,
                                      autocast_dtype, options)
    quality = None
    if args.fid is not None:
        quality = _fid_and_kid(args, extractor, model, config, resolve_shards(images.test_spec, key), device,
                               rank, world_size, autocast_dtype, images)
    digits = None
    if args.sample_quality is not None:
        digits = _digits_quality(args, model, config, images.test_spec, key, device, rank, world_size, autocast_dtype,
                                 images)
    if rank != 0:
        return None
    result = {
        **likelihood,
        "step": int(manifest["step"]),
        "checkpoint": args.checkpoint,
        "shards": spec,
        "ema": used_ema,
        "family": family,
    }
    if quality is not None:
        result.update(quality)
    if digits is not None:
        result.update(digits)
    return result


def _bits_per_dim_report(args, model, config, shards, device, rank: int, world_size: int,
                         autocast_dtype, options: dict) -> dict:
    """Held-out bits/dim, its standard error and the estimator's options; every process calls
    it (the sums are all-reduced). Rank 0 shows a progress bar on stderr."""
    from pipeline.evaluate import held_out_evaluation, pass_images

    data = config.data
    bar = None
    if args.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=pass_images(shards, rank=rank, world_size=world_size, max_images=args.max_images),
                   desc="eval" if world_size == 1 else f"eval (rank 0 of {world_size})", unit="image",
                   file=sys.stderr, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} images [{elapsed}<{remaining}]")
    try:
        result = held_out_evaluation(
            model,
            shards,
            image_size=data.image_size,
            channels=data.channels,
            batch_size=args.batch_size or config.eval.batch_size or data.batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
            num_workers=0,
            max_images=args.max_images,
            autocast_dtype=autocast_dtype,
            progress=(lambda images: _advance(bar, images)) if bar is not None else None,
            **options,
        )
    finally:
        if bar is not None:
            bar.close()
    return {"bits_per_dim": result.bits_per_dim, "bits_per_dim_stderr": result.stderr,
            "kind": model.bits_per_dim_kind, **result.options, **result.metrics, "images": result.images}


def _advance(bar, images: float) -> None:
    """Move the bar on by ``images``. Fractions of batches add up in floating point: a count
    within 1e-6 of a whole number is that number, and never past the end."""
    if bar.total is not None:
        images = min(images, bar.total - bar.n)
    bar.update(images)
    if abs(bar.n - round(bar.n)) < 1e-6:
        bar.n = round(bar.n)


def _fid_settings(args, config):
    """The run's eval section with the command line's feature-network options applied."""
    return config.eval.model_copy(update={
        key: value for key, value in (("inception_weights", args.inception_weights),
                                      ("fid_feature_network", args.fid_network)) if value is not None
    })


def _fid_extractor(args, config, device):
    from pipeline import fid

    return fid.build_extractor(_fid_settings(args, config), device)


def _fid_and_kid(args, extractor, model, config, shards, device, rank: int, world_size: int,
                 autocast_dtype, images) -> dict | None:
    """FID/KID of ``args.fid`` samples against ``shards``; every process calls it, rank 0 gets it."""
    import torch

    from pipeline import fid

    evaluation = _fid_settings(args, config)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype)

    result = fid.fid_and_kid(
        model, extractor, shards, num_images=args.fid, image_size=images.image_size,
        channels=images.channels, batch_size=args.batch_size or config.eval.batch_size or config.data.batch_size,
        rank=rank, world_size=world_size, reference_images=evaluation.fid_reference_images, seed=args.seed,
        kid_subsets=evaluation.kid_subsets, kid_subset_size=evaluation.kid_subset_size,
        autocast=autocast if autocast_dtype is not None else None, **config.sample.options,
    )
    if result is None:
        return None
    return {"fid": result["fid"], "kid": result["kid"], "kid_std": result["kid_std"],
            "fid_images": int(result["fid_images"]), "fid_reference_images": int(result["fid_reference_images"]),
            "fid_network": extractor.id}


def _digits_quality(args, model, config, spec, key: str, device, rank: int, world_size: int,
                    autocast_dtype, images) -> dict | None:
    """The digits measures of ``args.sample_quality`` samples against the held-out ``spec``;
    every process calls it, rank 0 gets it (`pipeline.digits_quality`)."""
    import torch

    from pipeline import digits_quality

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype)

    data = config.data
    measure = digits_quality.build(images.train_spec, spec, image_size=images.image_size, channels=images.channels,
                                   device=device, rank=rank, world_size=world_size, test_key=key)
    return digits_quality.sample_quality(
        model, measure, num_images=args.sample_quality,
        batch_size=args.batch_size or config.eval.batch_size or data.batch_size, seed=args.seed, rank=rank,
        world_size=world_size, autocast=autocast if autocast_dtype is not None else None, **config.sample.options,
    )


def write_result(run_dir: str, result: dict) -> Path:
    """``RUN_DIR/eval/step-XXXXXXXXX.json``, written atomically."""
    path = Path(run_dir) / "eval" / f"step-{result['step']:09d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def _evaluate_and_report(args) -> int:
    result = evaluate_run(args)
    if result is not None:
        write_result(args.run_dir, result)
        print(json.dumps(result), flush=True)
    return 0


def launch_eval(args) -> int:
    """The ``launch eval`` command: this process, or N worker processes."""
    _check_arguments(args)
    args.checkpoint = str(_choose_checkpoint(args.run_dir, args.checkpoint))
    if args.nproc == 1:
        return _evaluate_and_report(args)
    from launch.local import _wait, free_port

    command = [sys.executable, "-m", "launch.evaluate", args.run_dir, "--checkpoint", args.checkpoint,
               "--seed", str(args.seed), "--device", args.device, "--ema" if args.ema else "--no-ema",
               "--progress" if args.progress else "--no-progress"]
    for name in ("shards", "max_images", "batch_size", *_BITS_PER_DIM_OPTIONS, "fid", "inception_weights",
                 "fid_network", "sample_quality"):
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    processes = []
    for rank in range(args.nproc):
        env = dict(os.environ)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc),
                   LOCAL_WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", str(threads))
        processes.append(subprocess.Popen(command, env=env))
    return _wait(processes)


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.evaluate RUN_DIR ...``: one evaluation process (a worker of --nproc)."""
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        _check_arguments(args)
        return _evaluate_and_report(args)
    except UserError as exc:
        print(f"launch: error: {rank_tag()}{one_line(exc)}", file=sys.stderr)
        return UserError.exit_code
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
