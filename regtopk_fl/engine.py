"""The in-process engine: the same task, sparsifier, memory and server code
as the Flower runtime, in one process, all workers batched where the task can.

Per round: broadcast (count bytes: the planned messages of broadcast.py) ->
workers apply feedback, compute local updates, sparsify (one batched call) ->
server validates, aggregates, steps. The workers compute on the server's own
model: under ``broadcast=gradient`` that stands for their replicas, which the
Flower runtime keeps and checks bitwise against the server's model (digest).
"""
from __future__ import annotations

import torch

from . import faults, hostile
from .client_states import ClientStates
from .fedround import Coordinator, FedServer, worker_round
from .memory import ErrorFeedbackMemory, restore_rows
from .reuse import BufferPool


def corrupt(reply):
    reply.upload.values = torch.full_like(reply.upload.values, float("nan"))
    return reply


class InProcessRun:
    """State of one in-process run; ``round(t)`` advances it by one round."""

    def __init__(self, task, sparsifier, lr, momentum=0.0, weight_decay=0.0, local_steps=1,
                 local_lr=None, seed=0, fault_cfg=None, device="cpu", broadcast="gradient",
                 participation=None):
        self.task, self.sparsifier = task, sparsifier
        self.local_steps, self.local_lr = int(local_steps), local_lr
        self.seed, self.fault_cfg = int(seed), fault_cfg or {}
        # faults.hostile's upload attacks need the method's budget (over_budget)
        self.budget = sparsifier.budget(task.dim)  # None: no budget (dense)
        params = task.init_params().to(device)
        buffers = task.init_buffers()
        self.coord = Coordinator(FedServer(
            params, None if buffers is None else buffers.to(device), lr, momentum, weight_decay),
            broadcast)
        self.coord.start(range(task.num_workers))
        self.memory = ErrorFeedbackMemory(task.num_workers, task.dim, task.dtype, device,
                                          pool=BufferPool(2))
        self.sizes = task.num_examples()
        # client sampling (#12): per-client states of the sampled clients only
        self.participation = participation
        self.clients = None
        if participation is not None and (not participation.full
                                          or participation.stale_feedback != "keep"):
            self.memory, self.clients = None, ClientStates(task.dim, task.dtype, device)
        # faults.missing's "lost" replies: these workers put that upload back
        # into their residual the next round they compute
        self.restore_due: set = set()

    @property
    def server(self):
        return self.coord.server

    def round(self, t: int, observer=None) -> dict:
        n_all = (list(range(self.task.num_workers)) if self.participation is None
                 else self.participation.clients(t))  # #12: the sampled clients
        off = faults.offline(self.fault_cfg, n_all, t)  # faults.missing: no node online
        # only the sampled clients are sent anything (and of them, those online)
        plan = self.coord.plan([n for n in n_all if n not in off] if off else n_all)
        alive = faults.survivors(self.fault_cfg, self.seed, n_all, t)
        lost = faults.lost(self.fault_cfg, alive, t)
        if lost and self.clients is not None:
            raise ValueError("faults.missing: lost replies are not modelled under client sampling")
        replies = []
        if alive:
            total = float(sum(self.sizes[n] for n in alive))
            weights = [self.sizes[n] / total for n in alive]
            memory, rows = self.memory, None if len(alive) == self.task.num_workers else alive
            feedbacks = self.coord.feedback_for(alive)
            back = [n for n in alive if n in self.restore_due]
            if back:  # a lost upload: back into the residual, the feedback is about an older one
                restore_rows(self.memory, back)
                feedbacks = [None if n in self.restore_due else fb
                             for n, fb in zip(alive, feedbacks)]
                self.restore_due -= set(back)
            if self.clients is not None:  # #12: a batch of just these clients' states
                feedbacks = self.clients.usable(feedbacks, alive, t, self.participation)
                memory, rows = self.clients.gather(
                    alive, feedbacks, context=self.sparsifier.needs_context), None
                feedbacks = [None] * len(alive)  # applied by gather
            replies = worker_round(
                self.task, memory, self.sparsifier, self.server.params, self.server.buffers,
                feedbacks, alive, t, self.local_steps, self.local_lr,
                weights, rows=rows, observer=observer)
            if self.clients is not None:
                self.clients.scatter(alive, memory, t)
            for r in replies:  # computed on model_{t-1}, the replica every worker holds
                r.replica_round = t - 1
            nan = faults.corrupted(self.fault_cfg, self.seed, alive, t)
            replies = [corrupt(r) if r.worker in nan else r for r in replies]
            if lost:  # computed, never arrived
                replies = [r for r in replies if r.worker not in lost]
                self.restore_due |= lost
            # faults.hostile: upload and Byzantine attacks (the Flower runtime makes
            # them in the ClientApp and in strategies/hostile_grid.py)
            replies = hostile.tamper_round(self.fault_cfg, self.seed, t, replies, self.budget,
                                           self.task.num_workers)
        out = self.coord.collect(replies)
        return {"outcome": out, "plan": plan,
                "missing": len(n_all) - len(alive) + len(lost), "replies": len(replies), "sampled": len(n_all)}

    def state_dict(self) -> dict:
        mem = self.memory if self.clients is None else self.clients
        state = {"coord": self.coord.state_dict(), "memory": mem.state_dict()}
        if self.restore_due:
            state["restore_due"] = sorted(self.restore_due)
        return state

    def load_state_dict(self, state) -> None:
        self.coord.load_state_dict(state["coord"])
        (self.memory if self.clients is None else self.clients).load_state_dict(state["memory"])
        self.restore_due = set(state.get("restore_due", ()))
