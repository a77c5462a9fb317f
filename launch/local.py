"""``launch local``: N training processes on this machine (CPU with gloo, or one per GPU).

The launcher validates the config and the shards before any process starts, writes the resolved
config into the run directory, then starts ``python -m pipeline.trainer RUN_DIR/config.yaml`` N
times with the torchrun-style environment. It forwards SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 to
the processes (they save at the next step boundary and exit with EXIT_PREEMPTED), and if one
process fails it stops the others instead of leaving them waiting in a collective. Its exit status
is the job's: 0 finished, 75 stopped by a signal (relaunch resumes), otherwise the failure's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline import checkpoint, conditioning, runlock
from pipeline import config as config_module
from pipeline.config import RunConfig
from pipeline.data import plan_layout, resolve_shards, resume_problem
from pipeline.errors import UserError
from pipeline.preemption import EXIT_PREEMPTED, STOP_SIGNALS
from pipeline.trainer import write_resolved_config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def preflight(config: RunConfig, nproc: int) -> None:
    """Checks that need no process group: shards exist, match the config, suffice for the readers,
    and a resumed run's data stream fits this process count."""
    data = config.data
    train = resolve_shards(data.shards, "data.shards")
    # Labels asked for when the model is class-conditional (model.num_classes), in range.
    conditioning.check_shards(train, data.image_size, data.channels, "data.shards", config.model)
    check_data_layout(config, nproc, len(train.urls))
    if data.eval_shards is not None:
        held_out = resolve_shards(data.eval_shards, "data.eval_shards")
        conditioning.check_shards(held_out, data.image_size, data.channels, "data.eval_shards", config.model)
    # Model-level mistakes (attention at an unreachable resolution, sizes that do not divide)
    # surface here, before any process starts; the meta device allocates nothing.
    import torch

    from pipeline import models, strategies

    strategies.build(config)  # what the strategy cannot do with this config (nothing started)
    with torch.device("meta"):
        models.build(config.model, data.image_size, data.channels)
    run_dir = Path(config.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir: {run_dir} exists and is not a directory")


def check_data_layout(config: RunConfig, nproc: int, num_shards: int) -> None:
    """The canonical partitions fit the shards and the processes; a run resumed on another
    process count keeps its global batch and can restore its data stream exactly."""
    data = config.data
    saved = saved_data_layout(config.run_dir)
    plan_layout(num_shards, nproc, 0, data.num_workers, data.batch_size,
                configured=data.canonical_partitions, saved=saved["partitions"] if saved else None)
    if saved is None:
        return
    problem = resume_problem(saved["partitions"], saved["world_size"], saved["images_seen"], saved["step"],
                             world_size=nproc, batch_size=data.batch_size, grad_accum=config.train.grad_accum,
                             whole_rounds=not saved["legacy"])
    if problem is not None:
        raise UserError(f"run_dir: resuming {config.run_dir} (step {saved['step']}, {saved['world_size']} "
                        f"process(es)) on {nproc}: {problem}")


def saved_data_layout(run_dir) -> dict | None:
    """Partitions, process count, images seen and step of the run's newest checkpoint (None when it
    has none, or none readable here: the trainer then decides, verifying every file)."""
    for _, path in reversed(checkpoint.list_checkpoints(run_dir)):
        try:
            loaded = checkpoint.LoadedCheckpoint(path, json.loads((path / "manifest.json").read_bytes()))
            trainer_state = loaded.json("trainer.json")
            data_state = loaded.json(checkpoint.rank_file(0, "json"))["data"]
            legacy = "partitions" not in data_state
            return {"partitions": int(data_state["num_readers" if legacy else "partitions"]),
                    "world_size": int(trainer_state["world_size"]), "images_seen": int(trainer_state["images_seen"]),
                    "step": int(trainer_state["step"]), "legacy": legacy}
        except (OSError, ValueError, KeyError, TypeError, UserError):
            continue
    return None


def warn_if_config_changed(config: RunConfig) -> None:
    previous = Path(config.run_dir) / "config.yaml"
    if not previous.exists():
        return
    new_text = config_module.dump_yaml(config)
    old_text = previous.read_text()
    if old_text != new_text:
        import difflib

        changed = [
            line
            for line in difflib.unified_diff(old_text.splitlines(), new_text.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        print(
            f"launch: note: {previous} differs from this launch's config; resuming with the new one:\n  "
            + "\n  ".join(changed),
            file=sys.stderr,
        )


def launch_local(config: RunConfig, nproc: int) -> int:
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    preflight(config, nproc)
    # The run directory is this job's for as long as the launcher lives; its processes work
    # under the launcher's lock (pipeline/runlock.py).
    lock = runlock.acquire(config.run_dir)
    try:
        return _launch_under_lock(config, nproc, lock)
    finally:
        lock.release()


def _launch_under_lock(config: RunConfig, nproc: int, lock: runlock.RunLock) -> int:
    warn_if_config_changed(config)
    config_path = write_resolved_config(config)
    if nproc == 1:
        # One process needs no process group: train here, with this launcher's signal handling.
        from pipeline.trainer import run

        return run(config)
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    processes: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONUNBUFFERED="1",
        )
        env[runlock.TOKEN_VARIABLE] = lock.token
        if nproc > 1:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline.trainer", str(config_path)],
                env=env,
                start_new_session=True,  # signals reach them once, through us
            )
        )

    def forward(signum, frame):
        for process in processes:
            if process.poll() is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        return _wait(processes)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait(processes: list[subprocess.Popen]) -> int:
    """Wait for all processes; the moment one fails, kill the rest.

    The others would otherwise sit in a collective until its timeout, then add a traceback of
    their own to the one clear error; nothing they hold is lost (checkpoints commit atomically).
    """
    by_pid = {process.pid: process for process in processes}
    running = set(by_pid)
    while running:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in by_pid:
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        by_pid[pid].returncode = code
        if code not in (0, EXIT_PREEMPTED):
            for other in running:
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    codes = [process.returncode for process in processes]
    failures = [code for code in codes if code not in (0, EXIT_PREEMPTED)]
    if failures:
        # A process we killed reports a negative status; the one that failed first has the story.
        positive = [code for code in failures if code > 0]
        return positive[0] if positive else 1
    if EXIT_PREEMPTED in codes:
        return EXIT_PREEMPTED
    return 0
