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


class PollingGrid(Grid):
    def __init__(self, grid: Grid, poll_s: float = 0.2):
        self._grid = grid
        self.poll_s = max(0.01, float(poll_s))

    # -- delegated ---------------------------------------------------------------
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # NodeInfo with each node's public key (Grid's default drops it)
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name):  # anything else a grid offers (get_nodes, close, ...)
        return getattr(self._grid, name)

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
