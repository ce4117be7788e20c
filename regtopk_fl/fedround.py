"""One federated round without any framework: the worker side (memory ->
sparsifier -> uploads) and the server side (validate -> aggregate -> step ->
feedback). The Flower ClientApp/strategy and the in-process engine both call
these functions, so the two runtimes do the same arithmetic in the same order.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from .aggregate import Batch, Mean
from .broadcast import FEEDBACK_META, Downlink, Plan
from .memory import ErrorFeedbackMemory, restore_rows
from .optim import ServerSGD  # noqa: F401  (re-exported: the server optimizer)
from .payload import Upload, all_finite, coded_index_bytes_rows, index_itemsize, validate_upload
from .reuse import BufferPool

log = logging.getLogger(__name__)


# -- what the server sends back about a worker's last upload -----------------
@dataclass
class Feedback:
    """Delivered with the worker's next model broadcast: the global gradient on
    the entries it sent (aligned with its upload) and its weight w_n then; or
    ``rejected`` when the server dropped that upload."""

    values: torch.Tensor | None
    weight: float = 0.0
    rejected: bool = False

    def nbytes(self) -> int:
        # values in the model dtype + one float64 weight + one status byte
        return (0 if self.values is None else self.values.numel() * self.values.element_size()) + (
            FEEDBACK_META)


def apply_feedback(memory: ErrorFeedbackMemory, feedbacks: list, rows=None) -> None:
    """Apply each row's pending feedback (None: nothing pending) to the memory."""
    rows_l = list(range(memory.num_rows)) if rows is None else list(rows)
    if rows is None and feedbacks and all(f is not None and not f.rejected for f in feedbacks):
        memory.set_feedback(torch.cat([f.values for f in feedbacks]) if len(feedbacks) > 1
                            else feedbacks[0].values, [f.weight for f in feedbacks])
        return
    for row, f in zip(rows_l, feedbacks):
        if f is None:
            continue
        if f.rejected:
            restore_rows(memory, [row])
        else:
            memory.set_feedback(f.values, [f.weight], rows=[row])


# -- worker side -------------------------------------------------------------
def sparsify(memory: ErrorFeedbackMemory, grad: torch.Tensor, sparsifier, weights,
             rows=None, worker_ids=None, round: int = 0, observer=None) -> list:
    """Error feedback + selection for a batch of workers ([R, J] gradients).
    Returns one :class:`Upload` per row; the memory is updated in place.
    ``observer(a, selection)``, when given, sees the accumulated gradients.

    Passes over J (see memory.py and compress/exact_topk.py): for Top-k and
    RegTop-k, the finiteness check and ``eps += g`` (accumulate), then two
    read-only block reductions plus ~10% of J (selection); the rest is O(k).
    A dense sparsifier skips the context and commits a copy of ``a``."""
    a = memory.accumulate(grad, rows)
    ctx = (memory.context(weights, rows, worker_ids, round)
           if sparsifier.needs_context else None)  # the contract: compress/base.py
    sel = sparsifier.select(a, ctx)
    if observer is not None:
        observer(a, sel)
    values, local = memory.commit(a, sel, rows)
    counts = sel.counts.tolist()
    dim = memory.dim
    vals = values.split_with_sizes(counts)
    if local is None or not sparsifier.sends_indices:
        return [Upload(v, None, dim) for v in vals]
    return [Upload(v, i, dim) for v, i in zip(vals, local.split_with_sizes(counts))]


# -- server side -------------------------------------------------------------
@dataclass
class Reply:
    """One worker's reply as the server receives it."""

    worker: int
    upload: Upload
    num_examples: int
    loss: float = float("nan")
    buffers: torch.Tensor | None = None
    replica_round: int | None = None  # the model it computed on (broadcast=gradient)
    digest: bytes | None = None  # that model's digest, as the worker saw it


@dataclass
class RoundOutcome:
    grad: torch.Tensor  # aggregated global gradient g [J]
    weights: dict  # worker -> w_n used
    feedback: dict  # worker -> g on that worker's uploaded entries
    accepted: list
    rejected: dict = field(default_factory=dict)  # worker -> reason
    loss: float = float("nan")  # weighted training loss of the accepted workers
    uplink_raw: int = 0
    uplink_coded: int = 0
    sent: int = 0
    support: torch.Tensor | None = None  # accepted sparse uploads' indices (None: dense g)
    confirmed: list = field(default_factory=list)  # replies computed on the current model
    uplink_each: dict = field(default_factory=dict)  # worker -> coded bytes of its upload
    gathered: tuple | None = None  # (g's distinct support ascending, g there), when taken


class FedServer:
    """Global model, server optimizer and the aggregation rule g = sum w_n g_n.

    w_n = num_examples_n / sum over accepted replies (paper eq. 1, reweighted
    over the replies present). A reply that fails validation is dropped with a
    logged reason; a round with no valid reply leaves the model unchanged.
    """

    def __init__(self, params: torch.Tensor, buffers=None, lr: float = 0.01,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = params.detach().clone()
        self.buffers = None if buffers is None else buffers.detach().clone()
        self.opt = ServerSGD(self.params, lr, momentum, weight_decay)
        self.trust = None  # a trust.Guard: counts, budget, norms, weights (#11, #17)
        self.aggregate = Mean()  # the rule of step 4 (conf/aggregate/, #17)
        self._g_pool = BufferPool(2)  # the rounds' g buffers, reused once nothing holds them

    @property
    def dim(self) -> int:
        return self.params.numel()

    def _zero_g(self) -> torch.Tensor:
        """A zero g for this round. Each round's g is its own tensor (the
        broadcast step and the round's outcome keep it); a large one on the
        CPU comes from a pool of two (reuse.py: no page faults), the last
        round's step still holding its own g, the one before free by now."""
        return self._g_pool.take(self.params.shape, self.params.dtype,
                                 self.params.device).zero_()

    def check(self, reply: Reply):
        up = reply.upload
        if up.dim != self.dim:
            return f"upload J={up.dim} != model J={self.dim}"
        why = validate_upload(up.indices, up.values, self.dim, self.params.dtype)
        if why is None and (not isinstance(reply.num_examples, int) or reply.num_examples < 1):
            why = f"num_examples={reply.num_examples!r} must be a positive integer"
        if why is None and reply.buffers is not None and self.buffers is not None:
            b = reply.buffers
            if b.shape != self.buffers.shape or not all_finite(b):
                why = "buffers have the wrong shape or non-finite entries"
        return why

    @staticmethod
    def _concat(replies):
        """The sparse replies' indices (int64), values and lengths, concatenated."""
        sparse = [r for r in replies if r.upload.indices is not None]
        if not sparse:
            return sparse, None, None, []
        idx = torch.cat([r.upload.indices for r in sparse])
        if idx.dtype != torch.int64:
            idx = idx.to(torch.int64)
        return sparse, idx, torch.cat([r.upload.values for r in sparse]), [
            r.upload.values.numel() for r in sparse]

    def _all_sound(self, replies, packed) -> bool:
        """Vectorised check of every reply at once (the common case)."""
        dtype, has_buf, dim = self.params.dtype, self.buffers is not None, self.dim
        for r in replies:
            u = r.upload
            if (u.dim != dim or u.values.dtype != dtype or u.values.dim() != 1
                    or type(r.num_examples) is not int or r.num_examples < 1
                    or (r.buffers is not None) != has_buf):
                return False
            if u.indices is None:
                if u.values.numel() != dim or not all_finite(u.values):
                    return False
            elif (u.indices.dtype not in (torch.int32, torch.int64) or u.indices.dim() != 1
                  or u.indices.numel() != u.values.numel()):
                return False
        if has_buf and replies:
            if any(r.buffers.shape != self.buffers.shape for r in replies):
                return False
            if not all_finite(torch.stack([r.buffers for r in replies])):
                return False
        sparse, idx, vals, counts = packed
        if idx is None or idx.numel() == 0:
            return True
        if not all_finite(vals):
            return False
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= dim:
            return False
        # strictly ascending within each upload (so no duplicates)
        if len(set(counts)) == 1:  # equally long uploads: row by row, one comparison
            rows = idx.view(len(counts), -1)
            return bool((rows[:, 1:] > rows[:, :-1]).all())
        ok = idx[1:] > idx[:-1]
        bounds = [e - 1 for e in itertools.accumulate(counts[:-1]) if 0 < e < idx.numel()]
        if bounds:
            ok[torch.tensor(bounds, device=ok.device)] = True
        return bool(ok.all())

    def step(self, replies: list) -> RoundOutcome:
        """One server round over the replies of the workers that answered.
        The steps (numbered again in the body and in the helpers):

        1. validate: drop malformed uploads, each with its logged reason
           (payload.validate_upload; one vectorised check when all are sound);
        2. trust: drop well-formed uploads the server does not believe
           (trust.Guard.screen: claimed sizes, the method's budget, norms);
        3. weigh: w_n from the server's own example counts over the accepted
           replies (paper eq. 1), or the capped claims (trust.Guard.weights);
        4. aggregate: the run's rule (regtopk_fl/aggregate/): the paper's
           g = sum_n w_n g_hat_n, one scatter-add over the sparse uploads in
           worker order, never densifying one; or a robust rule;
        5. feedback: g on each worker's uploaded entries (RegTop-k's Delta);
        6. count: entries sent, uplink bytes (raw and coded), weighted loss;
        7. step: average the BatchNorm buffers and take the ServerSGD step.

        A round with no accepted reply leaves the model unchanged.
        """
        replies = sorted(replies, key=lambda r: r.worker)  # same order in every runtime
        ok, rejected, packed = self._validate(replies)  # 1
        ok, packed = self._screen(ok, rejected, packed)  # 2
        g = self._zero_g()
        out = RoundOutcome(g, {}, {}, [r.worker for r in ok], rejected)
        idx = packed[1]
        dense_any = any(r.upload.indices is None for r in ok)
        out.support = None if dense_any else (idx if idx is not None else
                                              torch.zeros(0, dtype=torch.int64,
                                                          device=g.device))
        if not ok:
            log.warning("no valid reply this round; the model is left unchanged")
            return out
        weights = self._weigh(ok)  # 3
        out.weights = {r.worker: w for r, w in zip(ok, weights)}
        self._aggregate(g, ok, weights, packed)  # 4
        self._feedback(out, ok, packed)  # 5
        self._count(out, ok, weights, packed)  # 6
        self._step(g, ok, weights, out)  # 7
        return out

    # -- the steps of :meth:`step` ------------------------------------------------
    def _validate(self, replies) -> tuple:
        """1. (sound replies, {worker: reason}, their packed uploads)."""
        try:
            packed = self._concat(replies)
        except (RuntimeError, TypeError):  # uploads of mixed shapes: the slow path names them
            packed = None
        if packed is not None and self._all_sound(replies, packed):
            return replies, {}, packed
        ok, rejected = [], {}
        for r in replies:
            why = self.check(r)
            if why is None:
                ok.append(r)
            else:
                rejected[r.worker] = why
                log.warning("dropped the upload of worker %s: %s", r.worker, why)
        return ok, rejected, self._concat(ok)

    def _screen(self, ok, rejected, packed) -> tuple:
        """2. Well-formed but not believed (trust.py, #11): into ``rejected``."""
        if self.trust is None or not ok:
            return ok, packed
        n_ok = len(ok)
        ok, distrusted = self.trust.screen(ok)
        for n, why in distrusted.items():
            rejected[n] = why
            log.warning("dropped the upload of worker %s: %s", n, why)
        return ok, (self._concat(ok) if len(ok) != n_ok else packed)

    def _weigh(self, ok) -> list:
        """3. w_n, in the order of ``ok``."""
        if self.trust is not None:
            return self.trust.weights(ok)
        total = float(sum(r.num_examples for r in ok))
        return [r.num_examples / total for r in ok]

    def _aggregate(self, g, ok, weights, packed) -> None:
        """4. g in place, by the run's rule (regtopk_fl/aggregate/: the paper's
        mean unless ``aggregate=...`` chose a robust one)."""
        self.aggregate.combine(g, Batch(ok, weights, packed))

    @staticmethod
    def _feedback(out: RoundOutcome, ok, packed) -> None:
        """5. g on each worker's entries (the whole g for a dense upload)."""
        sparse, idx, _, counts = packed
        g = out.grad
        fb = iter(g.index_select(0, idx).split_with_sizes(counts)) if sparse else iter(())
        for r in ok:  # a dense upload's feedback is g itself, shared: nothing writes into
            # a round's g after its step (FedServer._zero_g reuses a buffer only
            # once nothing else holds it), so m dense uploads cost no m copies of J
            out.feedback[r.worker] = g if r.upload.indices is None else next(fb)

    def _count(self, out: RoundOutcome, ok, weights, packed) -> None:
        """6. What the accepted uploads sent and cost (coded: as they travel)."""
        sparse, idx, vals, counts = packed
        # from the sizes alone (values in the model's dtype, as validated):
        # raw = entries x (index + value) bytes (payload.raw_bytes); the coded
        # index bytes of all sparse uploads in one call
        vsize, isize = self.params.element_size(), index_itemsize(self.dim)
        dense = [r.upload.values.numel() for r in ok if r.upload.indices is None]
        out.sent = sum(dense) + sum(counts)
        out.uplink_raw = sum(dense) * vsize + sum(counts) * (isize + vsize)
        out.uplink_each = {r.worker: r.upload.values.numel() * vsize for r in ok
                           if r.upload.indices is None}
        if sparse:
            for r, c, b in zip(sparse, counts, coded_index_bytes_rows(idx, counts, self.dim)):
                out.uplink_each[r.worker] = b + c * vsize
        out.uplink_coded = sum(out.uplink_each.values())
        out.loss = sum(w * float(r.loss) for r, w in zip(ok, weights))

    def _step(self, g, ok, weights, out: RoundOutcome | None = None) -> None:
        """7. The averaged buffers, then the optimizer step with g: on g's
        support alone where that is the same step (ServerSGD.sparse_ok), the
        support and g on it then kept in ``out.gathered`` for the broadcast."""
        if self.buffers is not None:
            self.buffers = torch.stack([r.buffers for r in ok]).mul_(
                torch.tensor(weights, dtype=self.buffers.dtype,
                             device=self.buffers.device)[:, None]).sum(0)
        if out is not None and out.support is not None and self.opt.sparse_ok:
            support = torch.unique(out.support)
            values = g.index_select(0, support)
            self.opt.step_sparse(support, values)
            out.gathered = (support, values)
            return
        self.opt.step(g)

    def state_dict(self) -> dict:
        return {"params": self.params.clone(),
                "buffers": None if self.buffers is None else self.buffers.clone(),
                "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.params.copy_(state["params"])
        if state.get("buffers") is not None:
            self.buffers = state["buffers"].to(self.params.device, copy=True)
        self.opt.load_state_dict(state["opt"])


def worker_round(task, memory, sparsifier, params, buffers, feedbacks, workers, round,
                 local_steps=1, local_lr=None, weights=None, rows=None, observer=None) -> list:
    """Everything a worker does in a round, for one or many workers at once:
    apply the server's feedback, compute the local update, sparsify, reply."""
    apply_feedback(memory, feedbacks, rows)
    res = task.local_update(params, buffers, workers, round, local_steps, local_lr)
    if weights is None:
        weights = [1.0 / len(workers)] * len(workers)
    uploads = sparsify(memory, res.grad, sparsifier, weights, rows, workers, round, observer)
    m = task.num_examples()
    return [Reply(n, up, int(m[n]), float(loss), None if res.buffers is None else res.buffers[i])
            for i, (n, up, loss) in enumerate(zip(workers, uploads, res.loss))]


class Coordinator:
    """The server's side of the protocol around :class:`FedServer`: which
    feedback each worker is owed, what each worker's next message carries
    (broadcast.py: the global gradient, a patch for a stale replica, or the
    full model) and its honest byte count, and the check that a reply was
    computed on the current model."""

    def __init__(self, server: FedServer, broadcast: str = "gradient", verify: bool = False):
        self.server = server
        self.pending: dict = {}  # worker -> Feedback owed with its next broadcast
        self.downlink = Downlink(broadcast, verify)
        self.round = 0  # rounds completed: the server holds model_{round}

    def start(self, workers) -> None:
        """Round 0: the seeded initial model, known to every worker."""
        self.downlink.start(self.server, workers)

    def plan(self, workers) -> Plan:
        """What each of these workers (None: an unidentified node) is sent next."""
        return self.downlink.plan(workers, self.server, self.pending)

    def feedback_for(self, workers) -> list:
        return [self.pending.get(n) for n in workers]

    def collect(self, replies, rejected=None) -> RoundOutcome:
        """Aggregate the replies of round ``self.round + 1``; ``rejected`` holds
        replies already refused upstream (undecodable messages), worker ->
        reason. A reply computed on another model than the server's current
        one (a stale or wrong replica) is rejected here, before it counts."""
        rejected = dict(rejected or {})
        current, t = [], self.round + 1
        digest = self.downlink.step.digest if self.downlink.step is not None else None
        for r in replies:
            why = self.downlink.check(r, self.round, digest)
            if why is None:
                current.append(r)
            else:
                rejected[r.worker] = why
                self.downlink.lost(r.worker)  # its replica is not the model: the full one next
        out = self.server.step(current)
        out.confirmed = [r.worker for r in current]
        for n, why in rejected.items():
            log.warning("dropped the reply of worker %s: %s", n, why)
            out.rejected[n] = why
        for n, values in out.feedback.items():
            self.pending[n] = Feedback(values, out.weights[n])
        for n in out.rejected:
            self.pending[n] = Feedback(None, 0.0, rejected=True)
        if self.server.trust is not None:  # refused rounds defer their allowance (#17)
            self.server.trust.settle(out.accepted, out.rejected)
        self.downlink.after_step(t, self.server, out, out.support)
        self.round = t
        return out

    def state_dict(self) -> dict:
        state = {"server": self.server.state_dict(), "round": self.round,
                 "downlink": self.downlink.state_dict(),
                 "pending": {int(n): (f.values, f.weight, f.rejected)
                             for n, f in self.pending.items()},
                 "aggregate": self.server.aggregate.state_dict()}
        if self.server.trust is not None:
            state["trust"] = self.server.trust.state_dict()
        return state

    def load_state_dict(self, state) -> None:
        self.server.load_state_dict(state["server"])
        dev = self.server.params.device  # a checkpoint is loaded onto the CPU first
        self.pending = {int(n): Feedback(None if v[0] is None else v[0].to(dev), *v[1:])
                        for n, v in state["pending"].items()}
        self.round = int(state.get("round", 0))
        if self.server.trust is not None and "trust" in state:
            self.server.trust.load_state_dict(state["trust"])
        self.server.aggregate.load_state_dict(state.get("aggregate", {}))
        if "downlink" in state:
            self.downlink.load_state_dict(state["downlink"], dev)
