"""Error-feedback memory: the only state a sparsifying worker keeps.

One object holds the state of ``N`` workers (``N = 1`` for a Flower client):

* ``eps``   [N, J]  residual: what was accumulated but not sent yet;
* ``prev_local`` [M]  last round's mask, row-local indices, grouped by row;
* ``prev_counts`` [N] entries each row sent last time it took part;
* ``prev_sent`` [M]   the values sent then (``w_n * prev_sent`` was its contribution);
* ``fb_g`` [M]        the global gradient of that round on those entries, NaN until
  the server's feedback arrives (NaN reads as "unknown": RegTop-k treats it as Q);
* ``fb_w`` [N]        the aggregation weight ``w_n`` the server gave each row then.

A row that skips a round keeps all of this untouched, so its next Delta uses the
global gradient of the round it last took part in, never one it did not see.

Passes over J in a worker step (``fedround.sparsify``), the cost that matters
at J = 11M: ``accumulate`` is one read-only reduction (the finiteness check)
plus the in-place add ``eps += g`` (``a`` *is* ``eps`` when all rows take
part). ``commit`` of a sparse selection is O(k): it gathers and zeroes the k
entries in place. A dense selection (``Selection.dense``) is committed as one
copy of ``a`` (the upload's values, which the memory also keeps as
``prev_sent``, not a second copy) and one zeroing pass; its J-sized indices
(``prev_local``) and unknown feedback (``fb_g``, all NaN) are only
materialized if something reads them.

A zero residual is not stored either: a new memory, and one whose last commit
sent every entry, holds ``eps`` as "all zero" until something reads it. Then
``accumulate`` (all rows) writes ``eps = a = g + 0.0`` into new memory, one
pass, bitwise ``0 + g`` (adding zero turns -0.0 into +0.0 in both), and a
dense commit of that ``a`` sends it without a copy and leaves the residual
zero again without a zeroing pass. A dense round's worker step is then the
finiteness check and that one add, where it was those two, a copy and a
zeroing pass (and under client sampling a zeroed batch first: issue #34).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compress.base import Selection, SparsifierError, row_of_entry
from .payload import all_finite
from .reuse import BufferPool


@dataclass
class SelectContext:
    """What a sparsifier may read, for the rows taking part ([R] rows)."""

    prev_flat: torch.Tensor  # [M] flat indices into the [R, J] batch
    prev_sent: torch.Tensor  # [M]
    fb_g: torch.Tensor  # [M], NaN where unknown
    fb_w: torch.Tensor  # [M] weight of the entry's row in the feedback round
    weights: torch.Tensor  # [R] aggregation weights of this round
    worker_ids: tuple  # [R] global ids, for seeded sparsifiers
    round: int


class ErrorFeedbackMemory:
    def __init__(self, num_rows: int, dim: int, dtype=torch.float32, device="cpu", eps=None,
                 pool: BufferPool | None = None):
        """``eps``: an existing [num_rows, dim] residual to adopt (no zeroed copy).
        ``pool``: where ``accumulate`` takes the new ``a`` of a zero residual
        (reuse.py; one shared by the rounds' memories spares each its page
        faults), else a new tensor."""
        self.num_rows, self.dim = int(num_rows), int(dim)
        if eps is not None and tuple(eps.shape) != (self.num_rows, self.dim):
            raise SparsifierError(f"eps.shape={tuple(eps.shape)}: expected "
                                  f"({self.num_rows}, {self.dim})")
        self.dtype, self.device = dtype if eps is None else eps.dtype, (
            torch.device(device) if eps is None else eps.device)
        self._eps = eps  # None: all zero, not allocated (see the module docstring)
        self._from_zero = None  # the eps that accumulate made from a zero residual
        self.pool = pool
        z = torch.zeros(0, dtype=dtype, device=device)
        self.prev_local = torch.zeros(0, dtype=torch.int64, device=device)
        self.prev_counts = torch.zeros(self.num_rows, dtype=torch.int64, device=device)
        self.prev_sent, self.fb_g = z, z.clone()
        self.fb_w = torch.zeros(self.num_rows, dtype=dtype, device=device)
        self._flat = None  # cached (flat index, row) of prev_local

    # -- lazily materialized: a zero residual, and after a dense upload ---------
    @property
    def eps(self) -> torch.Tensor:
        if self._eps is None:  # a zero residual, allocated once something reads it
            self._eps = torch.zeros(self.num_rows, self.dim, dtype=self.dtype, device=self.device)
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps, self._from_zero = value, None

    @property
    def prev_local(self) -> torch.Tensor:
        if self._prev_local is None:  # the last upload was dense: every entry
            self._prev_local = torch.arange(self.dim, device=self.device).repeat(self.num_rows)
        return self._prev_local

    @prev_local.setter
    def prev_local(self, value) -> None:
        self._prev_local = value

    @property
    def fb_g(self) -> torch.Tensor:
        if self._fb_g is None:  # no feedback yet on a dense upload: unknown
            self._fb_g = torch.full_like(self.prev_sent, float("nan"))
        return self._fb_g

    @fb_g.setter
    def fb_g(self, value) -> None:
        self._fb_g = value

    # -- the round ---------------------------------------------------------
    def accumulate(self, grad: torch.Tensor, rows=None) -> torch.Tensor:
        """a = eps + g for the given rows (all when None). Rejects bad input
        before touching the residual, so a NaN gradient never corrupts it."""
        n = self.num_rows if rows is None else len(rows)
        if grad.dim() != 2 or tuple(grad.shape) != (n, self.dim):
            raise SparsifierError(
                f"grad.shape={tuple(grad.shape)}: expected ({n}, {self.dim})")
        if grad.dtype != self.dtype:
            raise SparsifierError(f"grad.dtype={grad.dtype}: expected {self.dtype}")
        if not all_finite(grad):
            raise SparsifierError("grad: contains NaN or Inf entries")
        if rows is None:
            if self._eps is None:  # 0 + g, bitwise, in new memory (no zeros to read)
                a = (self.pool.take((n, self.dim), self.dtype, self.device) if self.pool
                     else torch.empty(n, self.dim, dtype=self.dtype, device=self.device))
                self._eps = self._from_zero = torch.add(grad, 0.0, out=a)
                return a
            self._from_zero = None
            return self._eps.add_(grad)
        return self.eps[list(rows)].add_(grad)

    def context(self, weights, rows=None, worker_ids=None, round: int = 0) -> SelectContext:
        weights = torch.as_tensor(weights, dtype=self.dtype, device=self.device)
        rows_l = list(range(self.num_rows)) if rows is None else list(rows)
        if rows is None:
            sent, fb_g = self.prev_sent, self.fb_g
            if self._flat is None:  # (flat index, row) of every previous entry
                pos = row_of_entry(self.prev_counts, self.prev_local.device)
                self._flat = (self.prev_local + pos * self.dim, pos)
            flat, pos = self._flat
            fb_w = self.fb_w.index_select(0, pos)
        else:
            local, counts, sent, fb_g = self._gather_rows(rows_l)
            pos = row_of_entry(counts, local.device)
            flat, fb_w = local + pos * self.dim, self.fb_w[rows_l][pos]
        return SelectContext(flat, sent, fb_g, fb_w, weights,
                             tuple(worker_ids) if worker_ids is not None else tuple(rows_l),
                             int(round))

    def commit(self, a: torch.Tensor, sel: Selection, rows=None):
        """Take the selected entries out of ``a``; the rest stays as residual.
        Returns (values to send, their row-local indices, None for a dense
        selection); ``sent + new residual == a`` exactly."""
        if sel.dense:
            return self._commit_dense(a, sel, rows)
        flat_a = a.view(-1)
        values = flat_a.index_select(0, sel.flat_idx)
        flat_a.index_fill_(0, sel.flat_idx, 0)
        pos = row_of_entry(sel.counts, a.device)
        local = sel.flat_idx - pos * self.dim
        nan = torch.full_like(values, float("nan"))
        if rows is None:
            self.prev_local, self.prev_counts = local, sel.counts.clone()
            self.prev_sent, self.fb_g = values.clone(), nan  # uploads may be edited
            self._flat = (sel.flat_idx, pos)
        else:
            self.eps[list(rows)] = a
            self._scatter_rows(list(rows), local, sel.counts, values, nan)
        return values, local

    def _commit_dense(self, a: torch.Tensor, sel: Selection, rows=None):
        """Every entry is sent: one copy of ``a`` and one zeroing pass. The
        copy is both the upload and ``prev_sent`` (uploads are replaced, never
        edited in place: the server and fault injection build new tensors).
        When ``a`` is the residual accumulate just made from a zero one
        (nothing else holds it), ``a`` itself is sent and the residual is
        zero again, unallocated: no copy, no zeroing."""
        if rows is None and a is self._eps and a is self._from_zero:
            values = a.reshape(-1)
            self._eps = self._from_zero = None
        else:
            values = a.reshape(-1).clone()
            a.zero_()
        if rows is None:
            self._prev_local, self.prev_counts = None, sel.counts.clone()
            self.prev_sent, self._fb_g, self._flat = values, None, None
        else:  # partial participation: per-row bookkeeping needs the indices
            self.eps[list(rows)] = a
            local = torch.arange(self.dim, device=a.device).repeat(len(rows))
            nan = torch.full_like(values, float("nan"))
            self._scatter_rows(list(rows), local, sel.counts, values.clone(), nan)
        return values, None

    def set_feedback(self, fb_values: torch.Tensor, weights, rows=None) -> None:
        """Server feedback for the rows' last upload: the global gradient on
        each sent entry (aligned with ``prev_local``) and the weight ``w_n``."""
        weights = torch.as_tensor(weights, dtype=self.dtype, device=self.device)
        if rows is None:
            if fb_values.shape != self.prev_sent.shape:
                raise SparsifierError(
                    f"feedback length={fb_values.numel()}: expected {self.prev_sent.numel()}")
            self.fb_g = fb_values.to(self.dtype).clone()
            self.fb_w.copy_(weights)
            return
        rows_l = list(rows)
        local, counts, sent, _ = self._gather_rows(rows_l)
        if fb_values.shape != sent.shape:
            raise SparsifierError(
                f"feedback length={fb_values.numel()}: expected {sent.numel()}")
        self._scatter_rows(rows_l, local, counts, sent, fb_values.to(self.dtype))
        self.fb_w[rows_l] = weights

    def feedback_from_global(self, g: torch.Tensor, weights, rows=None) -> None:
        """Feedback from a dense global gradient g [J] (what the server does)."""
        rows_l = list(range(self.num_rows)) if rows is None else list(rows)
        local = self.prev_local if rows is None else self._gather_rows(rows_l)[0]
        self.set_feedback(g[local], weights, rows)

    # -- per-row bookkeeping (only on partial participation) ------------------
    def _row_slices(self):
        ends = torch.cumsum(self.prev_counts, 0).tolist()
        return list(zip([0] + ends[:-1], ends))

    def _gather_rows(self, rows):
        sl = self._row_slices()
        parts = [slice(*sl[r]) for r in rows]
        cat = lambda t: torch.cat([t[p] for p in parts]) if parts else t[:0]
        return (cat(self.prev_local), self.prev_counts[rows].clone(),
                cat(self.prev_sent), cat(self.fb_g))

    def _scatter_rows(self, rows, local, counts, sent, fb_g):
        old = self._row_slices()
        new_ends = torch.cumsum(counts, 0).tolist()
        new = dict(zip(rows, zip([0] + new_ends[:-1], new_ends)))
        fields = (self.prev_local, self.prev_sent, self.fb_g)
        upd = (local, sent, fb_g)
        out = [[], [], []]
        for r in range(self.num_rows):
            src, (s, e) = (upd, new[r]) if r in new else (fields, old[r])
            for i in range(3):
                out[i].append(src[i][s:e])
        self.prev_local, self.prev_sent, self.fb_g = (torch.cat(o) for o in out)
        self._flat = None
        self.prev_counts = self.prev_counts.clone()
        self.prev_counts[rows] = counts

    # -- persistence (Flower context.state, checkpoints) ----------------------
    STATE_KEYS = ("eps", "prev_local", "prev_counts", "prev_sent", "fb_g", "fb_w")

    def state_dict(self, copy: bool = True, lazy: bool = False) -> dict:
        """The state's tensors (``copy=False``: the live ones, for writing out).
        ``lazy=True``: after a dense upload, leave out what it keeps implicit
        (the mask, every entry: J int64 a row; the feedback, unknown so far),
        which :meth:`load_state_dict` then leaves implicit again."""
        skip = ({"prev_local"} if self._prev_local is None else set()) | (
            {"fb_g"} if self._fb_g is None else set()) if lazy else set()
        return {k: getattr(self, k).clone() if copy else getattr(self, k)
                for k in self.STATE_KEYS if k not in skip}

    def load_state_dict(self, state: dict, copy: bool = True) -> None:
        """Take ``state``'s tensors (``copy=False``: adopt them where dtype and
        device already match, for state just read from a file). A state with
        the sent values but no mask (``state_dict(lazy=True)`` after a dense
        upload) leaves the mask, and the feedback if absent, implicit."""
        for k, v in state.items():
            dtype = torch.int64 if k in ("prev_local", "prev_counts") else self.dtype
            t = torch.as_tensor(v).to(dtype=dtype, device=self.device)
            setattr(self, k, t.clone() if copy else t)
        if "prev_sent" in state and "prev_local" not in state:
            if self.prev_sent.numel() != self.num_rows * self.dim:
                raise SparsifierError(f"a state without prev_local holds "
                                      f"{self.prev_sent.numel()} sent values: only a dense "
                                      f"upload ({self.num_rows} x {self.dim}) leaves it implicit")
            self._prev_local = None
            if "fb_g" not in state:
                self._fb_g = None
        self._flat = self._from_zero = None
        if self._eps is not None:
            self._eps = self._eps.reshape(self.num_rows, self.dim)


def restore_rows(memory: ErrorFeedbackMemory, rows) -> None:
    """The server rejected these rows' last upload: put what they sent back
    into the residual (error feedback loses nothing) and forget the mask."""
    local, counts, sent, _ = memory._gather_rows(list(rows))
    pos = torch.as_tensor(list(rows), device=local.device)[row_of_entry(counts, local.device)]
    memory.eps.view(-1).index_add_(0, local + pos * memory.dim, sent)
    empty = local[:0]
    memory._scatter_rows(list(rows), empty, torch.zeros_like(counts), sent[:0], sent[:0])
