"""The model a GPU client computes on, kept on its device between messages.

Every train message brings the client's replica (on the CPU, where it stays
bitwise the server's model) to round t; the client then needs that model on
its GPU. Copying the whole replica there costs 45 MB of host-to-device
traffic a message for ResNet-18. Yet under plain SGD (no momentum, no weight
decay) model_t differs from model_{t-1} only on the broadcast step's support,
and within a run every verified replica of round r is the same model_r,
whichever partition it belongs to. So a process keeps the last model it put
on its device with its (run, round), and when the next message's replica is
one round further by a step with a support, it copies just those entries.
Anything else (another run or round, a resync or a patch, a dense step,
momentum or weight decay) copies the whole model, as before.
"""
from __future__ import annotations

import torch

_HELD: dict = {}  # device -> [run id, round, params on that device]


def on_device(run_id, replica, step, device) -> torch.Tensor:
    """``replica.params`` (verified: receive_model checked its digest) on
    ``device``, updated in place from the model this process holds there
    when that is the replica's previous round."""
    key = str(device)
    held = _HELD.get(key)
    opt = replica.opt
    incremental = (held is not None and step is not None and step.indices is not None
                   and not opt.momentum and not opt.weight_decay
                   and held[0] == run_id and held[1] == step.round - 1 == replica.round - 1)
    if incremental:
        params = held[2]
        idx = step.indices.to(torch.int64)
        params.index_copy_(0, idx.to(device), replica.params.index_select(0, idx).to(device))
    else:
        params = torch.empty(replica.params.shape, dtype=replica.params.dtype, device=device)
        params.copy_(replica.params)
        _HELD[key] = held = [run_id, None, params]
    held[1] = replica.round
    return params


def forget() -> None:
    """Drop what this process holds (tests; a run that ends)."""
    _HELD.clear()
