"""Large CPU buffers reused from round to round.

A fresh J-sized CPU tensor costs page faults on first touch: 12.7 ms for
ResNet-18's 45 MB on this suite's CPU, against 1.0 ms to zero one already
mapped (scripts/bench_server_parts.py). In issue #34's sampled round (the
width-16 model, [10, J] batches) the memory's ``accumulate`` took 8.2 ms
into a fresh batch and 2.6-3.3 ms into a pooled one (profiles of single
runs, scripts/profile_round.py's clock). A :class:`BufferPool` hands
out a buffer it made before when nothing but the pool holds it any more (no
Python reference to it and no view of its storage), else a new one, keeping
at most ``size`` of them. A round's buffer lives on in what the round
returns (a step, an outcome, an upload) until the next round replaces it, so
a pool of two serves every other round from each.
"""
from __future__ import annotations

import sys

import torch

POOL_MIN = 1 << 16  # entries: smaller buffers (and any off the CPU) are allocated afresh


def _lone_refs() -> int:
    """What ``sys.getrefcount`` says, in :meth:`BufferPool.take`'s loop, of a
    tensor that only the pool holds: measured once, so that no Python
    version's way of counting (3.14 counts fewer borrowed references) can
    make a held buffer look free."""
    pool = [torch.empty(0)]
    for buf in pool:
        return sys.getrefcount(buf)


LONE_REFS = _lone_refs()


class BufferPool:
    """At most ``size`` buffers, reused once only the pool holds them."""

    def __init__(self, size: int = 2):
        self.size = int(size)
        self._bufs: list = []

    def take(self, shape, dtype, device) -> torch.Tensor:
        """A contiguous tensor of ``shape``, its contents undefined."""
        shape = tuple(int(s) for s in shape)
        device = torch.device(device)
        numel = 1
        for s in shape:
            numel *= s
        if device.type != "cpu" or numel < POOL_MIN:
            return torch.empty(shape, dtype=dtype, device=device)
        for buf in self._bufs:
            # no reference but the pool's (LONE_REFS): the storage's own and
            # the one this check takes
            if sys.getrefcount(buf) == LONE_REFS and buf.shape == shape and \
                    buf.dtype == dtype and \
                    torch._C._storage_Use_Count(buf.untyped_storage()._cdata) == 2:
                return buf
        buf = torch.empty(shape, dtype=dtype, device=device)
        if len(self._bufs) < self.size:
            self._bufs.append(buf)
        return buf
