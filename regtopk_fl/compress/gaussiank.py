"""Gaussian-k (Shi et al., "Understanding Top-k Sparsification in Distributed
Deep Learning"): a threshold from a normal fit instead of an exact top-k.

Fit mean m and std s of each row of a; the two-sided tail at probability
S = k/J gives ``t = |m| + s * Phi^-1(1 - S/2)``. Count ``|a| > t``; while the
count lies outside [2k/3, 4k/3], halve t (too few) or multiply it by 1.5 (too
many), at most 3 times, as the authors' GaussianK-SGD does. The row sends
every entry above the final threshold: about k, not exactly k; the count is
in ``Selection.counts``. Cost: a few elementwise passes, no sort or top-k.
"""
import torch

from .base import check_sparsity, mask_selection, num_selected
from .regtopk import RegTopK, regularized_abs

MAX_REFINE = 3


def threshold_select(a: torch.Tensor, score: torch.Tensor, sparsity: float):
    """Entries of ``score`` (>= 0) above the normal-fit threshold of ``a``."""
    n, dim = a.shape
    k = num_selected(sparsity, dim)
    std, mean = torch.std_mean(a, dim=1, keepdim=True)
    z = torch.special.ndtri(torch.tensor(1.0 - sparsity / 2.0, dtype=torch.float64)).item()
    thr = mean.abs() + std * z
    lo, hi = 2.0 * k / 3.0, 4.0 * k / 3.0
    mask = score > thr
    for _ in range(MAX_REFINE):
        cnt = mask.sum(dim=1, keepdim=True)
        few, many = cnt < lo, cnt > hi
        if not bool((few | many).any()):
            break
        thr = torch.where(few, thr * 0.5, torch.where(many, thr * 1.5, thr))
        mask = score > thr
    return mask_selection(mask)


class GaussianK:
    name = "gaussiank"
    sends_indices = True

    def __init__(self, sparsity: float, **_):
        self.sparsity = check_sparsity(sparsity)

    def select(self, a, ctx):
        return threshold_select(a, a.abs(), self.sparsity)


class RegTopKGaussianK(RegTopK):
    """RegTop-k's regularized score, selected with Gaussian-k's threshold."""

    name = "regtopk_gaussiank"

    def select(self, a, ctx):
        return threshold_select(a, self.score(a, ctx), self.sparsity)
