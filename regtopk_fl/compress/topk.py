"""Top-k: the k largest |a| of the accumulated gradient a = eps + g."""
from .base import check_sparsity, num_selected, rows_topk


class TopK:
    name = "topk"
    sends_indices = True

    def __init__(self, sparsity: float, **_):
        self.sparsity = check_sparsity(sparsity)

    def select(self, a, ctx):
        return rows_topk(a.abs(), num_selected(self.sparsity, a.shape[1]))
