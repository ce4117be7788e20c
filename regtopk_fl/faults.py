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


def _prob(cfg, key: str) -> float:
    return float(cfg.get(key, 0.0) or 0.0) if cfg else 0.0


def drops(cfg, seed: int, worker: int, round: int) -> bool:
    p = _prob(cfg, "drop_prob")
    return (p > 0 and _uniform(seed, worker, round, "drop") < p) or hostile.absent(
        cfg, worker, round)


def corrupts(cfg, seed: int, worker: int, round: int) -> bool:
    p = _prob(cfg, "nan_prob")
    return p > 0 and _uniform(seed, worker, round, "nan") < p


def survivors(cfg, seed: int, workers, round: int) -> list:
    """The workers that do not fail ``round`` (:func:`drops`): all of them,
    without asking worker by worker, when no fault can drop one."""
    if _prob(cfg, "drop_prob") <= 0 and not hostile.assigned(cfg):
        return list(workers)
    return [n for n in workers if not drops(cfg, seed, n, round)]


def corrupted(cfg, seed: int, workers, round: int) -> set:
    """The workers whose upload :func:`corrupts` in ``round``."""
    if _prob(cfg, "nan_prob") <= 0:
        return set()
    return {n for n in workers if corrupts(cfg, seed, n, round)}
