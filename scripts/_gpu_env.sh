# Sourced by the GPU scripts (gpu_checks.sh, gpu_flower_check.sh): the
# bundle that brings Flower and Ray to a GPU machine without them, and a CUDA
# MPS daemon of the script's own. Expects PY and DEVICE.

# unpack_bundle BUNDLE: its packages into a PYTHONPATH folder (SITE), or the
# repository alone where there is no bundle (the CPU smoke tests)
unpack_bundle() {
    if [ -f "$1" ]; then
        SITE=${SITE:-/tmp/regtopk-site}
        rm -rf "$SITE" && mkdir -p "$SITE"
        tar -xJf "$1" -C "$SITE" || { echo "could not unpack $1"; return 1; }
        export PYTHONPATH="$SITE:$PWD"
        echo "unpacked $1 ($(du -sh "$SITE" | cut -f1)) into $SITE (${SECONDS} s)"
    else
        export PYTHONPATH=$PWD
    fi
}

# mps_start: a daemon under /tmp/regtopk-mps, for the processes started
# after it (they find it by CUDA_MPS_PIPE_DIRECTORY); it is quit when the
# script exits, even when the script is cut. Returns 2 where there is no MPS
# (no CUDA device, no nvidia-cuda-mps-control), 1 where it did not start.
mps_start() {
    [ "$DEVICE" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1 || return 2
    mkdir -p /tmp/regtopk-mps/pipe /tmp/regtopk-mps/log
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/regtopk-mps/pipe
    export CUDA_MPS_LOG_DIRECTORY=/tmp/regtopk-mps/log
    trap mps_stop EXIT
    if nvidia-cuda-mps-control -d &&
            $PY -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
        return 0
    fi
    tail -5 /tmp/regtopk-mps/log/control.log 2>/dev/null
    mps_stop
    return 1
}

mps_stop() {
    echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
    trap - EXIT
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
