"""Peak memory and throughput of DDP against DeepSpeed ZeRO-2 (bf16), one JSON line per run.

For each config and strategy: train ``--steps`` steps through ``launch local`` in two launches
(the second resumes from the checkpoint the first wrote at half way, so checkpointing and
resuming are part of the run), then report the median images/s over the logged intervals after
the first, and the peak memory per process from the run's rank records (``peak_cuda_allocated_mb``
on GPUs, ``peak_rss_mb`` always; the maximum over ranks and both launches).

GPU (the figures for docs/benchmarks.md), on the configs' own data (prepared as their comments
say), or, where none is there (a GPU machine with no network to fetch them), on ``--synthetic-images
N`` photo crops (benchmarks/loader.py) written at each config's image size by ``data-prep images``:

    python benchmarks/deepspeed_memory.py --steps 300 --nproc 1 --synthetic-images 1024 \
        --out docs/benchmarks/deepspeed_memory_h100.jsonl

CPU smoke run (tiny configs on digits made in a temporary directory, 2 processes, seconds):

    python benchmarks/deepspeed_memory.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["configs/ddpm_256.yaml", "configs/pixelcnn_cifar32.yaml"]
TINY_CONFIGS = ["configs/tiny/ddpm.yaml", "tests/configs/tiny_pixelcnn.yaml"]
STRATEGIES = {
    "ddp": ["distributed.strategy=ddp"],
    "zero2": ["distributed.strategy=deepspeed", "deepspeed.config_file=configs/deepspeed/zero2.json"],
}


def _launch(config: str, nproc: int, overrides: list[str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "local", "--nproc", str(nproc), config, *overrides],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return result.returncode, result.stderr, time.perf_counter() - started


def _summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r][1:]  # first interval warms up
    peaks: dict[str, float] = {}
    for path in sorted((run_dir / "ranks").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") != "end":
                continue
            for key in ("peak_rss_mb", "peak_cuda_allocated_mb", "peak_cuda_reserved_mb"):
                if key in record:
                    peaks[key] = max(peaks.get(key, 0.0), record[key])
    return {
        "images_per_s": statistics.median(speeds) if speeds else None,
        "final_loss": records[-1].get("loss") if records else None,
        **{key: round(value, 1) for key, value in peaks.items()},
    }


def run_one(config: str, strategy: str, steps: int, nproc: int, precision: str, base: list[str], work: Path) -> dict:
    run_dir = work / f"{Path(config).stem}-{strategy}"
    common = [
        f"run_dir={run_dir}", "wandb.mode=disabled", f"train.mixed_precision={precision}",
        f"checkpoint.every_steps={max(steps // 2, 1)}", "sample.every_steps=0", "sample.n=1",
        "eval.every_steps=0", *base, *STRATEGIES[strategy],
    ]
    line = {"config": config, "strategy": strategy, "mixed_precision": precision, "nproc": nproc, "steps": steps}
    wall = 0.0
    for max_steps in (max(steps // 2, 1), steps):  # train, checkpoint, then resume to the end
        code, stderr, seconds = _launch(config, nproc, [*common, f"train.max_steps={max_steps}"])
        wall += seconds
        if code != 0:
            tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            return {**line, "error": f"exit {code} at max_steps={max_steps}: {tail}"}
    line["resumed"] = "resumed from" in stderr
    return {**line, **_summary(run_dir), "wall_s": round(wall, 1)}


def _synthetic_shards(config: str, count: int, work: Path) -> list[str]:
    """Overrides pointing ``config`` at ``count`` photo crops written at its image size."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from loader import make_image_folder, photographs

    from pipeline import config as config_module

    data = config_module.load(REPO / config).data
    out = work / f"photos-{data.image_size}-{data.channels}"
    if not out.exists():
        folder = work / "photos"
        if not folder.exists():
            make_image_folder(folder, photographs(None), count, seed=0)
        per_shard = max(1, count // (4 * max(data.num_workers, 1)))
        command = [sys.executable, "-m", "data_prep.cli", "images", str(folder), str(out), "--size",
                   str(data.image_size), "--mode", "RGB" if data.channels == 3 else "L", "--holdout", "0.05",
                   "--samples-per-shard", str(per_shard)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"data-prep images failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return [f"data.shards={out / 'train'}", f"data.eval_shards={out / 'test'}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--strategies", default="ddp,zero2")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU-sized data (a smoke run)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--synthetic-images", type=int, default=0, metavar="N",
                        help="train on N photo crops at each config's size instead of its data.shards")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)

    import torch

    nproc = args.nproc or (torch.cuda.device_count() or 2)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as temporary:
        work = Path(temporary)
        configs, base, steps = CONFIGS, list(args.overrides), args.steps
        if args.tiny:
            from data_prep.cli import main as data_prep_main

            digits = work / "digits"
            if data_prep_main(["digits", str(digits)]) != 0:
                return 1
            configs, steps = TINY_CONFIGS, min(args.steps, 6)
            base = [f"data.shards={digits / 'train'}", f"data.eval_shards={digits / 'test'}",
                    "data.num_workers=0", "data.batch_size=8", "train.log_every_steps=1", *base]
        for config in configs:
            if not (REPO / config).is_file():
                print(json.dumps({"config": config, "error": "config file not in this checkout"}), flush=True)
                continue
            extra = list(base)
            if args.synthetic_images and not args.tiny:
                extra = [*_synthetic_shards(config, args.synthetic_images, work), *extra]
            if config.endswith("ddpm.yaml"):
                extra += ["model.base_channels=8", "model.norm_groups=4", "model.sample_steps=2"]
            elif "ddpm" in config:
                extra += ["sample.options.steps=2"]
            for strategy in args.strategies.split(","):
                line = run_one(config, strategy, steps, nproc, args.precision, extra, work)
                line["device"] = device
                text = json.dumps(line)
                print(text, flush=True)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
