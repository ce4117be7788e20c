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
per-client data, which the store does not hold.
"""
from __future__ import annotations

import torch

from .compress.base import SparsifierError
from .memory import ErrorFeedbackMemory, restore_rows

_ROW_KEYS = ("eps", "prev_local", "prev_sent", "fb_g")  # split per client
_SCALAR_KEYS = ("prev_counts", "fb_w")  # one entry per client


class ClientStates:
    """worker id -> that worker's error-feedback state (only for workers that have one)."""

    def __init__(self, dim: int, dtype=torch.float32, device="cpu"):
        self.dim, self.dtype, self.device = int(dim), dtype, device
        self.states: dict = {}  # worker -> {key: tensor}, as one row of memory.state_dict()
        self.last_round: dict = {}  # worker -> round of the upload its state holds

    def __len__(self) -> int:
        return len(self.states)

    def gather(self, workers, feedbacks=None) -> ErrorFeedbackMemory:
        """A fresh memory whose row i is worker ``workers[i]`` (zeros for one
        without state: no residual, no previous mask), with ``feedbacks[i]``
        (the server's word on its last upload, or None) already applied.

        Feedback is applied here, per client, and not by the batched memory:
        there a batch mixing rows with and without feedback (common under
        sampling: first-time clients) is applied row by row, each re-packing
        the whole batch, O(m^2). Per client it is what
        ``ErrorFeedbackMemory.set_feedback`` does to one row (the feedback
        values, aligned with the last upload, and the weight), and for a
        rejected upload the memory's own ``restore_rows`` on a one-row memory."""
        workers = list(workers)
        feedbacks = [None] * len(workers) if feedbacks is None else list(feedbacks)
        mem = ErrorFeedbackMemory(len(workers), self.dim, self.dtype, self.device)
        if not any(n in self.states for n in workers):
            return mem
        empty = ErrorFeedbackMemory(1, self.dim, self.dtype, self.device).state_dict()
        rows = [self._with_feedback(self.states[n], fb) if n in self.states else empty
                for n, fb in zip(workers, feedbacks)]
        state = {k: torch.cat([r[k] for r in rows]) for k in (*_ROW_KEYS, *_SCALAR_KEYS)}
        mem.load_state_dict(state)
        return mem

    def _with_feedback(self, row: dict, fb) -> dict:
        if fb is None:
            return row
        if fb.rejected:
            one = ErrorFeedbackMemory(1, self.dim, self.dtype, self.device)
            one.load_state_dict(row)
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
        ``round``: the round of the uploads the rows now hold."""
        state = mem.state_dict()
        counts = state["prev_counts"].tolist()
        parts = {k: torch.split(state[k], counts) for k in ("prev_local", "prev_sent", "fb_g")}
        for i, n in enumerate(workers):
            self.states[int(n)] = {
                "eps": state["eps"][i:i + 1].clone(),
                "prev_counts": state["prev_counts"][i:i + 1].clone(),
                "fb_w": state["fb_w"][i:i + 1].clone(),
                **{k: parts[k][i].clone() for k in parts}}
            if round is not None:
                self.last_round[int(n)] = int(round)

    def state_dict(self) -> dict:
        return {"clients": {n: {k: v.clone() for k, v in s.items()}
                            for n, s in self.states.items()},
                "last_round": dict(self.last_round)}

    def load_state_dict(self, state: dict) -> None:
        self.states = {int(n): {k: v.to(self.device) for k, v in s.items()}
                       for n, s in state["clients"].items()}
        self.last_round = {int(n): int(r) for n, r in state.get("last_round", {}).items()}
