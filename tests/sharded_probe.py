"""What a resumed job holds, whole: run as the M processes of a job (torchrun-style environment).

``python -m tests.sharded_probe CONFIG OUT [key=value ...]`` builds the real trainer on the run
directory of CONFIG, which resumes from its newest checkpoint (each rank loading the pieces it
now holds, whatever process count wrote them), then assembles what the ranks hold into whole
tensors and rank 0 writes them to OUT (safetensors): ``model/NAME``, ``ema/NAME`` and, for the
sharded strategies, ``exp_avg/NAME`` and ``exp_avg_sq/NAME``, with the AdamW step in the metadata.
It trains nothing. tests/test_sharded_checkpoints.py compares OUT with the checkpoint's files.

The weights and AdamW moments are assembled by the libraries' own APIs, never by the project's
layout (which wrote the checkpoint and reads it back): FSDP2's ``DTensor.full_tensor()`` and
DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, so a wrong offset
in the project's pieces cannot agree with itself. The EMA (the project's own pieces) and the
buffers are assembled by the strategy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    from pipeline import config as config_module
    from pipeline.trainer import Trainer

    config_path, out, *overrides = argv
    trainer = Trainer(config_module.load(config_path, overrides))
    strategy, processes = trainer.strategy, trainer.processes
    state: dict[str, torch.Tensor] = {}
    with strategy.whole_model(None, use_ema=False) as model:
        state.update({f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()})
    if trainer.ema is not None:
        with strategy.whole_model(trainer.ema, use_ema=True) as model:
            state.update({f"ema/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()})
    metadata = {}
    if hasattr(strategy, "moment_pieces"):
        state.update(library_whole(strategy))
        metadata["optimizer_step"] = str(strategy.optimizer_step_count())
    if processes.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, out, metadata=metadata)
    processes.barrier()
    trainer.batches.close()
    processes.shutdown()
    trainer.release()
    return 0


def library_whole(strategy) -> dict[str, torch.Tensor]:
    """``model/NAME``, ``exp_avg/NAME``, ``exp_avg_sq/NAME`` of every parameter, whole, through the
    distribution library's own API (collective)."""
    whole: dict[str, torch.Tensor] = {}
    moments = ("exp_avg", "exp_avg_sq")
    if hasattr(strategy, "engine"):  # DeepSpeed ZeRO-1/2/3
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for name, parameter in strategy.engine.module.named_parameters():
            whole[f"model/{name}"] = safe_get_full_fp32_param(parameter)
            for moment in moments:
                value = safe_get_full_optimizer_state(parameter, moment)
                whole[f"{moment}/{name}"] = value if value is not None else torch.zeros_like(whole[f"model/{name}"])
    else:  # FSDP2: every parameter and its AdamW state are DTensors
        for name, parameter in strategy.model.named_parameters():
            whole[f"model/{name}"] = parameter.detach().full_tensor()
            state = strategy.optimizer.state.get(parameter, {})
            for moment in moments:
                value = state.get(moment)
                whole[f"{moment}/{name}"] = (value.full_tensor() if value is not None
                                             else torch.zeros_like(whole[f"model/{name}"]))
    return {name: tensor.detach().float().cpu().clone() for name, tensor in whole.items()}


# ---------------------------------------------------------------------------------------------
# The tests' side: run the probe as a job's processes, compare what it wrote with a checkpoint


def run_probe(run_dir: Path, overrides: list[str], nproc: int, out: Path) -> None:
    """This module as the ``nproc`` processes of a job resuming ``run_dir`` (its config.yaml
    with ``overrides``); rank 0 writes what they hold to ``out``."""
    from launch.local import free_port

    processes, port = [], free_port()
    for rank in range(nproc):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GENPIPE_")},
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        if nproc == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tests.sharded_probe", str(run_dir / "config.yaml"), str(out), *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(o[-3000:] for o in outputs)


def expected_state(step_dir: Path, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], int | None]:
    """A checkpoint's weights, EMA and (sharded strategies) AdamW moments read through the
    project's layout, keyed as the probe writes them, and its AdamW step."""
    from pipeline import checkpoint
    from pipeline.sharding import PartReader

    loaded = checkpoint.open_checkpoint(step_dir)
    parts = [part for part in ("model", "ema") if PartReader(loaded, part).exists]
    expected = {f"{part}/{k}": v for part in parts for k, v in PartReader(loaded, part).state_dict().items()}
    if not optimizer:
        return expected, None
    expected.update(PartReader(loaded, "optimizer").state_dict())
    return expected, int(loaded.json("trainer.json")["optimizer_step"])


def assert_holds(probe: Path, step_dir: Path, optimizer: bool = True) -> None:
    """What the probe wrote equals the checkpoint, bit for bit."""
    expected, step = expected_state(step_dir, optimizer)
    got = load_file(probe)
    if not optimizer:
        got = {k: v for k, v in got.items() if k.startswith(("model/", "ema/"))}
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:5]
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"resumed state differs from {step_dir.name}: {different[:5]}"
    if optimizer:
        with safe_open(str(probe), "pt") as handle:
            assert int(handle.metadata()["optimizer_step"]) == step


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
