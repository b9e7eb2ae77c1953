#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and for trying the sbatch templates.
#
#   bash scripts/slurm/one-node.sh install     # Debian's slurmctld, slurmd, slurm-client, munge
#   bash scripts/slurm/one-node.sh start DIR   # config, state and logs in DIR; prints SLURM_CONF
#   bash scripts/slurm/one-node.sh stop DIR    # stops the daemons that start DIR started
#
# There is no systemd here: munged, slurmctld and slurmd are started by hand and stopped by
# their PIDs. proctrack/linuxproc and task/none need no cgroups; jobcomp/filetxt records each
# (array) task's final state in DIR/jobcomp.txt, since sacct would need slurmdbd;
# kill_invalid_depend cancels an afterok chain whose predecessor failed instead of leaving it
# pending forever. Needs root.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "one-node.sh: Slurm is not installed and apt-get as root is not available" >&2
    return 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

start() {
  [ -n "$dir" ] || { echo "usage: one-node.sh start DIR" >&2; exit 2; }
  mkdir -p "$dir/state" "$dir/spool"
  dir="$(cd "$dir" && pwd)"
  local host cpus
  host="$(hostname -s)"
  cpus="$(nproc)"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=vimseg
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
DependencyParameters=kill_invalid_depend
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  # munge: its socket folder, owned by munge, then the daemon as munge, unless one answers.
  if ! munge -n > /dev/null 2>&1; then
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged --force
    echo started > "$dir/munged.started"
    for _ in $(seq 40); do munge -n > /dev/null 2>&1 && break; sleep 0.25; done
    munge -n > /dev/null || { echo "one-node.sh: munged does not answer" >&2; return 1; }
  fi
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  # Wait until the node takes jobs.
  for _ in $(seq 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "one-node.sh: the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  sinfo >&2 || true
  return 1
}

stop() {
  [ -n "$dir" ] || { echo "usage: one-node.sh stop DIR" >&2; exit 2; }
  local pid
  for name in slurmd slurmctld; do
    if [ -s "$dir/$name.pid" ]; then
      pid="$(cat "$dir/$name.pid")"
      kill "$pid" 2>/dev/null || true
      # slurmctld saves its state before it exits (a second or two).
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  if [ -e "$dir/munged.started" ]; then
    pkill -x munged || true
    rm -f "$dir/munged.started"
  fi
}

case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: one-node.sh install | start DIR | stop DIR" >&2; exit 2 ;;
esac
