"""On a GPU: the batched worker gradients (task.batched=true) against the
per-worker loop at Fig. 3's settings, round 1 and round 2 batches, and the
relative difference per worker (fp32), and how many of each worker's top-k
entries (S = 0.001) the two paths disagree on: the trajectories of a batched
and a loop run part when the selections do. Prints one line per worker and round.

    python scripts/gpu_grad_check.py DATA.tar.gz [DEVICE] [OVERRIDE ...]

Computes in fp32 (``tf32=false``, the suite's default); TF32=1 in the
environment turns TF32 on (cuDNN convolutions and matmuls, torch's default for
cuDNN) for the whole check. It also times both paths (median of 10 after 3 warm-ups).
"""
import os
import sys

import torch
sys.path.insert(0, "tests")
sys.path.insert(0, "scripts")
from conftest import compose_cfg  # noqa: E402
from gpu_bench import median_ms  # noqa: E402
from regtopk_fl import determinism  # noqa: E402
from regtopk_fl.runner import build  # noqa: E402

determinism.apply(False, tf32=os.environ.get("TF32") == "1")
print(f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
      f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}", flush=True)
data = sys.argv[1]
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
base = ["experiment=fig3_cifar10", f"task.data_path={data}", "task.cache_dir=/tmp/regtopk-cache",
        "task.test_subset=200", f"device={device}"] + sys.argv[3:]
loop, _ = build(compose_cfg(base + ["task.batched=false"]))
bat, _ = build(compose_cfg(base + ["task.batched=true"]))
p, b = loop.init_params().to(device), loop.init_buffers().to(device)
for rnd in (1, 2):
    rows = p.unsqueeze(0).expand(8, -1)
    g1, l1, b1 = loop.gradients(rows, b, list(range(8)), rnd, 0)
    g2, l2, b2 = bat.gradients(rows, b, list(range(8)), rnd, 0)
    for n in range(8):
        rel = float((g1[n] - g2[n]).abs().max() / g1[n].abs().max())
        nrel = float((g1[n] - g2[n]).norm() / g1[n].norm())
        relb = float((b1[n] - b2[n]).abs().max() / b1[n].abs().max().clamp_min(1e-30))
        print(f"round {rnd} worker {n}: grad max rel diff {rel:.3e} (norm {nrel:.3e}), buffers {relb:.3e}, "
              f"loss {l1[n]:.6f} vs {l2[n]:.6f}", flush=True)
    # how many of the top-k (S = 0.001) entries of each worker's |g| differ
    k = max(1, round(0.001 * g1.shape[1]))
    diff = [len(set(g1[n].abs().topk(k).indices.tolist()) ^ set(g2[n].abs().topk(k).indices.tolist())) // 2
            for n in range(8)]
    print(f"round {rnd}: top-k (k={k}) entries that differ per worker: {diff}", flush=True)


def timed(fn, reps=10):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return median_ms(fn, reps, sync, warmup=3)


rows = p.unsqueeze(0).expand(8, -1)
print(f"gradients of 8 workers: loop {timed(lambda: loop.gradients(rows, b, list(range(8)), 1, 0)):.2f} ms, "
      f"batched {timed(lambda: bat.gradients(rows, b, list(range(8)), 1, 0)):.2f} ms", flush=True)
