"""How many SuperNodes a ``flwr run`` federation has, as the ServerApp sees it
before round 1, and the refusal when that is not ``num_workers``.

Each SuperNode is one worker (one partition), so a run needs exactly
``num_workers`` nodes. When the ServerApp can know the federation's size
cannot change, a mismatch is refused at once instead of waiting
``runtime.wait_for_nodes_s`` for nodes that never come:

* **Simulation Runtime** (``flwr run`` against a SuperLink started with
  ``--simulation``, such as the local SuperLink ``flwr run .`` starts): the
  ServerApp gets an ``InMemoryGrid``, and Flower registers all simulated
  SuperNodes at once, in one loop right after the ServerApp starts, and never
  adds one later. The count is read once it has been non-zero and unchanged for
  ``settle_s``; any difference from ``num_workers`` is refused.
* **Deployment Runtime** (real SuperNodes): nodes connect over minutes and may
  restart, and a node that holds no partition (an impostor) is refused by
  identity (strategies/identity.py), so nothing is decided here; the strategy
  waits for the nodes (``SparseAggregation._nodes``).

The launcher's own simulation (``runtime=flower``, simulation/) always builds
``num_workers`` nodes and does not come through here.
"""
from __future__ import annotations

import time

from flwr.superlink.grid import InMemoryGrid


class FederationMismatch(RuntimeError):
    """The federation's node count and num_workers differ; str(e) is one line."""


def is_simulation(grid) -> bool:
    """Whether ``grid`` (or the grid a wrapper such as PollingGrid holds) is the
    Simulation Runtime's."""
    from .grid_wrapper import innermost

    return isinstance(innermost(grid), InMemoryGrid)


def settled_node_count(grid, wait_s: float = 60.0, settle_s: float = 2.0,
                       poll_s: float = 0.05) -> int:
    """The number of nodes once it has been non-zero and unchanged for
    ``settle_s`` (0 if no node registers within ``wait_s``; a simulation
    registers its nodes milliseconds after the ServerApp starts, whatever
    ``runtime.wait_for_nodes_s`` says, which is for real SuperNodes)."""
    start = time.monotonic()
    count, since = len(list(grid.get_node_ids())), start
    while True:
        now = time.monotonic()
        if count and now - since >= settle_s:
            return count
        if not count and now - start >= wait_s:
            return 0
        time.sleep(poll_s)
        new = len(list(grid.get_node_ids()))
        if new != count:
            count, since = new, time.monotonic()


def mismatch_message(nodes: int, num_workers: int) -> str:
    """What to do, in one line, when a simulation federation has ``nodes`` SuperNodes."""
    return (f"the federation has {nodes} simulated SuperNodes but num_workers={num_workers} "
            f"(one SuperNode per worker): run with --run-config 'num_workers={nodes} "
            f"task.num_workers={nodes}', or give the federation {num_workers} SuperNodes "
            f"(flwr run . --federation-config num-supernodes={num_workers})")


def check_simulation_size(grid, num_workers: int, wait_s: float = 60.0,
                          settle_s: float = 2.0) -> int:
    """Raise FederationMismatch unless the simulation federation has exactly
    ``num_workers`` SuperNodes; returns the count."""
    nodes = settled_node_count(grid, wait_s=wait_s, settle_s=settle_s)
    if nodes != num_workers:
        raise FederationMismatch(mismatch_message(nodes, num_workers))
    return nodes
