"""A Grid that hands everything to the Grid it wraps: the base of this
suite's grid wrappers (``PollingGrid``, ``HostileGrid``), which each change
``send_and_receive`` only."""
from __future__ import annotations

from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class WrappedGrid(Grid):
    def __init__(self, grid: Grid):
        self._grid = grid

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

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name):  # anything else a grid offers (close, ...)
        return getattr(self._grid, name)


def innermost(grid):
    """The grid under any number of wrappers."""
    while isinstance(grid, WrappedGrid):
        grid = grid._grid
    return grid
