"""A hostile worker by configuration (``faults.hostile``): one partition that
misbehaves in chosen rounds, each round its own way. For the tests (one
Flower simulation walks through every attack; tests/test_hostile_matrix.py)
and for anyone who wants to see what the server does with a lying client.

``faults.hostile.attacks`` is a string of ``ROUND:ATTACK`` items (``A-B:ATTACK``
for a range), separated by spaces or commas, e.g. ``"3:nan 4:impersonate
5-9:absent"``; ``faults.hostile.worker`` is the partition (-1: nobody).

The worker computes its round honestly and keeps its memory; the attack
changes only the reply that travels (clients/hostile.py does that), so what
the server must do is exactly what it does with an honest upload it rejects.
``absent`` is the exception: the worker sits the round out as under
``faults.drop_prob`` (no reply, no state change), in both runtimes; it is
what a twin run uses to say "this worker was simply not there".
"""
from __future__ import annotations

import re

# name -> what the reply then carries (the server's answer: README "Reliability")
ATTACKS = {
    "index_out_of_range": "an index equal to J",
    "index_negative": "an index of -1",
    "index_duplicate": "the first index twice",
    "index_unsorted": "indices (and values) in descending order",
    "index_float": "indices as float64",
    "length_mismatch": "one value fewer than indices",
    "values_2d": "values as a k x 1 matrix",
    "wrong_dtype": "values in another float dtype than the model's",
    "wrong_dim": "a dense upload of J + 1 values (no indices)",
    "nan": "a NaN value",
    "inf": "an Inf value",
    "huge_norm": "finite values scaled by 1e30",
    "missing_upload": "no upload record",
    "missing_values": "an upload record without values",
    "missing_num_examples": "no num-examples metric",
    "impersonate": "the partition id of the next worker (which also replies)",
    "unknown_partition": "partition id N + 95, outside 0..N-1",
    "inflate_examples": "num-examples = 10^12",
    "absent": "nothing: the worker sits the round out",
}
MESSAGE_ATTACKS = tuple(a for a in ATTACKS if a != "absent")

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?:([a-z_0-9]+)$")


def parse(spec) -> dict:
    """{round: attack} from the spec string; raises ValueError naming the item."""
    out: dict = {}
    for item in re.split(r"[\s,]+", str(spec or "").strip()):
        if not item:
            continue
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"{item!r} is not ROUND:ATTACK or A-B:ATTACK")
        lo, hi, attack = int(m[1]), int(m[2] or m[1]), m[3]
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        if lo < 1 or hi < lo:
            raise ValueError(f"{item!r}: rounds must be 1 <= A <= B")
        for t in range(lo, hi + 1):
            if t in out:
                raise ValueError(f"round {t} has two attacks")
            out[t] = attack
    return out


def attack(fault_cfg, worker: int, round: int):
    """The attack ``worker`` makes in ``round`` (None: it behaves)."""
    h = fault_cfg.get("hostile") if fault_cfg else None
    if not h or h.get("worker") is None or int(h.get("worker")) != int(worker):
        return None
    return parse(h.get("attacks", "")).get(int(round))


def absent(fault_cfg, worker: int, round: int) -> bool:
    return attack(fault_cfg, worker, round) == "absent"
