"""The server optimizer, shared by the server and every worker's model replica.

Under ``broadcast=gradient`` each worker applies the broadcast global gradient
to its own replica with this very class, so the replica and the server's
model stay bitwise equal (same arithmetic, same order, same dtype; both on
the CPU in the Flower runtime).
"""
from __future__ import annotations

import torch

SPARSE_MIN = 1 << 16  # plain SGD on a CPU model of at least this many entries steps sparsely


class ServerSGD:
    """SGD on the flat global model, with the arithmetic of torch.optim.SGD
    (weight decay, momentum with dampening 0, no Nesterov) but without its
    per-step dispatch overhead, which dominated small models' rounds."""

    def __init__(self, params: torch.Tensor, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        self.params, self.lr = params, float(lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buf = None

    @property
    def sparse_ok(self) -> bool:
        """Whether :meth:`step_sparse` may stand for :meth:`step`: plain SGD
        (momentum and weight decay move every entry) on a large CPU model,
        where the dense step is a pass over all J entries for a g that is
        zero on nearly all of them."""
        return (not self.momentum and not self.weight_decay
                and self.params.device.type == "cpu" and self.params.numel() >= SPARSE_MIN)

    def step_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """:meth:`step` for a g that is ``values`` on the distinct ``indices``
        and zero elsewhere (plain SGD only, :attr:`sparse_ok`). Bitwise the
        dense step: off the support p + (-lr) * 0 is p, and on it the same
        add kernel runs on the gathered entries (tests/test_broadcast.py
        compares the two on random supports)."""
        sub = self.params.index_select(0, indices)
        sub.add_(values, alpha=-self.lr)
        self.params.index_copy_(0, indices, sub)

    def step(self, g: torch.Tensor) -> None:
        d = g.add(self.params, alpha=self.weight_decay) if self.weight_decay else g
        if self.momentum:
            if self.buf is None:
                self.buf = d.clone()
            else:
                self.buf.mul_(self.momentum).add_(d)
            d = self.buf
        self.params.add_(d, alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"buf": None if self.buf is None else self.buf.clone()}

    def load_state_dict(self, state: dict, copy: bool = True) -> None:
        """``copy=False`` adopts the momentum buffer (a replica's, mapped in place)."""
        buf = state.get("buf")
        self.buf = None if buf is None else buf.to(self.params.device, copy=copy)
