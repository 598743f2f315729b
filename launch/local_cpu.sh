#!/usr/bin/env bash
# N CPU replica groups on this machine: a coordinator plus N `launch/replica.sh` groups of K
# ranks each (gloo), all running SCRIPT ARGS...; for trying multi-rank replica groups, the
# restart policy and healing without a cluster.
#
# Starts launch/coordinator.sh on a free loopback port, then replica groups named
# ${REPLICA_PREFIX}0 .. ${REPLICA_PREFIX}N-1 (each a torchrun of K ranks with its own restart
# policy, see launch/replica.sh), waits for all of them, stops the coordinator. Exit status:
# 0 if every group succeeded, else the first failure's. Ctrl-C stops everything.
#
# Variables:
#   REPLICAS            N, replica groups (default 2)
#   NPROC_PER_NODE      K, ranks per replica group (default 1)
#   LOG_DIR             where replica<i>.log and coordinator.log go (default ./lococomm-logs)
#   REPLICA_PREFIX      replica id prefix (default "replica")
#   LOCOCOMM_HEARTBEAT_TIMEOUT, LOCOCOMM_MIN_WORKERS, LOCOCOMM_TOKEN: passed to the
#                       coordinator (LOCOCOMM_INITIAL_WORKERS defaults to N, so the first
#                       epoch starts with every group)
#   MAX_RESTARTS, MONITOR_INTERVAL, OUTER_RESTARTS, RESTART_DELAY, LOCOCOMM_TIMEOUT,
#   OMP_NUM_THREADS, PYTHON, TORCHRUN: passed to launch/replica.sh
#
# Example:
#   REPLICAS=2 NPROC_PER_NODE=2 launch/local_cpu.sh examples/torchrun_train.py --algo both
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 SCRIPT [ARGS...]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPLICAS="${REPLICAS:-2}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
LOG_DIR="${LOG_DIR:-./lococomm-logs}"
REPLICA_PREFIX="${REPLICA_PREFIX:-replica}"
mkdir -p "$LOG_DIR"

pids=()
coordinator=""
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$coordinator" ]]; then
    kill -TERM "$coordinator" 2>/dev/null || true
    wait "$coordinator" 2>/dev/null || true
  fi
}
trap 'cleanup; exit 130' INT TERM

LOCOCOMM_HOST=127.0.0.1 LOCOCOMM_PORT=0 \
  LOCOCOMM_INITIAL_WORKERS="${LOCOCOMM_INITIAL_WORKERS:-$REPLICAS}" \
  "$here/coordinator.sh" >"$LOG_DIR/coordinator.addr" 2>"$LOG_DIR/coordinator.log" &
coordinator=$!
address=""
for _ in $(seq 1 300); do  # up to 30 s for the coordinator to print its address
  address="$(head -n 1 "$LOG_DIR/coordinator.addr" 2>/dev/null || true)"
  [[ -n "$address" ]] && break
  if ! kill -0 "$coordinator" 2>/dev/null; then
    echo "$0: the coordinator exited; see $LOG_DIR/coordinator.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [[ -z "$address" ]]; then
  echo "$0: no coordinator address after 30 s; see $LOG_DIR/coordinator.log" >&2
  cleanup
  exit 1
fi
echo "coordinator at $address; $REPLICAS replica groups x $NPROC_PER_NODE ranks; logs in $LOG_DIR"

export LOCOCOMM_COORDINATOR="$address"
for (( i = 0; i < REPLICAS; i++ )); do
  LOCOCOMM_REPLICA_ID="${REPLICA_PREFIX}${i}" LOCOCOMM_BACKEND="${LOCOCOMM_BACKEND:-gloo}" \
    "$here/replica.sh" "$@" >"$LOG_DIR/${REPLICA_PREFIX}${i}.log" 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
  fi
done
pids=()
kill -TERM "$coordinator" 2>/dev/null || true
wait "$coordinator" 2>/dev/null || true
coordinator=""
exit "$status"
