"""Fault injection by config, decided statelessly from (seed, worker, round)
so that both runtimes, a re-run and a resumed run inject the same faults.

* ``drop_prob``: the worker fails the round (receives the broadcast, replies
  nothing, changes no state);
* ``nan_prob``: the worker's upload arrives with NaN values (corrupted in
  transit; its own memory is intact) and the server must reject it;
* ``hostile``: one worker misbehaves by round (hostile.py); its ``absent``
  rounds are drops;
* ``missing``: a file of ``ROUND WORKER [absent|offline|lost]`` lines, the
  schedule of a deployed run's missing workers, replayed by its in-process
  twin (runtime=inprocess only; scripts/netns_test.py writes it). ``absent``
  (the default) is a drop: the worker was sent the round's message and never
  got it (or never answered). ``offline``: no node of it was online, so the
  server sent it nothing (no downlink bytes).
  ``lost``: the worker computed the round and its reply never reached the
  server (a link cut after it pulled the message, a reply after the round's
  timeout); it counts as missing, and the worker puts that upload back into
  its residual the next round it computes, as a deployed ClientApp does when
  the server's feedback is about an older upload (clients/client_app.py).
"""
from __future__ import annotations

import hashlib
import os
import struct

from . import hostile


def _uniform(seed: int, worker: int, round: int, salt: str) -> float:
    h = hashlib.blake2b(f"{salt}:{seed}:{worker}:{round}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", h)[0] / 2**64


def _prob(cfg, key: str) -> float:
    return float(cfg.get(key, 0.0) or 0.0) if cfg else 0.0


KINDS = ("absent", "offline", "lost")
_SCHEDULES: dict = {}


def parse_missing(text: str) -> dict:
    """``{(round, worker): "absent" | "offline" | "lost"}`` from ``ROUND WORKER [KIND]``
    lines (``#`` starts a comment); ValueError names the first bad line."""
    out: dict = {}
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        if len(line) not in (2, 3) or not all(x.isdigit() for x in line[:2]):
            raise ValueError(f"line {i} {raw.strip()!r}: want ROUND WORKER [{'|'.join(KINDS)}]")
        kind = line[2] if len(line) == 3 else "absent"
        if kind not in KINDS:
            raise ValueError(f"line {i}: kind {kind!r} is not one of {', '.join(KINDS)}")
        key = (int(line[0]), int(line[1]))
        if key in out:
            raise ValueError(f"line {i}: round {key[0]} worker {key[1]} listed twice")
        out[key] = kind
    return out


def missing_schedule(cfg) -> dict:
    """The ``faults.missing`` schedule of a config ({} when unset)."""
    path = cfg.get("missing") if cfg else None
    if not path:
        return {}
    path = os.path.abspath(str(path))
    stamp = os.stat(path).st_mtime_ns
    if _SCHEDULES.get(path, (None,))[0] != stamp:
        with open(path) as fh:
            _SCHEDULES[path] = (stamp, parse_missing(fh.read()))
    return _SCHEDULES[path][1]


def drops(cfg, seed: int, worker: int, round: int) -> bool:
    p = _prob(cfg, "drop_prob")
    return ((p > 0 and _uniform(seed, worker, round, "drop") < p)
            or hostile.absent(cfg, worker, round)
            or missing_schedule(cfg).get((round, worker)) in ("absent", "offline"))


def offline(cfg, workers, round: int) -> set:
    """The workers sent nothing in ``round``: no node of theirs online (``faults.missing``)."""
    sched = missing_schedule(cfg)
    return {n for n in workers if sched.get((round, n)) == "offline"}


def lost(cfg, workers, round: int) -> set:
    """The workers whose computed reply of ``round`` never arrives (``faults.missing``)."""
    sched = missing_schedule(cfg)
    return {n for n in workers if sched.get((round, n)) == "lost"}


def corrupts(cfg, seed: int, worker: int, round: int) -> bool:
    p = _prob(cfg, "nan_prob")
    return p > 0 and _uniform(seed, worker, round, "nan") < p


def survivors(cfg, seed: int, workers, round: int) -> list:
    """The workers that do not fail ``round`` (:func:`drops`): all of them,
    without asking worker by worker, when no fault can drop one."""
    if _prob(cfg, "drop_prob") <= 0 and not hostile.assigned(cfg) and not missing_schedule(cfg):
        return list(workers)
    return [n for n in workers if not drops(cfg, seed, n, round)]


def corrupted(cfg, seed: int, workers, round: int) -> set:
    """The workers whose upload :func:`corrupts` in ``round``."""
    if _prob(cfg, "nan_prob") <= 0:
        return set()
    return {n for n in workers if corrupts(cfg, seed, n, round)}
