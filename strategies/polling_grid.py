"""A Grid wrapper whose ``send_and_receive`` polls for replies every
``poll_s`` seconds instead of the deployment grid's fixed 3 s.

Flower 1.41's ``HttpGrid.send_and_receive`` (the grid a ServerApp gets under
``flwr run`` against a SuperLink) sleeps a hard-coded 3 s between pulls, which
puts a 0-3 s idle gap into every round. This wrapper does the same
push-then-pull loop through the public ``Grid.push_messages`` /
``Grid.pull_messages`` API with a shorter interval; everything else is
delegated to the wrapped grid unchanged.
"""
from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from .grid_wrapper import WrappedGrid


class PollingGrid(WrappedGrid):
    def __init__(self, grid: Grid, poll_s: float = 0.2):
        super().__init__(grid)
        self.poll_s = max(0.01, float(poll_s))

    # -- the faster loop -----------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        msg_ids = {m for m in self.push_messages(list(messages)) if m}
        end = None if timeout is None else time.monotonic() + timeout
        out: list = []
        while msg_ids:
            got = list(self.pull_messages(msg_ids))
            out.extend(got)
            msg_ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not msg_ids or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s if end is None else
                       max(0.0, min(self.poll_s, end - time.monotonic())))
        return out
