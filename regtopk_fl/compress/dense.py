"""No compression: every entry is sent (the paper's "distributed SGD").

The selection is dense (``Selection(None, counts)``): no index tensor is built,
and the memory commits it as a copy of ``a`` plus a zeroing pass."""
from .base import Sparsifier, all_entries


class Dense(Sparsifier):
    name = "dense"
    plot_order = 0
    sends_indices = False  # a dense upload is the value vector alone
    needs_context = False  # select ignores ctx: the worker step does not build one
    has_budget = False  # every upload is all of J
    exact_count = False  # J entries, not k

    def __init__(self, sparsity: float = 1.0, **_):
        self.sparsity = 1.0

    def budget(self, dim):
        """None: a dense run has no upload budget (every upload is all of J)."""
        return None

    def select(self, a, ctx):
        return all_entries(a.shape[0], a.shape[1], a.device)
