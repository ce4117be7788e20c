"""Coordinate-wise trimmed mean (a deviation from the paper; Yin et al. 2018)."""
from __future__ import annotations

import math

import torch

from .base import AggregateError, Batch, Rule, on_support


class TrimmedMean(Rule):
    """On the union support, drop the floor(trim_fraction * R) largest and
    smallest of x_n = R * w_n * g_hat_n per coordinate and average the rest
    (0 where a worker sent nothing, as for the median)."""

    name = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.1, **_):
        try:
            f = float(trim_fraction)
        except (TypeError, ValueError):
            f = math.nan
        if not 0.0 <= f < 0.5:
            raise AggregateError("aggregate.trim_fraction", trim_fraction, "must be in [0, 0.5)")
        self.trim_fraction = f

    def combine(self, g: torch.Tensor, batch: Batch) -> None:
        support, x = on_support(g, batch)
        n = x.shape[0]
        cut = int(math.floor(self.trim_fraction * n))
        g[support] = torch.sort(x, dim=0).values[cut:n - cut].mean(0)
