"""Exact top-k of each row of an [N, J] score at close to memory speed.

``torch.topk`` on a full row of J = 11M costs ~45 elementwise passes on CPU.
The selected set only depends on the k-th largest value, and almost all of a
row lies far below it, so for a long row (J >= ``SMALL_J``):

1. **Threshold from a sample.** A fixed strided sample of m ~ ``SAMPLE``
   entries (positions 0, s, 2s, ... with s a prime: no randomness, so every
   run is reproducible) gives ``t``, its r-th largest value, with
   r = e + ``MARGIN_SD`` * sqrt(e) + 4, where e = k m / J is the expected
   count of the row's top-k entries in the sample.
2. **The candidates** (score >= t, ascending). On CPU two passes of
   compiled code (:mod:`.scan_kernels`, numba): a count of them per block of
   64 (one read of the row), then their positions and scores written from
   the blocks that hold one. Elsewhere (CUDA, or without numba) in torch
   kernels: the row is viewed as [B, C] blocks (C = 64 or 128); one
   ``amax`` per block (for ``|a|``: ``amax`` and ``amin``, so ``|a|`` is
   never materialized) bounds each block's largest score. Only blocks whose
   bound is >= t are copied out (into a buffer reused between calls), and
   only there are scores computed and compared with ``t``. Both give the
   same tensors.
3. **Exact top-k on the candidates** (score >= t, in index order): the k-th
   largest candidate, every candidate above it, and the lowest-indexed ones
   equal to it. On CPU, where the sample expects many top-k entries (e > ~25,
   S >= 0.001 at J = 11M), its hi-th largest value, hi = e - ``MARGIN_SD`` *
   sqrt(e) - 4, probably has fewer than k candidates above it; then the k-th
   largest is found in the band below it (a partial ``topk`` of the smaller
   side of about a quarter of the candidates at S = 0.01, where selecting
   among all 128k candidates cost 0.6-0.8 passes;
   ``scripts/profile_exact_topk.py`` times each step). A wrong guess (k or
   more above hi) only costs the selection over all candidates. Not on CUDA:
   there the band's count is one more host sync, and that path was measured
   without it. If fewer than k candidates survive, ``t`` was too high: step 1
   retries with a rank ``RETRY_DEPTH`` = 8 times deeper, then with
   ``t = -inf`` (every entry a candidate). The result never depends on the
   sample, only the cost does.

**Why the margin holds at small k.** The rank-r threshold leaves fewer than
k candidates exactly when the sample holds r or more of the row's k - 1
largest entries. For a sample that falls on the row like a random one, that
count X is hypergeometric, close to Poisson(e), so a retry has probability
P(X >= r). The margin is sized for both regimes: for large e it is 4
standard deviations (P <= 3e-5 over every e); for small e the "+ 4"
dominates, so the sample must hold at least 5 top-k entries where it
expects e << 1 of them (k = 1 at J = 11M: e = 0.006, P = 5e-14). At
J = 11,173,962 (ResNet-18; stride 173, m = 64,590):

| S | k | e | r | P(retry) | P(second retry) | expected candidates |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| 0.0001 | 1,117 | 6.5 | 21 | 4e-6 | 3e-175 | 3,630 (3.3 k) |
| 0.001 | 11,174 | 65 | 101 | 2e-5 | < 1e-300 | 17,500 (1.6 k) |
| 0.01 | 111,740 | 646 | 752 | 2e-5 | < 1e-300 | 130,100 (1.16 k) |

The candidates are the entries above the sample's r-th largest value, about
J r / m = k + 4 sqrt(k J / m) + 4 J / m: at small k the additive terms
dominate (3.3 k), but the count stays small in absolute terms, and the cost
is the blocks it touches (~4 % of J at S = 0.0001), so the fast path holds
at every S. Measured on the benchmark's gradients after 1-5 rounds of error
feedback: 2.4k-4.3k, 13k-20k and 125k-130k candidates, in one pass each
(no retry in any timed call of ``scripts/bench_sparsifiers.py`` at these
S). The sample is systematic, not random: on a row whose large entries
repeat with a period that shares a factor with the stride it can land on
them (threshold too high: a retry) or miss them all (too low: more
candidates). A prime stride shares no factor with the periods of a
network's tensors (powers of two, 3 x 3 kernels), and an adversarial row
costs time, never exactness (``tests/test_selection.py`` builds such rows).

RegTop-k's score is ``|a|`` except on last round's mask (O(k) entries,
each ``|a| * tanh(.)``, never above ``|a|``). On CPU it is passed as
:class:`Lowered`: the blocks are bounded by ``|a|``, which bounds the
lowered score too, and the regularized score is computed only for the mask
entries that are candidates (``|a| >= t``: last round's entries were zeroed
in the residual, so usually few), then overwrites theirs before the count
and the selection. Which mask entries are candidates, and where they sit
among them, is one serial compiled pass over the mask
(:func:`.scan_kernels.mask_hits`; in torch, a gather of ``|a|`` on the
mask, ``nonzero`` and ``searchsorted``); the regularized score itself is
always torch's arithmetic, so its bits do not depend on the scan.
Elsewhere (CUDA, where the O(k) arithmetic is a few launches and each lazily found subset a host sync) every score is computed
at once, written into ``a`` for the selection and the original entries put
back bitwise afterwards. Either way RegTop-k costs Top-k's passes plus O(k).

Passes over J per row (CPU): the sample (a strided read), the count (one
read), the blocks holding a candidate read again (~2-6 % of J at S <= 0.001,
~19 % at S = 0.01, where candidates cluster in a gradient's large layers),
and O(k) work. (With torch's scan instead: two read-only block reductions
(``amax``, ``amin``; one for a materialized score), the blocks holding a
candidate copied and compared, and ``nonzero`` over their mask.) No J-sized
temporary is allocated. Short rows (J < ``SMALL_J``) take one vectorized
exact pass (``kthvalue`` and a tie mask) over the whole batch instead. The
``t = -inf`` fallback makes every entry a candidate (a copy of the row and
the exact selection over all of it, tens of passes): adversarial rows only.

On CUDA the same code runs with the host syncs it always had, per row and
candidate pass: ``t`` from the sample (``.item()``) and three ``nonzero``
calls (reached blocks, candidates, selected); for RegTop-k one check that
the overrides are >= 0. The CPU-only pieces (the reused buffer, the lazy
lowering) are skipped there: the caching allocator reuses memory, and O(k)
arithmetic costs launches, not passes.

**Ties.** The selected set is exactly the k largest scores; among entries equal
to the k-th largest value, the lowest indices win. This is what a stable
descending sort followed by the first k entries selects, and it does not
depend on the thread count, the device or the sample. Scores must be NaN-free
(the memory rejects non-finite gradients); +-inf are fine.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from typing import Callable, NamedTuple

import torch

from .base import Selection, check_k

SMALL_J = 1 << 15  # below this a row is selected in one vectorized exact pass
SAMPLE = 1 << 16  # strided sample size used to estimate the threshold
MARGIN_SD = 4.0  # sample rank = expected + MARGIN_SD * sqrt(expected) + 4
RETRY_DEPTH = 8  # the retry looks this many times deeper in the sample


class Lowered(NamedTuple):
    """Entries whose score is ``|score|`` lowered: ``idx`` (flat, distinct;
    ascending, as a :class:`Selection` gives them, for more than one row)
    and ``score(pos)``, the score at ``idx[pos]`` (``pos=None``: all), each
    at most ``|score|`` there. Only the entries that can be selected are
    evaluated (on CPU; elsewhere all at once)."""

    idx: torch.Tensor
    score: Callable


def exact_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [N, M] mask of the k largest entries of each row of ``score``,
    ties at the k-th value going to the lowest positions (1 <= k <= M)."""
    return _mask_and_kth(score, k)[0]


def _mask_and_kth(score: torch.Tensor, k: int):
    """(the mask of :func:`exact_mask`, each row's k-th largest value [N, 1]).

    Only the k-th largest value is computed (``kthvalue``, a selection, no
    sort); it is unique whatever the tie rule, so the mask is determined:
    every entry above it, then the first equal ones in position order."""
    n, m = score.shape
    if k >= m:
        return (torch.ones(n, m, dtype=torch.bool, device=score.device),
                score.amin(dim=1, keepdim=True))
    kth = torch.kthvalue(score, m - k + 1, dim=1, keepdim=True).values
    if score.device.type == "cpu":  # (elsewhere the count would be one more host sync)
        keep = score >= kth  # at least k a row; exactly k in all unless one ties at kth
        if int(keep.sum()) == n * k:
            return keep, kth
    keep = score > kth
    tie = score == kth
    need = k - keep.sum(dim=1, keepdim=True)
    keep |= tie & (torch.cumsum(tie, dim=1) <= need)
    return keep, kth


def _materialize(score, absolute, fix):
    """The score as a tensor (a copy when it must be changed)."""
    s = score.abs() if absolute else score
    if fix is not None and fix[0].numel():
        if s is score:
            s = s.clone()
        s.view(-1).index_copy_(0, fix[0].to(torch.int64), fix[1].to(s.dtype))  # distinct idx
    return s


def sample_stride(dim: int) -> int:
    """The sample's stride for a row of ``dim``: the smallest odd prime >=
    dim // SAMPLE (1 for short rows), so that it shares no factor with the
    periods of a network's tensors."""
    return _odd_prime_from(dim // SAMPLE)


@functools.lru_cache(maxsize=64)
def _odd_prime_from(s: int) -> int:
    if s < 2:
        return 1
    s |= 1
    while any(s % d == 0 for d in range(3, math.isqrt(s) + 1, 2)):
        s += 2
    return s


_scratch = threading.local()  # per thread: (device, dtype) -> a reused 1-D buffer


def _scratch_like(row, numel: int, dtype=None):
    """A 1-D buffer of ``numel`` entries (``row``'s dtype unless given), for
    the copied blocks and their mask. On CPU it is kept per thread and
    reused: a fresh multi-MB tensor costs its page faults on every call
    (3-4 ms for the 10 MB that S = 0.01 copies at J = 11M, more than the
    copy itself). Kept only up to half of the row (not for the ``t = -inf``
    fallback). Elsewhere (CUDA) the caching allocator already reuses memory:
    a plain allocation."""
    dtype = row.dtype if dtype is None else dtype
    if row.device.type != "cpu" or 2 * numel > row.numel():
        return torch.empty(numel, dtype=dtype, device=row.device)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (row.device, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        # 25 % headroom: the count drifts from round to round, and a buffer
        # regrown by a few blocks would fault all its pages in again
        size = max(numel + numel // 4, 1 << 16)
        buf = bufs[key] = torch.empty(size, dtype=dtype, device=row.device)
    return buf[:numel]


def _block_size(density: float) -> int:
    """Block length C of torch's scan: 128 while few blocks hold a candidate
    (about one in 8), else 64. Shorter blocks would leave fewer entries in
    the blocks that hold one, but an inner reduction over fewer than 64
    entries is compute-bound on CPU (C = 32 costs ~1.4x, C = 16 ~10x the
    time of C = 64), and where candidates cluster (a gradient's large layers)
    the share of entries in blocks hit barely falls with C: 21.6 / 18.6 /
    14.9 / 10.9 % at C = 128 / 64 / 32 / 16 for S = 0.01 in the benchmark
    (counted 2026-11-27; the compiled scan uses 64 too)."""
    return 128 if 128 * density <= 0.125 else 64


@functools.cache
def _compiled_scan():
    """:mod:`.scan_kernels` (imported on first use: ~0.5 s with numba), or
    None where numba is missing or the environment sets REGTOPK_FL_NUMBA=0."""
    if os.environ.get("REGTOPK_FL_NUMBA", "1") == "0":
        return None
    try:
        import regtopk_fl.compress.scan_kernels as scan_kernels  # (not the package: no cycle)
    except ImportError:  # numba is pinned, but a machine may still lack it
        return None
    except Exception as err:  # e.g. no writable cache directory: torch's scan is exact too
        _scan_failed(err)
        return None
    return scan_kernels


def _candidates(row, t: float, absolute: bool, block: int):
    """Local indices (ascending) and scores of the entries of ``row`` whose
    score (``|row|`` or ``row``) is >= t: on CPU by :mod:`.scan_kernels`
    where numba is there, else by torch (:func:`_candidates_torch`, blocks
    of ``block``, a power of two); the same tensors either way."""
    scan = _scan_for(row)
    if scan is not None:
        try:
            return scan.candidates(row, t, absolute)
        except Exception as err:  # e.g. numba's threading layer would not load
            _scan_failed(err)
    return _candidates_torch(row, t, absolute, block)


def _scan_for(row):
    """:mod:`.scan_kernels` where it takes ``row`` (CPU, float32/64), else None."""
    scan = _compiled_scan() if row.device.type == "cpu" and not _scan_failure else None
    if scan is not None and row.dtype in scan.DTYPES and not row.requires_grad:
        return scan
    return None


_scan_failure: list = []  # the compiled scan's first error in this process, if any


def _scan_failed(err: Exception) -> None:
    """The compiled scan raised (on import, or on a first call where numba
    imports but a kernel will not run): warn once, and let torch's scan,
    which gives the same tensors, serve this process from now on."""
    if not _scan_failure:
        _scan_failure.append(err)
        warnings.warn(f"the compiled top-k scan failed ({type(err).__name__}: {err}); "
                      "torch's scan runs instead", RuntimeWarning, stacklevel=3)


def _candidates_torch(row, t: float, absolute: bool, block: int):
    """:func:`_candidates` in torch kernels (CUDA, and CPU without numba)."""
    dim = row.numel()
    nb = dim // block
    body = row[:nb * block].view(nb, block)
    reach = body.amax(dim=1) >= t
    if absolute:  # max |.| of a block >= t  <=>  max >= t or min <= -t
        reach |= body.amin(dim=1) <= -t
    hit = torch.nonzero(reach).squeeze(1)  # ascending block numbers
    blk = _scratch_like(row, hit.numel() * block)  # the reachable blocks, end to end
    torch.index_select(body, 0, hit, out=blk.view(-1, block))
    if absolute:
        blk.abs_()
    pos = torch.nonzero(torch.ge(blk, t, out=_scratch_like(row, blk.numel(), torch.bool)))
    pos = pos.squeeze(1)
    shift = block.bit_length() - 1
    local = (hit.index_select(0, pos >> shift) << shift) | (pos & (block - 1))
    vals = blk.index_select(0, pos)
    if nb * block < dim:  # the tail after the last full block
        tail = row[nb * block:]
        tail = tail.abs() if absolute else tail
        tpos = torch.nonzero(tail >= t).squeeze(1)
        local = torch.cat([local, tpos + nb * block])
        vals = torch.cat([vals, tail.index_select(0, tpos)])
    return local, vals


def _kth_largest(vals, k: int):
    """The k-th largest entry of a 1-D tensor (0-dim tensor, no host sync):
    a partial selection of whichever side is smaller (k or numel - k + 1),
    cheaper than ``kthvalue`` on CPU when k is close to numel."""
    small = vals.numel() - k + 1
    if small < k:
        return torch.topk(vals, small, largest=False, sorted=False).values.max()
    return torch.topk(vals, k, sorted=False).values.min()


def _kth_below(vals, k: int, hi: float | None):
    """The k-th largest entry of ``vals`` (1 <= k <= numel), found among the
    entries below ``hi`` when fewer than k are >= ``hi``: the k-th largest is
    then the (k - above)-th largest of that band, a smaller selection. Any
    ``hi`` gives the same value; a poor one only costs the full selection."""
    if hi is not None:
        upper = vals >= hi
        above = int(upper.sum())
        if above < k:
            band = vals.index_select(0, torch.nonzero(~upper).squeeze(1))
            return _kth_largest(band, k - above)
    return _kth_largest(vals, k)


def _top_positions(vals, k: int, hi: float | None = None):
    """Ascending positions of the k largest entries of a 1-D tensor, ties at
    the k-th value going to the lowest positions (1 <= k <= numel).

    Every entry >= the k-th largest value (:func:`_kth_below`, ``hi`` a value
    that probably has fewer than k entries above it); where ties at that
    value make more than k, the last ``extra`` ties are dropped (the count
    is known from ``nonzero``, which synchronizes anyway)."""
    kth = _kth_below(vals, k, hi)
    pos = torch.nonzero(vals >= kth).squeeze(1)
    extra = pos.numel() - k
    if extra:
        tie = vals.index_select(0, pos) == kth  # the ties, in position order
        keep = ~tie | (torch.cumsum(tie, 0) <= tie.sum() - extra)
        pos = pos.index_select(0, torch.nonzero(keep).squeeze(1))
    return pos


def _lower(row, local, vals, t: float, low) -> int | None:
    """Overwrite the candidates' scores with the lowered ones, where a
    lowered entry is a candidate (``|a| >= t``); return how many candidates
    are still >= t. None if an override is not a lowering (or NaN): the
    caller then computes every override at once. ``low`` = (their local
    indices, their ``|a|`` or None where the compiled scan finds them, the
    score function, the offset of its positions)."""
    lidx, lmag, score, offset = low
    if lmag is None:  # which lowered entries are candidates, and where: one serial pass
        try:
            sub, where, mag = _compiled_scan().mask_hits(row, t, True, lidx, local)
        except Exception as err:
            _scan_failed(err)
            lmag = row.index_select(0, lidx).abs_()
    if lmag is not None:
        sub = torch.nonzero(lmag >= t).squeeze(1)
        where, mag = None, lmag.index_select(0, sub)
    if not sub.numel():
        return local.numel()
    val = score(sub + offset).to(vals.dtype)
    if not bool((val <= mag).all()):
        return None
    if where is None:
        where = torch.searchsorted(local, lidx.index_select(0, sub))
    # every such entry is a candidate (the same |a| >= t), so it is found
    vals.index_copy_(0, where, val)
    return local.numel() - int((val < t).sum())  # all were >= t before


def sample_ranks(k: int, m: int, dim: int) -> tuple:
    """(r, hi) for a sample of ``m`` of a row's ``dim`` entries and its k
    largest: the sample's r-th largest value is the threshold (step 1), with
    e = k m / dim expected top-k entries in the sample, r = e + MARGIN_SD
    sqrt(e) + 4 (at most m); the same margin on the other side gives hi, whose
    value probably has fewer than k entries above it (the band's top, step
    3; < 1: no band)."""
    expect = k * m / dim
    sd = MARGIN_SD * math.sqrt(expect)
    return min(m, math.ceil(expect + sd + 4.0)), math.floor(expect - sd - 4.0)


def _row_topk(row, k: int, absolute: bool, low=None):
    """Ascending local indices of the exact top-k of one long row. ``low``:
    (local idx, their |row| or None, the score function, offset into its
    positions) of lowered entries (:func:`_lower`), or None. Returns None
    if an override is not a lowering."""
    dim = row.numel()
    stride = sample_stride(dim)
    sample = row[::stride]
    sample = sample.abs() if absolute else sample.contiguous()
    m = sample.numel()
    rank, hi_rank = sample_ranks(k, m, dim)
    while True:
        hi = None
        if rank >= m:
            t = -math.inf  # every entry is a candidate: exact whatever the sample
        elif hi_rank >= 1 and row.device.type == "cpu":  # the rank-th and hi_rank-th largest
            top = torch.topk(sample, rank, sorted=True).values
            t, hi = top[rank - 1].item(), top[hi_rank - 1].item()
        else:  # the rank-th largest of the sample
            t = _kth_largest(sample, rank).item()
        local, vals = _candidates(row, t, absolute, _block_size(rank / m))
        count = local.numel() if low is None else _lower(row, local, vals, t, low)
        if count is None:
            return None
        if count >= k or t == -math.inf:
            if local.numel() == k:
                return local
            return local.index_select(0, _top_positions(vals, k, hi))
        rank = min(m, rank * RETRY_DEPTH)  # t was above the k-th value


def _rows_topk_lowered(score, k: int, lowered: Lowered):
    """Per-row top-k of ``|score|`` lowered at ``lowered.idx`` (CPU, long
    rows), or None where that path does not apply."""
    n, dim = score.shape
    idx = lowered.idx.to(torch.int64)
    if n > 1 and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        return None  # the per-row slices below need ascending indices
    if _scan_for(score) is None:  # |a| on the lowered entries (index_select checks bounds)
        mag = score.view(-1).index_select(0, idx).abs_()
    else:  # the compiled scan finds those that are candidates, reading without bounds
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n * dim):
            raise IndexError(f"lowered index out of range for a [{n}, {dim}] score")
        mag = None
    ends = [0, idx.numel()] if n == 1 else torch.searchsorted(
        idx, torch.arange(n + 1, device=idx.device) * dim).tolist()
    parts = []
    for r in range(n):
        lo, hi = ends[r], ends[r + 1]
        lidx = idx[lo:hi] - r * dim if r else idx[lo:hi]
        part = None if mag is None else mag[lo:hi]
        low = (lidx, part, lowered.score, lo) if hi > lo else None
        got = _row_topk(score[r], k, True, low)
        if got is None:
            return None
        parts.append(got + r * dim if r else got)
    return parts[0] if n == 1 else torch.cat(parts)


def rows_topk(score: torch.Tensor, k: int, *, absolute: bool = False, fix=None,
              lowered: Lowered | None = None) -> Selection:
    """Exact top-k of each row of a NaN-free ``score`` ([N, J]), as a
    :class:`Selection` (ascending within each row, k per row).

    The selected set is exactly the k largest scores of the row; ties at the
    k-th largest value are broken deterministically, **lowest index wins**
    (as a stable descending sort would). With ``absolute`` the score is
    ``|score|``; ``fix = (flat idx, values)`` overrides the score at a few
    flat positions, and ``lowered`` (a :class:`Lowered`) does the same
    lazily for overrides that never exceed ``|score|`` (RegTop-k's rescaled
    entries): on CPU, with ``absolute`` and long rows, only the overrides at
    entries with ``|score| >= t`` are computed. Otherwise all are; a short
    row's score is then materialized (J < ``SMALL_J``: a copy costs less
    than the calls that avoid it), and for a long row with ``absolute`` and
    overrides >= 0 they are written into ``score`` for the selection and the
    original entries put back bitwise before returning (also on error):
    O(k), where a rescaled copy of the score would cost a pass over J.
    Otherwise the score is materialized. ``|score|`` is never
    materialized for long rows, and ``score`` is unchanged on return. Works
    on any device.
    """
    n, dim = score.shape
    k = check_k(k, dim)
    score, dev = score.contiguous(), score.device
    counts = torch.full((n,), k, dtype=torch.int64, device=dev)
    if k == dim:
        return Selection(torch.arange(n * dim, device=dev), counts)
    if lowered is not None and lowered.idx.numel():
        if absolute and dim >= SMALL_J and dev.type == "cpu":
            flat = _rows_topk_lowered(score, k, lowered)
            if flat is not None:
                return Selection(flat, counts)
        fix = (lowered.idx, lowered.score(None))  # every override at once
    if dim < SMALL_J:  # one vectorized pass; a short score is cheap to materialize
        score = _materialize(score, absolute, fix)
        keep = exact_mask(score, k)
        return Selection(torch.nonzero(keep.reshape(-1)).squeeze(1), counts)
    if fix is not None and fix[0].numel():
        idx, val = fix[0].to(torch.int64), fix[1].to(score.dtype)
        if absolute and bool((val >= 0).all()):
            # |score| with overrides v >= 0 is |score'| where score' holds v
            # there: write them in, select, and restore the entries bitwise
            flat = score.view(-1)
            saved = flat.index_select(0, idx)
            flat.index_copy_(0, idx, val)
            try:
                return rows_topk(score, k, absolute=True)
            finally:
                flat.index_copy_(0, idx, saved)
        score, absolute = _materialize(score, absolute, (idx, val)), False
    parts = [_row_topk(score[r], k, absolute) + r * dim for r in range(n)]
    return Selection(parts[0] if n == 1 else torch.cat(parts), counts)
