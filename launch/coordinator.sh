#!/usr/bin/env bash
# Start a standalone lococomm coordinator in the foreground and print its address.
#
# The first line on stdout is the coordinator's "host:port" (what workers need in
# LOCOCOMM_COORDINATOR); it then serves until SIGINT/SIGTERM. One coordinator serves every
# replica group of a job; its state is soft (if it restarts, workers re-register).
#
# Variables (all optional):
#   LOCOCOMM_HOST               address to bind (default 127.0.0.1; use 0.0.0.0 for other
#                               machines, which requires LOCOCOMM_TOKEN)
#   LOCOCOMM_PORT               port (default 29400; 0 picks a free one, printed on stdout)
#   LOCOCOMM_TOKEN              shared secret for the HMAC handshake (read from the
#                               environment, so it never shows up in `ps`)
#   LOCOCOMM_HEARTBEAT_TIMEOUT  seconds of silence before a worker counts as hung (default 5)
#   LOCOCOMM_MIN_WORKERS        fewest replica groups that may train (default 1)
#   LOCOCOMM_INITIAL_WORKERS    replica groups the first epoch waits for (default: min workers)
#   LOCOCOMM_STORE_PORT         port of the rendezvous TCPStore (default 0: any free port)
#   LOCOCOMM_BIN                the `lococomm` command (default: lococomm on PATH, else the
#                               one next to $PYTHON or python3)
#
# Example:
#   LOCOCOMM_HOST=0.0.0.0 LOCOCOMM_TOKEN=$SECRET launch/coordinator.sh   # prints e.g. 0.0.0.0:29400
set -euo pipefail

if [[ -z "${LOCOCOMM_BIN:-}" ]]; then
  if command -v lococomm >/dev/null 2>&1; then
    LOCOCOMM_BIN=lococomm
  else
    py="$(command -v "${PYTHON:-python3}")"
    LOCOCOMM_BIN="$(dirname "$py")/lococomm"
  fi
fi

args=(coordinator
  --host "${LOCOCOMM_HOST:-127.0.0.1}"
  --port "${LOCOCOMM_PORT:-29400}"
  --heartbeat-timeout "${LOCOCOMM_HEARTBEAT_TIMEOUT:-5}"
  --min-workers "${LOCOCOMM_MIN_WORKERS:-1}"
  --store-port "${LOCOCOMM_STORE_PORT:-0}")
if [[ -n "${LOCOCOMM_INITIAL_WORKERS:-}" ]]; then
  args+=(--initial-workers "$LOCOCOMM_INITIAL_WORKERS")
fi
# The token stays in the environment (the coordinator falls back to $LOCOCOMM_TOKEN).
exec "$LOCOCOMM_BIN" "${args[@]}"
