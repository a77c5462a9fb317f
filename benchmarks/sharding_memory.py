"""Per-rank memory and checkpoint cost of DDP, DeepSpeed ZeRO-3 and FSDP2 at 1, 2 and 4 processes.

For each strategy and process count, two real ``launch local`` jobs of one config (EMA on): the
first trains ``--steps`` steps and checkpoints at the last; the second resumes from that
checkpoint, trains one more step and checkpoints again. Every rank's own records
(``run_dir/ranks/rank-RRRRR.jsonl``, written by pipeline/checkpointer.py) give, per rank:

- ``peak_rss_mb`` at the first checkpoint (the training's peak, before anything at the end of
  the run; ``peak_cuda_allocated_mb`` on GPUs, since the last logged step);
- ``state_mb``: the bytes of parameters (the module's own storage and, for ZeRO, its fp32
  masters), gradients, optimizer state and EMA the rank holds (``params/grads/optimizer/ema_mb``);
- ``save_s`` (the checkpoint, from the state's encoding to every rank past the commit),
  ``write_s`` (this rank's encode + write + fsync + hash) and ``written_mb`` (this rank's files);
  ``stall_s``, what training waited for: the whole save, or with ``checkpoint.async_save=true``
  (an override) the copy to host memory and any write still in flight;
- ``load_s`` and ``read_mb`` of the resumed job (this rank's reading, verifying, decoding and
  placing of the checkpoint).

One JSON line per (strategy, processes), with the per-rank lists and their maxima, and the
figures relative to the same strategy's 1-process run. A DDP run whose estimated memory (processes
× the 1-process peak, 10% margin) exceeds the memory available now less 2 GiB is not started:
it is reported as ``skipped`` with the estimate. Any job is stopped when the machine's available
memory falls below ``GUARD_MB`` (reported as an error row): never left to the out-of-memory
killer on a shared machine. ``zero3`` runs with benchmarks/configs/zero3_lean.json, which bounds
the parameters DeepSpeed keeps gathered between uses (its own defaults keep up to 1e9: this whole
model, on every rank); ``zero3-default`` (``deepspeed.zero_stage=3`` alone) and ``zero3-shipped``
(configs/deepspeed/zero3.json) run with the bounds the trainer sizes from the model.
Devices are chosen by availability, as ``launch local`` does (GPUs when there are, one process
each; the same command runs unchanged there).

    python benchmarks/sharding_memory.py --out docs/benchmarks/sharding_memory_cpu.jsonl
    python benchmarks/sharding_memory.py --tiny            # the tiny DDPM: a smoke run in minutes

Data: the digits of ``data-prep digits`` (made in a temporary directory), resized at load time
to the config's image size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "benchmarks/configs/ddpm_337m.yaml"
TINY = "configs/tiny/ddpm.yaml"
STRATEGIES = {
    "ddp": ["distributed.strategy=ddp"],
    # DeepSpeed's own defaults keep up to 1e9 gathered parameters alive between uses: the whole of
    # this model, on every rank. The lean file bounds them by hand (the figures of docs/benchmarks.md).
    "zero3": ["distributed.strategy=deepspeed", "deepspeed.config_file=benchmarks/configs/zero3_lean.json"],
    # What `deepspeed.zero_stage=3` alone gives (pipeline/deepspeed_engine.py sizes what a rank
    # keeps gathered from the model), and the shipped configs/deepspeed/zero3.json.
    "zero3-default": ["distributed.strategy=deepspeed", "deepspeed.zero_stage=3"],
    "zero3-shipped": ["distributed.strategy=deepspeed", "deepspeed.config_file=configs/deepspeed/zero3.json"],
    "fsdp": ["distributed.strategy=fsdp"],
}
MB = 2**20


def available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


GUARD_MB = 1536
"""A job is stopped (SIGKILL to its process group) when the machine's available memory falls
below this: the benchmark's own jobs go first, before the kernel's out-of-memory killer picks
someone else's process."""


def _launch(config: str, nproc: int, overrides: list[str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "local", "--nproc", str(nproc), config, *overrides],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env, start_new_session=True)
        while process.poll() is None:
            free = available_mb()
            if free is not None and free < GUARD_MB:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return -9, f"stopped: the machine's available memory fell to {free:.0f} MiB", \
                    time.perf_counter() - started
            time.sleep(0.5)
        log.seek(0)
        return process.returncode, log.read(), time.perf_counter() - started


def _records(run_dir: Path, nproc: int) -> list[list[dict]]:
    ranks = []
    for rank in range(nproc):
        path = run_dir / "ranks" / f"rank-{rank:05d}.jsonl"
        ranks.append([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
    return ranks


def _per_rank(records: list[list[dict]], first_step: int) -> dict[str, list]:
    out: dict[str, list] = {key: [] for key in (
        "peak_rss_mb", "peak_cuda_allocated_mb", "state_mb", "params_mb", "grads_mb", "optimizer_mb", "ema_mb",
        "save_s", "stall_s", "write_s", "written_mb", "load_s", "read_mb")}
    for rank_records in records:
        saved = next(r for r in rank_records if r["event"] == "checkpoint" and r["step"] == first_step)
        # With checkpoint.async_save the write's own costs come in a later record.
        written = next((r for r in rank_records if r["event"] == "checkpoint_written" and r["step"] == first_step),
                       saved)
        resumed = next(r for r in rank_records if r["event"] == "resumed")
        parts = {key: saved.get(f"{key}_bytes", 0) / MB for key in ("params", "grads", "optimizer", "ema")}
        values = {
            "peak_rss_mb": saved["peak_rss_mb"], "peak_cuda_allocated_mb": saved.get("peak_cuda_allocated_mb"),
            "state_mb": sum(parts.values()), **{f"{k}_mb": v for k, v in parts.items()},
            "save_s": written["save_s"], "stall_s": saved["stall_s"], "write_s": written["write_s"],
            "written_mb": written["written_bytes"] / MB,
            "load_s": resumed["load_s"], "read_mb": resumed["read_bytes"] / MB,
        }
        for key, value in values.items():
            out[key].append(round(value, 3) if isinstance(value, float) else value)
    if not any(value is not None for value in out["peak_cuda_allocated_mb"]):
        del out["peak_cuda_allocated_mb"]
    return out


def run_one(config: str, strategy: str, nproc: int, steps: int, base: list[str], work: Path) -> dict:
    run_dir = work / f"{strategy}-{nproc}"
    shutil.rmtree(run_dir, ignore_errors=True)
    common = [f"run_dir={run_dir}", f"checkpoint.every_steps={steps}", "checkpoint.keep_last=1", *base,
              *STRATEGIES[strategy]]
    line: dict = {"config": config, "strategy": strategy, "nproc": nproc, "steps": steps}
    walls = []
    try:
        for max_steps in (steps, steps + 1):  # train and checkpoint; resume, one step, checkpoint
            code, stderr, seconds = _launch(config, nproc, [*common, f"train.max_steps={max_steps}"])
            walls.append(round(seconds, 1))
            if code != 0:
                tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
                return {**line, "error": f"exit {code} at max_steps={max_steps}: {tail}", "wall_s": walls}
        per_rank = _per_rank(_records(run_dir, nproc), steps)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a large model fill a disk fast
    return {**line, "wall_s": walls, **{f"max_{key}": max(values) for key, values in per_rank.items()},
            "per_rank": per_rank}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--nprocs", default="1,2,4", help="process counts (GPUs: at most their number)")
    parser.add_argument("--strategies", default="ddp,zero3,fsdp")
    parser.add_argument("--steps", type=int, default=2, help="steps before the first checkpoint")
    parser.add_argument("--tiny", action="store_true", help="the tiny DDPM instead (a smoke run)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)

    import torch

    config = TINY if args.tiny else args.config
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if torch.cuda.is_available():
        nprocs = [n for n in nprocs if n <= torch.cuda.device_count()]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(prefix="sharding-bench-") as temporary:
        work = Path(temporary)
        from data_prep.cli import main as data_prep_main

        digits = work / "digits"
        if data_prep_main(["digits", str(digits)]) != 0:
            return 1
        base = [f"data.shards={digits / 'train'}", f"data.eval_shards={digits / 'test'}", "wandb.mode=disabled",
                "data.num_workers=0", "sample.at_end=false", "eval.every_steps=0", "train.log_every_steps=1"]
        if args.tiny:
            base += ["model.base_channels=8", "model.norm_groups=4", "data.batch_size=4", "train.warmup_steps=1"]
        base += args.overrides
        for strategy in args.strategies.split(","):
            single = None
            for nproc in nprocs:
                line: dict = {"config": config, "strategy": strategy, "nproc": nproc, "device": device}
                free = available_mb()
                if strategy == "ddp" and single and "max_peak_rss_mb" in single and free is not None:
                    # Every DDP rank holds what the single process held.
                    estimate = single["max_peak_rss_mb"] * nproc * 1.1
                    if estimate > free - 2048:  # leave the others on a shared machine 2 GiB
                        line["skipped"] = (f"needs ~{estimate / 1024:.1f} GiB ({nproc} × the 1-process peak), "
                                           f"{free / 1024:.1f} GiB available")
                if "skipped" not in line:
                    line.update(run_one(config, strategy, nproc, args.steps, base, work))
                    line["device"] = device
                    line["available_mb_before"] = round(free) if free is not None else None
                    if nproc == 1:
                        single = line
                    elif single and "error" not in line and "error" not in single:
                        line["state_vs_1proc"] = round(line["max_state_mb"] / single["max_state_mb"], 3)
                        line["peak_rss_vs_1proc"] = round(line["max_peak_rss_mb"] / single["max_peak_rss_mb"], 3)
                        line["save_s_vs_1proc"] = round(line["max_save_s"] / single["max_save_s"], 3)
                text = json.dumps(line)
                print(text, flush=True)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
