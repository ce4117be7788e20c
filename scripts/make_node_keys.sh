#!/usr/bin/env bash
# N SuperNode authentication key pairs (OpenSSH-format ECDSA, NIST P-384),
# as Flower 1.41's node authentication expects:
#   OUT_DIR/<prefix><i>      private key: stays on SuperNode i (--auth-supernode-private-key)
#   OUT_DIR/<prefix><i>.pub  public key:  registered at the SuperLink (scripts/register_nodes.sh)
#
#   scripts/make_node_keys.sh OUT_DIR N [PREFIX=node]
set -euo pipefail
if [ $# -lt 2 ]; then awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; fi
out="$1"; n="$2"; prefix="${3:-node}"
mkdir -p "$out"
source "$(dirname "$0")/_flwr_env.sh"
for ((i = 0; i < n; i++)); do
    key="$out/$prefix$i"
    if [ -e "$key" ]; then echo "exists, kept: $key"; continue; fi
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$prefix$i" -f "$key"
    else  # same format through `cryptography` (a Flower dependency)
        python - "$key" "$prefix$i" <<'PY'
import os, sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
path, comment = sys.argv[1], sys.argv[2]
k = ec.generate_private_key(ec.SECP384R1())
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as fh:
    fh.write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
with open(path + ".pub", "wb") as fh:
    fh.write(k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH)
             + b" " + comment.encode() + b"\n")
PY
    fi
    chmod 600 "$key"
    echo "$key (private)  $key.pub (public)"
done
