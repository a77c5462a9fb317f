"""This process's place in the job, and the few collectives the trainer's components need.

A training process reads its place from the torchrun-style environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; absent means one process) that `launch local`, the Slurm
entry point and torchrun all set. `Processes.start` creates the process group through
Accelerate (gloo on CPUs, NCCL on GPUs unless ``distributed.backend`` says otherwise) and, on
NCCL, a second gloo group for host-side agreement (the stop flag), which never waits for a GPU
stream. Strategies (pipeline/strategies/) start it; nothing else creates a process group (a
strategy that needs one even alone, FSDP2, asks for a group of one: `ensure_group`).

Each process also owns the hang watchdog (pipeline/watchdog.py), made here from
``distributed.hang_timeout_minutes`` and started by the trainer with `watch` once it is built.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from pipeline import watchdog

log = logging.getLogger(__name__)


@dataclass
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    accelerator: Any = None
    """The Accelerate `Accelerator` that created the group (DDP wraps through it)."""
    control_group: Any = None
    """A gloo group for host-side flags when the main backend is not gloo (None: the main group)."""
    watchdog: Any = None
    """This process's hang watchdog (pipeline/watchdog.py); None when not started by `start`."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, distributed_config) -> Processes:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        backend = None if distributed_config.backend == "auto" else distributed_config.backend
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="no",  # autocast and loss scaling are the strategy's, the same on CPU and GPU
            kwargs_handlers=[
                InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=distributed_config.timeout_minutes)),
            ],
        )
        processes = cls(
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            local_rank=accelerator.local_process_index,
            device=accelerator.device,
            accelerator=accelerator,
        )
        configure_logging(processes.rank)
        if processes.world_size > 1 and dist.get_backend() != "gloo":
            processes.control_group = dist.new_group(backend="gloo")
        from pipeline.watchdog import Watchdog

        processes.watchdog = Watchdog(distributed_config.resolved_hang_timeout_minutes() * 60, processes.rank,
                                       processes.world_size,
                                       paused_timeout_s=distributed_config.resolved_paused_timeout_minutes() * 60)
        return processes

    def ensure_group(self, backend: str) -> None:
        """A process group even for one process (FSDP2 shards over a device mesh, which needs one):
        a group of one on a free local port when no launcher made one."""
        if dist.is_initialized():
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    def watch(self, progress, run_dir) -> None:
        """Start the hang watchdog on the training loop's ``progress`` (collective)."""
        if self.watchdog is not None:
            self.watchdog.watch(progress, run_dir, self)

    @property
    def backend(self) -> str:
        if self.world_size > 1 and dist.is_initialized():
            return dist.get_backend()
        return "gloo" if self.device.type == "cpu" else "nccl"

    def barrier(self) -> None:
        if self.world_size > 1:
            _entering_collective()
            dist.barrier()

    def any_flag(self, local: int) -> int:
        """The largest of every process's ``local`` integer (host-side; collective)."""
        if self.world_size == 1:
            return local
        _entering_collective()
        flag = torch.tensor([int(local)], dtype=torch.int64)
        if self.control_group is None and self.backend != "gloo":
            flag = flag.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return int(flag.item())

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over processes of a device tensor (collective)."""
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def all_gather_objects(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        _entering_collective()
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's copy of ``module`` (collective)."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        _entering_collective()
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _entering_collective() -> None:
    """Counted by the hang watchdog: inside long untimed work, the rank that has entered the fewest
    collectives is the one its peers are waiting for (pipeline/watchdog.py)."""
    watchdog.entering_collective()


def leave(code: int) -> NoReturn:
    """End a training process with ``code`` once its work is closed (checkpoints committed, logs and
    trackers finished), without the interpreter's teardown.

    A process group outlives `destroy_process_group` while anything still refers to it (DeepSpeed
    keeps its groups on every parameter), and its worker threads release the last collective's
    tensors on their own: if the interpreter is tearing down by then, the thread cannot take the
    GIL and the process aborts ("terminate called without an active exception"), turning a
    finished job into a failed one (seen about once in 50 ZeRO-3 launches on a loaded machine)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if rank == 0 else f"[rank {rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stderr, force=True)
    for noisy in ("accelerate", "wandb", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
