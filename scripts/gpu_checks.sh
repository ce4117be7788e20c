#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (no
# internet; its python3 has torch/torchvision/pandas but not hydra, omegaconf,
# datasets or flwr-datasets, which travel as wheels in .whl/, and the CIFAR-10
# archive travels in data/). Results go to $OUT (at most 8 files):
#   run.log                     everything printed, in order
#   bench_sparsifiers_cuda.md/.csv  scripts/bench_sparsifiers.py on CUDA
#   fig3_{topk,regtopk}_metrics.csv, fig3_{topk,regtopk}_summary.json
#       the paper's Fig. 3 preset (ResNet-18, N = 8, S = 0.001) on the GPU,
#       both methods side by side, each stopped after FIG3_S seconds
#
#   OUT=/tmp/out FIG3_S=280 bash scripts/gpu_checks.sh 2>&1 | tee /tmp/out/run.log
# Locally (CPU, smoke): DEVICE=cpu ROUNDS=2 BENCH=0 OUT=/tmp/out bash scripts/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
DEVICE=${DEVICE:-cuda}
FIG3_S=${FIG3_S:-280}
ROUNDS=${ROUNDS:-1500}
BENCH=${BENCH:-1}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import hydra, flwr_datasets" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "$BENCH" = 1 ]; then
    echo "== exact selection tests (CUDA cases included)"
    timeout 120 $PY -m pytest -q -p no:cacheprovider --noconftest tests/test_selection.py
    echo "== sparsifier benchmark on $DEVICE"
    timeout 150 $PY scripts/bench_sparsifiers.py --device "$DEVICE" --sizes 1000000 11173962 \
        --repeats 5 --note "lent GPU machine" --out "$OUT/bench_sparsifiers_cuda.md" | tail -5
fi
echo "== Fig. 3 preset on $DEVICE, ${FIG3_S} s per method"
DATA="task.data_path=$PWD/data/cifar10-jpeg.tar.gz task.cache_dir=/tmp/regtopk-cache"
timeout 120 $PY -c "from regtopk_fl.tasks.data import load_cifar10; load_cifar10('$PWD/data/cifar10-jpeg.tar.gz', '/tmp/regtopk-cache')" || exit 1
for sp in topk regtopk; do
    timeout "$FIG3_S" $PY -m regtopk_fl experiment=fig3_cifar10 sparsifier=$sp device=$DEVICE \
        rounds=$ROUNDS $DATA checkpoint.every=0 progress=false hydra.run.dir=/tmp/fig3_$sp &
done
wait
for sp in topk regtopk; do
    cp /tmp/fig3_$sp/metrics.csv "$OUT/fig3_${sp}_metrics.csv"
    cp /tmp/fig3_$sp/summary.json "$OUT/fig3_${sp}_summary.json"
    tail -2 /tmp/fig3_$sp/metrics.csv
done
date
