"""A hostile worker by configuration (``faults.hostile``): one partition that
misbehaves in chosen rounds, each round its own way. For the tests (one
Flower simulation walks through every attack the server must refuse;
tests/test_hostile_matrix.py), for the Byzantine table (results/README.md)
and for anyone who wants to see what the server does with a lying client.

``faults.hostile.attacks`` is a string of ``ROUND:ATTACK`` items (``A-B:ATTACK``
for a range), separated by spaces or commas, e.g. ``"3:nan 4:impersonate
5-9:absent"``; ``faults.hostile.worker`` is the partition (-1: nobody);
``faults.hostile.scale`` is the c of ``sign_flip`` and ``scaled_copy``.

The worker computes its round honestly and keeps its memory; the attack
changes only the reply that travels, so what the server must do is exactly
what it does with an honest upload it rejects (or, for a Byzantine attack,
what its aggregation rule makes of an upload within every bound). Three
kinds, by where the attack is made:

* **Upload attacks** (:data:`UPLOAD_ATTACKS`) change one reply's upload or
  claimed count (:func:`tamper_upload`). Both runtimes: in-process on the
  Reply (engine.py), under Flower in the ClientApp's message (clients/hostile.py).
* **Byzantine attacks** (:data:`BYZANTINE`) are well-formed, within the
  budget and the norm guard, and need the round's other uploads: the
  attacker is omniscient, as in the Byzantine literature (:func:`byzantine`).
  Both runtimes, where all of a round's replies meet: in-process after the
  workers' step (engine.py); under Flower in a Grid wrapper that rewrites the
  hostile node's train reply on its way to the strategy, as an adversary on
  the network that reads every upload would (strategies/hostile_grid.py).
* **Message attacks** (the rest but ``absent``) break the wire format or the
  claimed identity; they exist only as Flower messages (clients/hostile.py),
  so they need ``runtime=flower``.

``absent`` is the exception to "computes honestly": the worker sits the round
out as under ``faults.drop_prob`` (no reply, no state change), in both
runtimes; it is what a twin run uses to say "this worker was simply not there".
"""
from __future__ import annotations

import dataclasses
import re

import torch

from .payload import Upload
from .trust import lower_median, upload_norm

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
    "over_budget": "one entry more than the method's budget (k + 1 for Top-k): its "
                   "honest entries and the lowest unsent indices, with value 0",
    "dense_all": "a dense upload of all J values (its honest values, 0 elsewhere)",
    "coded_all": "a sparse upload of all J indices, coded (its honest values, 0 elsewhere)",
    "sign_flip": "its honest upload, sign-flipped and scaled to c x the round's median norm",
    "scaled_copy": "c x the upload of another worker (the next partition that replied)",
    "random_direction": "a random direction on its honest indices, at the round's median norm",
    "ipm": "inner-product manipulation: minus the others' mean upload on its largest entries "
           "(as many as its honest upload), scaled to c x the round's median norm",
    "alie": "a little is enough, on the sent entries: on the others' mean's largest entries, "
            "each the senders' mean moved c of their standard deviations toward 0 and beyond",
    "absent": "nothing: the worker sits the round out",
}
UPLOAD_ATTACKS = ("nan", "inf", "huge_norm", "inflate_examples", "over_budget", "dense_all",
                  "coded_all")
BYZANTINE = ("sign_flip", "scaled_copy", "random_direction", "ipm", "alie")
# the attacks made to defeat a robust rule (issue #33): c is chosen knowing the rule
ADAPTIVE = ("ipm", "alie")
BUDGET_ATTACKS = ("over_budget", "dense_all", "coded_all")
# what either runtime can do; the rest are Flower messages (runtime=flower)
BOTH_RUNTIMES = ("absent", *UPLOAD_ATTACKS, *BYZANTINE)
# what the server must refuse, each with its reason (the hostile matrix)
REFUSED = tuple(a for a in ATTACKS if a != "absent" and a not in BYZANTINE)
DEFAULT_SCALE = 15.0  # c: 15 x the median stays under the default guard (20 x)

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


def assigned(fault_cfg) -> bool:
    """A hostile worker is set (``faults.hostile.worker`` >= 0, with attacks)."""
    h = fault_cfg.get("hostile") if fault_cfg else None
    return bool(h and h.get("worker") is not None and int(h.get("worker")) >= 0
                and h.get("attacks"))


def absent(fault_cfg, worker: int, round: int) -> bool:
    return attack(fault_cfg, worker, round) == "absent"


def scale(fault_cfg) -> float:
    h = fault_cfg.get("hostile") if fault_cfg else None
    c = h.get("scale") if h else None
    return DEFAULT_SCALE if c is None else float(c)


# -- upload attacks: one reply ------------------------------------------------------
def _spread(upload, indices) -> torch.Tensor:
    """The upload's values at ``indices`` (an ascending superset of its own), 0 elsewhere."""
    values = torch.zeros(indices.numel(), dtype=upload.values.dtype, device=upload.values.device)
    own = (torch.arange(upload.dim, device=values.device) if upload.indices is None
           else upload.indices.to(torch.int64))
    values[torch.searchsorted(indices, own)] = upload.values
    return values


def tamper_upload(attack: str, reply, budget=None):
    """A new Reply: ``reply`` as the hostile worker sends it under an upload
    attack (:data:`UPLOAD_ATTACKS`); ``budget`` is the run's budget (for
    ``over_budget``). The honest reply's tensors are never changed."""
    up = reply.upload
    if attack == "inflate_examples":
        return dataclasses.replace(reply, num_examples=10**12)
    if attack in ("nan", "inf"):
        values = up.values.clone()
        values[0] = float(attack)
        return dataclasses.replace(reply, upload=Upload(values, up.indices, up.dim))
    if attack == "huge_norm":
        return dataclasses.replace(reply, upload=Upload(up.values * 1e30, up.indices, up.dim))
    everything = torch.arange(up.dim, device=up.values.device)
    if attack == "dense_all":
        return dataclasses.replace(reply, upload=Upload(_spread(up, everything), None, up.dim))
    if attack == "coded_all":
        return dataclasses.replace(reply, upload=Upload(_spread(up, everything), everything,
                                                         up.dim))
    if attack == "over_budget":
        if budget is None or up.indices is None or budget + 1 > up.dim:
            raise ValueError("over_budget needs a sparse method whose budget is below J")
        own = up.indices.to(torch.int64)
        free = torch.ones(up.dim, dtype=torch.bool, device=own.device)
        free[own] = False
        extra = torch.nonzero(free).squeeze(1)[:budget + 1 - own.numel()]
        idx = torch.sort(torch.cat([own, extra])).values
        return dataclasses.replace(reply, upload=Upload(_spread(up, idx), idx, up.dim))
    raise ValueError(f"{attack!r} is not an upload attack")


# -- Byzantine attacks: the round's other uploads known ------------------------------------
def byzantine(attack: str, reply, others: list, c: float, seed: int, round: int,
              num_workers: int):
    """A new Reply: the hostile worker's honest ``reply`` replaced under a
    Byzantine attack, knowing the round's ``others`` (the other replies as
    sent). The median is the lower median of every honest upload's norm
    this round, its own included (what the server's guard would see without
    the attacker). Without other replies the reply goes out unchanged."""
    if not others:
        return reply
    up = reply.upload
    median = lower_median([upload_norm(reply)] + [upload_norm(r) for r in others])
    if attack == "sign_flip":
        own = upload_norm(reply)
        factor = -(c * median / own) if own > 0 else 0.0
        return dataclasses.replace(reply, upload=Upload(up.values * factor, up.indices, up.dim))
    if attack == "scaled_copy":
        src = min(others, key=lambda r: (r.worker - reply.worker) % max(num_workers, 1))
        sup = src.upload
        idx = None if sup.indices is None else sup.indices.clone()
        return dataclasses.replace(reply, upload=Upload(sup.values.to(up.values.dtype) * c, idx,
                                                        up.dim))
    if attack == "random_direction":
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(reply.worker))
                                            * 1_000_033 + int(round))
        z = torch.randn(up.values.numel(), generator=gen, dtype=torch.float64)
        zn = float(torch.linalg.vector_norm(z))
        v = (z * (median / zn if zn > 0 else 0.0)).to(up.values.dtype).to(up.values.device)
        return dataclasses.replace(reply, upload=Upload(v, up.indices, up.dim))
    if attack in ADAPTIVE:
        return dataclasses.replace(reply, upload=_adaptive(attack, up, others, c, median))
    raise ValueError(f"{attack!r} is not a Byzantine attack")


def _adaptive(attack: str, up, others: list, c: float, median: float):
    """The upload of ``ipm`` or ``alie``. The others' uploads are spread on
    all J entries (0 where one sent nothing); their plain mean mu is what the
    paper's rule would make of them (equal weights). The attacker keeps its
    honest count of entries (the budget holds) and sends the entries where
    |mu| is largest (all J for a dense upload).

    * ``ipm`` (inner-product manipulation, Xie et al. 2020): -mu there,
      scaled to c x the round's median norm. Knowing a norm rule's radius
      (``upload_clip``'s clip_ratio, ``centered_clip``'s), it sets c to it:
      the largest push against the honest direction that passes unclipped.
    * ``alie`` ("a little is enough", Baruch et al. 2019, on the sent
      entries): at entry j, with mean_j and std_j over the others that sent
      j (a statistic of the senders, as a rule made for sparse uploads would
      keep), the value mean_j - c std_j sign(mu_j): inside the senders'
      spread for small c, so that no per-entry or per-upload outlier test
      sees it, but every entry pushed against the aggregate."""
    dim = up.dim
    dtype, device = up.values.dtype, up.values.device
    x = torch.zeros(len(others), dim, dtype=torch.float64)
    sent = torch.zeros(len(others), dim, dtype=torch.bool)
    for i, r in enumerate(others):
        o = r.upload
        idx = (torch.arange(dim) if o.indices is None else o.indices.to(torch.int64).cpu())
        x[i, idx] = o.values.detach().to(torch.float64).cpu()
        sent[i, idx] = True
    mu = x.mean(0)
    count = up.values.numel()
    if up.indices is None:
        idx = None
        pick = torch.arange(dim)
    else:
        pick = torch.sort(torch.topk(mu.abs(), min(count, dim)).indices).values
        idx = pick.to(up.indices.dtype).to(up.indices.device)
    if attack == "ipm":
        v = -mu[pick]
        vn = float(torch.linalg.vector_norm(v))
        v = v * (c * median / vn if vn > 0 else 0.0)
    else:
        n = sent[:, pick].sum(0).clamp_min(1).to(torch.float64)
        xs = x[:, pick]
        mean = xs.sum(0) / n
        var = ((xs - mean) ** 2 * sent[:, pick]).sum(0) / n
        v = mean - c * var.sqrt() * torch.sign(mu[pick])
    return Upload(v.to(dtype).to(device), idx, dim)


def tamper_round(fault_cfg, seed: int, round: int, replies: list, budget=None,
                 num_workers: int = 0) -> list:
    """The in-process side: ``replies`` (one round's, honest) with the hostile
    worker's replaced under its upload or Byzantine attack of this round."""
    out = list(replies)
    if not assigned(fault_cfg):
        return out
    for i, r in enumerate(replies):
        a = attack(fault_cfg, r.worker, round)
        if a in UPLOAD_ATTACKS:
            out[i] = tamper_upload(a, r, budget)
        elif a in BYZANTINE:
            out[i] = byzantine(a, r, [o for o in replies if o is not r], scale(fault_cfg),
                               seed, round, num_workers or len(replies))
    return out
