"""`launch slurm` against a real two-node Slurm cluster (scripts/slurm_cluster.sh).

The cluster runs on this machine: two slurmd daemons (n1, n2, one CPU each) under one
slurmctld. A session fixture starts it when it is not up; when it cannot be started the Slurm
tests are skipped, or fail when the environment variable CI is set. Every job is a real sbatch
job submitted by the real `launch` command; nothing of Slurm or submitit is mocked.

The first tests need no cluster: the sbatch script of `--dry-run`, the Slurm-to-torchrun
environment mapping, and the reading of Slurm's answers (launch/slurm_queries.py) on text Slurm
22.05 printed: job records, pending reasons, partitions and their nodes, sbatch's refusals.

On the cluster, requests it can never run (more CPUs than a node has, a missing partition, a
feature or node no node has) are refused before anything is submitted; with the check skipped,
Slurm's own verdict (``PartitionConfig``) ends `launch slurm` with one line and the job cancelled;
a job that only waits (held) shows why and is followed to its end.
"""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from launch import slurm as slurm_launch
from launch import slurm_queries as queries
from pipeline import faults

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
TINY = REPO / "configs" / "tiny" / "ddpm.yaml"

slurm_only = [pytest.mark.slurm, pytest.mark.slow]


# --- no cluster needed -------------------------------------------------------------------------


def run_launch(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_dry_run_renders_the_sbatch_script_without_submitting(tmp_path):
    run_dir = tmp_path / "ddpm_256"
    result = run_launch(
        "slurm", str(REPO / "configs" / "ddpm_256.yaml"), f"run_dir={run_dir}",
        "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.partition=gpu",
        "slurm.setup=[module load cuda]", "slurm.extra_sbatch={mail-type: END}", "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash")
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
        "#SBATCH --mail-type=END",
        f"#SBATCH --output={run_dir}/slurm/%j_0_log.out",
        "module load cuda",
    ):
        assert line in script.splitlines(), line
    assert any(line.startswith("#SBATCH --signal=USR2@") for line in script.splitlines())
    assert "--kill-on-bad-exit=1" in script and "submitit.core._submit" in script
    assert not run_dir.exists(), "--dry-run must not write anything"


def test_gpu_jobs_run_one_task_per_gpu(tmp_path):
    result = run_launch(
        "slurm", str(REPO / "configs" / "ddpm_256.yaml"), f"run_dir={tmp_path}/r",
        "slurm.gpus_per_node=8", "slurm.tasks_per_node=2", "--dry-run",
    )
    assert result.returncode == 2
    assert "tasks_per_node" in result.stderr and "Traceback" not in result.stderr


def test_slurm_environment_becomes_torchrun_environment():
    environ = {
        "SLURM_JOB_ID": "12345", "SLURM_NTASKS": "5", "SLURM_PROCID": "4", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_NODELIST": "gpu[007-009]",
    }
    env = slurm_launch.distributed_env(environ)
    assert env == {
        "RANK": "4", "WORLD_SIZE": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "gpu007", "MASTER_PORT": str(slurm_launch.rendezvous_port(12345)),
    }
    assert slurm_launch._tasks_on_node("2(x2),1", 1) == 2


# --- reading Slurm's answers (text printed by Slurm 22.05 on the test cluster) -----------------

PENDING_RECORD = (
    "JobId=43 JobName=probe UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901722 Nice=0 "
    "Account=(null) QOS=(null) JobState=PENDING Reason=PartitionConfig Dependency=(null) Requeue=1 "
    "Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:30:00 TimeMin=N/A "
    "Scheduler=Main Partition=debug AllocNode:Sid=localhost:4136 ReqNodeList=(null) NodeList= "
    "NumNodes=1 NumCPUs=8 NumTasks=1 CPUs/Task=8 TRES=cpu=8,mem=4000M,node=1,billing=8 Features=(null) "
    "Command=(null) WorkDir=/tmp StdOut=/tmp/slurm-43.out Power= "
)
NODE_RECORD = (
    "NodeName=n1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=1 CPUTot=1 AvailableFeatures=(null) "
    "Gres=(null) OS=Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=4000 State=IDLE "
    "Partitions=debug"
)
DEBUG_PARTITION = (
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=n[1-2] PriorityJobFactor=1 "
    "State=UP TotalCPUs=2 TotalNodes=2 DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
    "TRES=cpu=2,mem=8000M,node=2,billing=2"
)
DEBUG_NODES = "2|1|4000|(null)|(null)|n[1-2]\n"


def test_scontrol_records_are_read_whole():
    job = queries.parse_record(PENDING_RECORD)
    assert (job["JobState"], job["Reason"], job["Partition"]) == ("PENDING", "PartitionConfig", "debug")
    assert job["AllocNode:Sid"] == "localhost:4136" and job["TRES"] == "cpu=8,mem=4000M,node=1,billing=8"
    assert job["NodeList"] == "" and job["Power"] == ""
    node = queries.parse_record(NODE_RECORD)
    assert node["OS"] == "Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0" and node["RealMemory"] == "4000"


@pytest.mark.parametrize(
    "text, code, detail, never, maybe",
    [
        ("PartitionConfig", "PartitionConfig", "", True, False),
        ("PartitionTimeLimit", "PartitionTimeLimit", "", True, False),
        ("BadConstraints", "BadConstraints", "", True, False),
        ("InvalidAccount", "InvalidAccount", "", True, False),
        ("InvalidQOS", "InvalidQOS", "", True, False),
        ("QOSMaxCpuPerJobLimit", "QOSMaxCpuPerJobLimit", "", True, False),
        ("QOSMaxGRESPerNode", "QOSMaxGRESPerNode", "", True, False),
        ("AssocMaxWallDurationPerJobLimit", "AssocMaxWallDurationPerJobLimit", "", True, False),
        ("QOSMinCpuNotSatisfied", "QOSMinCpuNotSatisfied", "", True, False),
        ("AssocMaxJobsLimit", "AssocMaxJobsLimit", "", False, False),
        ("QOSMaxJobsPerUserLimit", "QOSMaxJobsPerUserLimit", "", False, False),
        ("QOSMaxCpuPerUserLimit", "QOSMaxCpuPerUserLimit", "", False, False),
        ("AssocGrpGRES", "AssocGrpGRES", "", False, False),
        ("MaxCpuPerAccount", "MaxCpuPerAccount", "", False, False),
        ("Resources", "Resources", "", False, False),
        ("(Priority)", "Priority", "", False, False),
        ("BeginTime", "BeginTime", "", False, False),
        ("Dependency", "Dependency", "", False, False),
        ("PartitionNodeLimit", "PartitionNodeLimit", "", False, True),
        ("ReqNodeNotAvail,_UnavailableNodes:n[3-4]", "ReqNodeNotAvail", "UnavailableNodes:n[3-4]", False, True),
        ("(ReqNodeNotAvail, UnavailableNodes:n3)", "ReqNodeNotAvail", "UnavailableNodes:n3", False, True),
        ("SomeFutureReason", "SomeFutureReason", "", False, False),
    ],
)
def test_pending_reasons_say_whether_the_job_can_ever_start(text, code, detail, never, maybe):
    reason = queries.explain_reason(text, "57")
    assert (reason.code, reason.detail, reason.never, reason.maybe_never) == (code, detail, never, maybe)
    assert str(reason).startswith(code) and len(reason.meaning) > 10


def test_reasons_in_words():
    assert queries.explain_reason("None") is None and queries.explain_reason(None) is None
    assert str(queries.explain_reason("JobHeldUser", "57")) == "JobHeldUser: held; `scontrol release 57` lets it start"
    assert "busy with other jobs" in str(queries.explain_reason("Resources"))
    assert str(queries.explain_reason("ReqNodeNotAvail,_UnavailableNodes:n3")).startswith(
        "ReqNodeNotAvail [UnavailableNodes:n3]: ")


@pytest.mark.parametrize(
    "reason, request_fields, problem",
    [
        ("InvalidAccount", {"account": "nope"},
         "slurm.account=nope is not an account you may use (`sacctmgr show assoc user=$USER format=account`)"),
        ("InvalidQOS", {"qos": "fast"}, "slurm.qos=fast: its QOS is not valid "
                                        "(`sacctmgr show assoc user=$USER format=account,qos`)"),
        ("QOSMaxCpuPerJobLimit", {"qos": "short"}, "slurm.cpus_per_task: the request exceeds a per-job limit of "
                                                   "its QOS (CpuPerJobLimit) (`sacctmgr show qos short`); change "
                                                   "it or slurm.qos"),
        ("AssocMaxWallDurationPerJobLimit", {}, "slurm.time_minutes: the request exceeds a per-job limit of its "
                                                "account (association) (WallDurationPerJobLimit) (`sacctmgr show "
                                                "assoc user=$USER`); change it or slurm.account"),
        ("QOSMaxGRESPerNode", {}, "slurm.gpus_per_node: the request exceeds a per-job limit of its QOS "
                                  "(GRESPerNode) (`sacctmgr show qos`); change it or slurm.qos"),
        ("AssocMaxJobsLimit", {}, None),
        ("Resources", {}, None),
        ("JobHeldUser", {}, None),
    ],
)
def test_what_to_change_for_a_job_slurm_will_never_start(reason, request_fields, problem):
    info = queries.parse_record(PENDING_RECORD.replace("Reason=PartitionConfig", f"Reason={reason}"))
    explained = queries.explain_reason(info["Reason"], info["JobId"])
    assert queries.never_starts(info, explained, queries.Request(**request_fields)) == problem


def test_slurm_times_sizes_and_gres():
    assert [queries.parse_time_minutes(t) for t in ("UNLIMITED", "INFINITE", "30", "5:30", "01:00:00",
                                                    "1-00:00:00", "2-12", "1-02:03", "x")] == \
        [None, None, 30, 5.5, 60, 1440, 3600, 1563, None]
    assert [queries.parse_mem_mb(m) for m in ("4000", "480G", "1T", "512M", "0", "lots")] == \
        [4000, 480 * 1024, 1024 * 1024, 512, 0, None]
    assert [queries.parse_gpus(g) for g in ("(null)", "gpu:8", "gpu:a100:4(S:0-1)", "gpu:a100:4(S:0,1),gpu:v100:2",
                                            "mps:100,gpu:2")] == [0, 8, 4, 6, 2]


def test_request_from_the_slurm_section():
    request = queries.Request.from_section({"nodes": 2, "gpus_per_node": 4, "tasks_per_node": None,
                                            "cpus_per_task": 8, "extra_sbatch": {"nodelist": "g[1-2]"}})
    assert (request.tasks_per_node, request.cpus_per_node, request.nodelist) == (4, 32, "g[1-2]")
    assert queries.Request.from_section({"cpus_per_task": 2, "tasks_per_node": 3}).cpus_per_node == 6


GPU_PARTITION = queries.Partition(
    "gpu",
    {**queries.parse_record(DEBUG_PARTITION), "PartitionName": "gpu", "MaxNodes": "3", "MaxTime": "01:00:00",
     "TotalNodes": "4"},
    queries.parse_node_groups("2|64|512000|a100,ib|gpu:a100:4(S:0-1)|g[01-02]\n"
                              "2|16|128000|v100|gpu:v100:2|g[03-04]\nnot a line\n"),
)


@pytest.mark.parametrize(
    "request_fields, problem",
    [
        ({"cpus_per_task": 8}, "slurm.cpus_per_task=8 but the largest node of partition debug has 1 CPU"),
        ({"nodes": 3}, "slurm.nodes=3 but partition debug has 2 nodes"),
        ({"tasks_per_node": 2}, "slurm.tasks_per_node=2 x slurm.cpus_per_task=1 = 2 CPUs per node but the "
                                "largest node of partition debug has 1 CPU"),
        ({"constraint": "gpu"}, "slurm.constraint=gpu: no node of partition debug has this feature "
                                "(features there: none)"),
        ({"gpus_per_node": 1}, "slurm.gpus_per_node=1 but the largest node of partition debug has 0 GPUs"),
        ({"mem": "8G"}, "slurm.mem=8G but the largest node of partition debug has 4000 MB"),
        ({"nodes": 2, "mem": "4000", "time_minutes": 60 * 24 * 365}, None),
    ],
)
def test_request_against_the_test_clusters_partition(request_fields, problem):
    debug = queries.Partition("debug", queries.parse_record(DEBUG_PARTITION), queries.parse_node_groups(DEBUG_NODES))
    assert queries.partition_problem(queries.Request(**request_fields), debug) == problem


@pytest.mark.parametrize(
    "request_fields, problem",
    [
        ({"time_minutes": 120}, "slurm.time_minutes=120 but partition gpu allows at most 60 minutes "
                                "(MaxTime=01:00:00)"),
        ({"nodes": 4}, "slurm.nodes=4 but partition gpu allows at most 3 nodes per job"),
        ({"nodes": 3, "cpus_per_task": 32}, "slurm.cpus_per_task=32 on each of slurm.nodes=3 nodes but partition "
                                            "gpu has 2 nodes with that many CPUs"),
        ({"gpus_per_node": 8, "tasks_per_node": 8}, "slurm.gpus_per_node=8 but the largest node of partition gpu "
                                                    "has 4 GPUs"),
        ({"nodes": 3, "gpus_per_node": 4, "tasks_per_node": 4},
         "slurm.gpus_per_node=4 on each of slurm.nodes=3 nodes but partition gpu has 2 nodes with that many GPUs"),
        ({"nodes": 3, "constraint": "a100&ib"}, "slurm.constraint=a100&ib: 2 nodes of partition gpu have these "
                                                "features, slurm.nodes=3"),
        ({"constraint": "h100|mi300"}, "slurm.constraint=h100|mi300: no node of partition gpu has one of these "
                                       "features (features there: a100, ib, v100)"),
        ({"mem": "600G"}, "slurm.mem=600G but the largest node of partition gpu has 512000 MB"),
        ({"nodes": 3, "constraint": "a100|v100", "cpus_per_task": 16, "mem": "100G", "time_minutes": 60}, None),
        ({"constraint": "[a100*2&ib]", "nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4}, None),
    ],
)
def test_request_against_a_gpu_partition(request_fields, problem):
    assert queries.partition_problem(queries.Request(**request_fields), GPU_PARTITION) == problem


def test_sbatch_refusals_become_one_line():
    request = queries.Request(partition="nope", constraint="gpu", mem="9000")
    said = queries.sbatch_refusal("sbatch: error: invalid partition specified: nope\n"
                                  "sbatch: error: Batch job submission failed: Invalid partition name specified\n",
                                  request)
    assert said == ("sbatch refused the job: Invalid partition name specified (invalid partition specified: "
                    "nope); check slurm.partition=nope; nothing submitted")
    said = queries.sbatch_refusal("sbatch: error: Batch job submission failed: Invalid feature specification", request)
    assert said == ("sbatch refused the job: Invalid feature specification; check slurm.constraint=gpu; "
                    "nothing submitted")
    said = queries.sbatch_refusal("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch "
                                  "job submission failed: Requested node configuration is not available", request)
    assert said.startswith("sbatch refused the job: Requested node configuration is not available (Memory "
                           "specification can not be satisfied); check slurm.mem=9000")


# --- the cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster():
    if subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0:
        return
    problem = None
    if os.geteuid() != 0:
        problem = "starting the test cluster needs root"
    else:
        try:
            started = subprocess.run(
                [str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900
            )
            if started.returncode != 0:
                problem = f"{CLUSTER_SCRIPT} start failed:\n{started.stderr[-3000:]}"
        except subprocess.TimeoutExpired:
            problem = f"{CLUSTER_SCRIPT} start timed out"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm is required in CI: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def digits(digits_dir) -> Path:
    return digits_dir / "train"


def tiny(run_dir: Path, shards: Path, max_steps: int, *extra: str) -> list[str]:
    """A config small enough that two 1-CPU 'nodes' take ~0.5 s per step."""
    return [
        str(TINY), f"run_dir={run_dir}", f"data.shards={shards}", "data.eval_shards=null",
        "data.num_workers=0", "data.batch_size=8", "model.base_channels=8", "model.sample_steps=5",
        f"train.max_steps={max_steps}", "train.log_every_steps=1", "checkpoint.every_steps=1000",
        "sample.every_steps=0", "sample.n=4", "wandb.mode=offline",
        "slurm.nodes=2", "slurm.cpus_per_task=1", "slurm.time_minutes=10", *extra,
    ]


def job_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm" / "job.json").read_text())["job_id"]


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip() and "loss" in json.loads(line)]


def rank_records(run_dir: Path, rank: int, event: str) -> list[dict]:
    path = run_dir / "ranks" / f"rank-{rank:05d}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "slurm").glob("*_log.*")))


@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_train_on_disjoint_data_to_equal_weights(slurm_cluster, digits, tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 12
    result = run_launch("slurm", *tiny(run_dir, digits, max_steps), "--wait", "--poll-s=1", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr + logs(run_dir)
    job_id = job_id_of(run_dir)
    assert f"submitted job {job_id}" in result.stdout and "COMPLETED" in result.stdout

    starts = [rank_records(run_dir, rank, "start")[0] for rank in (0, 1)]
    assert [s["world_size"] for s in starts] == [2, 2]
    shards = [set(s["epoch0_shards"]) for s in starts]
    assert shards[0] and shards[1] and not shards[0] & shards[1], "ranks must read disjoint shards"
    ends = [rank_records(run_dir, rank, "end")[-1] for rank in (0, 1)]
    assert ends[0]["step"] == ends[1]["step"] == max_steps
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"], "gradients were not averaged"
    assert logged_steps(run_dir) == list(range(1, max_steps + 1))

    status = run_launch("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"{job_id} (COMPLETED" in status.stdout and f"step:        {max_steps}" in status.stdout
    assert "checkpoint:  " in status.stdout and "step-" in status.stdout


def _job_fields(job_id: str) -> dict[str, str]:
    return slurm_launch.job_state(job_id)


# Slurm holds a requeued job ~2 minutes before its begin time; the tests move it forward, but
# not at once: slurmd revokes the old run's credential at the (whole) second it kills it and
# refuses any credential created in that same second ("Killing non-startable batch JobId=N: Job
# credential revoked", and the job ends FAILED). Slurm kills the old run before it marks the job
# PENDING again, so two seconds after that are always past it. (`StartTime=now+2` would be the
# same, but a future begin time waits for Slurm's next periodic scheduling pass, up to a minute;
# `StartTime=now` schedules at once.)
def start_requeued_job(job_id: str) -> None:
    """Let a job seen PENDING after its requeue start now rather than at Slurm's begin time."""
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.quick
def test_usr2_requeues_and_resumes_every_step_once(slurm_cluster, digits, tmp_path):
    run_dir = tmp_path / "run"
    max_steps, preempt_after = 24, 4
    submitted = run_launch("slurm", *tiny(run_dir, digits, max_steps), timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_of(run_dir)

    deadline = time.monotonic() + 150
    while not (run_dir / "metrics.jsonl").exists() or len(logged_steps(run_dir)) < preempt_after:
        assert time.monotonic() < deadline, "no training progress\n" + logs(run_dir)
        assert _job_fields(job_id).get("JobState") in slurm_launch.ACTIVE_STATES, logs(run_dir)
        time.sleep(0.3)
    signalled_at = time.time()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    # A requeued job waits ~2 minutes for its begin time; let it start (two seconds on).
    deadline = time.monotonic() + 90
    while True:
        fields = _job_fields(job_id)
        if fields.get("JobState") == "PENDING" and fields.get("Restarts", "0") != "0":
            pending_seen_at = time.time()
            start_requeued_job(job_id)
            break
        assert fields.get("JobState") in slurm_launch.ACTIVE_STATES, f"{fields}\n{logs(run_dir)}"
        assert time.monotonic() < deadline, f"not requeued: {fields}\n{logs(run_dir)}"
        time.sleep(0.2)

    code = slurm_launch.wait(run_dir, job_id, poll_s=1, out=sys.stderr)
    assert code == 0, logs(run_dir)
    assert _job_fields(job_id)["Restarts"] == "1"

    steps = logged_steps(run_dir)
    assert steps == list(range(1, max_steps + 1)), "every step logged exactly once, in order"
    stopped = [e for e in events(run_dir) if e["event"] == "stopped"]
    requeued = [e for e in events(run_dir) if e["event"] == "requeued"]
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert [e["signal"] for e in stopped] == ["SIGUSR2"] and len(requeued) == 1
    assert [e["restart"] for e in starts] == [0, 1]
    stop_step = rank_records(run_dir, 0, "end")[0]["step"]
    assert preempt_after <= stop_step < max_steps
    assert rank_records(run_dir, 0, "start")[1]["step"] == stop_step, "resumed from the saved step"

    # The timeline for docs/slurm.md: signal -> checkpoint saved -> requeued -> first resumed step.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_resumed = next(m for m in metrics if m["step"] == stop_step + 1)
    timeline = {
        "saved_and_stopped": stopped[0]["time"] - signalled_at,
        "requeued": requeued[0]["time"] - signalled_at,
        "pending_again (test sets StartTime=now 2 s later)": pending_seen_at - signalled_at,
        "job_restarted": starts[1]["time"] - signalled_at,
        "first_resumed_step": first_resumed["time"] - signalled_at,
    }
    print("preempt timeline (s after scancel --signal=USR2):",
          json.dumps({k: round(v, 1) for k, v in timeline.items()}), file=sys.stderr)
    (run_dir / "slurm" / "timeline.json").write_text(json.dumps(timeline, indent=1))

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    wandb_runs = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("*run-*")
                  if p.is_dir() and not p.is_symlink()}  # not latest-run
    assert wandb_runs == {run_id}, "one W&B run across the requeue"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_crash_fails_the_job_and_is_not_requeued(slurm_cluster, digits, tmp_path):
    run_dir = tmp_path / "run"
    result = run_launch(
        "slurm", *tiny(run_dir, digits, 20), "--wait", "--poll-s=1",
        env=faults.env(fail_at_step=3), timeout=240,
    )
    assert result.returncode not in (0, 75), result.stdout
    job_id = job_id_of(run_dir)
    assert "FAILED" in result.stdout
    time.sleep(3)  # long enough for a requeue to show
    fields = _job_fields(job_id)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", fields
    assert not [e for e in events(run_dir) if e["event"] in ("requeued", "stopped")]
    assert not (run_dir / "slurm" / "requeues.json").exists()
    assert "injected failure" in logs(run_dir)


# --- requests the cluster can never run, and jobs that only wait ---------------------------------


def named_run_dir(tmp_path: Path, label: str) -> Path:
    """A run directory whose name (the job name) no other test or engineer uses."""
    return tmp_path / f"{label}-{uuid.uuid4().hex[:8]}"


def jobs_named(name: str, states: str = "all") -> list[str]:
    """`squeue`'s jobs of this name (in these states): "ID STATE REASON" lines."""
    result = subprocess.run(["squeue", "-h", "-t", states, "-n", name, "-o", "%i %T %r"],
                            capture_output=True, text=True, check=True)
    return result.stdout.split("\n")[:-1]


@pytest.fixture
def cancel_leftovers():
    """Cancel whatever jobs of the test's run directories are still queued when it ends."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["scancel", "-n", name], capture_output=True)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize(
    "override, problem",
    [
        ("slurm.cpus_per_task=8", "slurm.cpus_per_task=8 but the largest node of partition debug has 1 CPU"),
        ("slurm.nodes=3", "slurm.nodes=3 but partition debug has 2 nodes"),
        ("slurm.partition=nope", "slurm.partition=nope: no such partition (partitions here: debug)"),
        ("slurm.constraint=gpu", "slurm.constraint=gpu: no node of partition debug has this feature"),
        ("slurm.extra_sbatch={nodelist: n7}", "slurm.extra_sbatch nodelist=n7: partition debug has no node n7"),
    ],
)
def test_a_request_no_node_can_run_is_refused_before_submitting(
        slurm_cluster, digits, tmp_path, cancel_leftovers, override, problem):
    run_dir = named_run_dir(tmp_path, "refused")
    cancel_leftovers.append(run_dir.name)
    result = run_launch("slurm", *tiny(run_dir, digits, 2), override, "--wait", "--poll-s=1", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"launch: error: {problem}") and "nothing submitted" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "submitted job" not in result.stdout
    assert not run_dir.exists() and jobs_named(run_dir.name) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_what_sbatch_refuses_is_one_line(slurm_cluster, digits, tmp_path, cancel_leftovers):
    run_dir = named_run_dir(tmp_path, "sbatch-refused")
    cancel_leftovers.append(run_dir.name)
    result = run_launch("slurm", *tiny(run_dir, digits, 2), "slurm.constraint=gpu", "--no-partition-check",
                        timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("launch: error: sbatch refused the job: Invalid feature specification; "
                             "check slurm.constraint=gpu; nothing submitted\n")
    assert not (run_dir / "slurm" / "job.json").exists()
    assert jobs_named(run_dir.name, "PENDING,RUNNING") == []


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize(
    "override, wait, problem",
    [
        ("slurm.cpus_per_task=8", ["--wait", "--poll-s=1"],
         "slurm.cpus_per_task=8 but the largest node of partition debug has 1 CPU"),
        ("slurm.nodes=3", [], "slurm.nodes=3 but partition debug has 2 nodes"),
    ],
    ids=["wait", "no-wait"],
)
def test_a_job_slurm_will_never_start_is_cancelled_with_one_line(
        slurm_cluster, digits, tmp_path, cancel_leftovers, override, wait, problem):
    """With the check skipped, Slurm takes the job and keeps it pending (PartitionConfig) forever."""
    run_dir = named_run_dir(tmp_path, "never")
    cancel_leftovers.append(run_dir.name)
    result = run_launch("slurm", *tiny(run_dir, digits, 2), override, "--no-partition-check", *wait, timeout=180)
    assert result.returncode == 2, result.stdout + result.stderr
    job_id = job_id_of(run_dir)
    assert f"job {job_id}: PENDING: PartitionConfig: the request breaks a limit of its partition" in result.stdout
    assert result.stderr == (f"launch: error: job {job_id} can never start (Slurm: PartitionConfig): "
                             f"{problem}; cancelled job {job_id}\n")
    assert jobs_named(run_dir.name) == [f"{job_id} CANCELLED PartitionConfig"]

    status = run_launch("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"job:         {job_id} (CANCELLED" in status.stdout
    assert (f"reason:      PartitionConfig, could never start: {problem} (cancelled by `launch slurm`)"
            in status.stdout.splitlines())


@pytest.mark.slurm
@pytest.mark.slow
def test_status_marks_a_pending_job_that_can_never_start(slurm_cluster, digits, tmp_path, cancel_leftovers):
    """A job queued by hand (or before `launch slurm` judged jobs) that Slurm will never start."""
    from pipeline import config as config_module

    run_dir = named_run_dir(tmp_path, "hopeless")
    cancel_leftovers.append(run_dir.name)
    config = config_module.load(TINY, tiny(run_dir, digits, 2)[1:] + ["slurm.cpus_per_task=8"])
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_module.dump_yaml(config))
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-J", run_dir.name, "--cpus-per-task=8", "-o", "/dev/null", "--wrap", "true"],
        capture_output=True, text=True, check=True).stdout.strip()
    (run_dir / "slurm" / "job.json").write_text(json.dumps({"job_id": job_id, "stdout": "/dev/null"}))

    status = run_launch("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert f"job:         {job_id} (PENDING; requeued 0x)" in lines
    assert ("reason:      PartitionConfig: the request breaks a limit of its partition (can never start)"
            in lines)
    assert (f"fix:         slurm.cpus_per_task=8 but the largest node of partition debug has 1 CPU; "
            f"then `launch cancel {run_dir}` and submit again") in lines
    assert jobs_named(run_dir.name, "PENDING") != [], "status only reports; it cancels nothing"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_held_job_shows_why_it_waits_and_is_not_cancelled(slurm_cluster, digits, tmp_path, cancel_leftovers):
    run_dir = named_run_dir(tmp_path, "held")
    cancel_leftovers.append(run_dir.name)
    result = run_launch("slurm", *tiny(run_dir, digits, 2), "slurm.extra_sbatch={hold: true}", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_of(run_dir)
    held = f"JobHeldUser: held; `scontrol release {job_id}` lets it start"
    assert f"job {job_id}: PENDING: {held}" in result.stdout.splitlines()

    status = run_launch("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"reason:      {held}" in status.stdout.splitlines() and "fix:" not in status.stdout
    assert jobs_named(run_dir.name) == [f"{job_id} PENDING JobHeldUser"]
    cancelled = run_launch("cancel", str(run_dir))
    assert cancelled.returncode == 0, cancelled.stderr
    assert jobs_named(run_dir.name, "PENDING,RUNNING") == []
    # Cancelled before it ran: Slurm's ExitCode is 0:0, which is no exit status to show.
    followed = io.StringIO()
    assert slurm_launch.wait(run_dir, job_id, poll_s=0.5, out=followed) == 1
    assert followed.getvalue().splitlines()[-1].startswith(f"job {job_id} ended CANCELLED; logs: ")
    status = run_launch("status", str(run_dir))
    assert f"job:         {job_id} (CANCELLED; requeued 0x)" in status.stdout.splitlines(), status.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_wait_shows_why_a_job_waits_and_follows_it_to_the_end(slurm_cluster, digits, tmp_path, cancel_leftovers):
    """`--wait` on a held job: the reason is shown, the job is not given up on, and once released
    it runs to the end."""
    run_dir = named_run_dir(tmp_path, "held-wait")
    cancel_leftovers.append(run_dir.name)
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "slurm", *tiny(run_dir, digits, 2), "slurm.nodes=1",
         "slurm.extra_sbatch={hold: true}", "--wait", "--poll-s=1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    seen = []
    try:
        deadline = time.monotonic() + 180
        while not any("JobHeldUser" in line for line in seen):
            try:
                seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                pytest.fail("no pending reason shown:\n" + "".join(seen))
        job_id = job_id_of(run_dir)
        assert seen[-1] == f"job {job_id}: PENDING: JobHeldUser: held; `scontrol release {job_id}` lets it start\n"
        subprocess.run(["scontrol", "release", job_id], check=True)
        assert process.wait(timeout=300) == 0, "".join(seen) + process.stderr.read() + logs(run_dir)
    finally:
        process.kill()
    reader.join(timeout=60)  # the pipe closed when the process ended: read what is left
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    assert f"job {job_id}: RUNNING" in output and f"job {job_id}: COMPLETED" in output, output
    assert logged_steps(run_dir) == [1, 2]
