"""Where one exact top-k selection spends its time: each step of
``regtopk_fl/compress/exact_topk.py``'s long-row path, timed alone on the
benchmark's gradient (``bench_sparsifiers.make_data``), in milliseconds and in
one-pass floors (``torch.mul(g, 2, out=buf)``), with the counts that set them
(blocks reached, candidates, the band's size). Step 2 (the candidates) is
timed both ways: the compiled scan that runs on CPU (``scan_kernels.py``,
where numba is installed) and torch's kernels (CUDA's path, and CPU's
without numba).

    PYTHONPATH=. python scripts/profile_exact_topk.py [--sparsity 0.01] [--dim 11173962] [--threads 2]

The steps overlap what the selection does, not its exact sequence (a step is
timed on its own, with warm caches), so the rows do not add up to
``rows_topk``'s time, which is printed last.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_sparsifiers import make_data  # noqa: E402
from regtopk_fl.compress import exact_topk as E  # noqa: E402


def ms(fn, reps: int = 15) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.01)
    ap.add_argument("--dim", type=int, default=11_173_962)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    _, acc, _, _, _ = make_data(a.dim, a.sparsity, "cpu")
    row, dim = acc[0], a.dim
    k = max(1, round(a.sparsity * dim))
    buf = torch.empty_like(row)
    floor = ms(lambda: torch.mul(row, 2, out=buf))

    stride = E.sample_stride(dim)
    sample = row[::stride].abs()
    m = sample.numel()
    rank, hi_rank = E.sample_ranks(k, m, dim)
    top = torch.topk(sample, rank, sorted=True).values
    t = float(top[rank - 1])
    hi = float(top[hi_rank - 1]) if hi_rank >= 1 else None
    block = E._block_size(rank / m)
    body = row[:dim // block * block].view(-1, block)
    reach = (body.amax(1) >= t) | (body.amin(1) <= -t)
    hit = torch.nonzero(reach).squeeze(1)
    blk = torch.empty(hit.numel() * block)
    torch.index_select(body, 0, hit, out=blk.view(-1, block))
    blk.abs_()
    mask = blk >= t
    pos = torch.nonzero(mask).squeeze(1)
    vals = blk.index_select(0, pos)
    band = int((vals < hi).sum()) if hi is not None else None

    steps = {"sample and its threshold": lambda: torch.topk(row[::stride].abs(), rank, sorted=True)}
    scan = E._compiled_scan()
    if scan is not None:  # step 2 as it runs on CPU: scan_kernels.py
        # the first launch through candidates(): it sets numba's thread count to
        # torch's and puts torch's back, which _count alone would not
        scan.candidates(row, t, True)
        assert torch.get_num_threads() == a.threads
        x = row.numpy()
        counts = np.empty(dim // scan.BLOCK, dtype=np.int32)
        chunk = max(1, -(-counts.size // scan.CHUNKS))
        totals = np.empty(-(-counts.size // chunk), dtype=np.int64)
        steps |= {
            f"compiled scan: count (C = {scan.BLOCK})":
                lambda: scan._count(x, x.dtype.type(t), True, counts, chunk, totals),
            "compiled scan: count and write": lambda: scan.candidates(row, t, True),
        }
    steps |= {  # step 2 in torch (CUDA; CPU without numba)
        f"torch scan: block bounds (amax + amin, C = {block})":
            lambda: (body.amax(1) >= t) | (body.amin(1) <= -t),
        "torch scan: copy the reached blocks":
            lambda: torch.index_select(body, 0, hit, out=blk.view(-1, block)),
        "torch scan: compare with t": lambda: torch.ge(blk, t, out=mask),
        "torch scan: nonzero over the copied entries": lambda: torch.nonzero(mask),
        "torch scan: all of it": lambda: E._candidates_torch(row, t, True, block),
        "k-th largest of all candidates": lambda: E._kth_largest(vals, k),
        "k-th largest via the band": lambda: E._kth_below(vals, k, hi),
        "rows_topk (the whole selection)": lambda: E.rows_topk(acc, k, absolute=True),
    }
    print(f"J = {dim:,}, S = {a.sparsity}, k = {k:,}, {a.threads} threads; floor {floor:.2f} ms; "
          f"blocks reached {hit.numel() / reach.numel():.1%} of J, candidates {pos.numel():,} "
          f"({pos.numel() / k:.2f} k), band {band if band is None else f'{band:,}'}")
    for name, fn in steps.items():
        t_ms = ms(fn)
        print(f"{name:48s} {t_ms:7.2f} ms  {t_ms / floor:5.2f} passes")


if __name__ == "__main__":
    main()
