"""Norm clipping in the upload space, with a redescending band: a robust
rule made for sparse uploads (issue #33; a deviation from the paper).

Why the other robust rules break sparse training when nobody attacks: they
compare uploads where the uploads do not overlap. On the union support of
the round's uploads a worker that did not send an entry counts as 0 there,
so the coordinate-wise median is 0 wherever at most half the workers sent
an entry, trimming cuts exactly the large entries top-k sends, and centered
clipping measures ||x_n - v|| over entries of v that x_n never sent, which
inflates every distance and clips honest uploads. This rule looks at each
upload only on its own entries: its norm r_n = ||g_hat_n|| (the k values it
sent; all J for a dense upload) against the round's robust norm statistic
m = the lower median of the r_n (the server's guard uses the same, trust.py).

The rule. With a = ``clip_ratio`` and b = ``reject_ratio`` (a < b), each
upload keeps its direction and its entries and is scaled by

    s_n = 1                                 if r_n <= a m   (untouched)
    s_n = (a m / r_n) (b m - r_n) / (b m - a m)  if a m < r_n < b m
    s_n = 0                                 if r_n >= b m,

so its influence s_n r_n is r_n up to a m, then falls linearly from a m to 0
at b m (a redescending psi, as Hampel's three-part M-estimators: an upload
far outside the round's norms is not clipped but ignored), and

    g = sum_n w_n s_n g_hat_n       (written on the union support only).

The weights are not renormalised over what survives: an ignored upload
counts like an unsent one, as the paper's mean counts unsent entries.

Guarantee (for R accepted uploads of which a set B is Byzantine, |B| = f <
R / 2, weights w_n, honest uploads H):

1. Nobody attacks and every upload has r_n <= a m: s_n = 1 for all n, and g
   is the paper's mean, bitwise (the rule then runs ``Mean``'s arithmetic;
   tests/test_sparse_robust.py checks the equality). The honest uploads
   of the linreg and tiny_image presets of results/trust.md stay below
   3.3 m and 2.1 m (measured, results/trust.md), under the default a = 4.
2. The lower median is the ((R-1)//2 + 1)-th smallest norm, and f < R/2 puts
   at most f Byzantine norms below it, so m lies between two honest norms:
   the (((R-1)//2 + 1) - f)-th and the ((R-1)//2 + 1)-th smallest of H's.
   The attackers can shift m by f ranks among honest norms, no further.
3. Every upload's contribution has norm w_n s_n r_n <= w_n a m, whatever it
   sends. With H_a the honest uploads below a m (untouched) and
   g_H = sum_{n in H} w_n g_hat_n,

       ||g - g_H|| <= a m sum_{n in B} w_n + sum_{n in H \\ H_a} w_n (r_n - s_n r_n),

   the first term the attackers' whole reach (a m / R per attacker with
   equal weights), the second what honest uploads above a m lose (zero
   where 1. holds).

4. With the rate limit (``sustained_ratio`` = a_s, ``burst`` = B; the
   class below; the yaml's default a_s = 3, B = 10) worker n's radius in a
   round is a_n = min(a, a_s + its balance) <= a, so 3. holds with a_n for
   a, and over any T rounds it delivers sum_t s_n r_n / m_t <= a_s T + B
   medians: an attacker that sends at the radius every round is held to
   a_s m a round after its first B / (a - a_s) rounds. 1. holds as long as
   no honest worker's delivery above a_s outruns its balance (honest norm
   ratios above 3 are early transients in these presets: 3.24 at most,
   2.55 after round 150 on linreg).

What it does not guarantee: an attacker that stays at or below a m is
indistinguishable by norm from an honest worker, and its direction is not
checked (with heterogeneous data an honest upload at the optimum points
against the others' sum, so no direction test can separate them). Its
reach a m / R per round (a_s m / R sustained) is of the order of one honest
upload, not the 15 x of the attacks of results/trust.md; the adaptive
attacks there (``ipm`` at c = a, ``alie``) measure what that costs. A
persistent attacker biases the fixed point by up to its reach.
"""
from __future__ import annotations

import math

import torch

from .base import AggregateError, Batch, Rule, lower_median
from .mean import Mean


def _ratio(key: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (v > 0 and math.isfinite(v)):
        raise AggregateError(key, value, "must be a finite number > 0")
    return v


def scales(norms: list, clip_ratio: float, reject_ratio: float) -> list:
    """s_n for each upload norm (the module docstring): 1 up to a m, the
    redescending band between a m and b m, 0 beyond; m the lower median."""
    m = lower_median(norms)
    lo, hi = clip_ratio * m, reject_ratio * m
    out = []
    for r in norms:
        if r <= lo:
            out.append(1.0)
        elif r >= hi:
            out.append(0.0)
        else:
            out.append((lo / r) * (hi - r) / (hi - lo))
    return out


class UploadClip(Rule):
    """Each upload scaled by s_n from its own norm against the round's lower
    median norm (clipped to ``clip_ratio`` x the median, then ignored by
    ``reject_ratio`` x), then the paper's weighted sum; the derivation and
    the guarantee are in the module docstring.

    ``sustained_ratio`` (off: None) adds a per-worker rate limit on the
    influence, in units of the round's median norm: worker n may deliver
    ``sustained_ratio`` each round plus a balance, saved from the rounds in
    which it delivered less, up to ``burst``; its full-weight radius this
    round is a_n = min(clip_ratio, sustained_ratio + balance_n): an upload
    between a_n m and a m is clipped to a_n m, and the band falls from a_n m
    at a m to 0 at b m (with a_n = a the rule without the limit), so no
    norm delivers more than a_n m; the balance then moves by
    ``sustained_ratio`` - s_n r_n / m (kept in [0, burst]; it starts full).
    An honest worker's short spikes (the largest honest ratios are early
    transients, results/trust.md) spend its balance, while an attacker that
    sends at the radius every round is held to ``sustained_ratio`` after
    one burst. Over any T rounds a worker delivers at most
    ``sustained_ratio`` T + ``burst`` medians (each round's m). The
    balances are the rule's state (in the server's checkpoint)."""

    name = "upload_clip"

    def __init__(self, clip_ratio: float = 4.0, reject_ratio: float = 8.0,
                 sustained_ratio=None, burst: float = 10.0, **_):
        a = _ratio("aggregate.clip_ratio", clip_ratio)
        b = _ratio("aggregate.reject_ratio", reject_ratio)
        if b <= a:
            raise AggregateError("aggregate.reject_ratio", reject_ratio,
                                 f"must be > aggregate.clip_ratio ({a:g})")
        self.clip_ratio, self.reject_ratio = a, b
        self.sustained = None
        if sustained_ratio is not None:
            self.sustained = _ratio("aggregate.sustained_ratio", sustained_ratio)
            if self.sustained > a:
                raise AggregateError("aggregate.sustained_ratio", sustained_ratio,
                                     f"must be <= aggregate.clip_ratio ({a:g}) or null")
        try:
            cap = float(burst)
        except (TypeError, ValueError):
            cap = math.nan
        if not (cap >= 0 and math.isfinite(cap)):
            raise AggregateError("aggregate.burst", burst, "must be a finite number >= 0")
        self.burst = cap
        self.balance: dict = {}  # worker -> saved influence, in medians

    def state_dict(self) -> dict:
        return {"balance": dict(self.balance)} if self.sustained is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.balance = {int(k): float(v) for k, v in (state or {}).get("balance", {}).items()}

    def _limited(self, replies, norms) -> list:
        """s_n with each worker's full-weight radius from its balance, and
        the balances moved by this round's delivery."""
        m = lower_median(norms)
        out = []
        for r, rn in zip(replies, norms):
            bal = self.balance.get(int(r.worker), self.burst)
            a_n = min(self.clip_ratio, self.sustained + bal)
            lo, top, hi = a_n * m, self.clip_ratio * m, self.reject_ratio * m
            if rn <= lo:
                sn = 1.0
            elif rn <= top:  # clipped to the worker's radius this round
                sn = lo / rn
            elif rn >= hi:
                sn = 0.0
            else:  # the band: from its radius at a m down to 0 at b m
                sn = (lo / rn) * (hi - rn) / (hi - top)
            used = sn * rn / m if m > 0 else 0.0
            self.balance[int(r.worker)] = min(self.burst, max(0.0, bal + self.sustained - used))
            out.append(sn)
        return out

    def combine(self, g: torch.Tensor, batch: Batch) -> None:
        replies, weights = batch.replies, batch.weights
        norms = [float(torch.linalg.vector_norm(r.upload.values.to(g.dtype))) for r in replies]
        if self.sustained is None:
            s = scales(norms, self.clip_ratio, self.reject_ratio)
        else:
            s = self._limited(replies, norms)
        if all(sn == 1.0 for sn in s):  # nothing clipped: the paper's mean, bitwise
            Mean().combine(g, batch)
            return
        for r, w, sn in zip(replies, weights, s):
            if sn == 0.0:
                continue
            up = r.upload
            vals = up.values.to(g.dtype)
            coef = w if sn == 1.0 else w * sn
            if up.indices is None:
                g.add_(vals, alpha=coef)
            else:
                g.index_add_(0, up.indices.to(torch.int64), vals * coef)
