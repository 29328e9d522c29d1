#!/usr/bin/env bash
# A one-node Slurm on this machine, for the test suite (tests/slurm) and for trying kdrun's SLURM path:
#
#   scripts/slurm_local.sh up       install slurm-wlm + munge if missing (Debian/Ubuntu, as root), start
#                                   munged, slurmctld and slurmd; waits until the node is idle
#   scripts/slurm_local.sh down     stop the daemons and delete the state directory
#   scripts/slurm_local.sh status   sinfo of the running cluster (exit 1 if it is not up)
#
# Then, in the shell that submits:  export SLURM_CONF=${KDRUN_SLURM_DIR:-/tmp/kdrun-slurm}/slurm.conf
#
# Everything the daemons write (config, munge key and socket, state, spool, logs, pid files) lives in
# KDRUN_SLURM_DIR (default ${TMPDIR:-/tmp}/kdrun-slurm), so the machine's own /etc/slurm and /run/munge are
# never touched and `down` leaves nothing behind. The node is this machine under its real host name with
# its real CPUs (slurmd -C) and memory (/proc/meminfo), one partition `debug` (the default). The daemons
# run as root (SlurmUser=root): this is a throw-away test cluster, as in CI, which runs as root.
#
# Settings that differ from a production cluster, and why:
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none   no cgroups needed (containers, CI machines);
#                                   tasks are not pinned to cores, as on many clusters, so kdrun's own
#                                   thread limit per rank is what keeps the ranks from oversubscribing
#   SelectType=select/cons_tres, CR_CPU   CPUs are the consumable resource (two 1-CPU jobs run at once)
#   AuthInfo=cred_expire=$KDRUN_SLURM_CRED_EXPIRE (default 30 s; Slurm's default is 120 s)   how long a
#                                   requeued job waits before it may start again: short here so that the
#                                   requeue test takes about a minute, not three
#   SchedulerParameters=sched_interval=5,bf_interval=5   a requeued job whose delay has passed is started
#                                   by the next periodic scheduling pass (default every 60 s / 30 s)
#   accounting off                  no slurmdbd; `sacct` does not work (kdrun's launcher asks squeue)
set -euo pipefail

dir="${KDRUN_SLURM_DIR:-${TMPDIR:-/tmp}/kdrun-slurm}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

say() { echo "slurm_local: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "slurm-wlm and munge are not installed; install them (Debian/Ubuntu: apt-get install -y slurm-wlm munge, as root) and run this again."
    exit 1
  fi
  say "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

free_port() {
  # Two agents (or a leftover cluster) on one machine must not fight over Slurm's default ports 6817/6818.
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # pid file, name: SIGTERM, then wait up to 10 s, then SIGKILL
  local pidfile="$1" name="$2" pid
  pid_alive "$pidfile" || return 0
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  say "$name (pid $pid) did not stop on SIGTERM; killing it"
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  if [ ! -d "$dir" ]; then
    say "not up ($dir does not exist)"
    return 0
  fi
  # Jobs first, while slurmd still runs them: their processes are slurmd's children, not ours.
  if pid_alive "$dir/slurmctld.pid"; then
    scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
    sleep 1
  fi
  stop_daemon "$dir/slurmd.pid" slurmd
  stop_daemon "$dir/slurmctld.pid" slurmctld
  stop_daemon "$dir/munged.pid" munged
  rm -rf "$dir"
  say "down ($dir removed)"
}

up() {
  install_packages
  if pid_alive "$dir/slurmctld.pid"; then
    say "already up (SLURM_CONF=$conf); scripts/slurm_local.sh down first to restart it"
    return 0
  fi
  rm -rf "$dir"
  mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
  chmod 700 "$dir/munge"
  local host cpus mem node_line ctld_port slurmd_port
  host="$(hostname -s)"
  # slurmd -C: the node as slurmd itself will see it (CPUs, sockets, cores, threads), so the node is not
  # drained for a configuration above its hardware; memory from /proc/meminfo, as slurmd reads it.
  node_line="$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//')"
  mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
  cpus="$(echo "$node_line" | sed -E 's/.* CPUs=([0-9]+).*/\1/')"
  ctld_port="$(free_port)"
  slurmd_port="$(free_port)"
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done

  # munge: a fresh key for this cluster only, socket and state in $dir
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

  cat > "$conf" <<EOF
# Written by scripts/slurm_local.sh up on $(date -Is); deleted by scripts/slurm_local.sh down.
ClusterName=kdrunlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket,cred_expire=${KDRUN_SLURM_CRED_EXPIRE:-30}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MailProg=/bin/true
$node_line RealMemory=$mem NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

  slurmctld -i 2>>"$dir/slurmctld.log"
  slurmd -N "$host" 2>>"$dir/slurmd.log"
  # Up means: the node reports idle (slurmd registered with slurmctld), so a job submitted now starts.
  local state=""
  for _ in $(seq 100); do
    state="$(sinfo -h -n "$host" -o %T 2>/dev/null || true)"
    [ "$state" = idle ] && break
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    say "the node did not become idle (state '${state:-unknown}'); logs in $dir:"
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    down
    exit 1
  fi
  say "up: node $host, $cpus CPUs, ${mem} MB, partition debug (ports $ctld_port/$slurmd_port)"
  echo "export SLURM_CONF=$conf"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    if pid_alive "$dir/slurmctld.pid"; then sinfo; else say "not up"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status   (state in \$KDRUN_SLURM_DIR, default ${TMPDIR:-/tmp}/kdrun-slurm)" >&2; exit 2 ;;
esac
