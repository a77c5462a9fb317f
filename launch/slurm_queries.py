"""What Slurm says about a run's job and partition, and what that means for the run.

Every question `launch` asks Slurm goes through here (``scontrol show job|partition``, ``sacct``
where the cluster keeps accounting, ``sinfo`` for the nodes of a partition), with the parsing of
the answers, so that `launch slurm` (launch/slurm.py) and `launch status` (launch/status.py) read
a job the same way and neither imports the other. Also here:

- a pending job's reason (squeue's ``%r``, scontrol's ``Reason=``) in words, and whether Slurm can
  ever start the job as submitted (`explain_reason`, `never_starts`);
- a run's request (its config's ``slurm:`` section) checked against a partition
  (`partition_problem`): the check `launch slurm` makes before it submits, and the diagnosis of a
  job Slurm will never start, both naming the config key to change;
- the run directory's record of its job (``slurm/job.json``, ``slurm/requeues.json``).

Imported on every task of a job (launch/slurm.py is): standard library only at the top level.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write

SUBMITIT_FOLDER = "slurm"
"""Submitit's folder (sbatch script, pickles, per-task logs) inside the run directory."""
JOB_FILE = "job.json"
"""The run's current job (id, log paths), written at submission; read by status and cancel."""
REQUEUE_FILE = "requeues.json"
"""How many times rank 0 requeued the current job."""

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}


# ---------------------------------------------------------------------------------------------
# Calling Slurm


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """A Slurm command's answer; a missing command or a hung controller is a failed answer."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"{args[0]}: no answer within {timeout:.0f} s")


_KEY = re.compile(r"[A-Za-z][\w:/.-]*=")


def parse_record(text: str) -> dict[str, str]:
    """One record of ``scontrol -o show job|partition|node``: ``Key=Value`` tokens.

    A token without ``=`` continues the previous value (``OS=Linux 6.1 #1 SMP``); the first of a
    repeated key wins.
    """
    fields: dict[str, str] = {}
    key = None
    for token in text.split():
        if _KEY.match(token):
            name, _, value = token.partition("=")
            key = name if name not in fields else None
            if key is not None:
                fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


def job_state(job_id: str) -> dict[str, str]:
    """Slurm's fields for a job (JobState, Reason, ExitCode, Restarts, NodeList, Partition, ...),
    {} if unknown.

    scontrol knows pending, running and recently finished jobs (MinJobAge); sacct, where the
    cluster keeps accounting, knows the rest.
    """
    result = run(["scontrol", "show", "job", "-o", str(job_id)])
    if result.returncode == 0 and result.stdout.strip():
        return parse_record(result.stdout.strip().splitlines()[0])
    result = run(["sacct", "-X", "-n", "-P", "-o", "State,ExitCode,NodeList", "-j", str(job_id)])
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


def ended_status_text(info: dict[str, str]) -> str:
    """``exit status N`` for a job that has ended, "" for one cancelled before it ran (Slurm says
    ExitCode 0:0 then: nothing exited, so there is no status to show)."""
    code = exit_status(info)
    return "" if code == 0 and info.get("JobState") == "CANCELLED" else f"exit status {code}"


def hostnames(nodelist: str) -> list[str]:
    """A Slurm node list expanded (``gpu[003-004],x`` -> gpu003 gpu004 x), as scontrol says."""
    result = run(["scontrol", "show", "hostnames", nodelist])
    if result.returncode == 0 and result.stdout.split():
        return result.stdout.split()
    # Without scontrol (a compute node without the client tools): expand it ourselves.
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)


# ---------------------------------------------------------------------------------------------
# Why a pending job waits


@dataclass(frozen=True)
class Reason:
    """A pending job's reason: Slurm's code, what follows it, what it means."""

    code: str
    """Slurm's reason code, e.g. ``PartitionConfig``."""
    detail: str
    """What Slurm adds after the code, e.g. ``UnavailableNodes:n[3-4]``; often empty."""
    meaning: str
    """The code in words."""
    never: bool
    """Slurm never starts a job held back by this code unless the job changes (the request, or
    the account or QOS it names)."""
    maybe_never: bool = False
    """Never, or only until something outside the job changes (a node comes back): `never_starts`
    looks at the cluster to tell which."""

    def __str__(self) -> str:
        detail = f" [{self.detail}]" if self.detail else ""
        return f"{self.code}{detail}: {self.meaning}"


# Reasons that hold a job back until the request changes (Slurm's job_reason_codes page).
NEVER_REASONS = {
    "PartitionConfig": "the request breaks a limit of its partition",
    "PartitionTimeLimit": "its time limit exceeds its partition's",
    "BadConstraints": "no node can ever satisfy its requirements",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QOS is not valid",
    "AccountNotAllowed": "its partition does not allow its account",
    "QOSNotAllowed": "its QOS is not allowed by its account or partition",
    "MaxMemPerLimit": "its memory request exceeds the limit per CPU or per node",
    "DependencyNeverSatisfied": "it depends on a job that will never end as required",
    "ReservationDeleted": "its reservation no longer exists",
    "DeadLine": "it cannot end before its deadline",
}
# Reasons that either mean never or pass once something outside the job changes.
MAYBE_NEVER_REASONS = {
    "PartitionNodeLimit": "it asks for more or fewer nodes than its partition allows, or some of "
                          "the partition's nodes are down or drained",
    "ReqNodeNotAvail": "a node it asks for is busy, reserved, down, drained or unknown",
}
# Reasons a job waits out.
WAIT_REASONS = {
    "Resources": "the nodes it needs are busy with other jobs",
    "Priority": "jobs of higher priority are queued ahead of it",
    "BeginTime": "its start time has not come yet (a requeued job waits about two minutes)",
    "Dependency": "it waits for another job to end",
    "JobHeldUser": "held; `scontrol release {job}` lets it start",
    "JobHeldAdmin": "held by an administrator",
    "JobHoldMaxRequeue": "held after too many requeues; `scontrol release {job}` lets it start",
    "Reservation": "it waits for its reservation to begin",
    "Licenses": "it waits for a license",
    "NodeDown": "a node it needs is down",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "Constraints": "no node with the features it asks for is free now",
    "Cleaning": "its previous run (before a requeue) is still being cleaned up",
    "Prolog": "its prolog is running",
    "SchedDefer": "the scheduler defers immediate allocations",
    "FedJobLock": "the clusters of the federation are agreeing on it",
    "JobArrayTaskLimit": "its array already runs as many tasks as allowed",
    "QOSUsageThreshold": "its QOS's usage threshold is breached",
    "AccountingPolicy": "an accounting limit (account, user or QOS) holds it back",
    "AssociationJobLimit": "its account has reached its job count limit",
    "AssociationResourceLimit": "its account has reached a resource limit",
    "AssociationTimeLimit": "its account has reached its time limit",
    "QOSJobLimit": "its QOS has reached its job count limit",
    "QOSResourceLimit": "its QOS has reached a resource limit",
    "QOSTimeLimit": "its QOS has reached its time limit",
    "JobLaunchFailure": "its last launch failed (a file system or the program); see its logs",
    "SystemFailure": "a failure of Slurm, a file system or the network",
    "BurstBufferResources": "it waits for burst buffer space",
    "BurstBufferStageIn": "its burst buffer is being staged in",
    "BurstBufferOperation": "a burst buffer operation failed",
}
_OWNER = {"QOS": "its QOS", "Assoc": "its account (association)"}


def parse_reason(text: str | None) -> tuple[str, str]:
    """``ReqNodeNotAvail,_UnavailableNodes:n3`` (scontrol) or ``(ReqNodeNotAvail, UnavailableNodes:n3)``
    (squeue) -> (code, detail)."""
    text = (text or "").strip().strip("()")
    code, _, detail = text.partition(",")
    return code.strip(), detail.strip(" _")


def explain_reason(text: str | None, job_id: str = "JOBID") -> Reason | None:
    """A pending job's reason in words; None while Slurm has not given one yet (``None``)."""
    code, detail = parse_reason(text)
    if code in ("", "None", "(null)"):
        return None
    if code in NEVER_REASONS:
        return Reason(code, detail, NEVER_REASONS[code], never=True)
    if code in MAYBE_NEVER_REASONS:
        return Reason(code, detail, MAYBE_NEVER_REASONS[code], never=False, maybe_never=True)
    if code in WAIT_REASONS:
        return Reason(code, detail, WAIT_REASONS[code].format(job=job_id), never=False)
    family = re.fullmatch(r"(QOS|Assoc)(Max|Min|Grp)(\w+)", code)
    if family:
        owner, kind, rest = family.groups()
        if kind == "Grp":
            return Reason(code, detail, f"the running jobs of {_OWNER[owner]} use up an aggregate "
                                        f"limit ({rest}); it starts when they end", never=False)
        if kind == "Min":
            return Reason(code, detail, f"the request is below a per-job minimum of {_OWNER[owner]} "
                                        f"({rest})", never=True)
        if re.search(r"PerJob|PerNode|WallDuration", rest):
            return Reason(code, detail, f"the request exceeds a per-job limit of {_OWNER[owner]} "
                                        f"({rest})", never=True)
        # Per user, per account or a job count: the owner's other jobs use the limit up.
        return Reason(code, detail, f"your other jobs use up a limit of {_OWNER[owner]} ({rest}); "
                                    "it starts when they end", never=False)
    if re.fullmatch(r"Max\w+PerAccount", code):
        return Reason(code, detail, "the account's other jobs use up a per-account limit of its "
                                    "QOS; it starts when they end", never=False)
    return Reason(code, detail, "Slurm's reason (see `man squeue`, JOB REASON CODES)", never=False)


# ---------------------------------------------------------------------------------------------
# A run's request and a partition


@dataclass(frozen=True)
class Request:
    """What a run's job asks Slurm for, from its config's ``slurm:`` section."""

    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem: str | None = None
    time_minutes: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodelist: str | None = None
    """``slurm.extra_sbatch``'s ``nodelist``, if any."""

    @classmethod
    def from_section(cls, slurm: Mapping[str, Any]) -> Request:
        """From the ``slurm:`` section as a mapping (``config.slurm.model_dump()``, or the YAML)."""
        extra = slurm.get("extra_sbatch") or {}
        nodelist = extra.get("nodelist", extra.get("w"))
        return cls(
            nodes=int(slurm.get("nodes") or 1),
            # One task per GPU, or tasks_per_node on CPU partitions (as launch/slurm.py submits).
            tasks_per_node=int(slurm.get("tasks_per_node") or slurm.get("gpus_per_node") or 1),
            cpus_per_task=int(slurm.get("cpus_per_task") or 1),
            gpus_per_node=int(slurm.get("gpus_per_node") or 0),
            mem=None if slurm.get("mem") is None else str(slurm["mem"]),
            time_minutes=None if slurm.get("time_minutes") is None else int(slurm["time_minutes"]),
            partition=slurm.get("partition"),
            account=slurm.get("account"),
            qos=slurm.get("qos"),
            constraint=slurm.get("constraint"),
            nodelist=None if nodelist in (None, False) else str(nodelist),
        )

    @property
    def cpus_per_node(self) -> int:
        return self.tasks_per_node * self.cpus_per_task


def request_of_run(run_dir: Path) -> Request | None:
    """The request of the run's resolved config (``RUN_DIR/config.yaml``), None without one."""
    import yaml

    try:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        return Request.from_section(config.get("slurm") or {})
    except (OSError, AttributeError, TypeError, ValueError, yaml.YAMLError):
        return None


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of a partition alike in what a job can ask for (one ``sinfo --exact`` line)."""

    count: int
    cpus: int
    memory_mb: int
    features: frozenset[str]
    gpus: int
    names: str


@dataclass(frozen=True)
class Partition:
    """A partition's limits (``scontrol show partition``) and nodes (``sinfo``)."""

    name: str
    fields: dict[str, str]
    groups: tuple[NodeGroup, ...] = ()

    def _limit(self, key: str) -> int | None:
        value = self.fields.get(key, "UNLIMITED")
        return int(value) if value.isdigit() else None

    @property
    def max_nodes(self) -> int | None:
        return self._limit("MaxNodes")

    @property
    def min_nodes(self) -> int:
        return self._limit("MinNodes") or 0

    @property
    def total_nodes(self) -> int | None:
        return self._limit("TotalNodes")

    @property
    def max_cpus_per_node(self) -> int | None:
        return self._limit("MaxCPUsPerNode")

    @property
    def max_mem_per_node_mb(self) -> int | None:
        return self._limit("MaxMemPerNode")

    @property
    def max_time_minutes(self) -> float | None:
        return parse_time_minutes(self.fields.get("MaxTime", "UNLIMITED"))


def parse_time_minutes(text: str) -> float | None:
    """A Slurm time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in minutes; None for
    ``UNLIMITED``/``INFINITE``/``NONE`` or anything unreadable."""
    text = text.strip()
    days = 0
    if "-" in text:
        day_text, _, text = text.partition("-")
        if not day_text.isdigit():
            return None
        days = int(day_text)
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            return None
        hours, minutes, seconds = (list(map(int, parts)) + [0, 0])[:3]
    else:
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            return None
        numbers = list(map(int, parts))
        if len(numbers) == 1:
            hours, minutes, seconds = 0, numbers[0], 0
        elif len(numbers) == 2:
            hours, (minutes, seconds) = 0, numbers
        else:
            hours, minutes, seconds = numbers
    return days * 1440 + hours * 60 + minutes + seconds / 60


def parse_gpus(gres: str) -> int:
    """GPUs in a node's ``Gres`` (``gpu:a100:4(S:0-1),gpu:v100:2`` -> 6, ``(null)`` -> 0)."""
    gres = re.sub(r"\([^)]*\)", "", gres or "")
    total = 0
    for item in gres.split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def parse_mem_mb(text: str | None) -> float | None:
    """sbatch's ``--mem`` (``480G``, ``4000``, ``1T``, default unit M) in MB; None if unreadable."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text or ""), re.IGNORECASE)
    if match is None:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2).upper()]
    return float(match.group(1)) * scale


SINFO_FORMAT = "%D|%c|%m|%f|%G|%N"


def parse_node_groups(text: str) -> tuple[NodeGroup, ...]:
    """``sinfo --exact -h -o '%D|%c|%m|%f|%G|%N'`` lines -> node groups (unreadable lines skipped)."""
    groups = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        count, cpus, memory, features, gres, names = parts
        try:
            groups.append(NodeGroup(
                count=int(count), cpus=int(cpus.rstrip("+")), memory_mb=int(memory.rstrip("+")),
                features=frozenset(f for f in features.split(",") if f and f != "(null)"),
                gpus=parse_gpus(gres), names=names,
            ))
        except ValueError:
            continue
    return tuple(groups)


def partitions() -> dict[str, dict[str, str]] | None:
    """Every partition's ``scontrol show partition`` fields by name, hidden ones too; None when
    Slurm cannot be asked."""
    result = run(["scontrol", "-a", "-o", "show", "partition"])
    if result.returncode != 0:
        return None
    records = [parse_record(line) for line in result.stdout.splitlines() if line.strip()]
    return {r["PartitionName"]: r for r in records if "PartitionName" in r}


def default_partition(records: Mapping[str, Mapping[str, str]]) -> str | None:
    """The partition sbatch uses when none is asked for (``SBATCH_PARTITION``, else Default=YES)."""
    if os.environ.get("SBATCH_PARTITION"):
        return os.environ["SBATCH_PARTITION"]
    return next((name for name, r in records.items() if r.get("Default") == "YES"), None)


def partition(name: str, records: Mapping[str, dict[str, str]]) -> Partition:
    """A partition with its node groups (``sinfo``)."""
    result = run(["sinfo", "--exact", "-h", "-p", name, "-o", SINFO_FORMAT])
    groups = parse_node_groups(result.stdout) if result.returncode == 0 else ()
    return Partition(name, dict(records[name]), groups)


# ---------------------------------------------------------------------------------------------
# The request against a partition


def _plural(count: float, word: str) -> str:
    return f"{count:g} {word}" if count == 1 or word == "MB" else f"{count:g} {word}s"


def _minutes(value: float) -> str:
    return f"{value:g} minutes" if value < 120 else f"{value / 60:g} hours"


def _features(constraint: str) -> tuple[frozenset[str], str] | None:
    """A constraint of plain features joined by ``&`` (all) or ``|`` (any); None for the rest
    (counts, brackets, mixtures), which only Slurm judges."""
    if re.fullmatch(r"[\w.-]+(&[\w.-]+)*", constraint):
        return frozenset(constraint.split("&")), "all"
    if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", constraint):
        return frozenset(constraint.split("|")), "any"
    return None


def _narrow(groups: list[NodeGroup], amount, need: float, setting: str, unit: str, name: str,
            nodes: int) -> tuple[str | None, list[NodeGroup]]:
    """The node groups with at least `need` of a resource, or why too few nodes have it."""
    most = max(amount(g) for g in groups)
    if most < need:
        return f"{setting} but the largest node of partition {name} has {_plural(most, unit)}", groups
    fitting = [g for g in groups if amount(g) >= need]
    count = sum(g.count for g in fitting)
    if count < nodes:
        return (f"{setting} on each of slurm.nodes={nodes} nodes but partition {name} has "
                f"{_plural(count, 'node')} with that many {unit if unit == 'MB' else unit + 's'}"), fitting
    return None, fitting


def _limits_problem(request: Request, part: Partition) -> str | None:
    """The request against the partition's own limits (time, node counts)."""
    name = part.name
    if request.time_minutes is not None and part.max_time_minutes is not None \
            and request.time_minutes > part.max_time_minutes:
        return (f"slurm.time_minutes={request.time_minutes} but partition {name} allows at most "
                f"{_minutes(part.max_time_minutes)} (MaxTime={part.fields.get('MaxTime')})")
    if part.max_nodes is not None and request.nodes > part.max_nodes:
        return (f"slurm.nodes={request.nodes} but partition {name} allows at most "
                f"{_plural(part.max_nodes, 'node')} per job")
    if request.nodes < part.min_nodes:
        return (f"slurm.nodes={request.nodes} but partition {name} needs at least "
                f"{_plural(part.min_nodes, 'node')} per job")
    if part.total_nodes is not None and request.nodes > part.total_nodes:
        return f"slurm.nodes={request.nodes} but partition {name} has {_plural(part.total_nodes, 'node')}"
    if part.max_mem_per_node_mb is not None and (parse_mem_mb(request.mem) or 0) > part.max_mem_per_node_mb:
        return (f"slurm.mem={request.mem} but partition {name} allows at most "
                f"{part.max_mem_per_node_mb} MB per node (MaxMemPerNode)")
    return None


def _nodes_problem(request: Request, part: Partition) -> str | None:
    """The request against the partition's nodes: named nodes, features, CPUs, GPUs, memory."""
    name, groups = part.name, list(part.groups)
    if request.nodelist:
        known = {n for g in groups for n in hostnames(g.names)}
        missing = [n for n in hostnames(request.nodelist) if n not in known]
        if missing:
            return (f"slurm.extra_sbatch nodelist={request.nodelist}: partition {name} has no node "
                    f"{', '.join(missing)} (its nodes: {','.join(g.names for g in groups)})")
    wanted = _features(request.constraint) if request.constraint else None
    if wanted is not None:
        features, how = wanted
        groups = [g for g in groups if (features <= g.features if how == "all" else features & g.features)]
        found = sum(g.count for g in groups)
        if found < request.nodes:
            have = ", ".join(sorted({f for g in part.groups for f in g.features})) or "none"
            which = ("this feature" if len(features) == 1 else
                     "these features" if how == "all" else "one of these features")
            if not found:
                return (f"slurm.constraint={request.constraint}: no node of partition {name} has "
                        f"{which} (features there: {have})")
            return (f"slurm.constraint={request.constraint}: {_plural(found, 'node')} of partition "
                    f"{name} {'has' if found == 1 else 'have'} {which}, slurm.nodes={request.nodes}")
    cap = part.max_cpus_per_node
    if cap is not None and cap < request.cpus_per_node:
        return (f"{_cpus_setting(request)} but partition {name} lets a job use at most "
                f"{_plural(cap, 'CPU')} per node (MaxCPUsPerNode)")
    checks = [(lambda g: g.cpus, request.cpus_per_node, _cpus_setting(request), "CPU")]
    if request.gpus_per_node:
        checks.append((lambda g: g.gpus, request.gpus_per_node, f"slurm.gpus_per_node={request.gpus_per_node}", "GPU"))
    mem_mb = parse_mem_mb(request.mem)
    if mem_mb:  # 0 means all of each node's memory
        checks.append((lambda g: g.memory_mb, mem_mb, f"slurm.mem={request.mem}", "MB"))
    for amount, need, setting, unit in checks:
        problem, groups = _narrow(groups, amount, need, setting, unit, name, request.nodes)
        if problem:
            return problem
    return None


def _cpus_setting(request: Request) -> str:
    if request.tasks_per_node == 1:
        return f"slurm.cpus_per_task={request.cpus_per_task}"
    return (f"slurm.tasks_per_node={request.tasks_per_node} x slurm.cpus_per_task={request.cpus_per_task} "
            f"= {request.cpus_per_node} CPUs per node")


def partition_problem(request: Request, part: Partition) -> str | None:
    """Why the partition can never run the request, naming the config key; None when it can as
    far as its limits and nodes tell (nodes not known: limits only)."""
    return _limits_problem(request, part) or (_nodes_problem(request, part) if part.groups else None)


def request_problem(request: Request) -> str | None:
    """Why no partition the request names can ever run it, naming the config key; None when one
    can, or when Slurm cannot be asked (then sbatch and the scheduler judge)."""
    records = partitions()
    if records is None:
        return None
    if request.partition:
        names, source = [p.strip() for p in request.partition.split(",") if p.strip()], "slurm.partition"
    else:
        default = default_partition(records)
        if default is None:
            return None
        names = [default]
        source = "SBATCH_PARTITION" if os.environ.get("SBATCH_PARTITION") else None
    problems = []
    for name in names:
        if name not in records:
            where = f"{source}={name}" if source else f"partition {name}"
            problems.append(f"{where}: no such partition (partitions here: {', '.join(sorted(records)) or 'none'})")
            continue
        problem = partition_problem(request, partition(name, records))
        if problem is None:
            return None
        problems.append(problem)
    return "; ".join(problems) or None


def sbatch_refusal(stderr: str, request: Request) -> str:
    """sbatch's error lines -> one line: what sbatch said and which config key to look at."""
    lines = [line.strip().removeprefix("sbatch: error: ").strip() for line in stderr.splitlines() if line.strip()]
    failed = [line.partition("Batch job submission failed:")[2].strip() for line in lines
              if "Batch job submission failed:" in line]
    said = failed[-1] if failed else (lines[-1] if lines else "no message")
    details = [line for line in lines if "Batch job submission failed:" not in line
               and not line.startswith("Ignoring")]
    if details and said.rstrip(".").lower() not in details[0].lower():
        said += f" ({details[0]})"
    hint = next((hint for pattern, hint in [
        (r"feature", f"check slurm.constraint={request.constraint}"),
        (r"node name", "check the node names in slurm.extra_sbatch"),
        (r"gres|generic resource", "check slurm.gpus_per_node and any gres in slurm.extra_sbatch"),
        (r"memory", f"check slurm.mem={request.mem}"),
        (r"account", f"check slurm.account={request.account}"),
        (r"qos", f"check slurm.qos={request.qos}"),
        (r"partition", f"check slurm.partition={request.partition}"),
        (r"time limit", f"check slurm.time_minutes={request.time_minutes}"),
        (r"node count", f"check slurm.nodes={request.nodes}"),
        (r"node configuration|cpu count|socket|core", "no node fits slurm.cpus_per_task, slurm.tasks_per_node, "
                                                     "slurm.mem, slurm.gpus_per_node or slurm.extra_sbatch"),
    ] if re.search(pattern, stderr, re.IGNORECASE)), None)
    return f"sbatch refused the job: {said}" + (f"; {hint}" if hint else "") + "; nothing submitted"


# ---------------------------------------------------------------------------------------------
# A pending job Slurm will never start


_LIMIT_KEYS = [("WallDuration", "slurm.time_minutes"), ("Minutes", "slurm.time_minutes"),
               ("GRES", "slurm.gpus_per_node"), ("Mem", "slurm.mem"), ("Cpu", "slurm.cpus_per_task"),
               ("Node", "slurm.nodes"), ("Billing", "slurm.nodes")]


def never_starts(info: Mapping[str, str], reason: Reason, request: Request | None) -> str | None:
    """For a pending job (scontrol's fields) held back by `reason`: why Slurm will never start it
    and what in the config to change; None when it may yet start."""
    if not (reason.never or reason.maybe_never):
        return None
    request = request or Request()
    part_name = info.get("Partition") or request.partition
    code = reason.code
    if code in ("PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "BadConstraints", "MaxMemPerLimit"):
        records = partitions()
        if records is not None and part_name in records:
            problem = partition_problem(request, partition(part_name, records))
            if problem is not None:
                return problem
        if code == "PartitionNodeLimit":
            return None  # within the partition's limits: some of its nodes are down or drained
        keys = {"PartitionTimeLimit": "slurm.time_minutes", "BadConstraints": "slurm.constraint, slurm.extra_sbatch",
                "MaxMemPerLimit": "slurm.mem"}.get(code, "slurm.nodes, slurm.tasks_per_node, "
                                                         "slurm.cpus_per_task, slurm.gpus_per_node, slurm.mem")
        return (f"{reason.meaning} (compare {keys} with `scontrol show partition {part_name}` "
                f"and `sinfo -p {part_name} -N -l`)")
    if code == "ReqNodeNotAvail":
        names = reason.detail.partition("UnavailableNodes:")[2].strip()
        if not names:
            return None
        result = run(["sinfo", "-a", "-h", "-N", "-o", "%N"])
        if result.returncode != 0:
            return None
        known = set(result.stdout.split())
        unknown = [n for n in hostnames(names) if n not in known]
        if not unknown:
            return None  # down, drained or busy nodes may come back
        return f"node {', '.join(unknown)} does not exist on this cluster (slurm.extra_sbatch nodelist)"
    if code == "InvalidAccount":
        return (f"slurm.account={request.account} is not an account you may use "
                "(`sacctmgr show assoc user=$USER format=account`)" if request.account else
                "you have no valid default account: set slurm.account")
    if code in ("InvalidQOS", "QOSNotAllowed"):
        return (f"slurm.qos={request.qos}: {reason.meaning} (`sacctmgr show assoc user=$USER format=account,qos`)"
                if request.qos else f"{reason.meaning}: set slurm.qos to one your account may use")
    if code == "AccountNotAllowed":
        account = next((a for a in (info.get("Account"), request.account) if a and a != "(null)"), "(default)")
        return f"partition {part_name} does not allow account {account}: change slurm.account or slurm.partition"
    if code == "DependencyNeverSatisfied":
        return f"its dependency ({info.get('Dependency')}) can never be satisfied: check slurm.extra_sbatch"
    if code == "ReservationDeleted":
        return f"its reservation ({info.get('Reservation')}) no longer exists: check slurm.extra_sbatch"
    if code == "DeadLine":
        return "it cannot end before its deadline: check slurm.extra_sbatch and slurm.time_minutes"
    family = re.fullmatch(r"(QOS|Assoc)(Max|Min)(\w+)", code)
    if family:
        owner, _, rest = family.groups()
        key = next((k for token, k in _LIMIT_KEYS if token in rest), "slurm.nodes")
        if owner == "QOS":
            qos = next((q for q in (info.get("QOS"), request.qos) if q and q != "(null)"), "")
            show = f"sacctmgr show qos {qos}".strip()
            return f"{key}: {reason.meaning} (`{show}`); change it or slurm.qos"
        return (f"{key}: {reason.meaning} (`sacctmgr show assoc user=$USER`); change it or slurm.account")
    return reason.meaning


# ---------------------------------------------------------------------------------------------
# The run directory's record of its job


def read_job(run_dir: Path) -> dict[str, Any] | None:
    """The run's current job (``RUN_DIR/slurm/job.json``), None if it never had one."""
    path = Path(run_dir) / SUBMITIT_FOLDER / JOB_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_json(path: Path, data: dict) -> None:
    """Write a small JSON file whole (readers never see half of one)."""
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def read_requeues(run_dir: Path, job_id: str) -> int:
    """How many times rank 0 requeued this job (0 for another job's count)."""
    path = Path(run_dir) / SUBMITIT_FOLDER / REQUEUE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return int(data.get("requeues", 0)) if str(data.get("job_id")) == str(job_id) else 0


def write_requeues(run_dir: Path, job_id: str, requeues: int) -> None:
    write_json(Path(run_dir) / SUBMITIT_FOLDER / REQUEUE_FILE, {"job_id": job_id, "requeues": requeues})
