#!/usr/bin/env bash
# Run one replica group: `torchrun --nproc-per-node=K SCRIPT ARGS...` with the LOCOCOMM_*
# environment, restarting the whole group when one of its ranks dies.
#
# Each of the K ranks builds `lc.Manager.from_env()`, which joins the cross-replica group of
# its local rank (rank r of every replica group, as HSDP does). If a rank crashes, torchrun
# stops the group's other ranks and starts all K again (up to MAX_RESTARTS times); the new
# processes re-register under the same LOCOCOMM_REPLICA_ID and are healed from the other
# replica groups before their first step. If torchrun gives up, the whole group is launched
# again after RESTART_DELAY seconds, up to OUTER_RESTARTS times (0: never).
#
# Variables:
#   LOCOCOMM_COORDINATOR   host:port of the coordinator (required; see launch/coordinator.sh)
#   LOCOCOMM_REPLICA_ID    this group's stable name, the same on all its ranks
#                          (default: <hostname>-<pid of this script>)
#   LOCOCOMM_TOKEN         shared secret, if the coordinator uses one
#   LOCOCOMM_BACKEND       gloo | nccl (default: nccl when CUDA is available, else gloo)
#   LOCOCOMM_TIMEOUT       seconds a collective may take before the step fails (default 60)
#   NPROC_PER_NODE         K, ranks per node (default: number of GPUs, or 1 without CUDA)
#   NNODES                 nodes in this replica group (default 1)
#   RDZV_ENDPOINT          host:port of the group's torchrun rendezvous when NNODES > 1
#                          (c10d backend, rdzv id = replica id); default: --standalone
#   MAX_RESTARTS           torchrun restarts of the group after a rank failure (default 3)
#   MONITOR_INTERVAL       seconds between torchrun's health checks of its ranks (default 0.5)
#   OUTER_RESTARTS         relaunches of torchrun itself once it gives up (default 0)
#   RESTART_DELAY          seconds before such a relaunch (default 5)
#   TORCHRUN               torchrun command (default: torchrun on PATH, else next to $PYTHON)
#   OMP_NUM_THREADS        compute threads per rank on CPU (default 1)
#
# Example (2 GPUs, one replica group per node):
#   LOCOCOMM_COORDINATOR=coord:29400 LOCOCOMM_REPLICA_ID=node3 NPROC_PER_NODE=2 \
#     launch/replica.sh examples/torchrun_train.py --algo dp --steps 1000
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 SCRIPT [ARGS...]" >&2
  exit 2
fi
: "${LOCOCOMM_COORDINATOR:?set LOCOCOMM_COORDINATOR=host:port (see launch/coordinator.sh)}"

if [[ -z "${TORCHRUN:-}" ]]; then
  if command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=torchrun
  else
    py="$(command -v "${PYTHON:-python3}")"
    TORCHRUN="$(dirname "$py")/torchrun"
  fi
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)"
  fi
  NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
fi
NNODES="${NNODES:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

rdzv=(--standalone)
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  : "${LOCOCOMM_REPLICA_ID:?a multi-node replica group needs LOCOCOMM_REPLICA_ID (its rdzv id)}"
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$LOCOCOMM_REPLICA_ID")
elif [[ "$NNODES" != 1 ]]; then
  echo "$0: NNODES=$NNODES needs RDZV_ENDPOINT (the group's torchrun rendezvous)" >&2
  exit 2
fi
export LOCOCOMM_REPLICA_ID="${LOCOCOMM_REPLICA_ID:-$(hostname)-$$}"

# SIGTERM/SIGINT stop torchrun (which stops its ranks) and this script.
child=""
trap 'if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" || true; fi; exit 143' TERM INT

attempt=0
while true; do
  status=0
  "$TORCHRUN" "${rdzv[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --max-restarts "${MAX_RESTARTS:-3}" --monitor-interval "${MONITOR_INTERVAL:-0.5}" \
    "$@" &
  child=$!
  wait "$child" || status=$?
  child=""
  if [[ $status -eq 0 ]]; then
    exit 0
  fi
  attempt=$(( attempt + 1 ))
  if [[ $attempt -gt "${OUTER_RESTARTS:-0}" ]]; then
    echo "$0: replica group $LOCOCOMM_REPLICA_ID failed (torchrun exit $status)" >&2
    exit "$status"
  fi
  echo "$0: replica group $LOCOCOMM_REPLICA_ID failed (exit $status); relaunch $attempt in ${RESTART_DELAY:-5}s" >&2
  sleep "${RESTART_DELAY:-5}"
done
