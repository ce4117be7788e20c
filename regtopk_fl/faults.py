"""Fault injection by config, decided statelessly from (seed, worker, round)
so that both runtimes, a re-run and a resumed run inject the same faults.

* ``drop_prob``: the worker fails the round (receives the broadcast, replies
  nothing, changes no state);
* ``nan_prob``: the worker's upload arrives with NaN values (corrupted in
  transit; its own memory is intact) and the server must reject it;
* ``hostile``: one worker misbehaves by round (hostile.py); its ``absent``
  rounds are drops.
"""
from __future__ import annotations

import hashlib
import struct

from . import hostile


def _uniform(seed: int, worker: int, round: int, salt: str) -> float:
    h = hashlib.blake2b(f"{salt}:{seed}:{worker}:{round}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", h)[0] / 2**64


def drops(cfg, seed: int, worker: int, round: int) -> bool:
    p = float(cfg.get("drop_prob", 0.0) or 0.0) if cfg else 0.0
    return (p > 0 and _uniform(seed, worker, round, "drop") < p) or hostile.absent(
        cfg, worker, round)


def corrupts(cfg, seed: int, worker: int, round: int) -> bool:
    p = float(cfg.get("nan_prob", 0.0) or 0.0) if cfg else 0.0
    return p > 0 and _uniform(seed, worker, round, "nan") < p
