"""The ClientApp's side of ``faults.hostile`` (regtopk_fl/hostile.py): rewrite
an honest train reply into the configured attack. The worker's memory was
already saved from the honest computation; only what travels is changed.
Upload attacks go through the framework-free ``hostile.tamper_upload`` (the
same function the in-process engine uses); message attacks (wire format,
identity) are made here. Byzantine attacks need the round's other uploads:
strategies/hostile_grid.py makes those."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from protocol import wire
from regtopk_fl import hostile
from regtopk_fl.payload import _varint_encode, decode_indices


def _coded(indices: np.ndarray) -> np.ndarray:
    """Varint-coded indices as a blob, *without* the encoder's checks, so a
    hostile worker can send what no honest encoder would (a delta of 0 is a
    duplicate; an index past J decodes as one)."""
    idx = np.asarray(indices, np.int64)
    deltas = np.diff(idx, prepend=0)
    return np.concatenate([[0], _varint_encode(deltas)]).astype(np.uint8)


def _arrays(rec: ArrayRecord) -> dict:
    return {k: rec[k].numpy().copy() for k in rec.keys()}


def tamper(fault_cfg, pid: int, t: int, content: RecordDict, num_partitions: int,
           dim: int, budget=None) -> RecordDict:
    """``content`` as the hostile worker sends it in round ``t`` (unchanged
    when ``pid`` behaves in ``t`` or makes a Byzantine attack, which the grid
    wrapper makes). ``budget``: the run's upload budget (over_budget)."""
    attack = hostile.attack(fault_cfg, pid, t)
    if attack is None or attack == "absent" or attack in hostile.BYZANTINE:
        return content
    if attack in hostile.UPLOAD_ATTACKS:
        return wire.replace_upload(content, hostile.tamper_upload(
            attack, wire.read_reply(content, dim), budget))
    up = _arrays(content["upload"])
    metrics = {k: content["metrics"][k] for k in content["metrics"].keys()}
    v, i = up["values"], up.get("indices")
    if i is not None:  # indices travel coded (protocol/wire.py)
        i = decode_indices(i, dim)
    if attack.startswith("index_") and (i is None or i.size < 2):
        raise ValueError(f"attack {attack} needs a sparse upload of at least 2 entries")
    if attack == "index_out_of_range":
        i[-1] = dim
        up["indices"] = _coded(i)
    elif attack == "index_negative":  # not expressible coded: sent as a raw int array
        i[0] = -1
        up["indices"] = i
    elif attack == "index_duplicate":
        i[1] = i[0]
        up["indices"] = _coded(i)
    elif attack == "index_unsorted":  # not expressible coded: sent as a raw int array
        up["indices"], up["values"] = i[::-1].copy(), v[::-1].copy()
    elif attack == "index_float":
        up["indices"] = i.astype(np.float64)
    elif attack == "length_mismatch":
        up["values"] = v[:-1].copy()
    elif attack == "values_2d":
        up["values"] = v.reshape(-1, 1).copy()
    elif attack == "wrong_dtype":
        up["values"] = v.astype(np.float32 if v.dtype == np.float64 else np.float64)
    elif attack == "wrong_dim":
        up.pop("indices", None)
        up["values"] = np.zeros(dim + 1, dtype=v.dtype)
    elif attack == "missing_values":
        up.pop("values")
    elif attack == "missing_num_examples":
        metrics.pop("num-examples")
    elif attack == "impersonate":
        metrics["partition-id"] = (pid + 1) % num_partitions
    elif attack == "unknown_partition":
        metrics["partition-id"] = num_partitions + 95
    out = RecordDict({k: content[k] for k in content.keys()
                      if k not in ("metrics", "upload")})  # e.g. replica-meta, as sent
    out["metrics"] = MetricRecord(metrics)
    if attack != "missing_upload":
        out["upload"] = ArrayRecord({k: Array(a) for k, a in up.items()})
    return out
