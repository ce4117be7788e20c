"""Distributed linear regression, the paper's Fig. 2 (and Section 2 of its
supplement): N workers, J features, full-batch gradient descent on the MSE.

Worker n's ground truth is t_n = u_n * 1 + h * z_n with u_n ~ N(U, sigma^2)
(a scalar per worker, as in the authors' SynthDataSet) and z_n ~ N(0, I);
features x ~ N(0, I), labels y = x^T t_n + noise of variance ``noise_var``.
Heterogeneity knobs: ``sigma2`` (spread of the workers' means), ``h2`` and
unequal dataset sizes (``size_ratio`` > 1: shares drawn uniform(1, ratio)).

The local loss is f_n(w) = ||A_n w - y_n||^2 / m_n; the global objective is
sum_n w_n f_n with w_n = m_n / M, whose minimiser w* = (sum A^T A)^-1 sum A^T y
is exact. Gradients come from the per-worker Gram matrices (2/m (G w - z)), so
a round for all N workers is one batched matrix-vector product. float64: the
paper's curves go down to ||w - w*|| ~ 1e-10, below float32's resolution.
"""
from __future__ import annotations

import math

import torch

from .. import checks
from .base import Task


class LinRegTask(Task):
    name = "linreg"
    dtype = torch.float64
    has_closed_form = True

    @classmethod
    def check_settings(cls, cfg, num_workers, runtime):
        super().check_settings(cfg, num_workers, runtime)
        n = num_workers
        checks.num(cfg, "task.dim", 1, integer=True, allowed="must be an integer >= 1")
        m = checks.num(cfg, "task.samples_per_worker", 1, integer=True,
                       allowed="must be an integer >= 1")
        for key in ("task.sigma2", "task.h2", "task.noise_var"):
            checks.num(cfg, key, 0, allowed="must be >= 0")
        checks.num(cfg, "task.size_ratio", 1, allowed="must be >= 1 (1 = equal sizes)")
        ratio = checks.get(cfg, "task.size_ratio")
        if ratio > 1 and m * n < 2 * n:
            checks.fail("num_workers", n, f"more workers than data points ({m * n})")

    def __init__(self, num_workers: int = 20, dim: int = 100, samples_per_worker: int = 500,
                 mean: float = 0.0, sigma2: float = 5.0, h2: float = 1.0, noise_var: float = 0.5,
                 size_ratio: float = 1.0, init: str = "uniform", seed: int = 0, **_):
        self.num_workers, self.dim, self.seed = int(num_workers), int(dim), int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        n, j = self.num_workers, self.dim
        total = n * int(samples_per_worker)
        if size_ratio > 1.0:
            shares = 1.0 + (size_ratio - 1.0) * torch.rand(n, generator=gen, dtype=torch.float64)
            sizes = torch.floor(shares / shares.sum() * total).to(torch.int64)
            sizes[-1] = total - sizes[:-1].sum()
        else:
            sizes = torch.full((n,), int(samples_per_worker), dtype=torch.int64)
        self.sizes = [int(s) for s in sizes]
        u = mean + math.sqrt(sigma2) * torch.randn(n, generator=gen, dtype=torch.float64)
        self.truth = u[:, None] + math.sqrt(h2) * torch.randn(n, j, generator=gen, dtype=torch.float64)
        gram = torch.empty(n, j, j, dtype=torch.float64)
        z = torch.empty(n, j, dtype=torch.float64)
        yy = torch.empty(n, dtype=torch.float64)
        for k in range(n):
            a = torch.randn(self.sizes[k], j, generator=gen, dtype=torch.float64)
            y = a @ self.truth[k] + math.sqrt(noise_var) * torch.randn(
                self.sizes[k], generator=gen, dtype=torch.float64)
            gram[k], z[k], yy[k] = a.T @ a, a.T @ y, y @ y
        self.gram, self.z, self.yy = gram, z, yy
        self.inv_m = 1.0 / torch.tensor(self.sizes, dtype=torch.float64)
        self.w_star = torch.linalg.solve(gram.sum(0), z.sum(0))
        self._total = float(sum(self.sizes))
        # the global objective sum_n (m_n / M) f_n = (w'Gw - 2 z'w + y'y) / M
        self._g_sum, self._z_sum, self._yy_sum = gram.sum(0), z.sum(0), float(yy.sum())
        if init == "zeros":
            self._w0 = torch.zeros(j, dtype=torch.float64)
        elif init == "uniform":  # torch.nn.Linear's default, as the authors' model
            bound = 1.0 / math.sqrt(j)
            self._w0 = (torch.rand(j, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        else:
            raise ValueError(f"task.init={init!r}: must be 'uniform' or 'zeros'")

    def num_examples(self):
        return list(self.sizes)

    def init_params(self):
        return self._w0.clone()

    def gradients(self, params, buffers, workers, round, step):
        rows = list(workers)
        if rows == list(range(self.num_workers)):  # everyone: no gathers
            gram, z, yy, inv_m = self.gram, self.z, self.yy, self.inv_m
        else:
            gram, z, yy, inv_m = self.gram[rows], self.z[rows], self.yy[rows], self.inv_m[rows]
        if params.stride(0) == 0:  # every row is the same model (local_steps=1): one mat-vec
            gw = (gram.reshape(-1, self.dim) @ params[0]).reshape(len(rows), self.dim)
        else:
            gw = torch.bmm(gram, params.unsqueeze(2)).squeeze(2)
        loss = ((params * gw).sum(1) - 2 * (z * params).sum(1) + yy) * inv_m
        grads = 2.0 * inv_m[:, None] * (gw - z)
        return grads, loss.tolist(), None

    def evaluate(self, params, buffers=None):
        w = params.to(torch.float64)
        quad = float(w @ (self._g_sum @ w)) - 2.0 * float(self._z_sum @ w) + self._yy_sum
        return {"loss": quad / self._total,
                "gap": float(torch.linalg.vector_norm(w - self.w_star))}
