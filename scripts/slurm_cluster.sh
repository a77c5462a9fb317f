#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests and for trying `launch slurm`.
#
#   scripts/slurm_cluster.sh start    # install (Debian packages) if needed, configure, start
#   scripts/slurm_cluster.sh stop     # stop the daemons (configuration and job state are kept)
#   scripts/slurm_cluster.sh status   # sinfo, or exit 1 when the cluster is not up
#
# Two slurmd daemons run on this host under the node names n1 and n2 (`slurmd -N NAME`), each
# with one CPU, so `srun -N2` starts one task per "node". No cgroups are needed
# (proctrack/linuxproc, task/none) and no accounting database (sacct is unavailable; squeue and
# scontrol remember finished jobs for MinJobAge seconds). Needs root: it writes /etc/slurm,
# /etc/hosts and starts daemons. `start` and `stop` are idempotent.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
NODES=(n1 n2)
NODE_PORTS=(17001 17002)
CTLD_PORT=16817
# A marker so that `start` never overwrites a slurm.conf that this script did not write.
MARKER="# written by genpipe scripts/slurm_cluster.sh"

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root (it installs packages, writes /etc/slurm and /etc/hosts)"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR"
    for node in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$node"; done
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=genpipe
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Finished jobs stay visible to scontrol/squeue for 10 minutes (there is no sacct here).
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=1 RealMemory=4000
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=1 RealMemory=4000
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # Jobs resolve the rendezvous host by node name.
    if ! grep -qE "^127\.0\.0\.1[[:space:]].*\bn1\b.*\bn2\b" /etc/hosts; then
        # /etc/hosts may be a bind mount (containers): append in place rather than replace it.
        echo "127.0.0.1 n1 n2" >>/etc/hosts
    fi
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if pid_alive /run/munge/munged.pid; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.2; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start_daemons() {
    if ! pid_alive /run/slurmctld.pid; then
        slurmctld
    fi
    for node in "${NODES[@]}"; do
        if ! pid_alive "/run/slurmd-$node.pid"; then
            slurmd -N "$node"
        fi
    done
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o "%N %T" 2>/dev/null) || return 1
    for node in "${NODES[@]}"; do
        grep -qE "^$node (idle|mixed|allocated)" <<<"$states" || return 1
    done
}

wait_idle() {
    for _ in $(seq 120); do
        if nodes_idle; then return; fi
        # A node that came back after a stop may be DOWN until told otherwise.
        scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes did not become idle within 60 s (see $LOG_DIR/)"
}

stop_pidfile() {
    local pidfile=$1 pid
    pid_alive "$pidfile" || { rm -f "$pidfile"; return; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

cmd_start() {
    need_root
    install_packages
    if nodes_idle && pid_alive /run/slurmctld.pid; then
        log "already running"
        sinfo
        return
    fi
    write_config
    start_munge
    start_daemons
    wait_idle
    log "up"
    sinfo
}

cmd_stop() {
    need_root
    for node in "${NODES[@]}"; do stop_pidfile "/run/slurmd-$node.pid"; done
    stop_pidfile /run/slurmctld.pid
    log "stopped (munged left running)"
}

cmd_status() {
    nodes_idle && sinfo
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
