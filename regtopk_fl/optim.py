"""The server optimizer, shared by the server and every worker's model replica.

Under ``broadcast=gradient`` each worker applies the broadcast global gradient
to its own replica with this very class, so the replica and the server's
model stay bitwise equal (same arithmetic, same order, same dtype; both on
the CPU in the Flower runtime).
"""
from __future__ import annotations

import torch


class ServerSGD:
    """SGD on the flat global model, with the arithmetic of torch.optim.SGD
    (weight decay, momentum with dampening 0, no Nesterov) but without its
    per-step dispatch overhead, which dominated small models' rounds."""

    def __init__(self, params: torch.Tensor, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        self.params, self.lr = params, float(lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buf = None

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
