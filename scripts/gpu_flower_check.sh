#!/usr/bin/env bash
# The short check of Flower clients on a GPU (issue #21), for a device call
# with little time left: Fig. 3's settings (ResNet-18, N = 8, S = 0.001,
# deterministic=true) for ROUNDS rounds, each run through
# scripts/profile_round.py --flower (s/round, the server's steps, the
# clients' phases):
#   1. in-process twin, the recorded gradient step (task.batched=graph)
#   2. runtime=flower
#   3. runtime=flower under CUDA MPS (a daemon of this script's own, quit
#      after; skipped where nvidia-cuda-mps-control is missing)
# then the final models' agreement (Flower vs in-process). Needs .gpu/ from
# `make gpu-bundle` (carried); writes $OUT/flower_check.log; exits 1 when a
# part failed (each is capped at CAP_S, default 120 s).
#
#   device: bash scripts/gpu_flower_check.sh        (about 2-3 minutes)
#   CPU smoke: DEVICE=cpu ROUNDS=3 WIDTH=4 WORKERS=3 DATA=<synthetic archive> BUNDLE=none \
#              bash scripts/gpu_flower_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
DEVICE=${DEVICE:-cuda}
ROUNDS=${ROUNDS:-30}
WIDTH=${WIDTH:-64}
WORKERS=${WORKERS:-8}
METHOD=${METHOD:-topk}
PY=${PY:-python3}
BUNDLE=${BUNDLE:-.gpu/flower-cp312.tar.xz}
DATA=${DATA:-$PWD/.gpu/cifar10-small.tar.gz}
RUNS=${RUNS:-/tmp/regtopk_flower_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/flower_check.log") 2>&1
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
. scripts/_gpu_env.sh
unpack_bundle "$BUNDLE" || exit 1
rm -rf "$RUNS" && mkdir -p "$RUNS"
date
FAILED=""
prof() {  # NAME RUNTIME: at most CAP_S (default 120) seconds each
    echo "== $1 (at ${SECONDS} s)"
    timeout -k 10 "${CAP_S:-120}" $PY scripts/profile_round.py --flower "$DATA" \
        --device "$DEVICE" --rounds "$ROUNDS" --width "$WIDTH" --workers "$WORKERS" \
        --method "$METHOD" --runtime "$2" --keep "$RUNS/$1" --override task.batched=graph \
        || { echo "== $1 failed (rc $?)"; FAILED="$FAILED $1"; }
}
prof inprocess inprocess
prof flower flower
mps_start
case $? in
    0) prof flower_mps flower; mps_stop ;;
    2) echo "== flower_mps: not run (no CUDA MPS here)" ;;
    *) echo "== flower_mps: not run (the MPS daemon did not start)" ;;
esac
$PY - "$RUNS" <<'PY' || FAILED="$FAILED agreement"
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from gpu_bench import agreement
runs = Path(sys.argv[1])
for name in ("flower", "flower_mps"):
    if not (runs / name).exists():
        continue  # not run (no MPS): said above
    if not (runs / "inprocess" / "model.pt").exists() or not (runs / name / "model.pt").exists():
        sys.exit(f"{name} vs inprocess: a final model is missing")
    print(f"{name} vs inprocess, final models:", agreement(runs / name, runs / "inprocess"))
PY
echo "== total ${SECONDS} s${FAILED:+; failed:$FAILED}"
date
[ -z "$FAILED" ]
