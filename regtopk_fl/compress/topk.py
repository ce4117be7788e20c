"""Top-k: the k largest |a| of the accumulated gradient a = eps + g.

``|a|`` is never materialized: the exact selection (``exact_topk``) bounds
blocks of ``a`` by their max and min and takes ``|.|`` only where a block can
hold one of the k largest."""
from .base import Sparsifier, check_sparsity, num_selected
from .exact_topk import rows_topk


class TopK(Sparsifier):
    name = "topk"
    plot_order = 1
    # exactly k entries per upload: the default budget (k) is what is sent

    def __init__(self, sparsity: float, **_):
        self.sparsity = check_sparsity(sparsity)

    def select(self, a, ctx):
        return rows_topk(a, num_selected(self.sparsity, a.shape[1]), absolute=True)
