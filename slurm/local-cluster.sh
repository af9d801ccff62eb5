#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests and for trying templates.
#
#   slurm/local-cluster.sh start    install (as root, if missing), configure, start, wait for idle nodes
#   slurm/local-cluster.sh status   daemons, nodes and jobs
#   slurm/local-cluster.sh stop     cancel all jobs, stop the daemons
#
# Everything lives in a state directory (default: <repo>/.slurm-local, or $HPCJOBS_SLURM_STATE):
# slurm.conf, a private munge key and socket, spool and state directories, logs and PID files.
# No systemd: munged, slurmctld and one slurmd per emulated node (slurmd -N node1, -N node2)
# are started by hand and stopped through their PID files.  The daemons run as root.
#
# After `start`:  export SLURM_CONF=<state>/slurm.conf   (or: source <state>/env.sh)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${HPCJOBS_SLURM_STATE:-$REPO/.slurm-local}
CONF=$STATE/slurm.conf
NODES=(node1 node2)
CTLD_PORT=${HPCJOBS_SLURMCTLD_PORT:-}  # default: the first free of 16817, 16827, ...
NODE_PORT=${HPCJOBS_SLURMD_PORT:-}      # node1's; node2's is the next (default 17001, 17011, ...)
HOST=$(hostname -s)
SLURM_BIN=(slurmctld slurmd munged sbatch srun squeue sinfo scontrol scancel)

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

# ------------------------------------------------------------------------- install
missing_bins() {
    local b out=()
    for b in "${SLURM_BIN[@]}"; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || out+=("$b")
    done
    echo "${out[*]:-}"
}

ensure_packages() {
    local missing
    missing=$(missing_bins)
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing $missing; install the Debian packages slurm-wlm and munge (as root: apt-get install slurm-wlm munge)"
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing $missing and no apt-get here; install Slurm and munge by hand"
    say "installing slurm-wlm and munge (missing: $missing)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # policy-rc.d keeps the packages' init scripts from starting system-wide daemons
    local policy=/usr/sbin/policy-rc.d created_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    apt-get install -y -q --no-install-recommends slurm-wlm munge || { [ -n "$created_policy" ] && rm -f "$policy"; die "apt-get install slurm-wlm munge failed"; }
    [ -n "$created_policy" ] && rm -f "$policy"
    missing=$(missing_bins)
    [ -z "$missing" ] || die "still missing after install: $missing"
}

# ------------------------------------------------------------------------- configuration
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

choose_ports() {  # free ports, so a second checkout's cluster can run beside this one
    local i p ok
    if [ -z "$CTLD_PORT" ]; then
        for i in $(seq 0 20); do
            p=$(( 16817 + 10 * i ))
            port_in_use "$p" || { CTLD_PORT=$p; break; }
        done
    fi
    if [ -z "$NODE_PORT" ]; then
        for i in $(seq 0 20); do
            p=$(( 17001 + 10 * i )) ok=1
            for n in $(seq 0 $(( ${#NODES[@]} - 1 ))); do port_in_use $(( p + n )) && ok=; done
            [ -n "$ok" ] && { NODE_PORT=$p; break; }
        done
    fi
    [ -n "$CTLD_PORT" ] && [ -n "$NODE_PORT" ] || die "no free ports for slurmctld/slurmd near 16817/17001"
}

real_memory_mb() {
    # per emulated node: half the machine, at most 8 GiB, at least 512 MiB
    local kb
    kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    local mb=$(( kb / 1024 / ${#NODES[@]} ))
    (( mb > 8192 )) && mb=8192
    (( mb < 512 )) && mb=512
    echo "$mb"
}

write_config() {
    choose_ports
    mkdir -p "$STATE"/{munge,ctld,log,run} "${NODES[@]/#/$STATE/spool/}"
    chmod 700 "$STATE/munge"
    if [ ! -s "$STATE/munge/munge.key" ]; then
        (umask 077; head -c 1024 /dev/urandom >"$STATE/munge/munge.key")
    fi
    : >"$STATE/plugstack.conf"  # keep the host's /etc/slurm/plugstack.conf out of this cluster
    local tmp=$CONF.tmp
    cat >"$tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every start.
ClusterName=hpcjobs-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# short credentials: a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/plugstack.conf
# no cgroups: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule every few seconds, so a requeued job restarts quickly
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
MaxArraySize=100001
MaxJobCount=100000
ReturnToService=2
# each node offers 4 CPUs whatever the host has (the tests' jobs mostly wait), so a test's
# job arrays and other tests' jobs run side by side
SlurmdParameters=config_overrides
# keep finished jobs visible to squeue/scontrol for 10 minutes (there is no accounting)
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=node[1-${#NODES[@]}] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE_PORT-$(( NODE_PORT + ${#NODES[@]} - 1 )) CPUs=4 RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$tmp" "$CONF"
    printf 'export SLURM_CONF=%q\n' "$CONF" >"$STATE/env.sh"
}

# Multi-node jobs (tf.distribute, MPI) connect to the workers by node name: the emulated
# nodes' names must resolve, to this machine.  As root, add them to /etc/hosts if they don't.
HOSTS_MARK="# hpcjobs slurm/local-cluster.sh"
ensure_node_names() {
    local n missing=()
    for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null 2>&1 || missing+=("$n"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && [ -w /etc/hosts ]; then
        say "adding ${missing[*]} (127.0.0.1) to /etc/hosts"
        echo "127.0.0.1 ${missing[*]} $HOSTS_MARK" >>/etc/hosts
    else
        say "warning: ${missing[*]} do not resolve; multi-node jobs need them (add them to /etc/hosts as 127.0.0.1)"
    fi
}

# ------------------------------------------------------------------------- daemons
pid_alive() {  # pid_alive FILE: the PID in FILE is a running process
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

munge_pidfile() { echo "$STATE/run/munged.pid"; }
ctld_pidfile() { echo "$STATE/run/slurmctld.pid"; }
slurmd_pidfile() { echo "$STATE/run/slurmd-$1.pid"; }

all_running() {
    pid_alive "$(munge_pidfile)" && pid_alive "$(ctld_pidfile)" || return 1
    local n
    for n in "${NODES[@]}"; do pid_alive "$(slurmd_pidfile "$n")" || return 1; done
}

start_munged() {
    pid_alive "$(munge_pidfile)" && return 0
    rm -f "$STATE/munge/munge.socket" "$STATE/munge/munge.socket.lock"
    munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$(munge_pidfile)" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed" \
        || die "munged did not start; see $STATE/log/munged.log"
    local i
    for i in $(seq 50); do [ -S "$STATE/munge/munge.socket" ] && return 0; sleep 0.1; done
    die "munged did not create its socket; see $STATE/log/munged.log"
}

start_slurmctld() {
    pid_alive "$(ctld_pidfile)" && return 0
    # -i: ignore state that cannot be recovered (e.g. after an unclean stop)
    slurmctld -i -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
}

start_slurmd() {
    pid_alive "$(slurmd_pidfile "$1")" && return 0
    slurmd -N "$1" -f "$CONF" || die "slurmd -N $1 did not start; see $STATE/log/slurmd-$1.log"
}

wait_idle() {
    local deadline=$(( SECONDS + ${HPCJOBS_SLURM_START_TIMEOUT:-90} )) states resumed=
    while (( SECONDS < deadline )); do
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        if [ -n "$states" ] && ! grep -qv ' idle$\| mixed$\| allocated$' <<<"$states" \
            && [ "$(wc -l <<<"$states")" -ge "${#NODES[@]}" ]; then
            return 0
        fi
        if [ -z "$resumed" ] && grep -q 'down\|drain' <<<"$states"; then
            scontrol update nodename="node[1-${#NODES[@]}]" state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 1
    done
    echo "$states" >&2
    die "nodes not idle after ${HPCJOBS_SLURM_START_TIMEOUT:-90}s; see $STATE/log/"
}

usage_note() {
    cat <<EOF
local-cluster: ${#NODES[@]} nodes up (state in $STATE)
  export SLURM_CONF=$CONF
  sinfo; sbatch ...; squeue
  or: hpcjobs submit configs/quickstart.yaml --nodes 2 --set distribute.strategy=multiworker
  stop with: $0 stop
EOF
}

cmd_start() {
    ensure_packages
    export PATH=$PATH:/usr/sbin:/sbin
    export SLURM_CONF=$CONF
    if [ -s "$CONF" ] && all_running; then
        wait_idle
        usage_note
        return 0
    fi
    write_config
    ensure_node_names
    start_munged
    start_slurmctld
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_idle
    usage_note
}

kill_pidfile() {  # kill_pidfile FILE NAME: TERM, wait up to 15 s, then KILL
    local f=$1 name=$2 pid i
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name ($pid) did not stop; killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stray_stepds() {  # slurmstepd processes started by this cluster's slurmd (their environment names our conf)
    local p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
        tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF" && echo "${p#/proc/}"
    done
    return 0
}

cmd_stop() {
    export PATH=$PATH:/usr/sbin:/sbin
    export SLURM_CONF=$CONF
    if pid_alive "$(ctld_pidfile)"; then
        local jobs i
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            say "cancelling $(wc -w <<<"$jobs") job(s)"
            scancel $jobs 2>/dev/null || true
            for i in $(seq 45); do
                [ -z "$(squeue -h -t PD,R,CG,CF,S,RQ,RS,SE -o %A 2>/dev/null)" ] && break
                sleep 1
            done
        fi
    fi
    local n
    for n in "${NODES[@]}"; do kill_pidfile "$(slurmd_pidfile "$n")" "slurmd $n"; done
    kill_pidfile "$(ctld_pidfile)" slurmctld
    local strays
    strays=$(stray_stepds)
    if [ -n "$strays" ]; then
        say "killing leftover slurmstepd: $strays"
        kill -9 $strays 2>/dev/null || true
    fi
    kill_pidfile "$(munge_pidfile)" munged
    say "stopped"
}

cmd_status() {
    export PATH=$PATH:/usr/sbin:/sbin
    export SLURM_CONF=$CONF
    local f name rc=0
    for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        f=$STATE/run/$name.pid
        if pid_alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: not running"; rc=3; fi
    done
    if pid_alive "$(ctld_pidfile)"; then
        sinfo -N -o '%N %P %T %c %m' || true
        squeue -o '%.18i %.9P %.20j %.8T %.10M %.10l %R' || true
    fi
    echo "SLURM_CONF=$CONF"
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
