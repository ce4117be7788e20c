"""The omniscient attacker of ``faults.hostile``'s Byzantine attacks
(sign_flip, scaled_copy, random_direction; regtopk_fl/hostile.py) under
``runtime=flower``.

Those attacks need the round's other uploads, which no ClientApp sees. So the
ServerApp, when (and only when) the config names one, wraps its Grid in
:class:`HostileGrid`: an adversary on the network that reads every train
reply of the round and rewrites the hostile partition's reply before the
strategy gets it. The strategy, the Coordinator and the trust checks are the
same code as in any run and know nothing of it; the in-process engine makes
the same attacks with the same function (``hostile.byzantine``) on its replies.
Everything but ``send_and_receive`` is the wrapped grid's.
"""
from __future__ import annotations

import logging
from typing import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from protocol import wire
from regtopk_fl import hostile

from .grid_wrapper import WrappedGrid

log = logging.getLogger(__name__)


def needed(fault_cfg) -> bool:
    """Whether ``faults.hostile`` names a Byzantine attack in any round."""
    h = fault_cfg.get("hostile") if fault_cfg else None
    if not h or h.get("worker") is None or int(h.get("worker")) < 0:
        return False
    return any(a in hostile.BYZANTINE for a in hostile.parse(h.get("attacks", "")).values())


class HostileGrid(WrappedGrid):
    def __init__(self, grid: Grid, fault_cfg, seed: int, dim: int, num_workers: int):
        super().__init__(grid)
        self.fault_cfg, self.seed = fault_cfg, int(seed)
        self.dim, self.num_workers = int(dim), int(num_workers)

    # -- the adversary -------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return replies
        t, _ = wire.read_train(train[0].content)
        decoded = []
        for msg in replies:
            if msg.has_error() or msg.metadata.message_type != MessageType.TRAIN:
                continue
            try:
                decoded.append((msg, wire.read_reply(msg.content, self.dim)))
            except Exception:  # noqa: BLE001 - an undecodable reply is the strategy's to refuse
                continue
        for msg, reply in decoded:
            attack = hostile.attack(self.fault_cfg, reply.worker, t)
            if attack not in hostile.BYZANTINE:
                continue
            others = [r for m, r in decoded if m is not msg]
            bad = hostile.byzantine(attack, reply, others, hostile.scale(self.fault_cfg),
                                    self.seed, t, self.num_workers)
            msg.content = wire.replace_upload(msg.content, bad)
            log.info("round %d: the hostile worker %d's reply rewritten (%s)", t, reply.worker,
                     attack)
        return replies
