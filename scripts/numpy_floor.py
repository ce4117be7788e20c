"""The floor for the in-process round: the paper's linear regression with
RegTop-k, written as plainly as it can be in numpy, so that
``scripts/bench_runtimes.py`` can hold the suite's own wall time against it.

One round, for all N workers at once (the reference form of Delta, as the
suite's default; the authors' ``LinearRegression.py``):

1. full-batch gradients  g_n = 2/m_n (G_n w - z_n)   (G_n = A_n^T A_n, z_n = A_n^T y_n)
2. error feedback        a_n = eps_n + g_n
3. RegTop-k score        |a_n| * tanh(|1 + Delta_n| / mu) on last round's mask,
                         Delta_n = (g_prev - w_n s_prev) / (w_n s_prev); |a_n| elsewhere
4. exact top-k           the k largest scores, ties to the lowest index
5. upload and residual   s_n = a_n on the mask, eps_n = a_n with the mask zeroed
6. server                g = sum_n w_n s_n, w <- w - lr g; ||w - w*|| recorded

It reads the task's data (LinRegTask: the same seeded Gram matrices) and
nothing else of the suite. No trust checks, no byte counts, no checkpoints:
what is left is the algorithm. ``python scripts/numpy_floor.py`` prints its
wall time and final gap.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def run(gram, z, inv_m, w0, w_star, sparsity: float, mu: float, lr: float, rounds: int,
        weights=None) -> tuple:
    """(gap per round [rounds + 1], seconds for the rounds); ``mu`` None is
    plain Top-k (the score is |a| everywhere)."""
    n, j = z.shape
    k = max(1, int(round(sparsity * j)))
    w_n = (1.0 / inv_m) / (1.0 / inv_m).sum() if weights is None else np.asarray(weights)
    w, eps = w0.copy(), np.zeros((n, j))
    rows = np.arange(n)[:, None]
    mask = None  # [n, k] last round's indices
    gaps = [float(np.linalg.norm(w - w_star))]
    t0 = time.perf_counter()
    for _ in range(rounds):
        g_loc = 2.0 * inv_m[:, None] * ((gram.reshape(-1, j) @ w).reshape(n, j) - z)  # 1
        a = eps + g_loc  # 2
        score = np.abs(a)  # 3
        if mask is not None and mu is not None:  # mu None: plain Top-k
            contrib = w_n[:, None] * sent
            with np.errstate(divide="ignore", invalid="ignore"):
                delta = (g[mask] - contrib) / contrib
            delta = np.where(np.isfinite(delta) & (contrib != 0), delta, 1e8)
            score[rows, mask] = np.abs(a[rows, mask]) * np.tanh(np.abs(1.0 + delta) / mu)
        mask = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :k], axis=1)  # 4
        sent = a[rows, mask]  # 5
        eps = a
        eps[rows, mask] = 0.0
        g = np.zeros(j)  # 6
        np.add.at(g, mask.ravel(), (w_n[:, None] * sent).ravel())
        w -= lr * g
        gaps.append(float(np.linalg.norm(w - w_star)))
    return np.array(gaps), time.perf_counter() - t0


def from_task(task, sparsity: float, mu: float, lr: float, rounds: int) -> tuple:
    """:func:`run` on a LinRegTask's data."""
    return run(task.gram.numpy(), task.z.numpy(), task.inv_m.numpy(), task.init_params().numpy(),
               task.w_star.numpy(), sparsity, mu, lr, rounds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2500)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--mu", type=float, default=4.0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from regtopk_fl.tasks.linreg import LinRegTask

    gaps, secs = from_task(LinRegTask(num_workers=20, dim=100), args.sparsity, args.mu, 0.01,
                           args.rounds)
    print(f"numpy floor: {args.rounds} rounds in {secs:.2f} s, final gap {gaps[-1]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
