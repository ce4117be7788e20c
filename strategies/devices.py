"""No silent CPU: every node says in its identify answer which device it
computes on (protocol/wire.py), and a run whose clients compute elsewhere
than the run expects is stopped before round 1 with one line naming the
setting to change.

Under the launcher's simulation the run expects ``cuda`` exactly when each
client is given a share of a GPU (``runtime.client_gpus``, simulation/;
regtopk_fl/gpu_share.py says why a CUDA run gives every client one). A
client that still sees no CUDA device (a Ray node without a GPU, Ray hiding
them) would train on the CPU while the server's device is CUDA; one that
sees a GPU in a run on the CPU (a cluster node's GPU, under ``device=auto``
on a driver without one) would compute elsewhere than the run says. Under
``flwr run`` an explicit ``device=cpu|cuda`` is expected of every SuperNode
(``auto`` lets each node decide).
"""
from __future__ import annotations

import logging

from regtopk_fl.settings import ConfigError

log = logging.getLogger(__name__)


class DeviceMismatch(ConfigError):
    """A client computes on another device than the run's (exit status 2)."""


def mismatch(node, partition, found: str, expected: str, setting: str) -> str:
    """The one-line refusal."""
    who = f"node {node} (partition {partition}) computes on {found}"
    if expected == "cuda":
        return (f"{setting}: {who}, but this run's device is cuda: its process sees no CUDA "
                "device; give every client a GPU share (auto or a fraction in (0, 1]) on "
                "nodes that have a GPU")
    return (f"{setting}: {who}, but this run's device is {expected}: set device=cpu, or "
            "give every client a GPU share (a fraction in (0, 1]) with device=cuda")


def screen_devices(claims: list, devices: dict, expected: str | None, setting: str,
                   first_contact: bool) -> list:
    """The (node, partition) claims of nodes that compute on ``expected``.
    A node that computes elsewhere stops the run (DeviceMismatch) at first
    contact, before round 1; a node that joins later is left unbound (never
    sent the model), with a logged reason. A node that does not say (an
    older client) is let through with a warning."""
    if expected is None:
        return claims
    kept = []
    for node, partition in claims:
        found = devices.get(node)
        if found is None:
            log.warning("node %s (partition %s) does not say which device it computes on",
                        node, partition)
        elif found != expected:
            why = mismatch(node, partition, found, expected, setting)
            if first_contact:
                raise DeviceMismatch(why)
            log.warning("node %s not identified: %s", node, why)
            continue
        kept.append((node, partition))
    return kept
