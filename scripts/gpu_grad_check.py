"""On a GPU: the batched worker gradients (task.batched=true, vmap) and the
recorded per-worker step (task.batched=graph, a CUDA graph) against the
per-worker loop at Fig. 3's settings, round 1 and round 2 batches: the
relative difference per worker (fp32), whether it is bitwise, and how many of
each worker's top-k entries (S = 0.001) the paths disagree on: the
trajectories of two runs part when the selections do. Prints one line per
path, worker and round.

    python scripts/gpu_grad_check.py DATA.tar.gz [DEVICE] [OVERRIDE ...]

Computes in fp32 (``tf32=false``, the suite's default); TF32=1 in the
environment turns TF32 on (cuDNN convolutions and matmuls, torch's default for
cuDNN) for the whole check. It also times the three paths (median of 10 after 3 warm-ups). DET=1 runs it
with ``deterministic=true``.
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

determinism.apply(os.environ.get("DET") == "1", tf32=os.environ.get("TF32") == "1")
print(f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
      f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}", flush=True)
data = sys.argv[1]
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
base = ["experiment=fig3_cifar10", f"task.data_path={data}", "task.cache_dir=/tmp/regtopk-cache",
        "task.test_subset=200", f"device={device}"] + sys.argv[3:]
loop, _ = build(compose_cfg(base + ["task.batched=false"]))
paths = {"batched": build(compose_cfg(base + ["task.batched=true"]))[0],
         "graph": build(compose_cfg(base + ["task.batched=graph"]))[0]}
p, b = loop.init_params().to(device), loop.init_buffers().to(device)
for rnd in (1, 2):
    rows = p.unsqueeze(0).expand(8, -1)
    g1, l1, b1 = loop.gradients(rows, b, list(range(8)), rnd, 0)
    k = max(1, round(0.001 * g1.shape[1]))
    for name, task in paths.items():
        g2, l2, b2 = task.gradients(rows, b, list(range(8)), rnd, 0)
        for n in range(8):
            rel = float((g1[n] - g2[n]).abs().max() / g1[n].abs().max())
            nrel = float((g1[n] - g2[n]).norm() / g1[n].norm())
            relb = float((b1[n] - b2[n]).abs().max() / b1[n].abs().max().clamp_min(1e-30))
            print(f"{name} round {rnd} worker {n}: grad max rel diff {rel:.3e} (norm {nrel:.3e}), "
                  f"buffers {relb:.3e}, loss {l1[n]:.6f} vs {l2[n]:.6f}", flush=True)
        # how many of the top-k (S = 0.001) entries of each worker's |g| differ
        diff = [len(set(g1[n].abs().topk(k).indices.tolist())
                    ^ set(g2[n].abs().topk(k).indices.tolist())) // 2 for n in range(8)]
        print(f"{name} round {rnd}: bitwise equal to the loop: gradients "
              f"{torch.equal(g1, g2)}, statistics {torch.equal(b1, b2)}, losses {l1 == l2}; "
              f"top-k (k={k}) entries that differ per worker: {diff}", flush=True)


def timed(fn, reps=10):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return median_ms(fn, reps, sync, warmup=3)


rows = p.unsqueeze(0).expand(8, -1)
rec = paths["graph"]._graphed_fn
print(f"recorded step: {rec.recorded} recording(s); failed: {rec.failed}", flush=True)
if rec.failed is not None or not rec.recorded:
    sys.exit("the recorded step did not run: its comparisons above are the loop's own")
times = {name: timed(lambda t=task: t.gradients(rows, b, list(range(8)), 1, 0))
         for name, task in {"loop": loop, **paths}.items()}
print("gradients of 8 workers: " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in times.items()),
      flush=True)
