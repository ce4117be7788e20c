"""Error-feedback state for many clients of which few take part per round.

:class:`~regtopk_fl.memory.ErrorFeedbackMemory` keeps all N rows in one
[N, J] block; a round that touches R < N rows still re-packs the per-row
masks of all N (its partial-participation bookkeeping loops over every row).
With client sampling that makes the round cost grow with N. This store is a
layer above it: one small state per client, created the first time the client
takes part (a client that was never sampled holds nothing), and per round a
batched [R, J] memory of just the sampled clients, built from and written
back to their states. The arithmetic on each row is the memory's own, so the
result equals the [N, J] memory's row for row.

Memory bound: about ``(J + 3k) * itemsize`` bytes per client that has taken
part (residual + last mask, values and feedback), plus the task's own
per-client data, which the store does not hold, plus the [m, J] batch a round
builds, of which the store keeps at most two to reuse (reuse.py).
"""
from __future__ import annotations

import torch

from .compress.base import SparsifierError
from .memory import ErrorFeedbackMemory, restore_rows
from .reuse import BufferPool

_ROW_KEYS = ("eps", "prev_local", "prev_sent", "fb_g")  # split per client
_SCALAR_KEYS = ("prev_counts", "fb_w")  # one entry per client


class ClientStates:
    """worker id -> that worker's error-feedback state (only for workers that have one)."""

    def __init__(self, dim: int, dtype=torch.float32, device="cpu"):
        self.dim, self.dtype, self.device = int(dim), dtype, device
        self.states: dict = {}  # worker -> {key: tensor}, as one row of memory.state_dict()
        self.last_round: dict = {}  # worker -> round of the upload its state holds
        self.pool = BufferPool(2)  # the rounds' [R, J] batches (memory.py's zero residual)

    def __len__(self) -> int:
        return len(self.states)

    def gather(self, workers, feedbacks=None, context: bool = True) -> ErrorFeedbackMemory:
        """A fresh memory whose row i is worker ``workers[i]`` (zeros for one
        without state: no residual, no previous mask), with ``feedbacks[i]``
        (the server's word on its last upload, or None) already applied.

        Feedback is applied here, per client, and not by the batched memory:
        there a batch mixing rows with and without feedback (common under
        sampling: first-time clients) is applied row by row, each re-packing
        the whole batch, O(m^2). Per client it is what
        ``ErrorFeedbackMemory.set_feedback`` does to one row (the feedback
        values, aligned with the last upload, and the weight), and for a
        rejected upload the memory's own ``restore_rows`` on a one-row memory.

        ``context=False`` (a sparsifier that reads no context): only the
        residuals are loaded. The previous masks, values and feedback are
        what a context is made of and nothing else reads them before the
        round's commit replaces them all, so the batch starts without them:
        the same arithmetic, without copying m masks of up to J entries."""
        workers = list(workers)
        feedbacks = [None] * len(workers) if feedbacks is None else list(feedbacks)
        if not any(n in self.states for n in workers):
            return ErrorFeedbackMemory(len(workers), self.dim, self.dtype, self.device,
                                       pool=self.pool)
        rows = [self._with_feedback(self.states[n], fb) if n in self.states else None
                for n, fb in zip(workers, feedbacks)]
        eps = None  # every residual zero (after dense uploads): the memory's lazy zero
        for i, r in enumerate(rows):
            if r is not None and r["eps"] is not None:  # None: a zero residual
                if eps is None:
                    eps = torch.zeros(len(workers), self.dim, dtype=self.dtype,
                                      device=self.device)
                eps[i] = r["eps"][0]
        mem = ErrorFeedbackMemory(len(workers), self.dim, self.dtype, self.device, eps=eps,
                                  pool=self.pool)
        if not context:
            return mem
        empty = ErrorFeedbackMemory(1, self.dim, self.dtype, self.device).state_dict()
        rows = [empty if r is None else self._materialize(r) for r in rows]
        mem.load_state_dict({k: torch.cat([r[k] for r in rows])
                             for k in (*_ROW_KEYS[1:], *_SCALAR_KEYS)}, copy=False)
        return mem

    def _materialize(self, row: dict) -> dict:
        """A stored row with its markers spelt out: ``eps`` None is a zero
        residual, ``prev_local`` None a dense last upload (every entry),
        ``fb_g`` None no feedback on it yet (NaN, unknown)."""
        if all(row[k] is not None for k in _ROW_KEYS):
            return row
        out = dict(row)
        if out["eps"] is None:
            out["eps"] = torch.zeros(1, self.dim, dtype=self.dtype, device=self.device)
        if out["prev_local"] is None:
            out["prev_local"] = torch.arange(self.dim, device=self.device)
        if out["fb_g"] is None:
            out["fb_g"] = torch.full_like(out["prev_sent"], float("nan"))
        return out

    def _with_feedback(self, row: dict, fb) -> dict:
        if fb is None:
            return row
        if fb.rejected:
            one = ErrorFeedbackMemory(1, self.dim, self.dtype, self.device)
            one.load_state_dict(self._materialize(row))
            restore_rows(one, [0])
            return one.state_dict()
        if fb.values.shape != row["prev_sent"].shape:
            raise SparsifierError(f"feedback length={fb.values.numel()}: expected "
                                  f"{row['prev_sent'].numel()}")
        return {**row, "fb_g": fb.values.to(self.dtype),
                "fb_w": torch.tensor([fb.weight], dtype=self.dtype, device=self.device)}

    def usable(self, feedbacks, workers, round: int, participation) -> list:
        """The pending feedback each worker applies this round: under
        ``stale_feedback=forget`` feedback about an upload older than the
        previous round is left out (its mask then reads as unknown, Delta = Q);
        a "rejected" notice is always applied (error feedback loses nothing)."""
        return [fb if fb is None or fb.rejected
                or participation.keeps(self.last_round.get(n), round) else None
                for fb, n in zip(feedbacks, workers)]

    def scatter(self, workers, mem: ErrorFeedbackMemory, round: int | None = None) -> None:
        """Store the rows of ``mem`` (as built by :meth:`gather`) back;
        ``round``: the round of the uploads the rows now hold. Each row is
        copied out of the batch (a view would keep the whole [m, J] batch
        alive). After a dense commit (every entry sent, the residual zeroed,
        the mask left implicit) a row stores markers instead: ``eps``,
        ``prev_local`` and ``fb_g`` None (see :meth:`_materialize`)."""
        dense = mem._prev_local is None  # _commit_dense: every entry sent, eps zeroed
        counts = mem.prev_counts.tolist()
        keys = ("prev_sent",) if dense else ("prev_local", "prev_sent", "fb_g")
        parts = {k: torch.split(getattr(mem, k), counts) for k in keys}
        for i, n in enumerate(workers):
            row = {"eps": None if dense else mem.eps[i:i + 1].clone(),
                   "prev_counts": mem.prev_counts[i:i + 1].clone(),
                   "fb_w": mem.fb_w[i:i + 1].clone(),
                   "prev_local": None, "fb_g": None}
            row.update({k: parts[k][i].clone() for k in parts})
            self.states[int(n)] = row
            if round is not None:
                self.last_round[int(n)] = int(round)

    def state_dict(self) -> dict:
        return {"clients": {n: {k: None if v is None else v.clone() for k, v in s.items()}
                            for n, s in self.states.items()},
                "last_round": dict(self.last_round)}

    def load_state_dict(self, state: dict) -> None:
        self.states = {int(n): {k: None if v is None else v.to(self.device)
                                for k, v in s.items()}
                       for n, s in state["clients"].items()}
        self.last_round = {int(n): int(r) for n, r in state.get("last_round", {}).items()}
