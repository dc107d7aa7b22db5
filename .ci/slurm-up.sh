#!/usr/bin/env bash
# A single-node SLURM cluster on loopback (munge + slurmctld + slurmd) for the real-cluster test
# (tests/test_slurm.py). Idempotent: when the node is already up and idle it does nothing; otherwise
# it (re)writes the config and (re)starts the daemons this script started before (by pid file).
# Needs root and Debian's slurm-wlm + munge (installed by .ci/run).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/lib/cxr-ci-slurm
NODE=$(hostname -s)
CPUS=$(nproc)
# leave the host 2 GB; the test's workers ask for 2 GB each
MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))

up() {
  timeout 5 sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)' \
    && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'
}

if [ -f "$CONF" ] && grep -q 'cxr-audit CI' "$CONF" && up; then
  echo "slurm: already up on $NODE"
  exit 0
fi

mkdir -p "$STATE"/{ctld,d,log} /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key --force
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

cat >"$CONF" <<EOF
# cxr-audit CI: one node on loopback (written by .ci/slurm-up.sh)
ClusterName=cxrci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=60
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# stop only the daemons an earlier run of this script started
for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")"
    for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
done

/usr/sbin/slurmctld -c    # -c: clean start, no jobs from an earlier life
/usr/sbin/slurmd -N "$NODE"
for _ in $(seq 60); do
  if up; then
    scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    echo "slurm: up on $NODE ($CPUS CPUs, ${MEM_MB} MB)"
    sinfo
    exit 0
  fi
  scontrol update nodename="$NODE" state=resume 2>/dev/null || true
  sleep 1
done
echo "slurm: did not come up; logs:" >&2
tail -n 30 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
exit 1
