"""Step 2 of ``exact_topk`` on CPU in two passes of compiled code (numba).

In torch the candidates of a long row cost five kernels (per block ``amax``
and ``amin``, a copy of the reachable blocks, ``|.|``, the compare, then
``nonzero`` over the copy's mask): 2-3.4 passes over J at S = 0.01
(``scripts/profile_exact_topk.py``), where a fifth of the row lies in blocks
that hold a candidate. Here:

1. **Count** (one read of the row, vectorized, blocks in parallel): per block
   of ``BLOCK`` entries, how many have a score (``|x|`` or ``x``) >= t.
2. **Write** (blocks with a count, in parallel): each such block's positions
   and scores, at its offset (the running sum of the counts before it).

The blocks are split into ``CHUNKS`` runs of consecutive blocks, so the
offsets need only one running sum per run. For RegTop-k, :func:`mask_hits`
finds which of last round's (lowered) entries are candidates and where they
sit among them (serial, O(k)). The results are torch's scan's, bitwise:
positions ascending, the scores at them; IEEE comparisons (no fast-math), so
+-inf rows compare as in torch. numba's OpenMP layer shares torch's OpenMP
runtime, and its first launch in a process sets the thread count to every
core: each call puts torch's count back.
Imported lazily by ``exact_topk``: the first long selection of a process
takes ~0.5 s more (numba's import, the kernels loaded from ``__pycache__``),
the first on a machine ~1.8 s (compiling them there). Where numba is
missing, or ``REGTOPK_FL_NUMBA=0``, torch's scan runs instead.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from numba import njit, prange

# entries per counted block: the write pass re-reads only the blocks with a count;
# 32 or 16 re-read less but count at half the speed, 128 re-reads more
# (scripts/probes/compiled_scan/block_probe.py; its output: results/cpu_checks/compiled_scan/)
BLOCK = 64
CHUNKS = 64  # blocks are split into this many runs of consecutive blocks, one task each
DTYPES = (torch.float32, torch.float64)
# One caller at a time: each call already uses every thread torch is given,
# and numba's fallback threading layer (workqueue, where no OpenMP runtime is
# installed) aborts the process when two threads launch kernels at once.
_LOCK = threading.Lock()


@njit(parallel=True, cache=True)
def _count(x, t, absolute, counts, chunk, totals):
    """1. counts[b]: entries of block b (full blocks only) with score >= t;
    totals[c]: their sum over chunk c's blocks."""
    nb = counts.shape[0]
    for c in prange(totals.shape[0]):
        tot = 0
        for b in range(c * chunk, min((c + 1) * chunk, nb)):
            s = x[b * BLOCK:(b + 1) * BLOCK]
            n = np.int32(0)
            if absolute:
                for i in range(BLOCK):
                    n += np.int32(1) if abs(s[i]) >= t else np.int32(0)
            else:
                for i in range(BLOCK):
                    n += np.int32(1) if s[i] >= t else np.int32(0)
            counts[b] = n
            tot += n
        totals[c] = tot


@njit(parallel=True, cache=True)
def _write(x, t, absolute, counts, chunk, starts, pos, val):
    """2. each chunk's candidates from its offset ``starts[c]``, block by
    block: every entry of a block is written to a small buffer and the next
    slot taken only by a candidate (no branch to mispredict: a block that
    holds one holds ~6 % candidates at S = 0.01), then its count copied out."""
    nb = counts.shape[0]
    for c in prange(starts.shape[0]):
        o = starts[c]
        bpos = np.empty(BLOCK, np.int64)
        bval = np.empty(BLOCK, x.dtype)
        for b in range(c * chunk, min((c + 1) * chunk, nb)):
            m = counts[b]
            if m == 0:
                continue
            lo = b * BLOCK
            n = 0
            for i in range(BLOCK):
                v = abs(x[lo + i]) if absolute else x[lo + i]
                bpos[n] = lo + i
                bval[n] = v
                n += 1 if v >= t else 0
            pos[o:o + m] = bpos[:m]
            val[o:o + m] = bval[:m]
            o += m


def candidates(row: torch.Tensor, t: float, absolute: bool):
    """(local indices ascending, scores there) of the entries of a 1-D
    contiguous CPU ``row`` (float32 or float64) whose score is >= t."""
    threads = torch.get_num_threads()
    with _LOCK:
        try:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            return _candidates(row.numpy(), t, absolute)
        finally:  # numba's OpenMP layer shares torch's runtime and resets its thread count
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def _candidates(x, t, absolute):
    tx = x.dtype.type(t)  # torch compares in the row's dtype too
    nb = x.shape[0] // BLOCK
    chunk = max(1, -(-nb // CHUNKS))
    counts = np.empty(nb, dtype=np.int32)
    totals = np.empty(-(-nb // chunk), dtype=np.int64)
    _count(x, tx, absolute, counts, chunk, totals)
    starts = np.cumsum(totals) - totals
    tail = x[nb * BLOCK:]  # fewer than BLOCK entries after the last full block
    tail_pos = np.flatnonzero((np.abs(tail) if absolute else tail) >= tx)
    body = int(totals.sum())
    pos = np.empty(body + tail_pos.size, dtype=np.int64)
    val = np.empty(body + tail_pos.size, dtype=x.dtype)
    _write(x, tx, absolute, counts, chunk, starts, pos, val)
    pos[body:] = tail_pos + nb * BLOCK
    val[body:] = (np.abs(tail) if absolute else tail)[tail_pos]
    return torch.from_numpy(pos), torch.from_numpy(val)


@njit(cache=True)
def _hits(x, t, absolute, idx, local, sub, where, mag):
    """The entries of ``idx`` whose score is >= t, i.e. that are among the
    candidates ``local`` (ascending): their positions in ``idx`` (``sub``),
    in ``local`` (``where``, by binary search) and their scores (``mag``).
    Returns how many."""
    n = 0
    for j in range(idx.shape[0]):
        v = abs(x[idx[j]]) if absolute else x[idx[j]]
        if v >= t:
            target, lo, hi = idx[j], 0, local.shape[0]
            while lo < hi:
                mid = (lo + hi) >> 1
                if local[mid] < target:
                    lo = mid + 1
                else:
                    hi = mid
            sub[n], where[n], mag[n] = j, lo, v
            n += 1
    return n


def mask_hits(row: torch.Tensor, t: float, absolute: bool, idx: torch.Tensor, local: torch.Tensor):
    """(positions into ``idx``, positions into ``local``, scores there) of the
    entries of ``idx`` (distinct local indices into ``row``, in range: the
    caller checks) that are candidates: score >= t, so present in ``local``
    (:func:`candidates`' output for the same t). Serial: O(len(idx)) reads
    of the row."""
    x = row.numpy()
    ix, lx = idx.contiguous().numpy(), local.numpy()
    sub, where = np.empty(ix.shape[0], np.int64), np.empty(ix.shape[0], np.int64)
    mag = np.empty(ix.shape[0], x.dtype)
    n = _hits(x, x.dtype.type(t), absolute, ix, lx, sub, where, mag)
    return torch.from_numpy(sub[:n]), torch.from_numpy(where[:n]), torch.from_numpy(mag[:n])
