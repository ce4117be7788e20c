#!/usr/bin/env bash
# A/B: runtime.num_cpus=null (Ray counts the machine's 2 CPUs) vs auto (the affinity's 1), under taskset -c 0
cd /work/main
export FLWR_LOG_LEVEL=ERROR
for rep in 1 2; do
  for nc in null auto; do
    d=/tmp/ab_aff/$nc-$rep; rm -rf $d
    taskset -c 0 .venv/bin/python -m regtopk_fl task=cifar10 num_workers=8 rounds=6 sparsifier=regtopk sparsifier.sparsity=0.001 sparsifier.mu=5 eval_every=1000 task.test_subset=100 runtime=flower device=cpu runtime.num_cpus=$nc hydra.run.dir=$d > $d.log 2>&1
    .venv/bin/python - "$d" "$nc" "$rep" <<'PY'
import sys, json
sys.path.insert(0, "scripts")
from pathlib import Path
from bench_runtimes import per_round
d = Path(sys.argv[1]); s = json.loads((d / "summary.json").read_text())
print(sys.argv[2], sys.argv[3], "s/round %.3f" % per_round(d), "client_threads", s.get("client_threads"), "compute/handle ms", {k: round(v*1e3,1) for k, v in (s.get("client_timing_s") or {}).items() if k in ("compute","handle")}, flush=True)
PY
  done
done
