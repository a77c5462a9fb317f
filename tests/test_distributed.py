"""The collectives of pipeline/distributed.py's `Processes`, on two real gloo processes."""

from __future__ import annotations

import torch

from launch.local import free_port


def _broadcast_from_rank_0(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.distributed import Processes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Each rank's own values, as after a data-dependent initialisation from its own batch:
        # a parameter of several rows (FSDP2 shards those by rows) and a buffer.
        module = torch.nn.Linear(3, 4)
        with torch.no_grad():
            module.weight.fill_(rank + 1.0)
            module.bias.fill_(-rank - 1.0)
        module.register_buffer("count", torch.tensor([10 * (rank + 1)]))
        Processes(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu")).broadcast_module(module)
        torch.save(module.state_dict(), f"{out_dir}/rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_broadcast_module_gives_every_rank_rank_0s_weights_and_buffers(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_broadcast_from_rank_0, args=(free_port(), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank-{rank}.pt") for rank in (0, 1)]
    for state in states:
        assert torch.equal(state["weight"], torch.ones(4, 3)) and torch.equal(state["bias"], -torch.ones(4))
        assert state["count"].tolist() == [10]
