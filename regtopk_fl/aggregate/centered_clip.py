"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021), a norm-clipping
rule (a deviation from the paper)."""
from __future__ import annotations

import math

import torch

from .base import AggregateError, Batch, Rule, lower_median, on_support


class CenteredClip(Rule):
    """v <- v + sum_n w_n * min(1, tau / ||x_n - v||) * (x_n - v), ``iters``
    times, from v = 0; x_n is worker n's upload as a vector in R^J and w_n its
    weight, so without clipping v is the paper's g = sum_n w_n x_n.

    Two choices differ from the paper's: v starts at 0, not at last round's
    aggregate (which lives outside this round's support, and the sparse
    downlink broadcasts g on the support only), and the radius is relative,
    tau = ``clip_ratio`` x the lower median of the uploads' norms, so that
    one setting fits every task's gradient scale. A worker's pull on g is then
    at most w_n * tau per iteration, whatever it sends."""

    name = "centered_clip"

    def __init__(self, clip_ratio: float = 2.0, iters: int = 3, **_):
        try:
            c = float(clip_ratio)
        except (TypeError, ValueError):
            c = math.nan
        if not (c > 0 and math.isfinite(c)):
            raise AggregateError("aggregate.clip_ratio", clip_ratio, "must be a finite number > 0")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise AggregateError("aggregate.iters", iters, "must be an integer >= 1")
        self.clip_ratio, self.iters = c, iters

    def combine(self, g: torch.Tensor, batch: Batch) -> None:
        support, x = on_support(g, batch, scale_by_weight=False)
        w = torch.tensor(batch.weights, dtype=g.dtype, device=g.device)
        norms = torch.linalg.vector_norm(x, dim=1)
        tau = self.clip_ratio * lower_median(norms.tolist())
        v = torch.zeros(x.shape[1], dtype=g.dtype, device=g.device)
        for _ in range(self.iters):
            d = x - v
            dn = torch.linalg.vector_norm(d, dim=1)
            scale = torch.where(dn > tau, tau / dn.clamp_min(torch.finfo(g.dtype).tiny),
                                torch.ones_like(dn))
            v = v + ((w * scale)[:, None] * d).sum(0)
        g[support] = v
