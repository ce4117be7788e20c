#!/usr/bin/env bash
# Issue #18: the cheap recorded linear-regression claims, rerun with seeds
# (in-process). Each sweep's wall time goes to $LOG. Then the paired tables:
#   ANALYSE=1 bash scripts/seed_reruns.sh    (skips sweeps whose directory is complete)
# N_JOBS=2 runs two jobs side by side (one torch thread each) on a quiet 2-core
# machine; the default 1 runs them one after another.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
SW=${SW:-results/sweeps}
N_JOBS=${N_JOBS:-1}
LOG=${LOG:-$SW/seed_reruns.log}
ONLY=${ONLY:-fig2 heterogeneity workers participation forget}
# participation_reduced / forget_reduced / dense_m10 / participation_m20 / forget_m20:
# what fitted on the loaded machine of 2026-11-26 (m in {50, 20, 10}, 5 seeds; the
# full `participation` sweep was stopped after m = 100; see results/README.md)
mkdir -p "$SW"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
J="hydra/launcher=joblib hydra.launcher.n_jobs=$N_JOBS threads=1 progress=false"

sweep() {  # name, then the overrides
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: regtopk-fl -m $* $J hydra.sweep.dir=$SW/$name" | tee -a "$LOG"
    $PY -m regtopk_fl.launcher -m "$@" $J hydra.sweep.dir="$SW/$name" >"$SW/$name.out" 2>&1
    local rc=$?
    echo "   $name: exit $rc, $((SECONDS - t0)) s wall, $(date -Is)" | tee -a "$LOG"
}

for what in $ONLY; do
    case $what in
    fig2) sweep seeds_fig2_linreg experiment=fig2_linreg sparsifier=topk,regtopk \
              'seed=range(10)' ;;
    heterogeneity) sweep seeds_heterogeneity experiment=sweep_linreg_heterogeneity \
              'seed=range(5)' ;;
    workers) sweep seeds_workers experiment=sweep_linreg_workers 'seed=range(5)' ;;
    participation) sweep seeds_participation experiment=sweep_participation \
              'seed=range(10)' ;;
    forget) sweep seeds_participation_forget experiment=sweep_participation \
              sparsifier=regtopk participation.stale_feedback=forget \
              participation.clients_per_round=50,20,10 'seed=range(10)' ;;
    participation_reduced) sweep seeds_participation_reduced experiment=sweep_participation \
              participation.clients_per_round=50,10 sparsifier=topk,regtopk 'seed=range(5)' ;;
    dense_m10) sweep seeds_participation_dense_m10 experiment=sweep_participation \
              participation.clients_per_round=10 sparsifier=dense 'seed=range(5)' ;;
    forget_reduced) sweep seeds_participation_forget_reduced experiment=sweep_participation \
              sparsifier=regtopk participation.stale_feedback=forget \
              participation.clients_per_round=50,10 'seed=range(5)' ;;
    participation_m20) sweep seeds_participation_m20 experiment=sweep_participation \
              participation.clients_per_round=20 'seed=range(5)' ;;
    forget_m20) sweep seeds_participation_forget_m20 experiment=sweep_participation \
              participation.clients_per_round=20 sparsifier=regtopk \
              participation.stale_feedback=forget 'seed=range(5)' ;;
    esac
done

[ "${ANALYSE:-0}" = 1 ] || exit 0
PLOT="$PY -m regtopk_fl.analysis.plot"
$PLOT $SW/seeds_fig2_linreg --compare regtopk:topk --out results/seeds/fig2_linreg/
$PLOT $SW/seeds_heterogeneity --compare regtopk:topk --out results/seeds/heterogeneity/
$PLOT $SW/seeds_workers --compare regtopk:topk --out results/seeds/workers/
# participation: m = 100 (10 seeds; dense at m = 50 for seeds 0-7) from the full sweep that
# was stopped, m in {50, 20, 10} with 5 seeds from the reduced ones
P="$SW/seeds_participation $SW/seeds_participation_reduced $SW/seeds_participation_m20 \
   $SW/seeds_participation_dense_m10 $SW/seeds_participation_forget_reduced \
   $SW/seeds_participation_forget_m20"
$PLOT $P --x participation.clients_per_round --last 500 --compare regtopk:topk \
    --compare topk:dense --compare regtopk:dense --out results/seeds/participation/
# forget:keep: only its paired table is new (its figures, table and summary are the ones above)
$PLOT $P --x participation.clients_per_round --last 500 --by participation.stale_feedback \
    --compare forget:keep --out "$SW/seeds_participation_forget_keep"
for ext in md csv; do
    cp "$SW/seeds_participation_forget_keep/compare.$ext" results/seeds/participation/forget_compare.$ext
done
$PY scripts/participation_report.py $P --out results/seeds/participation/stale_delta.md
