"""Which device a ``device`` setting names, and which one a process can
actually compute on."""
from __future__ import annotations

import torch


def resolve_device(want: str | None = "auto") -> str:
    """``auto`` (or None): ``cuda`` where this process sees a CUDA device,
    else ``cpu``; ``cpu`` and ``cuda`` as given."""
    if want in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(want)


def compute_device(want: str | None = "auto") -> str:
    """The device this process computes on under the setting ``want``: as
    :func:`resolve_device`, except that ``cuda`` where this process sees no
    CUDA device is ``cpu`` (what it has; a Flower client reports it in its
    identify answer instead of failing later)."""
    dev = resolve_device(want)
    if dev == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return dev
