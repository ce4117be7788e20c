"""DGC: Deep Gradient Compression's sampled threshold (Lin, Han, Mao, Wang
and Dally, "Deep Gradient Compression: Reducing the Communication Bandwidth
for Distributed Training", ICLR 2018), with error feedback.

The paper sends only the entries of the accumulated gradient above a
threshold and accumulates the rest locally (Sec. 3.1). Its threshold is the
k-th largest |a|, and Sec. 5 (system analysis) makes that selection cheap:
sample only 0.1 % to 1 % of the gradient, run top-k on the sample to
estimate the threshold for the whole population, and, if the number of
entries above it is far more than expected, compute a precise threshold
from the entries already selected. The official implementation
(synxlin/deep-gradient-compression, ``dgc/compression.py``) fixes "far
more" at 1.3 k and, when too few pass (below 0.8 k), lowers the threshold
by the factor 0.8, at most 10 times in all. Here, for each row of ``a``
(k = round(S J)):

1. **Sample.** ``sample_fraction`` of the row (default 1 %, and at least
   2 / S entries as in DGC, else the whole row): m = floor(J / s) entries
   at a stride s, the largest odd prime <= J / target (1, the whole row,
   when J < 3 target), so m >= target; from an offset drawn in [0, s).
   *Strided, not uniform at random*, as DGC's default: a strided sample is
   a stratified one (one entry per stretch of s), so its quantile varies
   less than that of m independent draws, and it costs one strided read of
   m entries instead of m random indices. The stride is a prime (as in
   :mod:`.exact_topk`) so that it shares no factor with a network's tensor
   shapes (powers of two, 3 x 3 kernels), which would sample one channel
   position only. The offset is *random*, as in DGC, so the sample moves
   from round to round; it is drawn statelessly from (seed, worker id,
   round), as :class:`.randomk.RandomK` draws its entries, so both
   runtimes and a resumed run draw the same sample.
2. **Threshold.** t = the k_s-th largest |a| of the sample, k_s =
   ceil(k m / J): the k-th largest scaled to the sample's size. Candidates:
   every entry with |a| >= t (one pass over the row, the compiled candidate
   scan of :mod:`.exact_topk` on the CPU, torch's block scan elsewhere).
3. **Too few** (count < ``lower_bound`` k, default 0.8): t is multiplied
   by ``lower_bound`` and the candidates found again, at most
   ``max_adapt`` times (default 10), as DGC does; after that the row sends
   what passes (possibly fewer than k).
4. **Too many** (count > ``upper_bound`` k, default 1.3, DGC's bound; Shi
   et al.'s GaussianK-SGD comparison uses 4/3): the exact top-k of the
   candidates (lowest index on ties), so exactly k are sent. Otherwise the
   row sends every candidate: between ``lower_bound`` k (usually) and
   ``upper_bound`` k entries, as the paper's threshold does. (The official
   code then keeps the first k candidates by index; Shi et al.'s code
   sends all of them, as here.)

The count per row is therefore at most floor(``upper_bound`` k): that is
the upload budget (:meth:`DGC.budget`), which the server enforces
(regtopk_fl/trust.py) and which holds by construction. Only the selection
of DGC is implemented: its momentum correction, local gradient clipping,
momentum factor masking and warm-up training belong to the optimizer, and
this suite's error feedback is the plain accumulation of every sparsifier
(regtopk_fl/memory.py). Shi et al.'s DGC code draws a 1 % random sample
(``randperm``) and takes its k-th largest without scaling to the sample's
size, so its threshold admits about k / 0.01 entries and its exact top-k
always runs; here the threshold is scaled, as in DGC.

Passes over J: one strided read of m >= J / 100 entries, one candidate scan
per threshold tried (one, unless too few pass), and the selection on the
candidates only. CPU and CUDA alike (no device-specific code here: the
candidate scan chooses its kernels).
"""
import functools
import math

import torch

from .. import checks
from .base import Selection, Sparsifier, SparsifierError, check_sparsity, num_selected
from .exact_topk import _block_size, _candidates, _kth_largest, _top_positions

SAMPLE_FRACTION = 0.01  # DGC: 0.1 % to 1 % (the official default 1 %)
UPPER_BOUND = 1.3  # DGC's compress_upper_bound (Shi et al.: 4/3)
LOWER_BOUND = 0.8  # DGC's compress_lower_bound
MAX_ADAPT = 10  # DGC's max_adaptation_iters
_SEED_MASK = (1 << 64) - 1  # torch.Generator.manual_seed takes at most 64 bits


def _number(name, value, lo, hi, lo_open, hi_open, allowed) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (
        hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        raise SparsifierError(f"{name}={value!r}: {allowed}")
    return v


@functools.lru_cache(maxsize=64)
def _odd_prime_at_most(s: int) -> int:
    """The largest odd prime <= ``s``; 1 when ``s`` < 3."""
    if s < 3:
        return 1
    s -= 1 - s % 2  # odd
    while any(s % d == 0 for d in range(3, math.isqrt(s) + 1, 2)):
        s -= 2
    return s


def sample_plan(dim: int, k: int, sparsity: float, fraction: float) -> tuple:
    """(stride s, sample size m, rank k_s) for a row of ``dim`` entries: m
    = dim // s entries at stride s from an offset in [0, s), whose k_s-th
    largest |a| is the threshold. The target size is max(ceil(fraction J),
    ceil(2 / S)); s is the largest odd prime <= J / target, so m >= target
    (the whole row, s = 1, when the target reaches J / 3)."""
    target = max(math.ceil(fraction * dim), math.ceil(2.0 / sparsity))
    stride = 1 if target >= dim else _odd_prime_at_most(dim // target)
    m = dim // stride
    return stride, m, min(m, max(1, math.ceil(k * m / dim)))


class DGC(Sparsifier):
    name = "dgc"
    label = "DGC"
    plot_order = 4.2  # after Gaussian-k: the approximate top-k selections
    exact_count = False  # about k, at most floor(upper_bound k)

    def __init__(self, sparsity: float, sample_fraction: float = SAMPLE_FRACTION,
                 upper_bound: float = UPPER_BOUND, lower_bound: float = LOWER_BOUND,
                 max_adapt: int = MAX_ADAPT, seed: int = 0, **_):
        self.sparsity = check_sparsity(sparsity)
        self.sample_fraction = _number("sample_fraction", sample_fraction, 0.0, 1.0, True,
                                       False, "must be in (0, 1]")
        self.upper_bound = _number("upper_bound", upper_bound, 1.0, None, False, False,
                                   "must be a finite number >= 1")
        self.lower_bound = _number("lower_bound", lower_bound, 0.0, 1.0, True, True,
                                   "must be in (0, 1)")
        if isinstance(max_adapt, bool) or not isinstance(max_adapt, int) or max_adapt < 0:
            raise SparsifierError(f"max_adapt={max_adapt!r}: must be an integer >= 0")
        self.max_adapt = max_adapt
        self.seed = int(seed)

    @classmethod
    def check_settings(cls, cfg, runtime):
        super().check_settings(cfg, runtime)
        checks.num(cfg, "sparsifier.sample_fraction", 0, 1, lo_open=True, required=False,
                   allowed="must be in (0, 1]")
        checks.num(cfg, "sparsifier.upper_bound", 1, required=False,
                   allowed="must be a finite number >= 1")
        checks.num(cfg, "sparsifier.lower_bound", 0, 1, lo_open=True, hi_open=True,
                   required=False, allowed="must be in (0, 1)")
        checks.num(cfg, "sparsifier.max_adapt", 0, integer=True, required=False,
                   allowed="must be an integer >= 0")

    def budget(self, dim: int) -> int:
        """floor(upper_bound k), at least k, at most J: a larger count is cut
        to the exact top-k, so no row sends more."""
        k = num_selected(self.sparsity, dim)
        return min(int(dim), max(k, math.floor(self.upper_bound * k)))

    def budget_note(self, dim: int) -> str:
        return (f"{self.name}: sparsifier.upper_bound={self.upper_bound:g} x k, "
                f"k={num_selected(self.sparsity, dim)} at sparsity {self.sparsity:g}, J={dim}")

    def offset(self, worker: int, round: int, stride: int) -> int:
        """The sample's offset in [0, stride) for this worker and round. The
        seed words are reduced to 64 bits (the generator's seed), so any
        seed works; below 2**64 (every seed < ~1.8e7) nothing changes."""
        if stride == 1:
            return 0
        gen = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + int(worker)) * 1_000_033 + int(round)) & _SEED_MASK)
        return int(torch.randint(stride, (1,), generator=gen))

    def select(self, a, ctx):
        n, dim = a.shape
        k = num_selected(self.sparsity, dim)
        dev = a.device
        if k >= dim:  # S = 1: every entry
            return Selection(torch.arange(n * dim, device=dev),
                             torch.full((n,), dim, dtype=torch.int64, device=dev))
        stride, m, rank = sample_plan(dim, k, self.sparsity, self.sample_fraction)
        budget = self.budget(dim)
        a = a.contiguous()
        parts, counts = [], []
        for r in range(n):
            row = a[r]
            off = self.offset(ctx.worker_ids[r], ctx.round, stride)
            sample = row[off:off + m * stride:stride].abs()
            # the threshold in the row's dtype: >= compares alike in every kernel
            t = _kth_largest(sample, rank).item()
            block = _block_size(rank / m)
            local, vals = _candidates(row, t, True, block)
            for _ in range(self.max_adapt):
                if local.numel() >= self.lower_bound * k or t <= 0.0:
                    break
                t = torch.tensor(t * self.lower_bound, dtype=row.dtype).item()
                local, vals = _candidates(row, t, True, block)
            if local.numel() > budget:  # far more than expected: the exact top-k of them
                local = local.index_select(0, _top_positions(vals, k))
            parts.append(local + r * dim if r else local)
            counts.append(local.numel())
        flat = parts[0] if n == 1 else torch.cat(parts)
        return Selection(flat, torch.tensor(counts, dtype=torch.int64, device=dev))
