"""Global top-k oracle (the paper's "genie"): top-k of sum_n w_n a_n, every
worker sending those same entries. Needs every worker's a at once, so it only
runs in the in-process engine; it is an upper bound, not a deployable method."""
import torch

from .base import Selection, Sparsifier, check_sparsity, num_selected
from .exact_topk import rows_topk


class GlobalTopK(Sparsifier):
    name = "global_topk"
    plot_order = 3
    # exactly k entries per upload: the default budget (k) is what is sent
    needs_all_workers = True
    runtimes = ("inprocess",)
    runtime_note = "the global top-k oracle needs every worker in one process"

    def __init__(self, sparsity: float, **_):
        self.sparsity = check_sparsity(sparsity)

    def select(self, a, ctx):
        n, dim = a.shape
        k = num_selected(self.sparsity, dim)
        total = (ctx.weights.to(a.dtype).unsqueeze(1) * a).sum(0).abs()
        idx = rows_topk(total.unsqueeze(0), k).flat_idx  # exact, lowest index on ties
        flat = (idx.unsqueeze(0) + torch.arange(n, device=a.device).unsqueeze(1) * dim).reshape(-1)
        return Selection(flat, torch.full((n,), k, dtype=torch.int64, device=a.device))
