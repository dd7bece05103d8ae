#!/usr/bin/env bash
# Multi-host simulation on one machine for psShards (docs/benchmarks.md, "Sharded parameter server").
#
#   sudo benchmarks/netns_shards.sh [OUT.json] [extra args for netns_shards_fit.py]
#
# Topology (all addresses inside namespaces this script creates; nothing else is touched):
#
#   netns stsh-drv (10.213.7.1: driver + Spark master)
#        | veth stshd-n <-> stshd-h, rate-limited both ways
#   bridge stsh-br (root namespace, no address)
#        | veth stsh0-h <-> stsh0-n           | veth stsh1-h <-> stsh1-n
#   netns stsh-w0 (10.213.7.10: worker)      netns stsh-w1 (10.213.7.11: worker)
#
# Every link is shaped with tc tbf at $RATE (default 200mbit) in each direction, so the links,
# not the CPU cores, bound the parameter traffic. Each worker offers $CORES task slots (default
# 3: room for psShards=4 — two shard tasks and one training task per worker). The namespaces, the bridge and every
# process started here are removed on exit, on failure and on Ctrl-C.
#
# Environment: PYTHON (default: this checkout's .venv/bin/python), SPARKTORCH_PYTHONPATH (default: this
# checkout's python/), RATE, CORES.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${1:-$REPO/benchmarks/results/netns_shards.json}"
shift || true
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
PYPATH="${SPARKTORCH_PYTHONPATH:-$REPO/python}"
RATE="${RATE:-200mbit}"
CORES="${CORES:-3}"
NET=10.213.7
DRV_IP=$NET.1
WORKERS=2
SPARK_HOME="$("$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
WORK="$(mktemp -d /tmp/stsh.XXXXXX)"
PIDS=()

log() { echo "[netns_shards] $*" >&2; }

cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null
  done
  sleep 2
  for pid in "${PIDS[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null
  done
  for ns in stsh-drv stsh-w0 stsh-w1; do
    ip netns del "$ns" 2>/dev/null
  done
  ip link del stsh-br 2>/dev/null
  ip link del stshd-h 2>/dev/null
  ip link del stsh0-h 2>/dev/null
  ip link del stsh1-h 2>/dev/null
  if [ "$rc" -eq 0 ]; then
    rm -rf "$WORK"
    log "cleaned up"
  else
    log "cleaned up; failed with status $rc (Spark logs kept in $WORK)"
  fi
  exit $rc
}
trap cleanup EXIT INT TERM

if ip netns list | grep -qE '^stsh-'; then
  log "namespaces stsh-* already exist: another run? refusing"; exit 1
fi

shape() {  # shape NS DEV: tbf at $RATE on DEV's egress (NS "" = root namespace)
  local cmd=(tc qdisc add dev "$2" root tbf rate "$RATE" burst 256kbit latency 50ms)
  if [ -n "$1" ]; then ip netns exec "$1" "${cmd[@]}"; else "${cmd[@]}"; fi
}

link_ns() {  # link_ns NS HOSTDEV NSDEV IP
  ip netns add "$1"
  ip link add "$2" type veth peer name "$3"
  ip link set "$3" netns "$1"
  ip link set "$2" master stsh-br
  ip link set "$2" up
  ip netns exec "$1" ip link set lo up
  ip netns exec "$1" ip addr add "$4/24" dev "$3"
  ip netns exec "$1" ip link set "$3" up
  shape "" "$2"
  shape "$1" "$3"
}

log "creating the bridge and namespaces ($RATE per link and direction)"
ip link add stsh-br type bridge
ip link set stsh-br up
link_ns stsh-drv stshd-h stshd-n "$DRV_IP"
link_ns stsh-w0 stsh0-h stsh0-n "$NET.10"
link_ns stsh-w1 stsh1-h stsh1-n "$NET.11"

start() {  # start NS NAME IP cmd...: in its own session (process group) inside NS
  local ns=$1 name=$2 ip=$3; shift 3
  ip netns exec "$ns" env SPARK_HOME="$SPARK_HOME" SPARK_LOCAL_IP="$ip" SPARK_LOCAL_HOSTNAME="$ip" \
    PYSPARK_PYTHON="$PYTHON" PYTHONPATH="$PYPATH" OMP_NUM_THREADS=1 SPARK_WORKER_DIR="$WORK/$name" \
    setsid "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

wait_port() {  # wait_port NS IP PORT SECONDS
  local deadline=$(( $(date +%s) + $4 ))
  until ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "nothing listened on $2:$3"; return 1; }
    sleep 0.5
  done
}

log "starting the Spark master (driver namespace) and $WORKERS workers"
start stsh-drv master "$DRV_IP" "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master \
  --host "$DRV_IP" --port 7077 --webui-port 8080
wait_port stsh-drv "$DRV_IP" 7077 90
for i in 0 1; do
  start "stsh-w$i" "worker$i" "$NET.1$i" "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker \
    "spark://$DRV_IP:7077" --host "$NET.1$i" --cores "$CORES" --memory 2g --webui-port 8081 --work-dir "$WORK/work$i"
done

log "running the fits"
mkdir -p "$(dirname "$OUT")"
ip netns exec stsh-drv env SPARK_HOME="$SPARK_HOME" SPARK_LOCAL_IP="$DRV_IP" SPARK_LOCAL_HOSTNAME="$DRV_IP" \
  PYSPARK_PYTHON="$PYTHON" PYTHONPATH="$PYPATH" OMP_NUM_THREADS=1 \
  "$PYTHON" "$HERE/netns_shards_fit.py" "spark://$DRV_IP:7077" "$DRV_IP" "$OUT" --workers "$WORKERS" "$@"
log "results in $OUT"
