#!/usr/bin/env bash
# A private CA and a SuperLink server certificate valid for the given
# addresses (IPs and/or DNS names: every name the SuperNodes and `flwr` CLI
# users will dial). Copy ca.crt to every SuperNode and CLI machine; server.pem
# and server.key stay on the SuperLink machine.
#
#   scripts/make_certs.sh OUT_DIR ADDRESS [ADDRESS ...]
#   scripts/make_certs.sh certs 10.0.0.5 superlink.example.org localhost 127.0.0.1
#
# env: DAYS (default 365), KEY_ALG=ec|rsa (default ec, P-256; rsa = 3072 bit)
set -euo pipefail
if [ $# -lt 2 ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2
fi
out="$1"; shift
days="${DAYS:-365}"
mkdir -p "$out"
umask 077

newkey() {  # newkey FILE
    if [ "${KEY_ALG:-ec}" = rsa ]; then
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$1" 2>/dev/null
    else
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
    fi
}

san=""; ndns=0; nip=0
for a in "$@"; do
    if [[ "$a" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$a" == *:* ]]; then
        nip=$((nip + 1)); san+="IP.$nip = $a"$'\n'
    else
        ndns=$((ndns + 1)); san+="DNS.$ndns = $a"$'\n'
    fi
done

cat > "$out/server.cnf" <<CNF
[req]
distinguished_name = dn
req_extensions = v3_req
prompt = no
[dn]
CN = $1
[v3_req]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @alt
[alt]
$san
CNF

newkey "$out/ca.key"
openssl req -new -x509 -key "$out/ca.key" -sha256 -days "$days" \
    -subj "/CN=regtopk-fl SuperLink CA" -out "$out/ca.crt"
newkey "$out/server.key"
openssl req -new -key "$out/server.key" -out "$out/server.csr" -config "$out/server.cnf"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -out "$out/server.pem" -days "$days" -sha256 \
    -extfile "$out/server.cnf" -extensions v3_req 2>/dev/null
rm -f "$out/server.csr"
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "CA:          $out/ca.crt   (copy to every SuperNode and flwr CLI machine)"
echo "server cert: $out/server.pem, key: $out/server.key   (SuperLink machine only)"
echo "valid for:   $*"
