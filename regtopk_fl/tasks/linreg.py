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

import hashlib
import math
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

    # what the seed and the settings make; kept in ``data_cache`` when one is given
    _BUILT = ("sizes", "truth", "gram", "z", "yy", "w_star", "w0")

    def __init__(self, num_workers: int = 20, dim: int = 100, samples_per_worker: int = 500,
                 mean: float = 0.0, sigma2: float = 5.0, h2: float = 1.0, noise_var: float = 0.5,
                 size_ratio: float = 1.0, init: str = "uniform", seed: int = 0,
                 data_cache=None, background: bool = False, **_):
        """``background``: draw (or read) the data on a thread of its own and
        return at once; the data's attributes wait for it where they are
        first read (the runner asks this: a Flower start goes on with its
        imports, Ray and the actors meanwhile, issue #34)."""
        self.num_workers, self.dim, self.seed = int(num_workers), int(dim), int(seed)
        if init not in ("uniform", "zeros"):
            raise ValueError(f"task.init={init!r}: must be 'uniform' or 'zeros'")
        args = (self.num_workers, self.dim, int(samples_per_worker), float(mean), float(sigma2),
                float(h2), float(noise_var), float(size_ratio), init, self.seed)
        self._data_cache, self._args = data_cache or None, args
        self._lock = threading.Lock()
        self._share_to: list | None = []  # folders to write before the data is done
        threads = torch.get_num_threads()
        if background:  # read through __getattr__ until it is done
            self._pending = _BUILDER.submit(self._make, threads)
        else:
            self._populate(self._make(threads))

    def _make(self, threads: int) -> dict:
        if torch.get_num_threads() != threads:  # the caller's count: the same kernels and bits
            torch.set_num_threads(threads)
        built = _load_cached(self._data_cache, self._args) if self._data_cache else None
        if built is None:
            built = _build(*self._args)
            if self._data_cache:
                _save_cached(self._data_cache, self._args, built)
        with self._lock:
            folders, self._share_to = self._share_to, None
        for folder in folders:  # share() asked before the data was there
            _save_cached(folder, self._args, built)
        return built

    # what _make's data fills in (read through __getattr__ until then)
    _LAZY = frozenset({"_built", "sizes", "truth", "gram", "z", "yy", "w_star", "_w0", "inv_m",
                       "_total", "_g_sum", "_z_sum", "_yy_sum"})

    def __getattr__(self, name):
        # only called for attributes not set yet: the data's, until it is done
        if name in LinRegTask._LAZY and "_pending" in self.__dict__:
            self._finish()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _finish(self) -> None:
        """Wait for the data (its errors are raised here) and set the attributes."""
        with self._lock:
            pending = self.__dict__.get("_pending")
        if pending is None:
            return
        built = pending.result()
        with self._lock:
            if "_pending" in self.__dict__:
                self._populate(built)
                del self.__dict__["_pending"]

    def _populate(self, built: dict) -> None:
        self._built = built  # for share(): the same tensors, no copy
        sizes, self.truth, gram, z, yy, self.w_star, self._w0 = (built[k] for k in self._BUILT)
        self.sizes = [int(s) for s in sizes]
        self.gram, self.z, self.yy = gram, z, yy
        self.inv_m = 1.0 / torch.tensor(self.sizes, dtype=torch.float64)
        self._total = float(sum(self.sizes))
        # the global objective sum_n (m_n / M) f_n = (w'Gw - 2 z'w + y'y) / M
        self._g_sum, self._z_sum, self._yy_sum = gram.sum(0), z.sum(0), float(yy.sum())

    def __getstate__(self) -> dict:  # pickled with its data, not the thread making it
        self._finish()
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def num_examples(self):
        return list(self.sizes)

    def share(self, folder) -> dict:
        """The built data as a cache file in ``folder``: a Ray actor maps it
        instead of drawing N Gram matrices again (800 MB and seconds at
        N = 10,000, repeated by every actor). Nothing when the run keeps its
        own ``data_cache``: the actors read that. Asked while the data is
        still being drawn, the file is written when it is done and before
        anything in this process can read the data (the server reads it
        before it sends the actors a message), so share() does not wait."""
        if self._data_cache:
            return {}
        with self._lock:
            if self._share_to is not None:
                self._share_to.append(folder)
                return {"data_cache": str(folder)}
        if not _cache_file(folder, self._args).exists():
            _save_cached(folder, self._args, self._built)
        return {"data_cache": str(folder)}

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


# the tasks' data, drawn one task at a time behind the process's back (LinRegTask._make)
_BUILDER = ThreadPoolExecutor(1, thread_name_prefix="linreg-data")


def _build(n, j, samples_per_worker, mean, sigma2, h2, noise_var, size_ratio, init, seed) -> dict:
    """The workers' data, drawn from one generator in a fixed order (the
    numbers every recorded linear-regression run was made with).

    1. sizes (uniform shares when ``size_ratio`` > 1), then u and the truths;
    2. per worker k, in order: A_k (m_k x J) and its label noise e_k;
    3. per worker k: y_k = A_k t_k + sqrt(noise_var) e_k, G_k = A_k'A_k,
       z_k = A_k'y_k, yy_k = y_k'y_k;
    4. w* and the initial model (its uniform draw last).

    Step 2 is one generator's stream and stays sequential; step 3 for worker
    k runs on a second thread while worker k+1 is drawn (the same operations
    on the same tensors with the caller's thread count, so the same bits as
    one thread doing both: ``tests/test_linreg_cache.py``). At N = 10,000 the draw
    is most of a cold Flower start (issue #34)."""
    gen = torch.Generator().manual_seed(seed)
    total = n * samples_per_worker
    # 1.
    if size_ratio > 1.0:
        shares = 1.0 + (size_ratio - 1.0) * torch.rand(n, generator=gen, dtype=torch.float64)
        sizes = torch.floor(shares / shares.sum() * total).to(torch.int64)
        sizes[-1] = total - sizes[:-1].sum()
    else:
        sizes = torch.full((n,), samples_per_worker, dtype=torch.int64)
    u = mean + math.sqrt(sigma2) * torch.randn(n, generator=gen, dtype=torch.float64)
    truth = u[:, None] + math.sqrt(h2) * torch.randn(n, j, generator=gen, dtype=torch.float64)
    gram = torch.empty(n, j, j, dtype=torch.float64)
    z = torch.empty(n, j, dtype=torch.float64)
    yy = torch.empty(n, dtype=torch.float64)
    noise_sd, threads = math.sqrt(noise_var), torch.get_num_threads()

    def products(k, a, e):  # 3.
        if threading.get_ident() != caller:
            torch.set_num_threads(threads)  # this thread's BLAS/OpenMP count = the caller's
        y = a @ truth[k] + noise_sd * e
        gram[k], z[k], yy[k] = a.T @ a, a.T @ y, y @ y

    caller = threading.get_ident()
    with ThreadPoolExecutor(1, thread_name_prefix="linreg-products") as pool:
        pending: deque = deque()
        for k in range(n):  # 2.
            m = int(sizes[k])
            a = torch.randn(m, j, generator=gen, dtype=torch.float64)
            e = torch.randn(m, generator=gen, dtype=torch.float64)
            pending.append(pool.submit(products, k, a, e))
            if len(pending) > 4:  # a few workers' A_k in flight, not N
                pending.popleft().result()
        for f in pending:
            f.result()
    # 4.
    w_star = torch.linalg.solve(gram.sum(0), z.sum(0))
    if init == "zeros":
        w0 = torch.zeros(j, dtype=torch.float64)
    else:  # uniform: torch.nn.Linear's default, as the authors' model
        bound = 1.0 / math.sqrt(j)
        w0 = (torch.rand(j, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return {"sizes": sizes, "truth": truth, "gram": gram, "z": z, "yy": yy, "w_star": w_star,
            "w0": w0}


def _cache_file(cache_dir, args) -> Path:
    key = hashlib.sha256(repr(("linreg-v1",) + tuple(args)).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"linreg-N{args[0]}-J{args[1]}-{key}.pt"


def _load_cached(cache_dir, args):
    """The built data from ``cache_dir`` (memory-mapped: processes that load
    the same file share its pages), or None when it is not there or unreadable."""
    f = _cache_file(cache_dir, args)
    if not f.exists():
        return None
    try:
        built = torch.load(f, mmap=True, weights_only=True)
        if set(built) != set(LinRegTask._BUILT) or built["gram"].shape != (
                args[0], args[1], args[1]):
            raise ValueError("unexpected contents")
        return built
    except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt
        warnings.warn(f"ignoring unreadable cache {f}: {e}", stacklevel=3)
        return None


def _save_cached(cache_dir, args, built) -> None:
    from ..results import atomic_write

    f = _cache_file(cache_dir, args)
    try:
        atomic_write(f, lambda fh: torch.save(built, fh), "wb")
    except OSError as e:
        warnings.warn(f"could not write the linear-regression cache {f}: {e}", stacklevel=3)
