"""Random-k: k entries drawn uniformly without replacement, with error feedback.

Seeded statelessly from (seed, worker id, round): the same worker in the same
round draws the same entries in every runtime and after a resume.
"""
import torch

from .base import Sparsifier, check_sparsity, num_selected
from .exact_topk import rows_topk


class RandomK(Sparsifier):
    name = "randomk"
    plot_order = 2
    # exactly k entries per upload: the default budget (k) is what is sent

    def __init__(self, sparsity: float, seed: int = 0, **_):
        self.sparsity = check_sparsity(sparsity)
        self.seed = int(seed)

    def select(self, a, ctx):
        n, dim = a.shape
        keys = torch.empty(n, dim, dtype=torch.float32)
        for row, wid in enumerate(ctx.worker_ids):
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + int(wid)) * 1_000_033 + ctx.round)
            keys[row].uniform_(generator=gen)
        # i.i.d. uniform keys: the k largest form a uniform random k-subset
        return rows_topk(keys.to(a.device), num_selected(self.sparsity, dim))
