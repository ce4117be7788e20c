"""The paper's rule: g = sum_n w_n g_hat_n (Algorithm 1)."""
from __future__ import annotations

import torch

from ..compress.base import row_of_entry
from .base import Batch, Rule


class Mean(Rule):
    """Dense uploads are added one by one, then the sparse ones in one
    scatter-add in worker order (the same sequence of additions as adding
    them one by one), never densifying an upload. Bitwise the server's
    arithmetic before rules were a config group (tests/test_trust.py)."""

    name = "mean"
    paper = True

    def combine(self, g: torch.Tensor, batch: Batch) -> None:
        for r, w in zip(batch.replies, batch.weights):
            if r.upload.indices is None:
                g.add_(r.upload.values, alpha=w)
        sparse, idx, vals, counts = batch.packed
        if sparse:
            by_worker = dict(zip((r.worker for r in batch.replies), batch.weights))
            w = torch.tensor([by_worker[r.worker] for r in sparse], dtype=g.dtype,
                             device=g.device)
            if len(set(counts)) == 1:  # equally long uploads: w_n broadcast over its row
                contrib = (vals.view(len(counts), -1) * w[:, None]).view(-1)
            else:  # w_n repeated for each of its entries
                contrib = vals * w[row_of_entry(counts, g.device)]
            g.index_add_(0, idx, contrib)
