"""Exact top-k of each row of an [N, J] score at close to memory speed.

``torch.topk`` on a full row of J = 11M costs ~45 elementwise passes on CPU.
The selected set only depends on the k-th largest value, and almost all of a
row lies far below it, so for a long row (J >= ``SMALL_J``):

1. **Threshold from a sample.** A fixed strided sample of ~``SAMPLE`` entries
   (positions 0, s, 2s, ...: no randomness, so every run is reproducible)
   gives ``t``, its r-th largest value, with r = the expected count of
   top-k entries in the sample plus a margin of 4 standard deviations + 4.
   So ``t`` lies below the row's k-th largest value except with odds ~1e-5.
2. **Blocks that can hold a candidate.** The row is viewed as [B, C] blocks;
   one ``amax`` per block (for ``|a|``: ``amax`` and ``amin``, so ``|a|`` is
   never materialized) bounds each block's largest score. Only blocks whose
   bound is >= t are copied out (for S = 0.001 and C = 64, ~10% of J), and
   only there are scores computed and compared with ``t``.
3. **Exact top-k on the candidates** (score >= t, about 1.5k for every 1k
   selected; in index order). If fewer than k survive, ``t`` was too high: step 1 retries with a
   rank 8x deeper, then with ``t = -inf`` (every entry a candidate). The
   result never depends on the sample, only the cost does.

RegTop-k's score is ``|a|`` except on last round's mask (O(k) entries, each
``|a| * tanh(.) >= 0``): those values are written into ``a`` for the
selection and the original entries put back bitwise afterwards, so RegTop-k
costs Top-k's passes plus O(k).

Passes over J per row (CPU): two read-only block reductions (``amax``,
``amin``; one for a materialized score), about 10% of J copied and compared,
and O(k) work. No J-sized temporary is allocated. Short rows
(J < ``SMALL_J``) take one vectorized exact pass (``kthvalue`` and a tie mask)
over the whole batch instead; the ``t = -inf`` fallback copies the row once
and does the same on it.

**Ties.** The selected set is exactly the k largest scores; among entries equal
to the k-th largest value, the lowest indices win. This is what a stable
descending sort followed by the first k entries selects, and it does not
depend on the thread count, the device or the sample. Scores must be NaN-free
(the memory rejects non-finite gradients); +-inf are fine.
"""
from __future__ import annotations

import math
import threading

import torch

from .base import Selection, check_k

SMALL_J = 1 << 15  # below this a row is selected in one vectorized exact pass
SAMPLE = 1 << 16  # strided sample size used to estimate the threshold
MARGIN_SD = 4.0  # sample rank = expected + MARGIN_SD * sqrt(expected) + 4
RETRY_DEPTH = 8  # the retry looks this many times deeper in the sample

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
        s.view(-1)[fix[0]] = fix[1].to(s.dtype)
    return s


def _block_size(density: float) -> int:
    """Block length C: 128 while few blocks hold a candidate (about one in 8),
    else 64. Shorter blocks would leave fewer entries in the blocks that hold
    one, but an inner reduction over fewer than 64 entries is compute-bound
    on CPU (C = 32 costs ~1.4x, C = 16 ~10x the time of C = 64), and where
    candidates cluster (a gradient's large layers) the share of blocks hit
    barely falls with C: 22 % at C = 64 and 18 % at C = 32 for S = 0.01 in
    the benchmark."""
    return 128 if 128 * density <= 0.125 else 64


def _candidates(row, t: float, absolute: bool, block: int):
    """Local indices (ascending) and scores of the entries of ``row`` whose
    score (``|row|`` or ``row``) is >= t. ``block`` is a power of two."""
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


def _top_positions(vals, k: int):
    """Ascending positions of the k largest entries of a 1-D tensor, ties at
    the k-th value going to the lowest positions (1 <= k <= numel)."""
    kth = _kth_largest(vals, k)
    keep = vals > kth
    tie = vals == kth
    keep |= tie & (torch.cumsum(tie, 0) <= k - keep.sum())
    return torch.nonzero(keep).squeeze(1)


def _row_topk(row, k: int, absolute: bool) -> torch.Tensor:
    """Ascending local indices of the exact top-k of one long row."""
    dim = row.numel()
    stride = max(1, dim // SAMPLE)
    sample = row[::stride]
    sample = sample.abs() if absolute else sample.contiguous()
    m = sample.numel()
    expect = k * m / dim
    rank = min(m, math.ceil(expect + MARGIN_SD * math.sqrt(expect) + 4.0))
    while True:
        if rank >= m:
            t = -math.inf  # every entry is a candidate: exact whatever the sample
        else:  # the rank-th largest of the sample
            t = _kth_largest(sample, rank).item()
        local, vals = _candidates(row, t, absolute, _block_size(rank / m))
        if local.numel() == k:
            return local
        if local.numel() > k:
            return local.index_select(0, _top_positions(vals, k))
        rank = min(m, rank * RETRY_DEPTH)  # t was above the k-th value


def rows_topk(score: torch.Tensor, k: int, *, absolute: bool = False, fix=None) -> Selection:
    """Exact top-k of each row of a NaN-free ``score`` ([N, J]), as a
    :class:`Selection` (ascending within each row, k per row).

    The selected set is exactly the k largest scores of the row; ties at the
    k-th largest value are broken deterministically, **lowest index wins**
    (as a stable descending sort would). With ``absolute`` the score is
    ``|score|``; ``fix = (flat idx, values)`` overrides the score at a few
    flat positions (RegTop-k's rescaled entries). With ``absolute`` and
    overrides >= 0, they are written into ``score`` for the selection and the
    original entries are put back bitwise before returning (also on error):
    O(k), where a rescaled copy of the score would cost a pass over J.
    Otherwise the score is materialized. ``|score|`` is never materialized
    for long rows, and ``score`` is unchanged on return. Works on any device.
    """
    n, dim = score.shape
    k = check_k(k, dim)
    score, dev = score.contiguous(), score.device
    if k == dim:
        flat = torch.arange(n * dim, device=dev)
        return Selection(flat, torch.full((n,), dim, dtype=torch.int64, device=dev))
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
    if dim < SMALL_J:
        keep = exact_mask(score.abs() if absolute else score, k)
        flat = torch.nonzero(keep.reshape(-1)).squeeze(1)
        return Selection(flat, torch.full((n,), k, dtype=torch.int64, device=dev))
    parts = [_row_topk(score[r], k, absolute) + r * dim for r in range(n)]
    flat = parts[0] if n == 1 else torch.cat(parts)
    return Selection(flat, torch.full((n,), k, dtype=torch.int64, device=dev))
