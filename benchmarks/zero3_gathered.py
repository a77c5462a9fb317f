"""How many parameters a ZeRO-3 rank keeps gathered during a training step.

ZeRO-3 shards the parameters only if it releases them after use. DeepSpeed's own defaults
(``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` of 1e9) keep every parameter of
a smaller model gathered on every rank once the first step has traced the module order: the
whole model per rank, as under DDP. The trainer sizes both from the model unless the config file
sets them (a rank's share, ``parameters / world_size``: pipeline/deepspeed_engine.py). This
script trains a few steps of a config under ZeRO-3 for each variant and process count and
reports, per step, the largest number of parameter elements gathered on rank 0 at any module
boundary of the forward and backward (hooks on every module), against the model's total:

    python benchmarks/zero3_gathered.py                        # configs/ddpm_cifar32.yaml, 2 and 4 processes
    python benchmarks/zero3_gathered.py --nprocs 2 --steps 2   # what the full test tier runs

Variants: ``sized`` (the trainer's defaults, also what configs/deepspeed/zero3.json gives) and
``deepspeed-defaults`` (1e9 for both, DeepSpeed's own). One JSON line per (variant, processes).
Data: the digits of ``data-prep digits``, resized at load time to the config's image size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "sized": {},
    "deepspeed-defaults": {"stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000},
}


def worker(config_path: str, run_dir: str, digits: str, steps: int, overrides: list[str]) -> int:
    """One rank: build the trainer, train ``steps`` steps, count what is gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from pipeline import config as config_module
    from pipeline.trainer import Trainer

    config = config_module.load(config_path, [
        f"run_dir={run_dir}", f"data.shards={digits}/train", "data.eval_shards=null", "wandb.mode=disabled",
        "data.num_workers=0", "sample.at_end=false", "eval.every_steps=0", "eval.fid_images=0",
        "distributed.strategy=deepspeed", "deepspeed.zero_stage=3", f"train.max_steps={steps}", *overrides])
    trainer = Trainer(config)
    module = trainer.strategy.engine.module
    parameters = list(module.parameters())
    peak = [0]

    def count(*_):
        gathered = sum(p.ds_numel for p in parameters if p.ds_status == ZeroParamStatus.AVAILABLE)
        peak[0] = max(peak[0], gathered)

    for layer in module.modules():
        layer.register_forward_hook(count)
        layer.register_full_backward_hook(count)
    per_step = []
    for _ in range(steps):
        peak[0] = 0
        trainer.train_step(trainer.progress, trainer.window)
        per_step.append(peak[0])
    if trainer.processes.is_main:
        print(json.dumps({"peak_gathered_per_step": per_step,
                          "parameters": sum(p.ds_numel for p in parameters)}), flush=True)
    trainer.batches.close()
    trainer.processes.shutdown()
    trainer.release()
    return 0


def run(config: str, variant: str, nproc: int, steps: int, digits: Path, work: Path, overrides: list[str]) -> dict:
    from launch.local import free_port

    extra = list(overrides)
    if VARIANTS[variant]:
        tuning = work / f"{variant}.json"
        tuning.write_text(json.dumps({"zero_optimization": {"stage": 3, **VARIANTS[variant]}}))
        extra.append(f"deepspeed.config_file={tuning}")
    port, processes = free_port(), []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", config, str(work / f"{variant}-{nproc}"), str(digits), str(steps),
             *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=1800) for process in processes]
    line = {"config": config, "variant": variant, "nproc": nproc}
    if any(process.returncode for process in processes):
        tail = next(err for (_, err), p in zip(outputs, processes) if p.returncode).strip().splitlines()[-1:]
        return {**line, "error": tail[0] if tail else "failed"}
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    steady = max(result["peak_gathered_per_step"][1:] or result["peak_gathered_per_step"])
    return {**line, **result, "share_per_rank": -(-result["parameters"] // nproc),
            "steady_peak_vs_model": round(steady / result["parameters"], 3)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        config, run_dir, digits, steps, *overrides = argv[1:]
        return worker(config, run_dir, digits, int(steps), overrides)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ddpm_cifar32.yaml")
    parser.add_argument("--nprocs", default="2,4")
    parser.add_argument("--variants", default="sized,deepspeed-defaults")
    parser.add_argument("--steps", type=int, default=3, help="steps per run (the first traces the module order)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides (default: data.batch_size=8)")
    args = parser.parse_args(argv)
    overrides = args.overrides or ["data.batch_size=8"]
    with tempfile.TemporaryDirectory(prefix="zero3-gathered-") as temporary:
        work = Path(temporary)
        from data_prep.cli import main as data_prep_main

        digits = work / "digits"
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                code = data_prep_main(["digits", str(digits)])
            finally:
                sys.stdout = stdout
        if code != 0:
            return 1
        for variant in args.variants.split(","):
            for nproc in (int(n) for n in args.nprocs.split(",")):
                print(json.dumps(run(args.config, variant, nproc, args.steps, digits, work, overrides)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
