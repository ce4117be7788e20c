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
what is left is the algorithm.

The same loop also runs on torch tensors (``backend="torch"``: the same
steps, one call each, spelt as torch does them fastest: ``gather`` /
``scatter_`` for numpy's fancy indexing, ``topk`` checked for ties for its
stable ``argsort``, ``index_add_`` for ``add.at``). That twin shows what
torch's own calls cost on arrays this small; ``bench_runtimes.py`` reports
the suite against both.

``python scripts/numpy_floor.py [--backend torch]`` prints the wall time and
the final gap.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def numpy_ops() -> SimpleNamespace:
    """The calls of the loop that numpy and torch spell differently: numpy's
    (fancy indexing, its fastest way to read and write each row's mask)."""
    def put_rows(x, mask, vals):
        x[np.arange(len(x))[:, None], mask] = vals

    return SimpleNamespace(
        tanh=np.tanh, where=np.where, isfinite=np.isfinite, copy=np.copy,
        zeros=lambda shape, like: np.zeros(shape, dtype=like.dtype),
        # ascending indices of each row's k largest, the lowest index on ties
        top_rows=lambda score, k: np.sort(np.argsort(-score, axis=1, kind="stable")[:, :k],
                                          axis=1),
        take=lambda g, mask: g[mask],  # g [J] at each row's mask: [n, k]
        take_rows=lambda x, mask: x[np.arange(len(x))[:, None], mask],
        put_rows=put_rows, scatter_add=np.add.at, norm=lambda x: float(np.linalg.norm(x)))


def torch_top_rows(score, k: int):
    """Ascending indices of each row's k largest, the lowest index on ties:
    ``topk`` of k + 1 when no row ties at its k-th value (the k largest are
    then one set, whatever order topk found them in), else a stable sort."""
    import torch

    if k < score.shape[1]:
        vals, idx = torch.topk(score, k + 1, dim=1)
        if bool((vals[:, k - 1] > vals[:, k]).all()):
            return idx[:, :k].sort(dim=1).values
    return torch.sort(torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k],
                      dim=1).values


def torch_ops() -> SimpleNamespace:
    """The same calls in torch, each spelt the way torch does it fastest
    (``gather`` / ``scatter_`` / ``take``, not advanced indexing, which is
    torch's slower path for small index arrays)."""
    import torch

    return SimpleNamespace(
        tanh=torch.tanh, where=torch.where, isfinite=torch.isfinite, copy=torch.clone,
        zeros=lambda shape, like: torch.zeros(shape, dtype=like.dtype),
        top_rows=torch_top_rows, take=torch.take,
        take_rows=lambda x, mask: x.gather(1, mask),
        put_rows=lambda x, mask, vals: x.scatter_(1, mask, vals),
        scatter_add=lambda g, idx, vals: g.index_add_(0, idx, vals),
        norm=lambda x: float(torch.linalg.vector_norm(x)))


def run(gram, z, inv_m, w0, w_star, sparsity: float, mu: float, lr: float, rounds: int,
        xp=None) -> tuple:
    """(gap per round [rounds + 1], seconds for the rounds); ``mu`` None is
    plain Top-k (the score is |a| everywhere). The arrays are numpy's, or
    torch's with ``xp=torch_ops()``. Worker n's weight is its share of the
    examples (paper eq. 1): m_n / sum m = (1 / inv_m_n) / sum (1 / inv_m)."""
    xp = xp or numpy_ops()
    n, j = z.shape
    k = max(1, int(round(sparsity * j)))
    w_n = (1.0 / inv_m) / (1.0 / inv_m).sum()
    w, eps = xp.copy(w0), xp.zeros((n, j), z)
    gram2 = gram.reshape(-1, j)
    mask = None  # [n, k] last round's indices
    gaps = [xp.norm(w - w_star)]
    t0 = time.perf_counter()
    for _ in range(rounds):
        g_loc = 2.0 * inv_m[:, None] * ((gram2 @ w).reshape(n, j) - z)  # 1
        a = eps + g_loc  # 2
        score = abs(a)  # 3
        if mask is not None and mu is not None:  # mu None: plain Top-k
            contrib = w_n[:, None] * sent
            delta = (xp.take(g, mask) - contrib) / contrib  # 0 / 0 and x / 0 are caught below
            delta = xp.where(xp.isfinite(delta) & (contrib != 0), delta, 1e8)
            xp.put_rows(score, mask, abs(xp.take_rows(a, mask)) * xp.tanh(abs(1.0 + delta) / mu))
        mask = xp.top_rows(score, k)  # 4
        sent = xp.take_rows(a, mask)  # 5
        eps = a
        xp.put_rows(eps, mask, 0.0)
        g = xp.zeros(j, z)  # 6
        xp.scatter_add(g, mask.reshape(-1), (w_n[:, None] * sent).reshape(-1))
        w -= lr * g
        gaps.append(xp.norm(w - w_star))
    return np.array(gaps), time.perf_counter() - t0


def from_task(task, sparsity: float, mu: float, lr: float, rounds: int,
              backend: str = "numpy") -> tuple:
    """:func:`run` on a LinRegTask's data, with numpy or torch arrays."""
    if backend == "torch":
        return run(task.gram, task.z, task.inv_m, task.init_params(), task.w_star, sparsity,
                   mu, lr, rounds, xp=torch_ops())
    if backend != "numpy":
        raise ValueError(f"backend={backend!r}: must be 'numpy' or 'torch'")
    with np.errstate(divide="ignore", invalid="ignore"):
        return run(task.gram.numpy(), task.z.numpy(), task.inv_m.numpy(),
                   task.init_params().numpy(), task.w_star.numpy(), sparsity, mu, lr, rounds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2500)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--mu", type=float, default=4.0)
    ap.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from regtopk_fl.tasks.linreg import LinRegTask

    if args.backend == "torch":
        import torch
        torch.set_num_threads(1)
    gaps, secs = from_task(LinRegTask(num_workers=20, dim=100), args.sparsity, args.mu, 0.01,
                           args.rounds, args.backend)
    print(f"{args.backend} floor: {args.rounds} rounds in {secs:.2f} s, final gap {gaps[-1]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
