#!/usr/bin/env bash
# Start the SuperLink (Flower 1.41 Deployment Runtime): ONE HTTPS port serves
# the SuperNodes (Fleet API), the `flwr` CLI (Control API) and the ServerApp
# (Runtime API). TLS and SuperNode authentication are ON by default.
#
#   scripts/start_superlink.sh [--host 127.0.0.1] [--port 9093] [--certs DIR]
#                              [--database FILE] [--no-auth] [--insecure] [-- EXTRA...]
#
#   --certs DIR   holds ca.crt, server.pem, server.key (scripts/make_certs.sh); default ./certs
#   --host        address to listen on; 0.0.0.0 to accept SuperNodes from other machines
#   --database    keep registered nodes and runs across restarts (sqlite file);
#                 default: in memory (register the node keys again after a restart)
#   --no-auth     accept any SuperNode (no `flwr supernode register` needed)
#   --insecure    plain HTTP, no TLS (implies --no-auth; loopback experiments only)
#   EXTRA         passed to flower-superlink unchanged
# Runs in the foreground (exec): stop it with Ctrl-C / kill <pid>; the
# flower-superexec it starts exits with it. Results of a run are written by
# the ServerApp on THIS machine, into the run config's output_dir (relative
# paths: relative to the directory this script is started from).
set -euo pipefail
source "$(dirname "$0")/_flwr_env.sh"
host=127.0.0.1; port=9093; certs=certs; database=""; auth=1; tls=1
while [ $# -gt 0 ]; do
    case "$1" in
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --certs) certs="$2"; shift 2 ;;
        --database) database="$2"; shift 2 ;;
        --no-auth) auth=0; shift ;;
        --insecure) tls=0; auth=0; shift ;;
        --) shift; break ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "start_superlink.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
args=(--host "$host" --port "$port" --disable-runtime-dependency-installation)
if [ "$tls" = 1 ]; then
    for f in ca.crt server.pem server.key; do
        [ -r "$certs/$f" ] || { echo "start_superlink.sh: $certs/$f missing (scripts/make_certs.sh, or --insecure)" >&2; exit 2; }
    done
    certs="$(cd "$certs" && pwd)"  # absolute: the SuperExec it starts gets the CA path too
    args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem"
           --ssl-keyfile "$certs/server.key")
else
    echo "start_superlink.sh: WARNING: --insecure: plain HTTP, no TLS, no node authentication" >&2
    args+=(--insecure)
fi
[ "$auth" = 1 ] && args+=(--enable-supernode-auth)
[ -n "$database" ] && args+=(--database "$database")
exec flower-superlink "${args[@]}" "$@"
