"""What every aggregation rule shares: the round's accepted uploads
(:class:`Batch`), the base class and the coordinate-wise view of sparse
uploads on their union support (:func:`on_support`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class AggregateError(ValueError):
    """A bad rule parameter; str(e) is the one-line ``key=value: allowed``."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value = key, value
        super().__init__(f"{key}={value!r}: {allowed}")


@dataclass
class Batch:
    """One round's accepted replies in worker order, their weights w_n (summing
    to 1), and FedServer's concatenation of the sparse ones:
    ``packed = (sparse replies, int64 indices, values, counts)``."""

    replies: list
    weights: list
    packed: tuple

    @property
    def dense(self) -> bool:
        return any(r.upload.indices is None for r in self.replies)


class Rule:
    """An aggregation rule. ``combine`` writes g (zeros on entry, the model's
    dtype and device) in place, nonzero only on the union support of the
    uploads. ``paper`` marks the paper's own rule. ``state_dict`` is kept in
    the server's checkpoint (empty for stateless rules)."""

    name = "rule"
    paper = False

    def __init__(self, **_):  # the yaml's ``name`` (and keys of other rules) are ignored
        pass

    def combine(self, g: torch.Tensor, batch: Batch) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def lower_median(xs) -> float:
    """The lower median: the smaller middle value for an even count (the
    server's reference norm, trust.py; the radius of centered clipping)."""
    s = sorted(xs)
    return s[(len(s) - 1) // 2]


def on_support(g: torch.Tensor, batch: Batch, scale_by_weight: bool = True) -> tuple:
    """(support, x): the union support of the uploads (all of 0..J-1 when one
    is dense) and x [R, |support|], row n the upload of reply n there (0 where
    it sent nothing). With ``scale_by_weight`` row n is R * w_n * g_hat_n, so
    that the rows' plain mean is the paper's g."""
    replies, weights = batch.replies, batch.weights
    n, dim = len(replies), g.numel()
    if batch.dense:
        support = torch.arange(dim, device=g.device)
    else:
        support = torch.unique(torch.cat([r.upload.indices.to(torch.int64) for r in replies]))
    x = torch.zeros(n, support.numel(), dtype=g.dtype, device=g.device)
    for i, (r, w) in enumerate(zip(replies, weights)):
        up = r.upload
        pos = slice(None) if up.indices is None else torch.searchsorted(
            support, up.indices.to(torch.int64))
        vals = up.values.to(g.dtype)
        x[i, pos] = vals * (n * w) if scale_by_weight else vals
    return support, x
