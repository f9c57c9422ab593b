#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for the tests (recipe: shared/docs/slurm-ci.md).
# Each node has 2 "GPUs" (generic resource gpu), backed by fake device files: Slurm schedules them and
# sets CUDA_VISIBLE_DEVICES and SLURM_GPUS_ON_NODE for the jobs as on a GPU cluster; nothing opens them.
#
#   cluster.sh up DIR     install Debian's slurm + munge if missing, start munged, slurmctld and one
#                         slurmd per "node" (n1, n2), each in its own network namespace with its own
#                         address and hostname; print the SLURM_CONF path when every node is idle
#   cluster.sh down DIR   stop every daemon recorded in DIR by pid, remove namespaces, veths, bridge
#
# Needs root. Each cluster takes a free slot X (1-250) on this host, so that several test runs can
# have clusters at once: subnet 10.77.X.0/24, bridge slciXbr, namespaces slciX_n1.., veths slciXh0..,
# slurmctld port 17000+X. The addresses exist only on the bridge and namespaces made here; nothing
# else is contacted. Daemons are killed by their recorded pids, never by name.
set -euo pipefail

NODES=(n1 n2)
SLOTS_LOCK=/tmp/cotmi-slurm-cluster-slots.lock

# The first slot whose bridge does not exist, claimed by creating that bridge under a lock.
claim_slot() {
  local D=$1 x
  exec 9>"$SLOTS_LOCK"
  flock 9
  for x in $(seq 1 250); do
    if ! ip link show "slci${x}br" >/dev/null 2>&1; then
      ip link add "slci${x}br" type bridge
      echo "$x" > "$D/run/slot"
      echo "link slci${x}br" >> "$D/run/net"
      exec 9>&-  # unlocks; no daemon started later inherits the lock file
      return 0
    fi
  done
  exec 9>&-
  die "no free cluster slot (250 clusters on this host?)"
}

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  for bin in slurmctld slurmd sbatch munged mungekey; do
    command -v "$bin" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null || {
      DEBIAN_FRONTEND=noninteractive apt-get update >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
          slurmctld slurmd slurm-client munge >/dev/null; }
  fi
}

up() {
  local D=$1
  export PATH=$PATH:/usr/sbin
  [[ $(id -u) == 0 ]] || die "needs root (network namespaces, munge, slurmd)"
  install_packages
  mkdir -p "$D"/{munge,run,log,state,etc,dev} "${NODES[@]/#/$D/spool/}"
  chmod 755 "$D" "$D/munge"   # 700 fails: "Socket is inaccessible"
  claim_slot "$D"
  local X NET BRIDGE
  X=$(cat "$D/run/slot")
  NET=10.77.$X
  BRIDGE=slci${X}br
  local host mem
  host=$(hostname -s)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

  mungekey -c -k "$D/munge/munge.key" >/dev/null 2>&1 || mungekey -c -f -k "$D/munge/munge.key"
  munged --key-file="$D/munge/munge.key" --socket="$D/munge/sock" --pid-file="$D/run/munged.pid" \
    --log-file="$D/log/munged.log" --seed-file="$D/munge/seed"

  {
    echo "127.0.0.1 localhost"
    echo "$NET.1 $host"
    for i in "${!NODES[@]}"; do echo "$NET.$((11 + i)) ${NODES[$i]}"; done
  } > "$D/etc/hosts"

  cat > "$D/etc/slurm.conf" <<EOF
ClusterName=cotmi$X
SlurmctldHost=$host($NET.1)
SlurmctldPort=$((17000 + X))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/sock,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillOnBadExit=1
MinJobAge=3600
MailProg=/bin/true
GresTypes=gpu
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pidfile
SlurmdPidFile=$D/run/slurmd-%n.pidfile
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
EOF
  : > "$D/etc/gres.conf"
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=$NET.$((11 + i)) CPUs=2 RealMemory=$mem Gres=gpu:2 State=UNKNOWN" >> "$D/etc/slurm.conf"
    for g in 0 1; do  # character devices with the NVIDIA major number, in DIR only
      mknod "$D/dev/${NODES[$i]}-gpu$g" c 195 $((2 * i + g))
    done
    echo "NodeName=${NODES[$i]} Name=gpu File=$D/dev/${NODES[$i]}-gpu[0-1]" >> "$D/etc/gres.conf"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$D/etc/slurm.conf"
  export SLURM_CONF=$D/etc/slurm.conf

  ip addr add $NET.1/24 dev $BRIDGE
  ip link set $BRIDGE up
  for i in "${!NODES[@]}"; do
    local n=${NODES[$i]} ns=slci${X}_${NODES[$i]} host_if=slci${X}h$i node_if=slci${X}c$i
    ip netns add "$ns"
    echo "netns $ns" >> "$D/run/net"
    ip link add "$host_if" type veth peer name "$node_if"
    echo "link $host_if" >> "$D/run/net"
    ip link set "$host_if" master $BRIDGE up
    ip link set "$node_if" netns "$ns"
    ip -n "$ns" addr add "$NET.$((11 + i))/24" dev "$node_if"
    ip -n "$ns" link set "$node_if" up
    ip -n "$ns" link set lo up
    # nsenter, not `ip netns exec` (that remounts /sys and slurmd dies); a private /etc/hosts and
    # hostname per node. nsenter/unshare/exec keep $! equal to slurmd's pid.
    nsenter --net=/run/netns/"$ns" unshare -m -u --propagation private sh -c \
      "mount --bind $D/etc/hosts /etc/hosts && hostname $n && exec slurmd -D -f $SLURM_CONF" \
      > "$D/log/slurmd-$n.out" 2>&1 &
    echo $! > "$D/run/slurmd-$n.pid"
  done
  slurmctld -D -f "$SLURM_CONF" > "$D/log/slurmctld.out" 2>&1 &
  echo $! > "$D/run/slurmctld.pid"

  for _ in $(seq 1 120); do
    [[ $(sinfo -h -t idle -o %D 2>/dev/null || true) == "${#NODES[@]}" ]] && { echo "$SLURM_CONF"; return 0; }
    sleep 0.5
  done
  die "nodes did not become idle in 60 s; logs in $D/log"
}

down() {
  local D=$1 pidfile pid
  export PATH=$PATH:/usr/sbin
  for pidfile in "$D"/run/slurmctld.pid "$D"/run/slurmd-*.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
  done
  for pidfile in "$D"/run/slurmctld.pid "$D"/run/slurmd-*.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  [[ -S $D/munge/sock ]] && munged --stop --socket="$D/munge/sock" >/dev/null 2>&1 || true
  if [[ -f $D/run/net ]]; then
    tac "$D/run/net" | while read -r kind name; do
      case $kind in
        netns) ip netns del "$name" 2>/dev/null || true ;;
        link) ip link del "$name" 2>/dev/null || true ;;
      esac
    done
    rm -f "$D/run/net"
  fi
}

case "${1:-}" in
  up) [[ -n ${2:-} ]] || die "usage: cluster.sh up DIR"; up "$(realpath -m "$2")" ;;
  down) [[ -n ${2:-} ]] || die "usage: cluster.sh down DIR"; down "$(realpath -m "$2")" ;;
  *) die "usage: cluster.sh up|down DIR" ;;
esac
