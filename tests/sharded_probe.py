"""What a resumed job holds, whole: run as the M processes of a job (torchrun-style environment).

``python -m tests.sharded_probe CONFIG OUT [key=value ...]`` builds the real trainer on the run
directory of CONFIG, which resumes from its newest checkpoint (each rank loading the pieces it
now holds, whatever process count wrote them), then assembles what the ranks hold into whole
tensors and rank 0 writes them to OUT (safetensors): ``model/NAME``, ``ema/NAME`` and, for the
sharded strategies, ``exp_avg/NAME`` and ``exp_avg_sq/NAME``, with the AdamW step in the metadata.
It trains nothing. tests/test_sharded_checkpoints.py compares OUT with the checkpoint's files.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file


def main(argv: list[str]) -> int:
    from pipeline import config as config_module
    from pipeline import sharding
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
        for moment in ("exp_avg", "exp_avg_sq"):
            pieces = {f"{moment}/{name}": piece for name, piece in strategy.moment_pieces(moment).items()}
            whole = sharding.assemble(strategy.layout.renamed(f"{moment}/"), pieces, processes)
            state.update({name: tensor.cpu() for name, tensor in whole.items()})
        metadata["optimizer_step"] = str(strategy.optimizer_step_count())
    if processes.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, out, metadata=metadata)
    processes.barrier()
    trainer.batches.close()
    processes.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
