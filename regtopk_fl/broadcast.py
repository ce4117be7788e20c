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

A worker whose replica is older than the previous round (a sampled client
that sat rounds out, one that dropped a round, a restarted SuperNode, every
node after a resumed run, a new node) is sent a :class:`Patch` instead: the
server's *current values* of the entries that changed after the round r its
replica holds, coded indices plus values, the BatchNorm buffers (dense) and
the digest of the model, which the worker checks after applying it. Setting
values (not adding deltas) keeps the replica bitwise equal. The server keeps
for this, per model entry, the last round in which it changed
(:attr:`Downlink.changed`, one int32 per entry) and the digests of the models
of the last :data:`DIGEST_ROUNDS` rounds (and of model_0), never a model per
round. A worker with no replica is patched against round 0: every worker
builds model_0 from the seed. A patch from r also brings any replica of a
round between r and the server's round up to date (the entries that changed
after its own round are a subset of those that changed after r), so a worker
that got further than the server knows (a lost reply) is still served.

Patches count as ``patches``; the full model (and the optimizer state), sent
where a patch would not be smaller or cannot be exact, counts as
``resyncs``. :meth:`Downlink.plan` decides, worker by worker:

* replica at t-2 (it took part in round t-1): the :class:`GlobalStep` (a
  "delta"); under full participation nothing else is ever sent, so its bytes
  are what they were before patches existed;
* replica at an older round r, or none (r = 0): the patch, or the full model
  where that is not larger than the patch;
* the full model where a patch cannot be exact or cannot be trusted: the
  server optimizer has momentum or weight decay (they change every entry
  every round, so the patch would be dense, and a replica would also need
  the momentum buffer), r is older than the digest table's bound, a replica
  the worker claims (in its identify answer, after a restart or a resume)
  does not match the digest the server recorded for that round, or the
  worker failed to apply what it was sent (``REPLICA_STALE``), or its reply
  was computed on another model.

With plain SGD (no momentum, no weight decay, the paper's setting) the
optimizer has no state, so a replica is its params and buffers, and the
server's step ``p -= lr * g`` leaves every entry outside g's support bit for
bit as it was (p + (-lr * 0) = p): an entry changes only in a round whose
support holds it, which is what :attr:`Downlink.changed` records.

The server knows a replica's round from the worker's last reply that passed
the check (it names the model it computed on: round and digest), or from the
round and digest the worker claims in its identify answer, which the server
checks against its digest table before believing it (a claim it cannot
check gets the full model; a claim that matches the table but not the
worker's model ends in the worker's own digest check failing, then a full
model: never a wrong model).

``broadcast=model``: the whole model every round plus the per-worker
feedback values (stateless workers; the behaviour before the sparse
downlink).

Bytes, per message: a fixed :data:`HEADER` (round, kind, flags), the
:data:`DIGEST`, the feedback status (:data:`FEEDBACK_META`: weight + status),
a patch's base round (:data:`PATCH_BASE`), then the payload: indices raw
(int32) or coded (payload.py: varint deltas or bitmap, what actually
travels), values in the model dtype, buffers. A patch or a full model
carries the feedback values explicitly (a delta's are read off g).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import xxhash

from .optim import ServerSGD
from .payload import coded_index_bytes, coded_index_bytes_of_count, index_itemsize

MODES = ("gradient", "model")
HEADER = 16  # round (int64), message kind, flags
DIGEST = 16  # xxh3-128 of the model after the step
FEEDBACK_META = 9  # float64 weight + status byte
PATCH_BASE = 8  # a patch's base round (int64)
DIGEST_ROUNDS = 1024  # how many rounds back the server keeps digests and patches from


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


class GlobalStep:
    """What the server did in one round, as broadcast: model_{round-1} ->
    model_{round}. ``indices`` None means a dense g (dense uploads).

    Made by :meth:`from_gradient`, a step gathers g's support (the distinct
    indices, ascending) and its values only when something reads them: a
    Flower message, a replica, a checkpoint. The in-process engine sends
    nothing, so there only the byte counts are taken, from the support's size
    (:meth:`nbytes`)."""

    def __init__(self, round: int, values, indices, dim: int, stepped: bool = True,
                 buffers=None, digest: bytes | None = None):
        self.round, self.dim = int(round), int(dim)
        self._values = values  # g on the support, or the dense g
        self._indices = indices  # ascending int64 support (None: dense)
        self.stepped = stepped  # False: no valid reply, the model did not move
        self.buffers = buffers
        self.digest = digest  # of the server's model after the step
        self._pending = None  # (g, concatenated uploads' indices): gathered on first read
        self._sizes = None  # (raw, coded) bytes of the shared part, once counted

    @classmethod
    def initial(cls, params: torch.Tensor, buffers=None, digest: bytes | None = None):
        """Round 0: no step; every worker builds model_0 from the seed."""
        empty = params.new_zeros(0)
        return cls(0, empty, empty.to(torch.int64), params.numel(), False, buffers, digest)

    @classmethod
    def from_gradient(cls, round: int, g: torch.Tensor, support, stepped: bool, buffers,
                      digest=None, gathered=None):
        """``support``: the accepted uploads' indices concatenated (None:
        dense). ``g`` is the round's own tensor and is never written again.
        ``gathered``: g's distinct support and g on it, where the server took
        them already (its sparse step): the step then holds no g."""
        if gathered is not None:
            return cls(round, gathered[1], gathered[0].to(torch.int64), g.numel(), stepped,
                       buffers, digest)
        if support is None:
            return cls(round, g, None, g.numel(), stepped, buffers, digest)
        step = cls(round, None, None, g.numel(), stepped, buffers, digest)
        step._pending = (g, support.to(torch.int64))
        return step

    @property
    def indices(self) -> torch.Tensor | None:
        if self._pending is not None:
            self._gather()
        return self._indices

    @property
    def values(self) -> torch.Tensor:
        if self._pending is not None:
            self._gather()
        return self._values

    def _gather(self) -> None:
        g, support = self._pending
        self._indices = torch.unique(support) if support.numel() else support
        self._values = g.index_select(0, self._indices)
        self._pending = None

    @property
    def touched(self) -> torch.Tensor | None:
        """The entries g may be nonzero on (repeats allowed; None: every entry)."""
        return self._pending[1] if self._pending is not None else self._indices

    def applied(self, opt: ServerSGD) -> None:
        """``opt.step`` with this g, the server's arithmetic on the server's g:
        the dense g is a zero buffer kept between rounds with the support
        written in and wiped out again (O(k), not a J-sized allocation)."""
        if self.indices is None:
            opt.step(self.values.to(opt.params.device))
            return
        if opt.sparse_ok:  # the same step, on the support alone (optim.py)
            opt.step_sparse(self.indices.to(opt.params.device),
                            self.values.to(opt.params.device))
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
        """Bytes of the shared part of a delta message (counted once)."""
        if self._sizes is None:
            self._sizes = self._count_bytes()
        return self._sizes[1 if coded else 0]

    def _count_bytes(self) -> tuple:
        """(raw, coded): values, buffers, header and digest, and the indices
        raw (int32) or coded. Where the distinct indices are at least as many
        as a J-bit bitmap has bytes, the coding is the bitmap whatever they
        are (payload.coded_index_bytes_rows), so the count decides and
        nothing is gathered."""
        base = nbytes(self.buffers) + HEADER + DIGEST
        if self._pending is None and self._indices is None:  # dense g
            return (nbytes(self._values) + base,) * 2
        itemsize = (self._pending[0] if self._pending is not None else self._values).element_size()
        bitmap = (self.dim + 7) // 8
        count = 0
        if self._pending is not None and self._pending[1].numel() >= bitmap:
            # the union may reach the bitmap's size: count it on a J-bit mask
            support = self._pending[1]
            mask = torch.zeros(self.dim, dtype=torch.bool, device=support.device)
            count = int(mask.index_fill_(0, support, True).sum())
        if self._pending is not None and count < bitmap:  # the varints may be smaller
            self._gather()
        if self._pending is None:
            count = self._indices.numel()
            coded = coded_index_bytes(self._indices, self.dim)
        else:
            coded = 1 + bitmap
        base += count * itemsize
        return base + count * index_itemsize(self.dim), base + coded


def patch_nbytes(count: int, index_bytes: int, itemsize: int, buffer_bytes: int) -> int:
    """Bytes of a patch of ``count`` entries (its indices taking
    ``index_bytes``), without the feedback it may carry."""
    return HEADER + DIGEST + PATCH_BASE + count * itemsize + index_bytes + buffer_bytes


@dataclass
class Patch:
    """model_{base} -> model_{round}: the values model_{round} holds at the
    entries that changed after round ``base`` (ascending ``indices``), the
    BatchNorm buffers and the digest of model_{round}. It brings any replica
    of a round in [base, round] to model_{round}, bitwise."""

    round: int
    base: int
    values: torch.Tensor
    indices: torch.Tensor  # ascending int64
    dim: int
    buffers: torch.Tensor | None = None
    digest: bytes | None = None


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

    def patch(self, p: Patch) -> str | None:
        """Bring the replica from any round in [p.base, p.round] to
        model_{p.round} by setting the patched entries. Returns why it could
        not (the replica is then unusable), else None."""
        if not p.base <= self.round <= p.round:
            return (f"replica holds round {self.round}, the patch is from round {p.base} "
                    f"to {p.round}")
        if self.opt.buf is not None:  # never sent: patches are for plain SGD only
            return "a patch cannot restore the optimizer's momentum"
        self._digest = None
        if p.indices.numel():
            self.params[p.indices.to(self.params.device)] = p.values.to(self.params.device)
        if p.buffers is not None:
            self.buffers = p.buffers.detach().cpu().clone()
        self.round = p.round
        if p.digest is not None and self.digest() != p.digest:
            return f"replica digest mismatch after the patch to round {p.round}"
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
    "delta", "patch", "full" or "model"), and their bytes."""

    kinds: dict
    raw: dict
    coded: dict
    kind_list: list  # the kinds in the order of the workers planned for
    base_list: list = field(default_factory=list)  # a patch's base round, else None

    @property
    def resyncs(self) -> int:
        return sum(k == "full" for k in self.kinds.values())

    @property
    def patches(self) -> int:
        return sum(k == "patch" for k in self.kinds.values())


class Downlink:
    """The server's side of the downlink: the last :class:`GlobalStep`, which
    replica round each worker is known to hold, the round each model entry
    last changed and the recent models' digests, and what each worker must
    be sent (see the module docstring)."""

    def __init__(self, mode: str = "gradient", verify: bool = False,
                 window: int = DIGEST_ROUNDS):
        if mode not in MODES:
            raise ValueError(f"broadcast={mode!r}: must be one of {', '.join(MODES)}")
        self.mode, self.verify, self.window = mode, bool(verify), int(window)
        self.step: GlobalStep | None = None
        self.current: dict = {}  # worker -> round of the model its replica is known to hold
        self.resync: set = set()  # workers whose next message must be the full model
        self.patchable = False  # plain SGD under broadcast=gradient (set by start)
        self.changed: torch.Tensor | None = None  # int32 [J]: the last round each entry changed
        self.digests: dict = {}  # round -> digest of model_round (verify; bounded)
        self._sizes: dict = {}  # base -> (raw, coded) patch bytes for the current step

    def start(self, server, workers) -> None:
        """Round 0: every worker builds model_0 from the seed, so all are current."""
        digest = model_digest(server.params, server.buffers) if self.verify else None
        self.step = GlobalStep.initial(server.params, server.buffers, digest)
        self.current = {int(n): 0 for n in workers}
        self.resync = set()
        opt = server.opt
        self.patchable = self.mode == "gradient" and not opt.momentum and not opt.weight_decay
        self.changed = (torch.zeros(server.dim, dtype=torch.int32, device=server.params.device)
                        if self.patchable else None)
        self.digests = {0: digest} if digest is not None else {}
        self._sizes = {}

    def route(self, worker) -> tuple:
        """(kind, base round of the patch or None) for ``worker`` (None: a
        node not yet identified), before the size comparison of :meth:`plan`."""
        if self.mode == "model":
            return "model", None
        if self.step is None:
            return "full", None
        t = self.step.round
        if t == 0:  # model_0 comes from the seed: nothing to send but the header
            return "delta", None
        if worker is not None and worker in self.resync:
            return "full", None
        r = None if worker is None else self.current.get(worker)
        if r == t - 1:
            return "delta", None
        r = 0 if r is None else r  # no replica known: model_0 from the seed
        if not self.patchable or (r != 0 and r < t - self.window):
            return "full", None
        return "patch", r

    def patch_indices(self, base: int) -> torch.Tensor:
        """The entries that changed after round ``base`` (ascending int64)."""
        return torch.nonzero(self.changed > int(base)).flatten()

    def patch_count(self, base: int) -> int:
        """How many entries changed after round ``base``: from one histogram
        of ``changed`` per step, not a pass over J per base (#34: a sampled
        round meets as many bases as clients)."""
        if "after" not in self._sizes:  # after[r] = #{entries changed after round r}
            hist = torch.bincount(self.changed.to(torch.int64), minlength=self.step.round + 1)
            self._sizes["after"] = (self.changed.numel() - torch.cumsum(hist, 0)).tolist()
        after = self._sizes["after"]
        return after[int(base)] if int(base) < len(after) else 0

    def patch_bytes(self, base: int, server) -> tuple:
        """(raw, coded) bytes of the patch from ``base`` (cached per round).
        The indices are found only where their count does not decide the
        coded size (a patch of fewer entries than the bitmap has bytes)."""
        sizes = self._sizes.get(base)
        if sizes is None:
            n, dim = self.patch_count(base), server.dim
            coded = coded_index_bytes_of_count(n, dim)
            if coded is None:
                coded = coded_index_bytes(self.patch_indices(base), dim)
            args = (server.params.element_size(), nbytes(server.buffers))
            sizes = self._sizes[base] = (patch_nbytes(n, n * index_itemsize(dim), *args),
                                         patch_nbytes(n, coded, *args))
        return sizes

    def patch(self, base: int, server) -> Patch:
        """The patch from round ``base`` to the server's current model."""
        idx = self.patch_indices(base)
        return Patch(self.step.round, int(base), server.params[idx].cpu(), idx.cpu(), server.dim,
                     None if server.buffers is None else server.buffers.cpu(), self.step.digest)

    def plan(self, workers, server, pending: dict) -> Plan:
        """Kinds and bytes for these workers (None: a node not yet identified).
        A patch is sent only where it is smaller than the full model."""
        model = nbytes(server.params) + nbytes(server.buffers)
        full = model + nbytes(server.opt.buf) + HEADER + DIGEST
        kinds, raw, coded, order, bases = {}, {}, {}, [], []
        shared = None
        for i, n in enumerate(workers):
            key = n if n is not None and n not in kinds else f"node{i}"
            fb = pending.get(n) if n is not None else None
            k, base = self.route(n)
            if k == "patch":
                sizes = self.patch_bytes(base, server)
                if sizes[1] >= full:
                    k, base = "full", None
            kinds[key] = k
            order.append(k)
            bases.append(base)
            if k == "delta":  # g is shared; the feedback values are read off it
                if shared is None:
                    shared = (self.step.nbytes(False), self.step.nbytes(True))
                extra = FEEDBACK_META if fb is not None else 0
                raw[key], coded[key] = shared[0] + extra, shared[1] + extra
                continue
            fb_bytes = fb.nbytes() if fb is not None else 0  # with its values
            if k == "model":  # the whole model + the feedback values (as before)
                raw[key] = coded[key] = model + fb_bytes
            elif k == "full":
                raw[key] = coded[key] = full + fb_bytes
            else:  # a patch
                raw[key], coded[key] = sizes[0] + fb_bytes, sizes[1] + fb_bytes
        return Plan(kinds, raw, coded, order, bases)

    def confirm(self, worker: int, replica_round) -> None:
        """A reply computed on model_{replica_round} passed the check."""
        self.current[int(worker)] = int(replica_round)
        self.resync.discard(int(worker))

    def lost(self, worker) -> None:
        """The worker's replica cannot be trusted (it failed to apply what it
        was sent, or replied from another model): the full model next."""
        if worker is not None:
            self.resync.add(int(worker))

    def claim(self, worker: int, replica_round, digest) -> str:
        """What a node says its replica holds (``replica_round`` None: no
        replica), checked against the digest table; returns what was decided.
        A verified claim sets the round the next patch starts from."""
        w = int(worker)
        if self.mode == "model" or self.step is None:
            return "ignored (no replicas)"
        t = self.step.round
        if replica_round is None:
            self.current[w] = 0
            self.resync.discard(w)
            return "no replica: patched from model_0, which it builds from the seed"
        r = int(replica_round)
        if r > t:  # its replica is ahead of a resumed server: unusable, model_0 instead
            self.current[w] = 0
            self.resync.discard(w)
            return f"replica of round {r} is ahead of the server's {t}: patched from model_0"
        if r < 0 or (r != 0 and r < t - self.window) or r not in self.digests:
            self.resync.add(w)
            return f"replica of round {r} is outside the server's digest table: the full model"
        if self.digests[r] != digest:
            self.resync.add(w)
            return f"replica of round {r} does not match the server's digest: the full model"
        self.current[w] = r
        self.resync.discard(w)
        return f"replica of round {r} matches the server's digest"

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
        """Record round ``round``'s step as the next broadcast, the entries it
        changed and the new model's digest."""
        if self.mode == "model":
            return
        digest = model_digest(server.params, server.buffers) if self.verify else None
        self.step = GlobalStep.from_gradient(round, outcome.grad, support,
                                             bool(outcome.accepted), server.buffers, digest,
                                             outcome.gathered)
        if self.changed is not None and self.step.stepped:
            touched = self.step.touched
            if touched is None:  # a dense g moves every entry
                self.changed.fill_(round)
            else:
                self.changed.index_fill_(0, touched.to(self.changed.device), round)
        if digest is not None:
            self.digests[round] = digest
            for r in [r for r in self.digests if r and r < round - self.window]:
                del self.digests[r]
        self._sizes = {}
        confirmed = [int(n) for n in outcome.confirmed]  # each as confirm(n, round - 1)
        self.current.update(dict.fromkeys(confirmed, round - 1))
        self.resync.difference_update(confirmed)

    def state_dict(self) -> dict:
        s = self.step
        return {"current": dict(self.current), "resync": sorted(self.resync),
                "changed": None if self.changed is None else self.changed.cpu().clone(),
                "digests": dict(self.digests), "step": None if s is None else {
                    "round": s.round, "values": s.values, "indices": s.indices, "dim": s.dim,
                    "stepped": s.stepped, "buffers": s.buffers, "digest": s.digest}}

    def load_state_dict(self, state: dict, device="cpu") -> None:
        self.current = {int(k): int(v) for k, v in state["current"].items()}
        self.resync = {int(n) for n in state.get("resync", ())}
        self.digests = {int(k): v for k, v in state.get("digests", {}).items()}
        self._sizes = {}
        st = state.get("step")
        if st is not None:
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            self.step = GlobalStep(st["round"], mv(st["values"]), mv(st["indices"]), st["dim"],
                                   st["stepped"], mv(st["buffers"]), st["digest"])
        if self.patchable and self.step is not None:
            changed = state.get("changed")
            # a checkpoint from before patches: every entry counts as changed at
            # its round, so only replicas of that round are patched (the rest
            # get the full model) until the entries' rounds are known again
            self.changed = (changed.to(device=device, dtype=torch.int32) if changed is not None
                            else torch.full((self.step.dim,), self.step.round, dtype=torch.int32,
                                            device=device))
