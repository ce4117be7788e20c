"""RegTop-k (Bereyhi, Liang et al., arXiv 2501.05633, Algorithm 1).

Selects the top-k of the regularized score ``|a| * tanh(|1 + Delta| / mu)``.
Delta, the posterior distortion, is defined on the entries this worker sent in
the round it last took part in; every other entry gets ``Q`` (default 1e8, so
``tanh(|1 + Q| / mu) = 1`` in floating point for any sensible mu). With
``s`` = the value sent, ``w`` = its aggregation weight, ``g`` = that round's
global gradient on the entry:

* ``reference`` (default; the authors' released code):
  ``Delta = (g - w s) / (w s)``. Entries that cancelled out across workers
  (g = 0) get Delta = -1 and score 0. This form reproduces the paper's Fig. 2.
* ``paper`` (Algorithm 1 as printed): the denominator is ``w a`` with the
  current round's accumulated gradient ``a`` on that entry. Measured on
  Fig. 2's linear regression it stalls like Top-k (see results/README.md).

Every division is guarded: a zero denominator, NaN or Inf yields Delta = Q, so
no NaN or Inf leaves the sparsifier. The extra cost over Top-k is O(k): only
the previous mask's entries are rescaled, never above ``|a|`` (tanh <= 1),
and they reach the exact selection as a lowering of ``|a|``
(``rows_topk(a, k, absolute=True, lowered=...)``), which on CPU scores only
the mask entries that can be selected; so RegTop-k runs Top-k's path without
materializing its score.
"""
import math

import torch

from .. import checks
from .base import Sparsifier, SparsifierError, check_positive, check_sparsity, num_selected
from .exact_topk import Lowered, rows_topk

DISTORTIONS = ("reference", "paper")


def prev_scores(a: torch.Tensor, ctx, mu: float, distortion: str, q: float, pos=None,
                scale=None, noise=None):
    """The regularized score on last round's mask only: ``(flat idx, score)``,
    O(k); ``pos`` (positions into the mask) restricts it to those entries.
    Every other entry's score is ``|a| * tanh(|1 + Q| / mu)``. ``scale``
    (None: 1, no operation) multiplies Delta before the guard and ``noise``
    (None: 0, no operation) replaces |1 + Delta| by sqrt((1 + Delta)^2 +
    noise^2), for regtopk_sampled (compress/regtopk_sampled.py)."""
    idx, sent, fb_g, fb_w = ctx.prev_flat, ctx.prev_sent, ctx.fb_g, ctx.fb_w
    if pos is not None:
        idx, sent, fb_g, fb_w = (x.index_select(0, pos) for x in (idx, sent, fb_g, fb_w))
    a_prev = a.view(-1).index_select(0, idx)
    contrib = fb_w * sent
    den = contrib if distortion == "reference" else fb_w * a_prev
    delta = (fb_g - contrib).div_(den)
    if scale is not None:
        delta.mul_(scale)
    # a zero denominator gives +-inf or NaN (x / 0, 0 / 0), unknown feedback
    # (fb_g NaN) NaN: every non-finite Delta is Q (in delta's dtype)
    delta.nan_to_num_(nan=q, posinf=q, neginf=q)
    delta.add_(1.0)
    if noise is not None:
        delta.square_().add_(noise * noise).sqrt_()
    return idx, delta.abs_().div_(mu).tanh_().mul_(a_prev.abs_())


def off_mask_scale(mu: float, q: float) -> float:
    """tanh(|1 + Q| / mu): 1.0 in floating point unless mu is huge."""
    return math.tanh(abs(1.0 + q) / mu)


def regularized_abs(a: torch.Tensor, ctx, mu: float, distortion: str, q: float,
                    scale=None, noise=None) -> torch.Tensor:
    """|a| * tanh(|1 + Delta| / mu) for a [N, J] batch (a fresh tensor)."""
    score = a.abs()
    base = off_mask_scale(mu, q)
    if base != 1.0:  # only for a huge mu: keeps the off-mask scale exact
        score.mul_(base)
    if ctx.prev_flat.numel():
        idx, vals = prev_scores(a, ctx, mu, distortion, q, scale=scale, noise=noise)
        score.view(-1)[idx] = vals
    return score


class RegTopK(Sparsifier):
    name = "regtopk"
    plot_order = 5
    uses_mu = True
    # exactly k entries per upload: the default budget (k) is what is sent

    def __init__(self, sparsity: float, mu: float = 1.0, distortion: str = "reference",
                 q: float = 1e8, **_):
        self.sparsity = check_sparsity(sparsity)
        self.mu = check_positive("mu", mu)
        self.q = check_positive("q", q)
        if distortion not in DISTORTIONS:
            raise SparsifierError(f"distortion={distortion!r}: must be one of {DISTORTIONS}")
        self.distortion = distortion

    @classmethod
    def check_settings(cls, cfg, runtime):
        super().check_settings(cfg, runtime)
        checks.num(cfg, "sparsifier.mu", 0, lo_open=True, allowed="must be a finite number > 0")
        checks.choice(cfg, "sparsifier.distortion", DISTORTIONS)
        checks.num(cfg, "sparsifier.q", 0, lo_open=True, allowed="must be a finite number > 0")

    def score(self, a, ctx):
        return regularized_abs(a, ctx, self.mu, self.distortion, self.q)

    def select(self, a, ctx):
        k = num_selected(self.sparsity, a.shape[1])
        if off_mask_scale(self.mu, self.q) != 1.0:  # huge mu: every entry rescaled
            return rows_topk(self.score(a, ctx), k)
        if not ctx.prev_flat.numel():
            return rows_topk(a, k, absolute=True)
        # |a| * tanh(.) <= |a|: a lowering, computed where it can be selected
        return rows_topk(a, k, absolute=True, lowered=Lowered(
            ctx.prev_flat, lambda pos: prev_scores(a, ctx, self.mu, self.distortion, self.q, pos)[1]))
