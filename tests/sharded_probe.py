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

import sys

import torch
from safetensors.torch import save_file


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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
