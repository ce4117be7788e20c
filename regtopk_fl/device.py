"""Which device a ``device`` setting names."""
from __future__ import annotations

import torch


def resolve_device(want: str | None = "auto") -> str:
    """``auto`` (or None): ``cuda`` where this process sees a CUDA device,
    else ``cpu``; ``cpu`` and ``cuda`` as given."""
    if want in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(want)
