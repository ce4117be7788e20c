#!/usr/bin/env bash
# Start one SuperNode = one worker (partition) of a run.
#
#   scripts/start_supernode.sh SUPERLINK PARTITION_ID NUM_PARTITIONS AUTH_KEY ROOT_CERT \
#                              [LOCAL_PORT=9094] [STATE_DIR] [-- EXTRA...]
#
#   SUPERLINK    host:port of the SuperLink (the one port it listens on)
#   AUTH_KEY     this node's private key (scripts/make_node_keys.sh; its .pub must be
#                registered at the SuperLink), or "none" when the SuperLink runs --no-auth
#   ROOT_CERT    the CA certificate (ca.crt) the SuperLink's certificate was signed with,
#                or "insecure" for a SuperLink started with --insecure
#   LOCAL_PORT   this node's local Runtime API port (127.0.0.1 only; nodes sharing a
#                machine need different ports; nothing to open in a firewall)
#   STATE_DIR    where the worker keeps its error-feedback memory between rounds (a file per
#                run and partition), so a restarted node resumes; "" = memory only
#   env DATA_PATH   this machine's copy of the data set (overrides task.data_path)
#   env CACHE_DIR   this machine's cache folder (overrides task.cache_dir)
#   env SUPERNODE_HOME  Flower home of this node (installed app copies);
#                       default ${FLWR_HOME:-~/.flwr}/supernode-<partition>
#   EXTRA        passed to flower-supernode unchanged (e.g. --max-retries 10)
# Runs in the foreground (exec). The node picks the GPU when there is one
# (device=auto), else the CPU.
set -euo pipefail
if [ $# -lt 5 ]; then awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; fi
source "$(dirname "$0")/_flwr_env.sh"
superlink="$1"; pid="$2"; nparts="$3"; key="$4"; cert="$5"; shift 5
lport=9094; state=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then lport="$1"; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then state="$1"; shift; fi
[ "${1:-}" = "--" ] && shift

q() { printf '"%s"' "$1"; }  # a TOML string (paths must not contain ")
node_config="partition-id=$pid num-partitions=$nparts"
if [ -n "$state" ]; then
    mkdir -p "$state"; state="$(cd "$state" && pwd)"
    node_config+=" state-dir=$(q "$state")"
fi
[ -n "${DATA_PATH:-}" ] && node_config+=" data-path=$(q "$DATA_PATH")"
[ -n "${CACHE_DIR:-}" ] && node_config+=" cache-dir=$(q "$CACHE_DIR")"

args=(--superlink "$superlink" --host 127.0.0.1 --port "$lport" --node-config "$node_config")
if [ "$cert" = insecure ]; then
    args+=(--insecure)
else
    [ -r "$cert" ] || { echo "start_supernode.sh: root certificate $cert not readable" >&2; exit 2; }
    args+=(--root-certificates "$cert")
fi
if [ "$key" != none ]; then
    [ -r "$key" ] || { echo "start_supernode.sh: auth key $key not readable" >&2; exit 2; }
    args+=(--auth-supernode-private-key "$key")
fi
export FLWR_HOME="${SUPERNODE_HOME:-${FLWR_HOME:-$HOME/.flwr}/supernode-$pid}"
mkdir -p "$FLWR_HOME"
exec flower-supernode "${args[@]}" "$@"
