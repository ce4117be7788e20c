"""Observations of the accumulated gradient during training (the Gaussian-k
paper's): histograms of a's entries, the contraction ratio of Top-k against
its bounds, and Gaussian-k's selected count and selection time next to Top-k.

Enabled with ``observe.every=T`` (in-process runtime): every T rounds, worker
0's accumulated gradient a (before selection) is examined and one row is
appended to ``observations.csv``; histograms go to ``histograms.npz``.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from .compress.base import num_selected
from .compress.exact_topk import rows_topk
from .compress.gaussiank import threshold_select
from .results import atomic_write

FIELDS = ["round", "dim", "k", "norm2", "topk_contraction", "bound_1_minus_k_over_d",
          "bound_sq", "gaussiank_count", "topk_select_s", "gaussiank_select_s", "mean", "std",
          "kurtosis"]


class GradientObserver:
    def __init__(self, run_dir, sparsity: float, bins: int = 101):
        self.dir = Path(run_dir)
        self.sparsity, self.bins = float(sparsity), int(bins)
        self.rows: list = []
        self.hists: dict = {}
        self.round = 0

    def __call__(self, a: torch.Tensor, sel) -> None:
        u = a[0].detach().float().cpu().clone()
        d = u.numel()
        k = num_selected(self.sparsity, d)
        t0 = time.perf_counter()
        top = rows_topk(u.abs().unsqueeze(0), k)
        t1 = time.perf_counter()
        g = threshold_select(u.unsqueeze(0), u.abs().unsqueeze(0), self.sparsity)
        t2 = time.perf_counter()
        norm2 = float(u.double().pow(2).sum())
        rest = u.clone()
        rest[top.flat_idx] = 0
        std, mean = torch.std_mean(u.double())
        z = (u.double() - mean) / std if float(std) > 0 else u.double() * 0
        self.rows.append({
            "round": self.round, "dim": d, "k": k, "norm2": norm2,
            "topk_contraction": float(rest.double().pow(2).sum()) / norm2 if norm2 > 0 else float("nan"),
            "bound_1_minus_k_over_d": 1 - k / d, "bound_sq": (1 - k / d) ** 2,
            "gaussiank_count": int(g.counts[0]), "topk_select_s": t1 - t0,
            "gaussiank_select_s": t2 - t1, "mean": float(mean), "std": float(std),
            "kurtosis": float(z.pow(4).mean()),
        })
        lim = 5.0 * float(std) if float(std) > 0 else 1.0
        counts, edges = np.histogram(u.numpy(), bins=self.bins, range=(float(mean) - lim, float(mean) + lim))
        self.hists[f"r{self.round}_counts"], self.hists[f"r{self.round}_edges"] = counts, edges

    def state_dict(self) -> dict:  # goes into the run's checkpoint
        return {"rows": list(self.rows), "hists": dict(self.hists)}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.hists = list(state["rows"]), dict(state["hists"])

    def write(self) -> None:
        if not self.rows:
            return

        def table(fh):
            w = csv.DictWriter(fh, FIELDS)
            w.writeheader()
            w.writerows(self.rows)

        atomic_write(self.dir / "observations.csv", table)
        atomic_write(self.dir / "histograms.npz", lambda fh: np.savez(fh, **self.hists), "wb")
