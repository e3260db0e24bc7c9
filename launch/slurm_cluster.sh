#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for trying (and testing) multi-node style training.
#
#   sudo bash launch/slurm_cluster.sh start    # installs slurm-wlm + munge (Debian/Ubuntu) if missing, starts
#                                              # munged, slurmctld and slurmd; prints `export SLURM_CONF=...`
#   export SLURM_CONF=/tmp/ftprof-slurm/slurm.conf
#   srun -N1 -n2 hostname                      # two tasks answer
#   srun -N1 -n2 --cpus-per-task=1 bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS \
#       LOCAL_RANK=$SLURM_LOCALID MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
#       exec .venv/bin/python launch/train.py --ds_config ds_configs/zero2.json \
#       --model tiny-bert --dataset synthetic --max_steps 4 --output_dir outputs/slurm-tiny'
#   sudo bash launch/slurm_cluster.sh status   # daemons, node state, exit 0 when the cluster answers
#   sudo bash launch/slurm_cluster.sh stop     # cancels its jobs, stops the daemons it started
#
# On a laptop: the same three commands (Debian, Ubuntu, or WSL2; elsewhere install Slurm and MUNGE yourself,
# the script then only configures and starts them). Nothing outside the state directory is configured or
# started: the cluster has its own slurm.conf, its own munge key and socket, logs and spool, all under
# ${FTPROF_SLURM_DIR:-/tmp/ftprof-slurm}, so a system Slurm or munge service is left alone (pick other ports
# with FTPROF_SLURMCTLD_PORT / FTPROF_SLURMD_PORT if one listens on 6817/6818). No systemd, cgroups or
# accounting database are needed, so it also runs in a container. Run it as root (sudo) so that slurmd can
# start jobs for any user; srun/sbatch then work as your normal user with SLURM_CONF exported. Without root
# (and with Slurm already installed) it runs every daemon as you, which is enough for your own jobs.
#
# Environment: FTPROF_SLURM_DIR (state directory), FTPROF_SLURM_TIMEOUT (seconds to wait for the cluster,
# default 90), FTPROF_SLURMCTLD_PORT (6817), FTPROF_SLURMD_PORT (6818), FTPROF_SLURM_CLUSTER (cluster name).
# Exit codes: 0 ok; 1 error (daemon logs printed); 3 Slurm is not installed and cannot be installed here
# (no apt-get, not root, or apt-get failed); 2 usage.
set -euo pipefail

DIR=${FTPROF_SLURM_DIR:-/tmp/ftprof-slurm}
TIMEOUT=${FTPROF_SLURM_TIMEOUT:-90}
CTLD_PORT=${FTPROF_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${FTPROF_SLURMD_PORT:-6818}
CLUSTER=${FTPROF_SLURM_CLUSTER:-ftprof}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
PIDS=$DIR/pids
NODE=$(hostname -s)
# Debian keeps the daemons in /usr/sbin, which a non-root PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin
export SLURM_CONF=$CONF

now() { date +%s.%N 2>/dev/null || date +%s; }
elapsed() { LC_ALL=C awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v srun >/dev/null &&
        command -v munged >/dev/null
}

install() {
    installed && return 0
    if [[ $(id -u) != 0 ]]; then
        say "Slurm/munge are not installed and installing needs root: sudo bash $0 start"; exit 3
    fi
    if ! command -v apt-get >/dev/null; then
        say "Slurm/munge are not installed and there is no apt-get; install slurmctld, slurmd, slurm-client" \
            "and munge with your package manager, then run this again"; exit 3
    fi
    say "installing slurm-wlm and munge with apt-get"
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 slurm-wlm munge)
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$DIR/apt.log" 2>&1; then
        # Fresh containers have no package lists yet.
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR/apt.log" 2>&1 &&
               DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$DIR/apt.log" 2>&1; }; then
            tail -n 15 "$DIR/apt.log" >&2
            say "apt-get could not install slurm-wlm and munge (log: $DIR/apt.log)"; exit 3
        fi
    fi
    installed || { say "slurm-wlm installed but slurmctld/slurmd/srun/munged are still missing"; exit 3; }
}

# pid of a daemon we started, if it is still that daemon (its command line names our state directory).
live_pid() {
    local pid
    pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$DIR/" || return 1
    echo "$pid"
}

# A daemon this start spawned is alive while its process is: right after `&` its command line is still the
# forked shell's (exec has not happened yet), so live_pid would call a healthy daemon dead. Zombies are dead.
spawned_pid() {
    local pid state
    pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
    state=$(sed -E 's/^.*\) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z && $state != X ]] || return 1
    echo "$pid"
}

answers() { timeout 20 srun -N1 -n1 --immediate=15 -t 1 hostname >/dev/null 2>&1; }

running() {
    live_pid munged >/dev/null && live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null
}

logs() {
    local f
    for f in munged slurmctld slurmd; do
        # The .out file holds what a daemon said before it opened its log file.
        if [[ -s $DIR/log/$f.log ]]; then
            echo "----- $DIR/log/$f.log (last 25 lines)" >&2
            tail -n 25 "$DIR/log/$f.log" >&2
        elif [[ -s $DIR/log/$f.out ]]; then
            echo "----- $DIR/log/$f.out (last 25 lines)" >&2
            tail -n 25 "$DIR/log/$f.out" >&2
        fi
    done
}

# A start that failed: show why, and leave no daemon of it behind (spawned ones included).
fail() {
    logs
    SPAWNED=1 stop_daemons slurmd slurmctld munged 2>/dev/null
    die "$*"
}

write_conf() {
    # slurmd -C reports this machine's real CPUs, sockets, cores, threads and RealMemory in slurm.conf
    # syntax; a node line that promises more than the hardware has would be drained.
    local hw user
    hw=$(slurmd -C 2>/dev/null | grep '^NodeName=' | sed -E 's/^NodeName=[^ ]+ //; s/ *UpTime=.*//')
    [[ $hw == *CPUs=* ]] || hw="CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))"
    user=$(id -un)
    cat >"$CONF" <<EOF
# Written by launch/slurm_cluster.sh: a one-node cluster on $NODE (Slurm $(slurmd -V 2>/dev/null | awk '{print $2}')).
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
# No cgroups (containers rarely have a writable cgroup tree): track processes by their parent pids.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PropagateResourceLimits=NONE
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=30
Waittime=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    mkdir -p "$DIR/munge-key"
    chmod 700 "$DIR/munge-key"
    if [[ ! -s $DIR/munge-key/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$DIR/munge-key/munge.key" --force
        else
            dd if=/dev/urandom of="$DIR/munge-key/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 600 "$DIR/munge-key/munge.key"
    # The socket's directory must be reachable by every user that runs srun, writable only by us.
    mkdir -p "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    rm -f "$SOCKET" "$SOCKET.lock"
    setsid munged --foreground --force --key-file="$DIR/munge-key/munge.key" --socket="$SOCKET" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge-key/munge.seed" \
        </dev/null >>"$DIR/log/munged.out" 2>&1 9>&- &
    echo $! >"$PIDS/munged.pid"
    local i
    for i in $(seq 50); do
        [[ -S $SOCKET ]] && munge -n --socket="$SOCKET" 2>/dev/null | unmunge --socket="$SOCKET" >/dev/null 2>&1 &&
            return 0
        spawned_pid munged >/dev/null || break
        sleep 0.2
    done
    fail "munged did not start (log: $DIR/log/munged.out)"
}

start() {
    mkdir -p "$DIR"
    install
    if running && answers; then
        say "already running ($DIR)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if running || live_pid munged >/dev/null || live_pid slurmctld >/dev/null || live_pid slurmd >/dev/null; then
        say "a previous cluster in $DIR does not answer; restarting it"
        stop
    fi
    local t0
    t0=$(now)
    # A fresh cluster every start: no jobs or node states are carried over from an earlier one.
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log" "$PIDS"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log" "$PIDS"
    chmod 755 "$DIR"
    write_conf
    start_munged
    setsid slurmctld -D -i -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 9>&- &
    echo $! >"$PIDS/slurmctld.pid"
    setsid slurmd -D -N "$NODE" -f "$CONF" </dev/null >>"$DIR/log/slurmd.out" 2>&1 9>&- &
    echo $! >"$PIDS/slurmd.pid"
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        for d in slurmctld slurmd; do
            if ! spawned_pid $d >/dev/null; then
                fail "$d exited during start-up (config: $CONF; logs: $DIR/log)"
            fi
        done
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        if [[ $state == idle* || $state == mix* || $state == alloc* ]] && answers; then
            say "cluster '$CLUSTER' up in $(elapsed "$t0") s: node $NODE ($(sinfo -h -o '%c CPUs, %m MB')), partition debug"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    say "node state: ${state:-unknown}; sinfo: $(sinfo 2>&1 | tail -n +2 | tr '\n' ' ')"
    fail "srun did not answer within ${TIMEOUT} s (config: $CONF; logs: $DIR/log)"
}

stop() {
    local i
    if live_pid slurmctld >/dev/null; then
        timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
        for i in $(seq 20); do
            [[ -z $(timeout 5 squeue -h 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    # slurmd and slurmctld shut down (seconds each) side by side; munged last, they may still need it.
    stop_daemons slurmd slurmctld
    stop_daemons munged
}

stop_daemons() {
    local d pid i alive stopping=()
    for d in "$@"; do
        if pid=$(live_pid "$d") || { [[ -n ${SPAWNED:-} ]] && pid=$(spawned_pid "$d"); }; then
            kill -TERM "$pid" 2>/dev/null || true
            stopping+=("$d:$pid")
        fi
        rm -f "$PIDS/$d.pid"
    done
    for i in $(seq 50); do
        alive=0
        for d in ${stopping[@]+"${stopping[@]}"}; do kill -0 "${d#*:}" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.2
    done
    for d in ${stopping[@]+"${stopping[@]}"}; do
        kill -0 "${d#*:}" 2>/dev/null && kill -KILL "${d#*:}" 2>/dev/null || true
        say "stopped ${d%%:*} (${d#*:})"
    done
}

status() {
    local d pid ok=0
    for d in munged slurmctld slurmd; do
        if pid=$(live_pid $d); then echo "$d: running (pid $pid)"; else echo "$d: not running"; ok=1; fi
    done
    if ((ok == 0)); then
        sinfo 2>&1 || true
        if answers; then echo "srun: answers"; echo "export SLURM_CONF=$CONF"; else echo "srun: no answer"; ok=1; fi
    fi
    return $ok
}

# One start or stop at a time per state directory (two test sessions starting the cluster together).
lock() {
    mkdir -p "$DIR"
    if command -v flock >/dev/null; then
        exec 9>"$DIR/.lock"
        flock -w 300 9 || die "another slurm_cluster.sh holds $DIR/.lock"
    fi
}

case ${1:-} in
    start) lock; start ;;
    stop) lock; stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in \${FTPROF_SLURM_DIR:-/tmp/ftprof-slurm})" >&2; exit 2 ;;
esac
