#!/usr/bin/env bash
# Fig. 3 on one GPU: the paper's settings (experiment=fig3_cifar10) against
# the authors' released code's (experiment=fig3_authors), Top-k and RegTop-k
# each, at a matched budget: the four runs start together on the one GPU and
# each is stopped after the same RUN_S seconds (SIGINT: the run records what
# it has). The whole script stays under CAP_S (default 180 s). Results are
# written as they come, into $OUT:
#   $OUT/<protocol>_<method>/metrics.csv, summary.json, .hydra/, *.log   the runs
#   $OUT/fig3_authors_gpu.md                                             the table
#   $OUT/fig3_authors_gpu.log                                            what it printed
# WEIGHTS=/path/resnet18-f37072fd.pth (a torchvision ResNet-18 state_dict, as
# ResNet18_Weights.IMAGENET1K_V1 downloads it) makes the authors' runs
# fine-tune it; without WEIGHTS they train from scratch and the table says so.
#
#   OUT=/tmp/out bash scripts/gpu_fig3_authors.sh
#   OUT=/tmp/out WEIGHTS=/data/resnet18-f37072fd.pth CAP_S=180 bash scripts/gpu_fig3_authors.sh
# CPU smoke test (tiny settings):
#   OUT=/tmp/smoke DEVICE=cpu CAP_S=150 RUN_S=60 TEST_SUBSET=20 \
#     EXTRA="task.subset_per_class=4 eval_every=1" AUTHORS_EXTRA="local_steps=2 task.resize=64" \
#     bash scripts/gpu_fig3_authors.sh
set -u
OUT=${OUT:-/tmp/gpu_fig3_authors}
DEVICE=${DEVICE:-cuda}
CAP_S=${CAP_S:-180}
RUN_S=${RUN_S:-$((CAP_S - 60))}        # each run's share; the rest: start-up, data, table
TEST_SUBSET=${TEST_SUBSET:-2000}       # test images per evaluation (10,000 = all)
PY=${PY:-python3}
WEIGHTS=${WEIGHTS:-}
EXTRA=${EXTRA:-}                       # extra overrides for every run
AUTHORS_EXTRA=${AUTHORS_EXTRA:-}       # extra overrides for the authors' runs
PAPER_EXTRA=${PAPER_EXTRA:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/fig3_authors_gpu.log"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import hydra, flwr_datasets" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=${DATA:-}
for d in "$PWD/data/cifar10-jpeg.tar.gz" "$PWD/../shared/data/cifar10-jpeg.tar.gz"; do
    [ -z "$DATA" ] && [ -f "$d" ] && DATA=$d
done
[ -n "$DATA" ] || { echo "no CIFAR-10 archive (set DATA=...)"; exit 2; }
date; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ -n "$WEIGHTS" ]; then
    PRE="task.pretrained_weights=$WEIGHTS"; PRE_NOTE="ImageNet-pretrained ($WEIGHTS)"
else
    PRE="task.pretrained_weights=null"
    PRE_NOTE="NOT pretrained: no WEIGHTS given, the authors' protocol trains from scratch"
fi
echo "== authors' protocol: $PRE_NOTE"
COMMON="task.data_path=$DATA task.cache_dir=/tmp/regtopk-cache task.test_subset=$TEST_SUBSET \
device=$DEVICE rounds=100000 checkpoint.every=0 progress=false $EXTRA"
timeout 90 $PY -c "from regtopk_fl.tasks.data import load_cifar10; load_cifar10('$DATA', '/tmp/regtopk-cache')" || exit 1
LEFT=$((CAP_S - (SECONDS - START) - 25))
[ "$LEFT" -lt "$RUN_S" ] && RUN_S=$LEFT
echo "== 4 runs side by side, $RUN_S s each ($((SECONDS - START)) s used so far)"
pids=()
for proto in paper authors; do
    for sp in topk regtopk; do
        if [ $proto = paper ]; then
            args="experiment=fig3_cifar10 eval_every=50 $PAPER_EXTRA"
        else
            args="experiment=fig3_authors $PRE eval_every=5 $AUTHORS_EXTRA"
        fi
        # shellcheck disable=SC2086
        timeout -s INT -k 15 "$RUN_S" $PY -m regtopk_fl $args sparsifier=$sp $COMMON \
            hydra.run.dir="$OUT/${proto}_$sp" > "$OUT/${proto}_$sp.out" 2>&1 &
        pids+=($!)
    done
done
wait "${pids[@]}"
rm -f "$OUT"/*/model.pt "$OUT"/*/checkpoint.pt   # large; the table needs neither
echo "== table ($((SECONDS - START)) s used)"
$PY - "$OUT" "$PRE_NOTE" "$RUN_S" <<'EOF' | tee "$OUT/fig3_authors_gpu.md"
import json, sys
from pathlib import Path
import pandas as pd
out, note, run_s = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"# Fig. 3 on {out}: the paper's settings vs the authors' code, {run_s} s per run\n")
print(f"Authors' protocol: {note}.\n")
print("| protocol | method | rounds done | minibatch gradients | last accuracy (round) "
      "| best accuracy (round) | s/round |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for proto in ("paper", "authors"):
    for sp in ("topk", "regtopk"):
        d = out / f"{proto}_{sp}"
        try:
            m = pd.read_csv(d / "metrics.csv")
            cfg = json.loads((d / "summary.json").read_text())
        except (OSError, ValueError) as e:
            print(f"| {proto} | {sp} | not measured ({type(e).__name__}) | | | | |")
            continue
        if m.empty:  # stopped before round 0's evaluation was written
            print(f"| {proto} | {sp} | 0 (no round recorded in {run_s} s) | | | | |")
            continue
        done = int(m["round"].max())
        acc = m.dropna(subset=["accuracy"])
        acc = acc[acc["round"] > 0]
        steps = done * int(cfg.get("local_steps", 1)) * int(cfg.get("num_workers", 8))
        last = (f"{acc['accuracy'].iloc[-1]:.2f} % ({int(acc['round'].iloc[-1])})"
                if len(acc) else "none yet")
        best = acc.loc[acc["accuracy"].idxmax()] if len(acc) else None
        best = f"{best['accuracy']:.2f} % ({int(best['round'])})" if best is not None else ""
        per = m["wall_s"].diff().iloc[2:].median() if "wall_s" in m and len(m) > 3 else float("nan")
        print(f"| {proto} | {sp} | {done} | {steps} | {last} | {best} | {per:.3g} |")
EOF
echo "== done in $((SECONDS - START)) s"; date
