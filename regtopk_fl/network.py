"""Simulated communication time of a round, from the bytes that travelled.

``network.uplink_mbps``, ``network.downlink_mbps`` and ``network.latency_ms``
(all off by default) model every worker on its own link of those rates. A
round's communication time is then the broadcast (the largest message the
server sent: a resync outweighs a gradient) plus the slowest worker's upload,
plus one latency each way:

    comm_s = max_n down_n * 8 / downlink + max_n up_n * 8 / uplink + 2 * latency

Bytes are the coded bytes (what the messages carry). Computation time is not
included: ``comm_s`` isolates what sparsification changes. ``regtopk-plot``
draws loss/accuracy against its running sum.
"""
from __future__ import annotations

from omegaconf import OmegaConf


def settings(cfg) -> dict | None:
    """The network model of a config, or None when it is off."""
    up = OmegaConf.select(cfg, "network.uplink_mbps", default=None)
    down = OmegaConf.select(cfg, "network.downlink_mbps", default=None)
    if up is None and down is None:
        return None
    lat = OmegaConf.select(cfg, "network.latency_ms", default=None) or 0.0
    return {"uplink_mbps": up, "downlink_mbps": down, "latency_ms": float(lat)}


def comm_seconds(net: dict | None, up_bytes, down_bytes) -> float | None:
    """Communication time of one round (None when the network model is off).
    A link left unset (None) costs nothing."""
    if net is None:
        return None
    up, down = max(up_bytes, default=0), max(down_bytes, default=0)
    s = 2.0 * net["latency_ms"] / 1000.0
    if net["uplink_mbps"]:
        s += up * 8 / (float(net["uplink_mbps"]) * 1e6)
    if net["downlink_mbps"]:
        s += down * 8 / (float(net["downlink_mbps"]) * 1e6)
    return s
