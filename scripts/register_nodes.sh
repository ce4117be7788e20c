#!/usr/bin/env bash
# Register SuperNode public keys at a SuperLink running with node
# authentication (Flower 1.41: `flwr supernode register`; a SuperNode whose
# key is not registered is refused and exits). Run where the `flwr` CLI has
# the SuperLink connection in $FLWR_HOME/config.toml (docs/deploy.md).
#
#   scripts/register_nodes.sh CONNECTION PUBKEY [PUBKEY ...]
#   scripts/register_nodes.sh regtopk keys/node*.pub
set -euo pipefail
if [ $# -lt 2 ]; then awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; fi
source "$(dirname "$0")/_flwr_env.sh"
conn="$1"; shift
rc=0
for pub in "$@"; do
    name="$(basename "$pub" .pub)"
    flwr supernode register "$pub" "$conn" --name "$name" || { rc=1; echo "register_nodes.sh: $pub failed" >&2; }
done
flwr supernode list "$conn"
exit $rc
