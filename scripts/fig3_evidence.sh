#!/usr/bin/env bash
# Issue #30: the CPU runs behind the Fig. 3 verdict, stage by stage, resumable.
#   bash scripts/fig3_evidence.sh paper_1e-3 ablation warm_init warm scratch_half paper_1e-4
# Each stage is one Hydra sweep into $SW/fig3_<stage>; two jobs side by side
# (one torch thread each), checkpoints every CKPT rounds. Killed or stopped, the
# same command resumes every unfinished job from its checkpoint and skips the
# finished ones (README "Exact resume"). Wall times go to $LOG. Then the raw files
# and the tables: python scripts/fig3_verdict.py (results/fig3/).
# Never edit this file while it runs: bash reads a script as it goes.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
SW=${SW:-results/sweeps}
N_JOBS=${N_JOBS:-2}
SEEDS=${SEEDS:-range(5)}
CKPT=${CKPT:-100}
LOG=${LOG:-$SW/fig3_evidence.log}
DATA=${DATA:-$PWD/../shared/data/cifar10-jpeg.tar.gz}
WARM=${WARM:-$SW/fig3_warm_init/model.pt}   # the dense-trained start (stage warm_init)
HALF_ROUNDS=${HALF_ROUNDS:-200}
mkdir -p "$SW"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
J="hydra/launcher=joblib hydra.launcher.n_jobs=$N_JOBS threads=1 progress=false checkpoint.every=$CKPT"

sweep() {  # name, then the overrides
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: regtopk-fl -m $* $J hydra.sweep.dir=$SW/$name ($(date -Is))" | tee -a "$LOG"
    $PY -m regtopk_fl.launcher -m "$@" $J hydra.sweep.dir="$SW/$name" >>"$SW/$name.out" 2>&1
    local rc=$?
    echo "   $name: exit $rc, $((SECONDS - t0)) s wall, $(date -Is)" | tee -a "$LOG"
}

# the ablation's cells (conf/experiment/fig3_ablation.yaml): the paper's text,
# each of the authors' switches alone, and all of them
declare -A CELLS=(
    [base]=""
    [local]="local_steps=10 upload=last_gradient"
    [softmax]="task.loss=softmax_ce"
    [sparsity]="sparsifier.sparsity=0.001"
    [uniform]="server.weighting=uniform"
    [bn]="task.eval_mode=train task.eval_batch_size=20"
    [all]="local_steps=10 upload=last_gradient task.loss=softmax_ce sparsifier.sparsity=0.001 server.weighting=uniform task.eval_mode=train task.eval_batch_size=20"
)
ABLATION=${ABLATION:-base softmax sparsity uniform bn local all}
# seed outermost, so the pairs finish together: (0, topk), (0, regtopk), (1, topk), ...
CPU3="experiment=fig3_cifar10_cpu task.data_path=$DATA ~hydra.sweeper.params.sparsifier seed=$SEEDS sparsifier=topk,regtopk"
for stage in "$@"; do
    case $stage in
    # step 3: the paper's text at its iteration count, width 16
    paper_1e-3) sweep fig3_paper_1e-3 $CPU3 rounds=1500 sparsifier.sparsity=0.001 ;;
    paper_1e-4) sweep fig3_paper_1e-4 $CPU3 rounds=1500 sparsifier.sparsity=0.0001 ;;
    # step 1: the authors' switches one at a time and all together (tiny_image)
    ablation) for cell in $ABLATION; do
                  sweep fig3_ablation_$cell experiment=fig3_ablation ~hydra.sweeper.params.sparsifier \
                      seed=$SEEDS sparsifier=topk,regtopk ${CELLS[$cell]}
              done ;;
    # step 2: a dense-trained start on a disjoint slice, then both methods from it
    warm_init) # dense, all 8 workers, iid, on the second half of every class; lr 0.05 with
               # momentum 0.9 to get far in few rounds (a stand-in for pretraining, not the paper's
               # optimiser). Its model.pt is the start of stage warm.
               t0=$SECONDS
               echo "== warm_init -> $WARM ($(date -Is))" | tee -a "$LOG"
               $PY -m regtopk_fl.launcher experiment=fig3_cifar10_cpu task.data_path=$DATA \
                   sparsifier=dense task.partition=iid task.subset_offset=2500 \
                   task.subset_per_class=2500 rounds=${WARM_ROUNDS:-500} lr=0.05 momentum=0.9 \
                   seed=1000 threads=2 progress=false eval_every=100 checkpoint.every=$CKPT \
                   hydra.run.dir=$(dirname "$WARM") >>"$SW/fig3_warm_init.out" 2>&1
               echo "   warm_init: exit $?, $((SECONDS - t0)) s wall, $(date -Is)" | tee -a "$LOG" ;;
    # both methods on the first half (disjoint from warm_init's), from the warm start and
    # from scratch, the same seeds
    warm) sweep fig3_warm $CPU3 rounds=$HALF_ROUNDS sparsifier.sparsity=0.001 \
              task.subset_per_class=2500 task.init_from="$(realpath -m "$WARM")" ;;
    scratch_half) sweep fig3_scratch_half $CPU3 rounds=$HALF_ROUNDS sparsifier.sparsity=0.001 \
              task.subset_per_class=2500 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
