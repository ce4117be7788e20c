"""A short GPU probe before the full checks: Flower at Fig. 3 (Top-k, few
rounds, deterministic) with the clients on the loop and on the recorded step
(task.batched=graph), their in-process twins, the clients' phase times.

    python scripts/gpu_probe.py OUT [ROUNDS]
"""
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb  # noqa: E402

out = Path(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
out.mkdir(parents=True, exist_ok=True)
a = SimpleNamespace(workers=8, rounds=rounds, width=64, data=str(gb.ROOT / ".gpu/cifar10-small.tar.gz"),
                    cache="/tmp/regtopk_gpu_cache", test_subset=200, device=device)
if len(sys.argv) > 4:  # CPU smoke: data archive, width, workers
    a.data, a.width, a.workers = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
runs = Path("/tmp/regtopk_probe_runs")
res = {}


def save():
    (out / "probe.json").write_text(json.dumps(res, indent=1, default=str))


for mode in ("false", "graph"):
    for runtime in ("inprocess", "flower"):
        name = f"{runtime}-{mode}"
        t0 = time.perf_counter()
        try:
            row = gb._run(gb.compose(gb.fig3(a, "topk", runtime) + [f"task.batched={mode}"]),
                          runs / name)
        except Exception as exc:  # noqa: BLE001 - the probe reports what broke
            row = {"error": f"{type(exc).__name__}: {exc}"}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        res[name] = row
        print(name, json.dumps(row, default=str), flush=True)
        save()
for x, y in (("flower-false", "inprocess-false"), ("flower-graph", "inprocess-graph"),
             ("inprocess-graph", "inprocess-false"), ("flower-graph", "flower-false")):
    try:
        res[f"{x} vs {y}"] = gb.agreement(runs / x, runs / y)
    except Exception as exc:  # noqa: BLE001
        res[f"{x} vs {y}"] = f"{type(exc).__name__}: {exc}"
    print(f"{x} vs {y}:", res[f"{x} vs {y}"], flush=True)
save()
