"""The downlink: what the server sends a worker at the start of round t.

``broadcast=gradient`` (the default, the paper's Algorithm 1): the server
broadcasts what it did in round t-1, a :class:`GlobalStep`: the global
gradient g = sum_n w_n g_hat_n on its support (the union of the accepted
uploads' indices, so entries that cancelled to 0 are sent too: RegTop-k's
Delta needs them), the averaged BatchNorm buffers (dense, small), whether the
server stepped, and a digest of the server's model after the step. Every
worker keeps a :class:`Replica` of the global model and of the server
optimizer's state and applies g with the server's own :class:`ServerSGD`, so
the replica stays bitwise equal to the server's model; it checks that against
the digest. Its RegTop-k feedback is read off the same g.

A worker gets the full model (and the optimizer state) instead, once, when
its replica is missing, stale or wrong: a new node, one that missed a round,
a restarted SuperNode, a resumed run, a digest mismatch. The server knows a
replica is current only from that worker's last reply, which names the model
it computed on (round and digest); :meth:`Downlink.plan` decides. These
transfers are counted as ``resyncs``.

``broadcast=model``: the whole model every round plus the per-worker
feedback values (stateless workers; the behaviour before the sparse
downlink).

Bytes, per message: a fixed :data:`HEADER` (round, kind, flags), the
:data:`DIGEST`, the feedback status (:data:`FEEDBACK_META`: weight + status),
then the payload: indices raw (int32) or coded (payload.py: varint deltas or
bitmap, what actually travels), values in the model dtype, buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from .optim import ServerSGD
from .payload import coded_index_bytes, index_itemsize

MODES = ("gradient", "model")
HEADER = 16  # round (int64), message kind, flags
DIGEST = 16  # xxh3-128 of the model after the step
FEEDBACK_META = 9  # float64 weight + status byte


_ZEROS: dict = {}  # (J, dtype, device) -> a J-sized zero buffer for applying g


def model_digest(params: torch.Tensor, buffers=None) -> bytes:
    """xxh3-128 of the model's bytes (params, then buffers): equal digests mean
    bitwise-equal models (up to a 2^-128 accident; the digest guards against
    divergence, not forgery: a client only repeats what the server sent).
    1.3 ms for ResNet-18's 45 MB here, against 22 ms for sha256."""
    h = xxhash.xxh3_128()
    for t in (params, buffers):
        if t is not None:
            h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
    return h.digest()


def nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class GlobalStep:
    """What the server did in one round, as broadcast: model_{round-1} ->
    model_{round}. ``indices`` None means a dense g (dense uploads)."""

    round: int
    values: torch.Tensor  # g on the support, or the dense g
    indices: torch.Tensor | None  # ascending int64 support
    dim: int
    stepped: bool = True  # False: no valid reply, the model did not move
    buffers: torch.Tensor | None = None
    digest: bytes | None = None  # of the server's model after the step

    @classmethod
    def initial(cls, params: torch.Tensor, buffers=None, digest: bytes | None = None):
        """Round 0: no step; every worker builds model_0 from the seed."""
        empty = params.new_zeros(0)
        return cls(0, empty, empty.to(torch.int64), params.numel(), False, buffers, digest)

    @classmethod
    def from_gradient(cls, round: int, g: torch.Tensor, support, stepped: bool, buffers,
                      digest=None):
        """``support``: the accepted uploads' indices concatenated (None: dense)."""
        if support is None:  # g is the round's own tensor and is never written again
            return cls(round, g, None, g.numel(), stepped, buffers, digest)
        idx = torch.unique(support.to(torch.int64)) if support.numel() else support.to(torch.int64)
        return cls(round, g[idx], idx, g.numel(), stepped, buffers, digest)

    def applied(self, opt: ServerSGD) -> None:
        """``opt.step`` with this g, the server's arithmetic on the server's g:
        the dense g is a zero buffer kept between rounds with the support
        written in and wiped out again (O(k), not a J-sized allocation)."""
        if self.indices is None:
            opt.step(self.values.to(opt.params.device))
            return
        key = (self.dim, self.values.dtype, opt.params.device)
        g = _ZEROS.get(key)
        if g is None:
            g = _ZEROS[key] = torch.zeros(self.dim, dtype=self.values.dtype,
                                          device=opt.params.device)
        idx = self.indices.to(g.device)
        g[idx] = self.values.to(g.device)
        try:
            opt.step(g)  # keeps no reference to g (momentum clones, decay adds)
        finally:
            g[idx] = 0

    def on(self, local: torch.Tensor) -> torch.Tensor:
        """g on a worker's sent entries (ascending, within the support)."""
        if self.indices is None:
            return self.values[local]
        pos = torch.searchsorted(self.indices, local.to(self.indices.device))
        if pos.numel() and (int(pos.max()) >= self.indices.numel()
                            or not bool((self.indices[pos] == local).all())):
            raise ValueError("the broadcast's support does not cover this worker's upload")
        return self.values[pos]

    def nbytes(self, coded: bool) -> int:
        """Bytes of the shared part of a delta message."""
        n = nbytes(self.values) + nbytes(self.buffers) + HEADER + DIGEST
        if self.indices is not None:
            n += (coded_index_bytes(self.indices, self.dim) if coded
                  else self.indices.numel() * index_itemsize(self.dim))
        return n


class Replica:
    """A worker's copy of the global model and of the server optimizer's state,
    moved by the broadcast gradients with the server's arithmetic. Lives on the
    CPU, like the Flower server's model, so the two stay bitwise equal."""

    def __init__(self, params: torch.Tensor, buffers, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, round: int = 0, opt_state=None, copy: bool = True):
        own = (lambda t: t.detach().cpu().clone()) if copy else (lambda t: t.detach().cpu())
        self.params = own(params)
        self.buffers = None if buffers is None else own(buffers)
        self.opt = ServerSGD(self.params, lr, momentum, weight_decay)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state, copy=copy)
        self.round = int(round)
        self._digest = None  # cached digest of the current params and buffers

    def apply(self, step: GlobalStep) -> str | None:
        """Bring the replica from model_{step.round-1} to model_{step.round}.
        Returns why it could not (the replica is then unusable), else None."""
        if step.round == self.round:  # already there (round 0, or a re-delivery)
            pass
        elif step.round != self.round + 1:
            return f"replica holds round {self.round}, the broadcast is for round {step.round}"
        elif step.stepped:
            self._digest = None
            step.applied(self.opt)
            if step.buffers is not None:
                self.buffers = step.buffers.detach().cpu().clone()
        self.round = step.round
        if step.digest is not None and self.digest() != step.digest:
            return f"replica digest mismatch after round {step.round}"
        return None

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = model_digest(self.params, self.buffers)
        return self._digest

    def state_dict(self) -> dict:
        return {"params": self.params.clone(),
                "buffers": None if self.buffers is None else self.buffers.clone(),
                "momentum": self.opt.buf, "round": self.round}

    @classmethod
    def from_state(cls, state: dict, lr, momentum, weight_decay, copy: bool = True):
        """``copy=False`` adopts the tensors (state just read from a file)."""
        return cls(state["params"], state.get("buffers"), lr, momentum, weight_decay,
                   int(state["round"]), {"buf": state.get("momentum")}, copy=copy)


@dataclass
class Plan:
    """What one round's messages carry, worker by worker (``kind`` is
    "delta", "full" or "model"), and their bytes."""

    kinds: dict
    raw: dict
    coded: dict
    kind_list: list  # the kinds in the order of the workers planned for

    @property
    def resyncs(self) -> int:
        return sum(k == "full" for k in self.kinds.values())


class Downlink:
    """The server's side of the downlink: the last :class:`GlobalStep`, which
    replicas are known to be current, and what each worker must be sent."""

    def __init__(self, mode: str = "gradient", verify: bool = False):
        if mode not in MODES:
            raise ValueError(f"broadcast={mode!r}: must be one of {', '.join(MODES)}")
        self.mode, self.verify = mode, bool(verify)
        self.step: GlobalStep | None = None
        self.current: dict = {}  # worker -> round of the model its replica is known to hold

    def start(self, server, workers) -> None:
        """Round 0: every worker builds model_0 from the seed, so all are current."""
        digest = model_digest(server.params, server.buffers) if self.verify else None
        self.step = GlobalStep.initial(server.params, server.buffers, digest)
        self.current = {int(n): 0 for n in workers}

    def kind(self, worker) -> str:
        if self.mode == "model":
            return "model"
        if self.step is None:
            return "full"
        if worker is None:  # a node we have not heard from: fine only before round 1
            return "delta" if self.step.round == 0 else "full"
        return "delta" if self.current.get(worker) == self.step.round - (
            1 if self.step.round else 0) else "full"

    def plan(self, workers, server, pending: dict) -> Plan:
        """Kinds and bytes for these workers (None: a node not yet identified)."""
        model = nbytes(server.params) + nbytes(server.buffers)
        full = model + nbytes(server.opt.buf) + HEADER + DIGEST
        kinds, raw, coded, order = {}, {}, {}, []
        shared = None
        for i, n in enumerate(workers):
            key = n if n is not None and n not in kinds else f"node{i}"
            fb = pending.get(n) if n is not None else None
            kinds[key] = k = self.kind(n)
            order.append(k)
            if k == "model":  # the whole model + the feedback values (as before)
                raw[key] = coded[key] = model + (fb.nbytes() if fb is not None else 0)
            elif k == "full":
                raw[key] = coded[key] = full + (fb.nbytes() if fb is not None else 0)
            else:
                if shared is None:
                    shared = (self.step.nbytes(False), self.step.nbytes(True))
                extra = FEEDBACK_META if fb is not None else 0
                raw[key], coded[key] = shared[0] + extra, shared[1] + extra
        return Plan(kinds, raw, coded, order)

    def confirm(self, worker: int, replica_round) -> None:
        """A reply computed on model_{replica_round} passed the check."""
        self.current[int(worker)] = int(replica_round)

    def check(self, reply, expected_round: int, expected_digest) -> str | None:
        """Why this reply was not computed on the server's current model, or None."""
        if self.mode == "model" or (reply.replica_round is None and not self.verify):
            return None  # in one process every worker computes on the server's model
        if reply.replica_round is None or int(reply.replica_round) != expected_round:
            return (f"computed on a stale replica (round {reply.replica_round}, "
                    f"the server is at round {expected_round})")
        if self.verify and reply.digest != expected_digest:
            return "computed on a replica whose digest differs from the server's model"
        return None

    def after_step(self, round: int, server, outcome, support) -> None:
        """Record round ``round``'s step as the next broadcast."""
        if self.mode == "model":
            return
        digest = model_digest(server.params, server.buffers) if self.verify else None
        self.step = GlobalStep.from_gradient(round, outcome.grad, support,
                                             bool(outcome.accepted), server.buffers, digest)
        for n in outcome.confirmed:
            self.current[n] = round - 1

    def state_dict(self) -> dict:
        s = self.step
        return {"current": dict(self.current), "step": None if s is None else {
            "round": s.round, "values": s.values, "indices": s.indices, "dim": s.dim,
            "stepped": s.stepped, "buffers": s.buffers, "digest": s.digest}}

    def load_state_dict(self, state: dict, device="cpu") -> None:
        self.current = {int(k): int(v) for k, v in state["current"].items()}
        st = state.get("step")
        if st is not None:
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            self.step = GlobalStep(st["round"], mv(st["values"]), mv(st["indices"]), st["dim"],
                                   st["stepped"], mv(st["buffers"]), st["digest"])
