"""`launch slurm | cancel`: training jobs on a Slurm cluster through submitit (`launch status`,
launch/status.py, reads their job state with the functions here).

Launcher side: `submit` validates the config, writes the resolved config into the run directory
and submits one sbatch job (submitit's `SlurmExecutor`, files in ``run_dir/slurm/``) with one
task per GPU (or ``slurm.tasks_per_node`` tasks on CPU partitions), ``--signal=USR2@N`` and
``--requeue``. ``--dry-run`` prints the sbatch script, rendered by submitit's own builder.

Job side: every task runs `SlurmEntry`, which turns the Slurm environment into the torchrun-style
one the trainer reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = first host
of the node list, MASTER_PORT derived from the job id) and calls `pipeline.trainer.run`.

Signal policy (see docs/slurm.md):
- SIGUSR2 (time limit near, preemption notice, ``scancel --signal=USR2``) and SIGUSR1: the
  trainer saves at the next step boundary and returns EXIT_PREEMPTED; rank 0 then requeues the
  job (``scontrol requeue``) unless it was already requeued ``slurm.max_requeues`` times. The
  requeued job resumes from the checkpoint in the run directory.
- SIGTERM (plain ``scancel``, or Slurm's own preemption, which requeues by itself when the
  partition says so): save and exit, never requeued by us.
- Anything else (an exception, a non-zero return) fails the job; srun's ``--kill-on-bad-exit``
  stops the other ranks, and nothing requeues it.
submitit installs its own USR2 handler (which would requeue from inside the handler, without a
checkpoint); `SlurmEntry` replaces it with the flag-only handler of `pipeline.preemption` as its
first action, and the trainer installs the same handler again.

This module is imported on every task before training starts: keep its top-level imports light.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import preemption
from pipeline.errors import UserError

SUBMITIT_FOLDER = "slurm"
"""Submitit's folder (sbatch script, pickles, per-task logs) inside the run directory."""
JOB_FILE = "job.json"
"""The run's current job (id, log paths), written at submission; read by status and cancel."""
REQUEUE_FILE = "requeues.json"
"""How many times rank 0 requeued the current job."""
EVENTS_FILE = "events.jsonl"
"""One JSON line per job-side event (start, stop, requeue), with wall-clock times."""

PORT_BASE, PORT_SPAN = 20000, 10000
# Below Linux's ephemeral range (32768+), so outgoing connections rarely hold the port.

REQUEUE_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1)
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}


# ---------------------------------------------------------------------------------------------
# The sbatch parameters and script


def tasks_per_node(slurm: Any) -> int:
    """One task per GPU; on CPU partitions ``tasks_per_node`` (default 1)."""
    return slurm.tasks_per_node or slurm.gpus_per_node or 1


def sbatch_parameters(config: Any) -> dict[str, Any]:
    """Keyword parameters of submitit's `SlurmExecutor` (and its sbatch builder) for a run."""
    slurm = config.slurm
    params: dict[str, Any] = {
        "job_name": config.wandb.name or Path(config.run_dir).name,
        "nodes": slurm.nodes,
        "ntasks_per_node": tasks_per_node(slurm),
        "cpus_per_task": slurm.cpus_per_task,
        "time": slurm.time_minutes,
        "signal_delay_s": slurm.signal_delay_s,
        "setup": list(slurm.setup) or None,
        # One rank failing must end the job rather than leave the others blocked in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        "wckey": None,  # submitit's default wckey is meaningless to most clusters
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(slurm, key) is not None:
            params[key] = getattr(slurm, key)
    if slurm.exclusive:
        params["exclusive"] = True
    additional: dict[str, Any] = {
        # submitit writes USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise; ours is USR2.
        "signal": f"USR2@{slurm.signal_delay_s}",
        "requeue": True,
    }
    for key, value in slurm.extra_sbatch.items():
        if value is False:
            additional.pop(key.replace("_", "-"), None)
            continue
        additional[key.replace("_", "-")] = value
    params["additional_parameters"] = additional
    return params


def submitit_command(folder: Path) -> str:
    """The command each task runs: submitit's job runner, loading the pickled `SlurmEntry`."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(config: Any) -> str:
    """The sbatch script `submit` would write, rendered by submitit's own builder."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(config.run_dir) / SUBMITIT_FOLDER
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **sbatch_parameters(config))


# ---------------------------------------------------------------------------------------------
# Submission


def resolve_config(config_path: str, overrides: list[str]) -> Any:
    """Load and validate the config; the run directory becomes absolute (jobs run elsewhere)."""
    from pipeline import config as config_module

    config = config_module.load(config_path, overrides)
    run_dir = Path(config.run_dir).expanduser().resolve()
    if str(run_dir) != config.run_dir:
        config = config.model_copy(update={"run_dir": str(run_dir)})
    return config


def _run_dir_slurm(run_dir: Path) -> Path:
    return Path(run_dir) / SUBMITIT_FOLDER


def submit(config: Any) -> dict[str, Any]:
    """Write the resolved config into the run directory and submit the job; returns job.json."""
    import submitit

    from launch.local import preflight, warn_if_config_changed
    from pipeline.trainer import write_resolved_config

    run_dir = Path(config.run_dir)
    folder = _run_dir_slurm(run_dir)
    previous = read_job(run_dir)
    if previous is not None:
        state = job_state(previous["job_id"]).get("JobState")
        if state in ACTIVE_STATES:
            raise UserError(
                f"{run_dir}: job {previous['job_id']} of this run is still {state}; "
                f"wait for it or stop it with `launch cancel {run_dir}`"
            )
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run `launch slurm` on a Slurm login node (or use --dry-run)")
    # The login node sees the shared file system the nodes see: check the shards here, before
    # the job waits in the queue only to fail.
    preflight(config, config.slurm.nodes * tasks_per_node(config.slurm))
    warn_if_config_changed(config)
    config_path = write_resolved_config(config)
    folder.mkdir(parents=True, exist_ok=True)

    # A new job starts a new requeue count (the count is also keyed by job id).
    (folder / REQUEUE_FILE).unlink(missing_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**sbatch_parameters(config))
    job = executor.submit(SlurmEntry(str(config_path)))
    tasks = config.slurm.nodes * tasks_per_node(config.slurm)
    info = {
        "job_id": job.job_id,
        "submitted_at": _now(),
        "nodes": config.slurm.nodes,
        "tasks": tasks,
        "sbatch_script": str(job.paths.submission_file),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
        "task_logs": str(folder / f"{job.job_id}_<task>_log.out"),
    }
    _write_json(folder / JOB_FILE, info)
    return info


def read_job(run_dir: Path) -> dict[str, Any] | None:
    path = _run_dir_slurm(Path(run_dir)) / JOB_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def wait(run_dir: Path, job_id: str, poll_s: float = 10.0, out=sys.stdout) -> int:
    """Follow a job until it ends (through requeues); its exit status, or 1 if it did not finish."""
    last_state, last_step = None, None
    unknown_since = None
    while True:
        info = job_state(job_id)
        state = info.get("JobState")
        if state is None:
            # Briefly unknown right after submission on a busy controller; gone for good later.
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > 60:
                print(f"job {job_id}: no longer known to Slurm", file=out, flush=True)
                return 1
        else:
            unknown_since = None
        if state != last_state and state is not None:
            extra = f" (requeued {info['Restarts']}x)" if info.get("Restarts", "0") != "0" else ""
            print(f"job {job_id}: {state}{extra}", file=out, flush=True)
            last_state = state
        progress = read_progress(run_dir)
        if progress.get("step") is not None and progress["step"] != last_step:
            last_step = progress["step"]
            print(f"  step {last_step}, {progress.get('images_seen')} images", file=out, flush=True)
        if state is not None and state not in ACTIVE_STATES:
            code = exit_status(info)
            if state == "COMPLETED":
                return code
            print(f"job {job_id} ended {state} (exit status {code}); logs: "
                  f"{_run_dir_slurm(run_dir)}/{job_id}_*_log.err", file=out, flush=True)
            return code or 1
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# Querying Slurm


def _slurm(args: list[str], check: bool = False) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check)
    except FileNotFoundError:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: not found")


def job_state(job_id: str) -> dict[str, str]:
    """Slurm's fields for a job (JobState, ExitCode, Restarts, NodeList, ...), {} if unknown.

    scontrol knows pending, running and recently finished jobs (MinJobAge); sacct, where the
    cluster keeps accounting, knows the rest.
    """
    result = _slurm(["scontrol", "show", "job", "-o", str(job_id)])
    if result.returncode == 0 and result.stdout.strip():
        fields: dict[str, str] = {}
        for token in result.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields
    result = _slurm(["sacct", "-X", "-n", "-P", "-o", "State,ExitCode,NodeList", "-j", str(job_id)])
    if result.returncode == 0 and result.stdout.strip():
        state, exit_code, nodes = (result.stdout.strip().splitlines()[-1].split("|") + ["", "", ""])[:3]
        return {"JobState": state.split()[0], "ExitCode": exit_code, "NodeList": nodes}
    return {}


def exit_status(info: dict[str, str]) -> int:
    """Slurm's ``ExitCode=code:signal`` as a shell exit status."""
    code, _, sig = info.get("ExitCode", "0:0").partition(":")
    try:
        return int(sig) + 128 if sig and int(sig) else int(code)
    except ValueError:
        return 1


# ---------------------------------------------------------------------------------------------
# The run directory's progress


def read_progress(run_dir: Path) -> dict[str, Any]:
    """Step, images seen and throughput from the last line of metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    with path.open() as lines:
        for line in lines:
            line = line.strip()
            if line:
                try:
                    last = json.loads(line)
                except json.JSONDecodeError:
                    pass  # a line being written
    return last


def cancel(run_dir: Path) -> str:
    """``scancel`` the run's current job: SIGTERM, the trainer saves and exits, no requeue."""
    job = read_job(Path(run_dir))
    if job is None:
        raise UserError(f"{run_dir}: no job submitted with `launch slurm` (no {SUBMITIT_FOLDER}/{JOB_FILE})")
    result = _slurm(["scancel", str(job["job_id"])])
    if result.returncode != 0:
        raise UserError(f"scancel {job['job_id']} failed: {result.stderr.strip() or result.stdout.strip()}")
    return job["job_id"]


# ---------------------------------------------------------------------------------------------
# Job side


def first_hostname(nodelist: str) -> str:
    """First host of a Slurm node list (``gpu[003-005],gpu010`` -> ``gpu003``), as scontrol says."""
    result = _slurm(["scontrol", "show", "hostnames", nodelist])
    if result.returncode == 0 and result.stdout.split():
        return result.stdout.split()[0]
    # Without scontrol on the compute node: expand the first group ourselves.
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)[0]


def rendezvous_port(job_id: str | int) -> int:
    """A port derived from the job id: the same for every task (and requeue) of one job,
    different for jobs that may share a node."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _tasks_on_node(tasks_per_node_text: str, node_index: int) -> int:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) -> tasks on the node with this index."""
    counts: list[int] = []
    for part in tasks_per_node_text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"unreadable SLURM_TASKS_PER_NODE {tasks_per_node_text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_index]


def distributed_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The torchrun-style variables of this task, from the Slurm environment."""
    job_id = environ["SLURM_JOB_ID"]
    world_size = int(environ["SLURM_NTASKS"])
    node_index = int(environ.get("SLURM_NODEID", 0))
    tasks_text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_world = _tasks_on_node(tasks_text, node_index) if tasks_text else world_size
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": first_hostname(environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": str(rendezvous_port(job_id)),
    }


@dataclass(frozen=True)
class SlurmEntry:
    """What every task of a `launch slurm` job runs (pickled by submitit, so module-level)."""

    config_path: str

    def __call__(self) -> int:
        # First: replace submitit's USR2 handler (requeue without a checkpoint) by the flag.
        preemption.install()
        os.environ.update(distributed_env())
        # Threads per process = the CPUs Slurm gave the task (before torch is imported).
        if "SLURM_CPUS_PER_TASK" in os.environ:
            os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        rank = int(os.environ["RANK"])
        job_id = os.environ["SLURM_JOB_ID"]
        run_dir = Path(self.config_path).parent
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if rank == 0:
            _event(run_dir, "start", job_id=job_id, restart=restarts,
                   nodes=os.environ.get("SLURM_JOB_NODELIST"), world_size=int(os.environ["WORLD_SIZE"]))

        from pipeline import config as config_module
        from pipeline import trainer

        try:
            config = config_module.load(self.config_path)
            code = trainer.run(config)
        except UserError as exc:
            # A user's mistake seen only on the nodes (a path, the data): one line, no requeue.
            from pipeline.errors import one_line

            print(f"error: [rank {rank}] {one_line(exc)}", file=sys.stderr, flush=True)
            if rank == 0:
                _event(run_dir, "end", job_id=job_id, exit_code=UserError.exit_code, error=one_line(exc))
            raise SystemExit(UserError.exit_code) from None
        if code != preemption.EXIT_PREEMPTED:
            if rank == 0:
                _event(run_dir, "end", job_id=job_id, exit_code=code)
            if code:
                raise SystemExit(code)
            return code

        self._after_stop(run_dir, job_id, rank, config.slurm.max_requeues)
        raise SystemExit(code)

    @staticmethod
    def _after_stop(run_dir: Path, job_id: str, rank: int, max_requeues: int) -> None:
        """After a signal-driven save: rank 0 requeues the job if the policy allows."""
        signum = preemption.received_signal()
        signame = signal.Signals(signum).name if signum else "another rank's signal"
        if rank != 0:
            print(f"rank {rank}: stopped by {signame}, checkpoint saved", flush=True)
            # The caller exits 75; non-zero ranks exit 0 instead so that srun's
            # --kill-on-bad-exit cannot stop rank 0 before it has requeued the job.
            raise SystemExit(0)
        _event(run_dir, "stopped", job_id=job_id, signal=signame)
        # None: the stop came from another rank's signal (Slurm signals every task alike).
        if signum is not None and signum not in REQUEUE_SIGNALS:
            print(f"stopped by {signame}: checkpoint saved, not requeued (a plain scancel or "
                  "Slurm's own preemption)", flush=True)
            return
        done = _read_requeues(run_dir, job_id)
        if done >= max_requeues:
            print(f"stopped by {signame}: checkpoint saved; not requeued, slurm.max_requeues="
                  f"{max_requeues} reached. Resubmit to continue.", flush=True)
            _event(run_dir, "not_requeued", job_id=job_id, requeues=done)
            return
        # Counted before the requeue: the requeued job may start before this process exits.
        _write_requeues(run_dir, job_id, done + 1)
        result = _slurm(["scontrol", "requeue", job_id])
        if result.returncode != 0:
            _write_requeues(run_dir, job_id, done)
            print(f"scontrol requeue {job_id} failed: {result.stderr.strip()}; resubmit to continue",
                  flush=True)
            return
        _event(run_dir, "requeued", job_id=job_id, requeues=done + 1)
        print(f"stopped by {signame}: checkpoint saved, job {job_id} requeued "
              f"({done + 1}/{max_requeues})", flush=True)


def _read_requeues(run_dir: Path, job_id: str) -> int:
    path = Path(run_dir) / SUBMITIT_FOLDER / REQUEUE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return int(data.get("requeues", 0)) if str(data.get("job_id")) == str(job_id) else 0


def _write_requeues(run_dir: Path, job_id: str, requeues: int) -> None:
    _write_json(Path(run_dir) / SUBMITIT_FOLDER / REQUEUE_FILE, {"job_id": job_id, "requeues": requeues})


def _event(run_dir: Path, event: str, **fields: Any) -> None:
    path = Path(run_dir) / SUBMITIT_FOLDER / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Command line (registered by launch/cli.py)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``slurm``, ``status`` (launch/status.py) and ``cancel`` subcommands."""
    slurm = subparsers.add_parser(
        "slurm",
        help="submit a training job to Slurm (multi-node, requeued on preemption)",
        description="Submit CONFIG as a Slurm job through submitit. Resources come from the "
        "config's slurm: section (override them like any key: slurm.nodes=4).",
    )
    slurm.add_argument("config", help="YAML config file")
    slurm.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides")
    slurm.add_argument("--dry-run", action="store_true",
                       help="print the sbatch script that would be submitted; submit nothing")
    slurm.add_argument("--wait", action="store_true",
                       help="follow the job (through requeues) and exit with its exit status")
    slurm.add_argument("--poll-s", type=float, default=10.0, help=argparse.SUPPRESS)
    slurm.set_defaults(func=_cmd_slurm)

    from launch import status  # `launch status` reads any run directory, Slurm or not

    status.add_command(subparsers)

    cancel_parser = subparsers.add_parser(
        "cancel", help="cancel a run's Slurm job (it saves a checkpoint first; not requeued)")
    cancel_parser.add_argument("run_dir")
    cancel_parser.set_defaults(func=_cmd_cancel)


def _cmd_slurm(args: argparse.Namespace) -> int:
    config = resolve_config(args.config, list(args.overrides))
    if args.dry_run:
        print(sbatch_script(config), end="")
        return 0
    info = submit(config)
    print(f"submitted job {info['job_id']}: {info['tasks']} task(s) on {info['nodes']} node(s)")
    print(f"  run dir: {config.run_dir}")
    print(f"  script:  {info['sbatch_script']}")
    print(f"  stdout:  {info['stdout']}")
    print(f"  stderr:  {info['stderr']}")
    print(f"  other tasks' logs: {info['task_logs']}")
    if not args.wait:
        return 0
    sys.stdout.flush()
    return wait(Path(config.run_dir), info["job_id"], poll_s=args.poll_s)


def _cmd_cancel(args: argparse.Namespace) -> int:
    job_id = cancel(Path(args.run_dir))
    print(f"cancelled job {job_id} (it saves a checkpoint before it stops; "
          f"`launch slurm` with the same config resumes)")
    return 0
