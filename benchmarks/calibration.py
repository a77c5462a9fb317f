"""Known-entropy calibration at 16×16×3: each family's held-out bits/dim against the exact entropy
of its data, trained within a 10-minute CPU budget (issue 13.3).

Data (``data_prep.calibration``): a uniform mixture of K = 8 smooth prototypes plus discretised
Gaussian noise of σ = 4 levels on every subpixel (clipped, tails folded into the end bins),
16×16×3, 32,768 training and 1,024 held-out images, seed 0; its exact −log₂ p(x)/D per image, the
entropy H with its Monte-Carlo standard error and the held-out images' exact mean (the "truth")
are in ``DATA/calibration.json``. Written by ``python -m data_prep.calibration DATA`` unless DATA
already holds the same spec.

Per family (``--families``; configs/calibration/<family>.yaml, sized for 10 minutes of one core:
steps, not seconds, so the numbers reproduce):

1. ``launch local CONFIG run_dir=RUNS/<family> data.shards=DATA/train data.eval_shards=DATA/test``
   with ``OMP_NUM_THREADS=1`` (one intra-op thread; the data reader is one worker process).
   Recorded: wall time and the CPU time (user + system) of the whole process tree, from
   ``os.wait4``. On a quiet 2-core machine one thread's CPU time is its wall time; on a shared
   machine the wall time is longer and the CPU time is the budget that reproduces.
2. ``launch eval RUNS/<family>`` on all held-out images (EMA weights, seed 0); diffusion with
   ``--estimator mc-importance --timesteps-per-image 32``: the unbiased estimate of the bound,
   whose standard error holds the Monte-Carlo noise.
3. The gap: bits/dim − truth (both on the same 1,024 images), its standard error (the eval's,
   which holds the images' spread as well: conservative) and the goal: ≤ 0.10 bits/dim for
   PixelCNN++ and the flow, 0.15 for diffusion's bound, 0.20 for the VAE's ELBO.

For diffusion also the floor of its bound (``--oracle-images``, default 256): the bound that the
Bayes-optimal noise predictor (``data_prep.calibration.oracle_eps_fn``: the exact E[x_0 | x_t] of
this data) gets with the config's schedule and fixed variances, at the config's T and at
T = 1000, paired with the same images' exact values: no network trained on this data can do
better under that reverse process, so the trained model's gap splits into the chain's own
looseness and what training left.

Rows are printed and appended as JSON lines to ``--out`` (default
docs/benchmarks/calibration_cpu.jsonl); the table in docs/benchmarks.md comes from them::

    python benchmarks/calibration.py                       # all four families, ~37 CPU minutes
    # docs/benchmarks.md's table: the two halves at once, one core each
    python benchmarks/calibration.py --families pixelcnn,vae --oracle-images 0
    python benchmarks/calibration.py --families flow,diffusion --oracle-images 128
    python benchmarks/calibration.py --families flow --runs /tmp/cal_runs
    python benchmarks/calibration.py --runs /tmp/smoke --oracle-images 16 --out /tmp/smoke.jsonl \
        train.max_steps=10 checkpoint.every_steps=10 eval.every_steps=0     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from data_prep import calibration as cal  # noqa: E402

SPEC = cal.CalibrationSpec(image_size=16, channels=3, prototypes=8, sigma=4.0, seed=0)
TRAIN_IMAGES, TEST_IMAGES = 32_768, 1024
FAMILIES = {  # family -> (config, launch eval options, goal: largest gap in bits/dim)
    "pixelcnn": ("configs/calibration/pixelcnn.yaml", [], 0.10),
    "flow": ("configs/calibration/flow.yaml", [], 0.10),
    "diffusion": ("configs/calibration/ddpm.yaml",
                  ["--estimator", "mc-importance", "--timesteps-per-image", "32"], 0.15),
    "vae": ("configs/calibration/vae.yaml", [], 0.20),
}


def ensure_data(data: Path) -> dict:
    """DATA/calibration.json, writing the data first unless it is there with this spec."""
    if (data / cal.INFO_NAME).is_file():
        info = cal.read_info(data)
        if info["spec"] == SPEC and info["train_images"] == TRAIN_IMAGES and info["held_out_images"] == TEST_IMAGES:
            return info
        print(f"{data}: written for another spec; writing it again", file=sys.stderr)
    cal.write_data(data, SPEC, train=TRAIN_IMAGES, test=TEST_IMAGES, entropy_samples=20_000,
                   overwrite=True)
    return cal.read_info(data)


def run_timed(command: list[str], log: Path) -> tuple[float, float, str]:
    """Run `command` (stderr to `log`); (wall seconds, CPU seconds of it and its children, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        output = []
        reader = threading.Thread(target=lambda: output.append(process.stdout.read()))
        reader.start()
        _, status, usage = os.wait4(process.pid, 0)
        reader.join()
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {log}")
    return wall, usage.ru_utime + usage.ru_stime, output[0]


def diffusion_floor(info: dict, data: Path, timesteps: int, images: int, schedule_name: str,
                    variance: str) -> dict:
    """The bound of the Bayes-optimal denoiser minus the exact value, on the first `images`
    held-out images (mc-importance, 32 timesteps per image), in bits/dim."""
    from pipeline.data import eval_batches
    from pipeline.models.diffusion import NoiseSchedule, TimestepImportance, beta_schedule, variational_bound_mc
    from pipeline.shards import resolve_shards

    spec = info["spec"]
    schedule = NoiseSchedule(beta_schedule(schedule_name, timesteps), variance)
    eps = cal.oracle_eps_fn(spec, schedule, chunk=16)
    generator, importance, gaps = torch.Generator().manual_seed(0), TimestepImportance(timesteps), []
    batches = eval_batches(resolve_shards(str(data / "test")), rank=0, world_size=1, num_workers=0,
                           batch_size=16, image_size=spec.image_size, channels=spec.channels,
                           max_images=images)
    start = time.process_time()
    for batch in batches:
        nats, drawn, terms = variational_bound_mc(eps, schedule, batch.float() / 127.5 - 1, generator,
                                                  timesteps_per_image=32,
                                                  proposal=importance.proposal(), timestep_batch=8)
        importance.observe(drawn, terms)
        gaps.append(nats / (spec.dims * math.log(2)) - torch.from_numpy(cal.bits_per_dim(spec, batch.numpy())))
    gap = torch.cat(gaps).double()
    return {"row": "diffusion_floor", "timesteps": timesteps, "schedule": schedule_name,
            "variance": variance, "images": gap.numel(), "gap": round(gap.mean().item(), 4),
            "gap_stderr": round((gap.std() / math.sqrt(gap.numel())).item(), 4),
            "cpu_s": round(time.process_time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "calibration")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "calibration")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--oracle-images", type=int, default=256,
                        help="held-out images of diffusion's Bayes-optimal floor (0: skip it)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "calibration_cpu.jsonl")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every family's training (e.g. train.max_steps=20 "
                             "for a smoke run; the rows record them)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; expected some of {list(FAMILIES)}")

    info = ensure_data(args.data)
    truth = info["held_out_bits_per_dim"]
    common = {"host": platform.node(), "torch": torch.__version__, "entropy": round(info["entropy_bits_per_dim"], 4),
              "entropy_stderr": round(info["entropy_stderr"], 5), "truth": round(truth, 4),
              "truth_stderr": round(info["held_out_stderr"], 4)}
    print(f"data {args.data}: D = {info['dims']}, entropy {info['entropy_bits_per_dim']:.4f} ± "
          f"{info['entropy_stderr']:.4f} bits/dim, held-out truth {truth:.4f} ± "
          f"{info['held_out_stderr']:.4f} ({info['held_out_images']} images)")
    rows = []
    args.runs.mkdir(parents=True, exist_ok=True)
    for family in families:
        config, eval_options, goal = FAMILIES[family]
        run_dir = args.runs / family
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists: a new measurement needs a fresh run directory "
                             f"(remove it or pass another --runs)")
        load = os.getloadavg()[0]
        train_wall, train_cpu, _ = run_timed(
            [sys.executable, "-m", "launch.cli", "local", config, f"run_dir={run_dir}",
             f"data.shards={args.data / 'train'}", f"data.eval_shards={args.data / 'test'}",
             *args.overrides],
            args.runs / f"{family}.train.log")
        eval_wall, eval_cpu, stdout = run_timed(
            [sys.executable, "-m", "launch.cli", "eval", str(run_dir), "--no-progress", *eval_options],
            args.runs / f"{family}.eval.log")
        result = json.loads(stdout)
        gap = result["bits_per_dim"] - truth
        row = {**common, "row": "family", "family": family, "config": config,
               "overrides": args.overrides,
               "load_average_1min": round(load, 2), "steps": result["step"],
               "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
               "eval_wall_s": round(eval_wall, 1), "eval_cpu_s": round(eval_cpu, 1),
               "bits_per_dim": round(result["bits_per_dim"], 4),
               "bits_per_dim_stderr": round(result["bits_per_dim_stderr"], 4),
               "kind": result["kind"], "eval_options": {k: result[k] for k in ("estimator", "timesteps_per_image") if k in result},
               "gap": round(gap, 4), "goal": goal, "goal_met": gap <= goal}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "diffusion" in families and args.oracle_images > 0:
        from pipeline import config as run_config

        model = run_config.load(REPO / FAMILIES["diffusion"][0]).model
        for timesteps in sorted({model.timesteps, 1000}, reverse=True):
            row = {**common, **diffusion_floor(info, args.data, timesteps, args.oracle_images,
                                               model.schedule, model.variance)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")

    print("\n| family | steps | training wall / CPU | held-out bits/dim | entropy | gap | goal |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row["row"] == "family":
            print(f"| {row['family']} | {row['steps']} | {row['train_wall_s']:.0f} s / {row['train_cpu_s']:.0f} s "
                  f"| {row['bits_per_dim']:.4f} ± {row['bits_per_dim_stderr']:.4f} | {row['entropy']:.4f} "
                  f"| {row['gap']:+.4f} | ≤ {row['goal']:.2f}: {'met' if row['goal_met'] else 'not met'} |")
        else:
            print(f"| diffusion floor (Bayes-optimal ε, T = {row['timesteps']}) | | | | | "
                  f"{row['gap']:+.4f} ± {row['gap_stderr']:.4f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
