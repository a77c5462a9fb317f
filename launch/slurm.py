"""`launch slurm | cancel`: training jobs on a Slurm cluster through submitit. What Slurm says
about jobs and partitions is read in launch/slurm_queries.py, shared with `launch status`.

Launcher side: `submit` validates the config, checks the request against the partition (a job
the partition can never run is an error before anything is submitted), writes the resolved
config into the run directory and submits one sbatch job (submitit's `SlurmExecutor`, files in
``run_dir/slurm/``) with one task per GPU (or ``slurm.tasks_per_node`` tasks on CPU partitions),
``--signal=USR2@N`` and ``--requeue``. ``--dry-run`` prints the sbatch script, rendered by
submitit's own builder. After submitting, `first_look` (or `wait`, with ``--wait``) shows why the
job is pending; a job Slurm will never start (its reason, e.g. ``PartitionConfig``, confirmed
against the partition) is cancelled and reported as one line naming the config key to change.

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
- A hung rank (no training progress for ``distributed.hang_timeout_minutes``, see
  pipeline/watchdog.py): the process whose watchdog reports it requeues the job (same
  ``slurm.max_requeues`` count) before exiting with EXIT_HUNG, so the job resumes from its last
  checkpoint instead of burning its time limit in a dead collective.
- Anything else (an exception, a non-zero return) fails the job; srun's ``--kill-on-bad-exit``
  stops the other ranks, and nothing requeues it.
submitit installs its own USR2 handler (which would requeue from inside the handler, without a
checkpoint); `SlurmEntry` replaces it with the flag-only handler of `pipeline.preemption` as its
first action, and the trainer installs the same handler again.

This module is imported on every task before training starts: keep its top-level imports light.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from launch import slurm_queries as queries
from launch.slurm_queries import ACTIVE_STATES, JOB_FILE, SUBMITIT_FOLDER, exit_status, job_state, read_job
from pipeline import preemption, runlock
from pipeline.errors import UserError
from pipeline.rundir import RunDir

EVENTS_FILE = "events.jsonl"
"""One JSON line per job-side event (start, stop, requeue), with wall-clock times."""

PORT_BASE, PORT_SPAN = 20000, 10000
# Below Linux's ephemeral range (32768+), so outgoing connections rarely hold the port.

REQUEUE_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1)

FIRST_LOOK_TRIES, FIRST_LOOK_INTERVAL_S = 20, 0.5
"""Without ``--wait``: how often (and how far apart) `first_look` asks for a new job's reason
while Slurm has not given one yet (``Reason=None``, the job not yet looked at)."""


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


def request_of(config: Any) -> queries.Request:
    """What the run's job asks Slurm for."""
    return queries.Request.from_section(config.slurm.model_dump())


def submit(config: Any, check_partition: bool = True) -> dict[str, Any]:
    """Write the resolved config into the run directory and submit the job; returns job.json.

    First, unless `check_partition` is false, the request is checked against its partition
    (`slurm_queries.request_problem`): one the partition can never run is an error that submits
    nothing. So is a job sbatch refuses.
    """
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
    request = request_of(config)
    if check_partition:
        problem = queries.request_problem(request)
        if problem is not None:
            raise UserError(f"{problem}; nothing submitted")
    # The login node sees the shared file system the nodes see: check the shards here, before
    # the job waits in the queue only to fail.
    preflight(config, config.slurm.nodes * tasks_per_node(config.slurm))
    runlock.check_free(run_dir)  # a `launch local` or another cluster's job training into it
    warn_if_config_changed(config)
    config_path = write_resolved_config(config)
    folder.mkdir(parents=True, exist_ok=True)

    # A new job starts a new requeue count (the count is also keyed by job id).
    (folder / queries.REQUEUE_FILE).unlink(missing_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**sbatch_parameters(config))
    try:
        # submitit prints sbatch's error lines before raising them: one line is enough.
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(SlurmEntry(str(config_path)))
    except submitit.core.utils.FailedJobError as exc:
        raise UserError(queries.sbatch_refusal(str(exc), request)) from None
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
    queries.write_json(folder / JOB_FILE, info)
    return info


# ---------------------------------------------------------------------------------------------
# Following a submitted job


def describe(job_id: str, info: dict[str, str]) -> tuple[str, queries.Reason | None]:
    """``job N: STATE`` (with the requeue count and, while pending, the reason in words), and the
    pending reason."""
    state = info.get("JobState", "unknown to Slurm")
    extra = f" (requeued {info['Restarts']}x)" if info.get("Restarts", "0") != "0" else ""
    reason = queries.explain_reason(info.get("Reason"), job_id) if state == "PENDING" else None
    why = f": {reason}" if reason is not None else ""
    return f"job {job_id}: {state}{extra}{why}", reason


def give_up(run_dir: Path, job_id: str, reason: queries.Reason, problem: str) -> UserError:
    """Cancel a job Slurm will never start; the one-line error that says so and what to change."""
    result = queries.run(["scancel", str(job_id)])
    if result.returncode == 0:
        done = f"cancelled job {job_id}"
    else:
        done = f"cancelling it failed ({(result.stderr or result.stdout).strip()}): run `scancel {job_id}`"
    message = f"job {job_id} can never start (Slurm: {reason.code}): {problem}; {done}"
    job = read_job(run_dir)
    if job is not None and str(job.get("job_id")) == str(job_id):
        queries.write_json(_run_dir_slurm(run_dir) / JOB_FILE,
                           {**job, "never_starts": {"reason": reason.code, "problem": problem}})
    _event(run_dir, "never_starts", job_id=job_id, reason=reason.code, problem=problem,
           cancelled=result.returncode == 0)
    return UserError(message)


def _check_pending(run_dir: Path, job_id: str, info: dict[str, str], reason: queries.Reason | None,
                   request: queries.Request | None) -> None:
    if reason is not None and (reason.never or reason.maybe_never):
        problem = queries.never_starts(info, reason, request)
        if problem is not None:
            raise give_up(run_dir, job_id, reason, problem)


def first_look(run_dir: Path, job_id: str, request: queries.Request | None = None,
               out: TextIO = sys.stdout) -> None:
    """Right after submitting, without ``--wait``: show the job's state and why it is pending;
    a job Slurm will never start is cancelled and raised as a `UserError`.

    Slurm gives a reason when it first looks at a job (limits at submission, the rest at the next
    scheduling pass): ask at most FIRST_LOOK_TRIES times while it has given none.
    """
    request = request or queries.request_of_run(run_dir)
    for attempt in range(FIRST_LOOK_TRIES):
        info = job_state(job_id)
        line, reason = describe(job_id, info)
        if info.get("JobState") not in (None, "PENDING") or reason is not None:
            break
        if attempt + 1 < FIRST_LOOK_TRIES:
            time.sleep(FIRST_LOOK_INTERVAL_S)
    else:
        later = f"`launch status {run_dir}` shows it later"
        line = (f"job {job_id}: not known to Slurm yet ({later})" if info.get("JobState") is None else
                f"{line} (Slurm has not given a reason yet; {later})")
    print(line, file=out, flush=True)
    _check_pending(run_dir, job_id, info, reason, request)


def wait(run_dir: Path, job_id: str, poll_s: float = 10.0, out: TextIO = sys.stdout,
         request: queries.Request | None = None) -> int:
    """Follow a job until it ends (through requeues), saying why it is pending; its exit status,
    or 1 if it did not finish. A job Slurm will never start is cancelled and raised as a
    `UserError`."""
    request = request or queries.request_of_run(run_dir)
    last_line, last_step = None, None
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
            line, reason = describe(job_id, info)
            if line != last_line:
                print(line, file=out, flush=True)
                last_line = line
            _check_pending(run_dir, job_id, info, reason, request)
        progress = read_progress(run_dir)
        if progress.get("step") is not None and progress["step"] != last_step:
            last_step = progress["step"]
            print(f"  step {last_step}, {progress.get('images_seen')} images", file=out, flush=True)
        if state is not None and state not in ACTIVE_STATES:
            code = exit_status(info)
            if state == "COMPLETED":
                return code
            ended = queries.ended_status_text(info)  # "" if cancelled before it ran: still exits 1
            print(f"job {job_id} ended {state}{f' ({ended})' if ended else ''}; logs: "
                  f"{_run_dir_slurm(run_dir)}/{job_id}_*_log.err", file=out, flush=True)
            return code or 1
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# The run directory's progress


def read_progress(run_dir: Path) -> dict[str, Any]:
    """Step, images seen and throughput from the last record of metrics.jsonl."""
    records = RunDir(run_dir).metrics()
    return records[-1] if records else {}


def cancel(run_dir: Path) -> str:
    """``scancel`` the run's current job: SIGTERM, the trainer saves and exits, no requeue."""
    job = read_job(Path(run_dir))
    if job is None:
        raise UserError(f"{run_dir}: no job submitted with `launch slurm` (no {SUBMITIT_FOLDER}/{JOB_FILE})")
    result = queries.run(["scancel", str(job["job_id"])])
    if result.returncode != 0:
        raise UserError(f"scancel {job['job_id']} failed: {result.stderr.strip() or result.stdout.strip()}")
    return job["job_id"]


# ---------------------------------------------------------------------------------------------
# Job side


def first_hostname(nodelist: str) -> str:
    """First host of a Slurm node list (``gpu[003-005],gpu010`` -> ``gpu003``), as scontrol says."""
    return queries.hostnames(nodelist)[0]


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

    def __call__(self) -> NoReturn:
        """Train, then end this task's process with its exit status (`pipeline.distributed.leave`)."""
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
        from pipeline import trainer, watchdog
        from pipeline.distributed import leave

        try:
            config = config_module.load(self.config_path)
            max_requeues = config.slurm.max_requeues
            watchdog.on_hang(lambda report: self._requeue_after_hang(run_dir, job_id, max_requeues, report))
            code = trainer.run(config)
        except UserError as exc:
            # A user's mistake seen only on the nodes (a path, the data): one line, no requeue.
            from pipeline.errors import one_line

            print(f"error: [rank {rank}] {one_line(exc)}", file=sys.stderr, flush=True)
            if rank == 0:
                _event(run_dir, "end", job_id=job_id, exit_code=UserError.exit_code, error=one_line(exc))
            leave(UserError.exit_code)
        if code != preemption.EXIT_PREEMPTED:
            if rank == 0:
                _event(run_dir, "end", job_id=job_id, exit_code=code)
            leave(code)
        # The caller exits 75; non-zero ranks exit 0 instead so that srun's --kill-on-bad-exit
        # cannot stop rank 0 before it has requeued the job.
        self._after_stop(run_dir, job_id, rank, config.slurm.max_requeues)
        leave(code if rank == 0 else 0)

    @staticmethod
    def _after_stop(run_dir: Path, job_id: str, rank: int, max_requeues: int) -> None:
        """After a signal-driven save: rank 0 requeues the job if the policy allows."""
        signum = preemption.received_signal()
        signame = signal.Signals(signum).name if signum else "another rank's signal"
        if rank != 0:
            print(f"rank {rank}: stopped by {signame}, checkpoint saved", flush=True)
            return
        _event(run_dir, "stopped", job_id=job_id, signal=signame)
        # None: the stop came from another rank's signal (Slurm signals every task alike).
        if signum is not None and signum not in REQUEUE_SIGNALS:
            print(f"stopped by {signame}: checkpoint saved, not requeued (a plain scancel or "
                  "Slurm's own preemption)", flush=True)
            return
        done = queries.read_requeues(run_dir, job_id)
        if done >= max_requeues:
            print(f"stopped by {signame}: checkpoint saved; not requeued, slurm.max_requeues="
                  f"{max_requeues} reached. Resubmit to continue.", flush=True)
            _event(run_dir, "not_requeued", job_id=job_id, requeues=done)
            return
        # Counted before the requeue: the requeued job may start before this process exits.
        queries.write_requeues(run_dir, job_id, done + 1)
        result = queries.run(["scontrol", "requeue", job_id])
        if result.returncode != 0:
            queries.write_requeues(run_dir, job_id, done)
            print(f"scontrol requeue {job_id} failed: {result.stderr.strip()}; resubmit to continue",
                  flush=True)
            return
        _event(run_dir, "requeued", job_id=job_id, requeues=done + 1)
        print(f"stopped by {signame}: checkpoint saved, job {job_id} requeued "
              f"({done + 1}/{max_requeues})", flush=True)


    @staticmethod
    def _requeue_after_hang(run_dir: Path, job_id: str, max_requeues: int, report: dict) -> None:
        """In the process that reported a hung rank, before it exits: requeue the job (it resumes
        from its last checkpoint) unless it was requeued ``max_requeues`` times already."""
        _event(run_dir, "hung", job_id=job_id, **{k: report[k] for k in ("rank", "host", "step")})
        done = queries.read_requeues(run_dir, job_id)
        if done >= max_requeues:
            print(f"hung rank: not requeued, slurm.max_requeues={max_requeues} reached. Resubmit to continue.",
                  flush=True)
            _event(run_dir, "not_requeued", job_id=job_id, requeues=done)
            return
        queries.write_requeues(run_dir, job_id, done + 1)
        result = queries.run(["scontrol", "requeue", job_id])
        if result.returncode != 0:
            queries.write_requeues(run_dir, job_id, done)
            print(f"scontrol requeue {job_id} failed: {result.stderr.strip()}; resubmit to continue", flush=True)
            return
        _event(run_dir, "requeued", job_id=job_id, requeues=done + 1)
        print(f"hung rank: job {job_id} requeued ({done + 1}/{max_requeues})", flush=True)


def _event(run_dir: Path, event: str, **fields: Any) -> None:
    path = Path(run_dir) / SUBMITIT_FOLDER / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Command line (registered by launch/cli.py)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``slurm`` and ``cancel`` subcommands."""
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
                       help="follow the job (through requeues, showing why it is pending) and exit "
                       "with its exit status")
    slurm.add_argument("--no-partition-check", dest="partition_check", action="store_false",
                       help="submit without first checking the request against the partition's "
                       "limits and nodes (sinfo, scontrol); Slurm's own verdict still counts")
    slurm.add_argument("--poll-s", type=float, default=10.0, help=argparse.SUPPRESS)
    slurm.set_defaults(func=_cmd_slurm)

    cancel_parser = subparsers.add_parser(
        "cancel", help="cancel a run's Slurm job (it saves a checkpoint first; not requeued)")
    cancel_parser.add_argument("run_dir")
    cancel_parser.set_defaults(func=_cmd_cancel)


def _cmd_slurm(args: argparse.Namespace) -> int:
    config = resolve_config(args.config, list(args.overrides))
    if args.dry_run:
        print(sbatch_script(config), end="")
        return 0
    info = submit(config, check_partition=args.partition_check)
    print(f"submitted job {info['job_id']}: {info['tasks']} task(s) on {info['nodes']} node(s)")
    print(f"  run dir: {config.run_dir}")
    print(f"  script:  {info['sbatch_script']}")
    print(f"  stdout:  {info['stdout']}")
    print(f"  stderr:  {info['stderr']}")
    print(f"  other tasks' logs: {info['task_logs']}", flush=True)
    if not args.wait:
        first_look(Path(config.run_dir), info["job_id"], request_of(config))
        return 0
    return wait(Path(config.run_dir), info["job_id"], poll_s=args.poll_s, request=request_of(config))


def _cmd_cancel(args: argparse.Namespace) -> int:
    job_id = cancel(Path(args.run_dir))
    print(f"cancelled job {job_id} (it saves a checkpoint before it stops; "
          f"`launch slurm` with the same config resumes)")
    return 0
