#!/usr/bin/env bash
# The GPU checks of issue #21 in one go, for a lent GPU machine (one H100 or
# H200, no internet): Flower clients on the GPU beside the in-process engine.
# Needs what `make gpu-bundle` puts in .gpu/ (carry it): the Flower + Ray +
# Hydra + flwr-datasets wheels the machine lacks, unpacked here into a
# PYTHONPATH folder (flower-cp312.tar.xz), and a reduced CIFAR-10 archive
# (cifar10-small.tar.gz, the offline archive's layout).
#
# Steps, in order, each under a hard time cap and skipped with a printed
# "not run: budget" when less than it needs is left of BUDGET_S (default 420 s):
#   env        versions, GPU, what imports
#   inprocess  (b) compute floor (ResNet-18 fwd+bwd of N x 20 images), the
#              workers' gradients (loop vs batched), in-process s/round of
#              Fig. 3 (topk, regtopk) x (loop, batched), deterministic=true,
#              and a repeat (bitwise?)
#   flower     (a) runtime=flower at Fig. 3 (N=8, ResNet-18, S=0.001) for
#              ROUNDS rounds, s/round, final model vs the in-process twins;
#              (c) peak GPU memory per client, the client_gpus auto chose
#   flower_mps the same under CUDA MPS (the client processes' kernels side by
#              side instead of time-sliced), with a daemon of this script's
#              own (pipe and log under /tmp/regtopk-mps), quit afterwards;
#              "not run" where the machine has no nvidia-cuda-mps-control
#   many       (d) Flower, ResNet-18 width 16, N=64, m=16: s/round
# Results, written as each step completes (at most 3 files in $OUT):
#   run.log           everything printed, in order
#   gpu_summary.json  the numbers, one key per step
#   gpu_summary.md    the same as tables
#
#   OUT=/tmp/out bash scripts/gpu_checks.sh
# CPU smoke test (`make gpu-smoke`, which CI runs; tests/test_gpu_checks.py runs
# it with no time left, every step skipped):
#   DEVICE=cpu ROUNDS=2 DATA=<synthetic archive> GPU_BENCH_ARGS="--width 4 ..." OUT=... bash scripts/gpu_checks.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
DEVICE=${DEVICE:-cuda}
ROUNDS=${ROUNDS:-30}
BUDGET_S=${BUDGET_S:-420}
PY=${PY:-python3}
BUNDLE=${BUNDLE:-.gpu/flower-cp312.tar.xz}
DATA=${DATA:-$PWD/.gpu/cifar10-small.tar.gz}
RUNS=${RUNS:-/tmp/regtopk_gpu_runs}
EXTRA=${GPU_BENCH_ARGS:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
date
. scripts/_gpu_env.sh
unpack_bundle "$BUNDLE" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
[ -f "$DATA" ] || { echo "no data archive at $DATA (make gpu-bundle builds it)"; exit 1; }

bench() { $PY scripts/gpu_bench.py "$@" --out "$OUT" --runs "$RUNS"; }

# step NAME CAP_S NEED_S [ARGS...]: run `gpu_bench.py NAME ARGS` for at most
# CAP_S seconds, or skip it when less than NEED_S seconds of the budget are
# left; its results go under KEY (default NAME)
step() {
    local name=$1 cap=$2 need=$3 left=$((BUDGET_S - SECONDS)) t rc key=${KEY:-$1}
    shift 3
    if [ "$left" -lt "$need" ]; then
        bench skip "$key" --why "not run: budget (${left} s of ${BUDGET_S} s left, needs ~${need} s)"
        return
    fi
    t=$cap; [ "$left" -lt "$t" ] && t=$left
    echo "== $key (at ${SECONDS} s; cap ${t} s)"
    # shellcheck disable=SC2086
    timeout -k 15 "$t" $PY scripts/gpu_bench.py "$name" --out "$OUT" --runs "$RUNS" \
        --device "$DEVICE" --data "$DATA" --rounds "$ROUNDS" $EXTRA "$@"
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        bench skip "$key" --stopped --why "stopped after its ${t} s cap (partial results kept)"
        $PY -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
    fi
    echo "== $key done (rc $rc) at ${SECONDS} s"
}

# the Flower step again under CUDA MPS, with a daemon of its own
flower_mps() {
    local left=$((BUDGET_S - SECONDS)) rc
    if [ "$left" -lt 60 ]; then
        bench skip flower_mps --why "not run: budget (${left} s of ${BUDGET_S} s left, needs ~60 s)"
        return
    fi
    mps_start
    rc=$?
    if [ "$rc" = 0 ]; then
        KEY=flower_mps step flower 150 60 --tag mps
        mps_stop
    elif [ "$rc" = 2 ]; then
        bench skip flower_mps --why "not run: no CUDA MPS here (DEVICE=$DEVICE)"
    else
        bench skip flower_mps --why "not run: the MPS daemon did not start (run.log)"
    fi
}

step env 90 20
step inprocess 150 60
step flower 240 90
flower_mps
step many 150 60
echo "== total ${SECONDS} s"
cat "$OUT/gpu_summary.md" 2>/dev/null
date
exec 1>&- 2>&-
wait "$TEE" 2>/dev/null || sleep 1   # run.log complete before the script returns
