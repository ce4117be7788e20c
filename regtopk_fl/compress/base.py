"""Shared pieces of every sparsifier: the selection result, k from S, validation.

A sparsifier works on a batch of accumulated gradients ``a`` of shape ``[N, J]``
(one row per worker; a single worker is ``N = 1``) and returns a
:class:`Selection`: flat indices into ``a.view(-1)``, grouped by row in row
order and ascending within a row, plus the count per row. It never changes
``a`` and never touches the error-feedback memory; the memory owns all state.
"""
from __future__ import annotations

import math

import torch


class SparsifierError(ValueError):
    """Invalid sparsifier parameter or input; the message names key and value."""


class Selection:
    """Entries chosen for upload: ``flat_idx`` indexes ``a.view(-1)`` (row-major),
    grouped by row, ascending within a row; ``counts`` [N] entries per row.

    A *dense* selection (``Selection(None, counts)``, every entry of every row)
    carries no index tensor: the worker step checks ``dense`` and never builds
    the N*J indices. ``flat_idx`` still materializes them on request, for
    callers that want them (tests, analysis)."""

    __slots__ = ("_flat", "counts")

    def __init__(self, flat_idx, counts):
        self._flat = flat_idx  # int64 [M], or None: every entry (dense)
        self.counts = counts  # int64 [N]; counts.sum() == M

    @property
    def dense(self) -> bool:
        return self._flat is None

    @property
    def flat_idx(self) -> torch.Tensor:
        if self._flat is None:
            self._flat = torch.arange(int(self.counts.sum()), device=self.counts.device)
        return self._flat

    def row_slices(self):
        """(start, stop) of each row's entries in ``flat_idx``."""
        ends = torch.cumsum(self.counts, 0).tolist()
        starts = [0] + ends[:-1]
        return list(zip(starts, ends))


def num_selected(sparsity: float, dim: int) -> int:
    """k = max(1, round(S * J)) with round-half-up; validates S and J."""
    check_sparsity(sparsity)
    if int(dim) < 1:
        raise SparsifierError(f"dim={dim}: the gradient must have at least one entry")
    return max(1, min(int(dim), int(math.floor(sparsity * dim + 0.5))))


def check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise SparsifierError(f"sparsity={sparsity!r}: must be a number in (0, 1]") from None
    if not (0.0 < s <= 1.0):
        raise SparsifierError(f"sparsity={sparsity!r}: must be in (0, 1]")
    return s


def check_positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SparsifierError(f"{name}={value!r}: must be a positive number") from None
    if not (v > 0.0 and math.isfinite(v)):
        raise SparsifierError(f"{name}={value!r}: must be a finite number > 0")
    return v


def check_k(k: int, dim: int) -> int:
    if not (1 <= int(k) <= int(dim)):
        raise SparsifierError(f"k={k}: must be in [1, J={dim}]")
    return int(k)


def all_entries(n: int, dim: int, device) -> Selection:
    """Every entry of every row, as a dense selection (no index tensor)."""
    return Selection(None, torch.full((n,), dim, dtype=torch.int64, device=device))


def mask_selection(mask: torch.Tensor) -> Selection:
    """Selection from a boolean [N, J] mask (row-major, ascending)."""
    flat = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)
    counts = mask.sum(dim=1, dtype=torch.int64)
    return Selection(flat, counts)


def row_of_entry(counts, device=None) -> torch.Tensor:
    """Row number of every entry of a row-grouped flat array with these counts.

    (torch.repeat_interleave does this, but costs ~10 ms per call on CPU in
    torch 2.14; this is microseconds.)
    """
    c = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if device is None and isinstance(counts, torch.Tensor):
        device = counts.device
    n, total = len(c), int(sum(c))
    if n == 0 or total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if all(x == c[0] for x in c):
        return torch.arange(n, device=device).unsqueeze(1).expand(n, c[0]).reshape(-1)
    ends = torch.cumsum(torch.as_tensor(c, dtype=torch.int64, device=device), 0)
    return torch.searchsorted(ends, torch.arange(total, device=device), right=True)
