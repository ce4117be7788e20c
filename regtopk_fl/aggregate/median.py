"""Coordinate-wise median (a deviation from the paper; Yin et al. 2018)."""
from __future__ import annotations

import torch

from .base import Batch, Rule, on_support


class Median(Rule):
    """On the union support of the round's uploads, the median over the
    workers of x_n = R * w_n * g_hat_n (R accepted replies; a worker that did
    not send an entry contributes 0 there), the mean of the two middle values
    for even R. With sparse uploads most workers send 0 at most coordinates,
    so the median there is 0: unlike the dense case of the literature, an
    entry survives only where more than half the workers sent it."""

    name = "median"

    def combine(self, g: torch.Tensor, batch: Batch) -> None:
        support, x = on_support(g, batch)
        n = x.shape[0]
        s = torch.sort(x, dim=0).values
        g[support] = (s[(n - 1) // 2] + s[n // 2]) / 2
