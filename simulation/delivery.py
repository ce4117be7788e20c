"""Hand a pushed message to the simulated clients when it is pushed, not on
Flower's next 0.1 s tick.

Flower 1.41's Simulation Runtime moves the ServerApp's messages from its
LinkState to the workers that run the ClientApps in one thread,
``vce_api.add_messages_to_queue``: it asks the state for one message per node,
then sleeps 0.1 s, forever. Every message thus waits up to 0.1 s before a client
sees it, and a node with two messages waits a tick for the second. On a GPU a
Fig. 3 round computes in about 40 ms, so that tick, not the work, set Flower's
round time (0.20 s a round at N = 8 and at N = 64 alike, results/README.md).

``prompt_delivery()`` swaps that thread's function, for the duration of one
``flwr.simulation.run_simulation`` call, for one that

1. wakes as soon as the state stores a message for a client (the state's
   ``store_message_ins`` is wrapped to set an event), or after 0.1 s as before;
2. asks the nodes a message was stored for since the last pass for their
   next message (the wrapper notes each message's destination; the first
   pass asks every node, for what was stored before the wrapper was in
   place, and so does a pass after ``SWEEP_S`` seconds without a push);
3. asks again at once while a pass found any, so a second message to one node
   is not a tick late.

Flower's own thread asks all N nodes every pass, and the state scans every
stored message for each node it is asked about: at N = 10,000 a pass cost
more than the round's work (#34). Asking only the nodes that were sent
something makes a pass O(messages), whatever N is.

Which client gets which message, and what the messages hold, is unchanged;
only the wait goes. The swap is made only where the function is the one this
was written against (``flwr==1.41.0``, the same four arguments); anywhere else
Flower's own runs (one debug line). The Simulation Runtime that ``flwr run``
starts (its own ``flwr-simulation`` process) is not reached by this and keeps
its tick.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time

IDLE_S = 0.1  # Flower's tick: how long the thread sleeps when nothing was pushed
SWEEP_S = 10.0  # a pass asks every node again after this long without a push (a safety net)
FLWR_VERSION = "1.41.0"
_ARGS = ["state", "queue", "nodes_mapping", "f_stop"]

log = logging.getLogger(__name__)


def add_messages_when_pushed(state, queue, nodes_mapping, f_stop) -> None:
    """``vce_api.add_messages_to_queue`` that wakes on a push (steps 1-3 above)."""
    pushed = threading.Event()
    store = state.store_message_ins
    lock = threading.Lock()
    pending: dict = {}  # node id -> None: nodes a message was stored for since the last pass

    def store_and_wake(*args, **kwargs):
        out = store(*args, **kwargs)
        msg = args[0] if args else kwargs.get("message")
        node = getattr(getattr(msg, "metadata", None), "dst_node_id", None)
        with lock:
            pending[node] = None  # None (not a message?) makes the next pass ask everyone
        pushed.set()
        return out

    state.store_message_ins = store_and_wake  # this state object only
    last_push = time.monotonic()
    sweep = True  # (2) the first pass asks every node
    try:
        while not f_stop.is_set():
            pushed.clear()  # before the pass: a push during it is seen next time
            with lock:
                todo, pending = pending, {}
            if todo:
                last_push = time.monotonic()
            if sweep or None in todo or time.monotonic() - last_push >= SWEEP_S:
                todo, sweep, last_push = dict.fromkeys(nodes_mapping), False, time.monotonic()
            found = []
            for node_id in todo:  # (2)
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
                    found.append(node_id)
            if found:  # (3) ask these again at once: one may hold a second message
                with lock:
                    pending.update(dict.fromkeys(found))
            else:
                pushed.wait(IDLE_S)  # (1)
    finally:
        del state.store_message_ins  # the class's method again


def _swappable(vce_api) -> bool:
    import flwr

    fn = getattr(vce_api, "add_messages_to_queue", None)
    return (getattr(flwr, "__version__", None) == FLWR_VERSION and fn is not None
            and list(inspect.signature(fn).parameters) == _ARGS)


@contextlib.contextmanager
def prompt_delivery():
    """Within the block, the Simulation Runtime delivers messages when pushed."""
    from flwr.server.superlink.fleet.vce import vce_api

    if not _swappable(vce_api):
        import flwr

        log.warning("runtime.prompt_delivery: flwr %s's message thread is not the one of "
                    "flwr %s; messages wait for Flower's own tick (slower rounds, same "
                    "results)", getattr(flwr, "__version__", "?"), FLWR_VERSION)
        yield False
        return
    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = add_messages_when_pushed
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original


@contextlib.contextmanager
def node_directory(directory: dict):
    """Within the block, ``directory`` receives Flower's node id -> partition
    id table when the Simulation Runtime registers its nodes
    (``vce_api._register_nodes``, flwr 1.41): the server's hint of whom to
    identify first under client sampling (#34). Only a hint: each node still
    says its partition itself. Elsewhere (another flwr) it stays empty and
    the server finds the nodes by asking in batches."""
    from flwr.server.superlink.fleet.vce import vce_api

    import flwr

    original = getattr(vce_api, "_register_nodes", None)
    if original is None or getattr(flwr, "__version__", None) != FLWR_VERSION:
        yield directory
        return

    def register_and_note(*args, **kwargs):
        mapping = original(*args, **kwargs)
        directory.update({int(n): int(p) for n, p in mapping.items()})
        return mapping

    vce_api._register_nodes = register_and_note
    try:
        yield directory
    finally:
        vce_api._register_nodes = original
