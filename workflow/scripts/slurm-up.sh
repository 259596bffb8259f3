#!/usr/bin/env bash
# A real single-node SLURM on this host, for tests and for trying the slurm profile.
#
#   workflow/scripts/slurm-up.sh          install (if needed), configure, start; wait until idle
#   workflow/scripts/slurm-up.sh stop     stop the daemons this script started
#   workflow/scripts/slurm-up.sh status   exit 0 when the node answers `sinfo` as idle/mixed
#
# Needs root and Debian/Ubuntu packages `slurm-wlm` and `munge` (installed with apt-get when
# slurmctld is missing). Idempotent: a second call with the daemons up only checks the node.
# No systemd, no cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no
# accounting (so snakemake's slurm executor must poll with `squeue`, which MinJobAge=600
# makes reliable). GPUs listed by `nvidia-smi -L` become a `gpu` GRES on the node.
# On failure the last line on stderr says why, and the exit status is non-zero.
set -euo pipefail

ACTION="${1:-start}"
CONF_DIR=/etc/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm
WAIT_S="${SLURM_UP_TIMEOUT:-60}"
# Memory (MB) left to the OS; the node offers the rest to jobs.
MARGIN_MB="${SLURM_UP_MEM_MARGIN_MB:-1024}"

die() {
    echo "slurm-up: $*" >&2
    exit 1
}

node_state() {
    sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n 1 | tr -d '*~#$@'
}

pid_alive() {  # pid_alive FILE: the process named in FILE runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    local pidfile=$2 pid
    if pid_alive "$pidfile"; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        echo "slurm-up: stopped $1 (pid $pid)"
    fi
    rm -f "$pidfile"
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
NODE=$(hostname -s)

case "$ACTION" in
    stop)
        stop_daemon slurmd "$RUN/slurmd.pid"
        stop_daemon slurmctld "$RUN/slurmctld.pid"
        stop_daemon munged /run/munge/munged.pid
        exit 0
        ;;
    status)
        state=$(node_state)
        [[ $state == idle || $state == mixed || $state == allocated ]] \
            || die "node $NODE is '${state:-not answering}'"
        echo "slurm-up: node $NODE is $state"
        exit 0
        ;;
    start) ;;
    *) die "unknown action '$ACTION'; use start, stop or status" ;;
esac

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurmctld missing and no apt-get to install slurm-wlm"
    echo "slurm-up: installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
fi
command -v slurmctld >/dev/null || die "slurmctld still missing after install"

# 2. Munge: a key, and the daemon running as the munge user.
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
id munge >/dev/null 2>&1 || die "user 'munge' missing (the munge package creates it)"
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if ! pid_alive /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        || die "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge credentials do not round-trip"

# 3. slurm.conf for this one host. Written only when its content changes, so a running
#    cluster is not disturbed by a second call.
# nproc honours OMP_NUM_THREADS, which a caller may have set for itself: count the CPUs.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(free -m | awk '/^Mem:/ {print $2}')
REAL_MB=$((MEM_MB - MARGIN_MB))
((REAL_MB > 512)) || die "only ${MEM_MB} MB of memory; need more than $((MARGIN_MB + 512))"
GPUS=0
if command -v nvidia-smi >/dev/null; then
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
GRES_NODE=""
GRES_TYPES=""
if ((GPUS > 0)); then
    GRES_NODE=" Gres=gpu:$GPUS"
    GRES_TYPES="GresTypes=gpu"
fi

mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
NEW_CONF=$(cat <<EOF
# Written by workflow/scripts/slurm-up.sh: a single-node SLURM on $NODE.
ClusterName=nnbyol
# Addresses pinned to loopback: works where the host name does not resolve (containers).
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs stay visible to squeue for 10 minutes: the executor polls with squeue.
MinJobAge=600
SchedulerType=sched/backfill
SelectType=select/cons_tres
# CPUs are the consumable; memory requests are checked against the node, not summed, so
# a 2-core test box runs two jobs whose declared memory adds up to more than it has.
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MpiDefault=none
$GRES_TYPES
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB$GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
CHANGED=0
if [[ ! -f $CONF_DIR/slurm.conf ]] || [[ "$(cat "$CONF_DIR/slurm.conf")" != "$NEW_CONF" ]]; then
    printf '%s\n' "$NEW_CONF" >"$CONF_DIR/slurm.conf"
    CHANGED=1
fi
if ((GPUS > 0)); then
    {
        echo "# Written by workflow/scripts/slurm-up.sh"
        echo "AutoDetect=off"
        echo "NodeName=$NODE Name=gpu File=/dev/nvidia[0-$((GPUS - 1))]"
    } >"$CONF_DIR/gres.conf"
else
    rm -f "$CONF_DIR/gres.conf"
fi
# cgroup.conf is read by some plugins even when unused; keep it absent so nothing asks for
# cgroups.
if ((CHANGED)); then
    stop_daemon slurmd "$RUN/slurmd.pid"
    stop_daemon slurmctld "$RUN/slurmctld.pid"
fi

# 4. Daemons (daemonised, as root; -c only on a fresh config, to drop stale state).
if ! pid_alive "$RUN/slurmctld.pid"; then
    args=()
    ((CHANGED)) && args+=(-c)
    /usr/sbin/slurmctld "${args[@]}" || die "slurmctld did not start (see $LOGS/slurmctld.log)"
fi
if ! pid_alive "$RUN/slurmd.pid"; then
    /usr/sbin/slurmd || die "slurmd did not start (see $LOGS/slurmd.log)"
fi

# 5. Wait for the node to be schedulable.
state=""
for _ in $(seq $((WAIT_S * 2))); do
    state=$(node_state)
    case "$state" in
        idle | mixed | allocated)
            echo "slurm-up: node $NODE is $state (CPUs=$CPUS RealMemory=${REAL_MB}MB GPUs=$GPUS)"
            exit 0
            ;;
        down | drained | draining | fail | failing)
            # ReturnToService=2 resumes a node that registers with a valid config; a node
            # left down from an earlier run needs an explicit resume.
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            ;;
    esac
    sleep 0.5
done
reason=$(sinfo --noheader --nodes="$NODE" --format=%E 2>/dev/null | head -n 1)
tail -n 5 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 2>/dev/null || true
die "node $NODE not idle after ${WAIT_S}s (state '${state:-no answer}', reason '${reason}')"
