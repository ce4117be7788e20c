"""The wire protocol: every message the server and a worker exchange, both
ways, as Flower records. The ClientApp (clients/) and the strategy
(strategies/) both speak it through this module and never import each other,
as in Flower's ``flwr new`` template.

Indices always travel coded (regtopk_fl/payload.py: sorted-delta varints or a
bitmap, whichever is smaller), as a uint8 array of exactly the counted bytes,
never as int32 arrays. Values and dense tensors travel in the model dtype.

Server -> worker
  train            "config" {server-round, downlink}; ``downlink`` names the kind:
                   "delta"  "step" {values, indices (coded; absent = dense g),
                            buffers?} and "step-meta" {round, stepped, digest,
                            dim}: the last round's global gradient
                   "patch"  "patch" {values, indices (coded), buffers?} and
                            "patch-meta" {round, base, digest, dim}: the
                            server's values of the entries that changed after
                            round ``base`` (a stale replica catches up)
                   "full"   "replica" {params, buffers?, momentum?} and
                            "replica-meta" {round, digest}: the whole model and
                            optimizer state (a resync)
                   "model"  "arrays" {params, buffers?}: broadcast=model
                   plus, when the server owes the worker a word on its last
                   upload, "feedback-meta" {weight, rejected, round?} and,
                   except with a delta (read off g there), "feedback" {values}
  query.identify   nothing
  query.checkpoint nothing
  query.restore    the worker's memory (:func:`memory_content`)
Worker -> server
  train            "upload" {values, indices (coded; absent = dense),
                   buffers?}, "metrics" {partition-id, num-examples, loss,
                   sent, uplink-bytes} and, under broadcast=gradient,
                   "replica-meta" {round, digest} of the model the upload was
                   computed on; under Ray, "placement" {ray-node-id};
                   "client-timing" {build, model, memory, compute, save,
                   encode: seconds the ClientApp spent on each phase of the
                   message} (its own word: recorded, never counted)
  query.identify   "metrics" {partition-id}, "node-device" {device: the
                   device it computes on, "cpu" or "cuda"; threads: its torch
                   CPU threads} and, when it holds
                   a replica, "replica-meta" {round, digest} of it (the server
                   checks the claim against its digest table before patching it)
  query.checkpoint its memory (:func:`memory_content`)
  errors           :data:`FAULT_DROPPED`, :data:`WRONG_WORKER`, :data:`REPLICA_STALE`
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from regtopk_fl.broadcast import GlobalStep, Patch, Replica
from regtopk_fl.fedround import Feedback, Reply
from regtopk_fl.payload import Upload, decode_indices, encode_indices, raw_bytes

FAULT_DROPPED = 900  # error code of an injected failure (faults.drop_prob)
WRONG_WORKER = 901  # a restore message meant for another partition
REPLICA_STALE = 902  # the replica could not be brought to the server's model


# -- tensors and indices ------------------------------------------------------------
def array(t: torch.Tensor) -> Array:
    return Array(t.detach().cpu().numpy())


def tensor(rec: ArrayRecord, key: str, device="cpu") -> torch.Tensor:
    return torch.from_numpy(rec[key].numpy()).to(device)


def coded(indices: torch.Tensor, dim: int) -> Array:
    return Array(np.frombuffer(encode_indices(indices, dim), dtype=np.uint8))


def uncoded(rec: ArrayRecord, key: str, dim: int) -> torch.Tensor:
    """Decode a coded index array; ValueError for anything else."""
    arr = rec[key].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"{key} must travel coded (uint8 bytes), got {arr.dtype}{list(arr.shape)}")
    return torch.from_numpy(decode_indices(arr, dim))


# -- server -> worker: the train message ----------------------------------------------
def step_records(step: GlobalStep) -> dict:
    """delta: the last round's global step (built once, sent to every node)."""
    rec = {"values": array(step.values)}
    if step.indices is not None:
        rec["indices"] = coded(step.indices, step.dim)
    if step.buffers is not None:
        rec["buffers"] = array(step.buffers)
    meta = {"round": int(step.round), "stepped": bool(step.stepped), "dim": int(step.dim)}
    if step.digest is not None:
        meta["digest"] = step.digest
    return {"step": ArrayRecord(rec), "step-meta": ConfigRecord(meta)}


def read_step(content) -> GlobalStep:
    rec, meta = content["step"], content["step-meta"]
    dim = int(meta["dim"])
    idx = uncoded(rec, "indices", dim) if "indices" in rec else None
    return GlobalStep(int(meta["round"]), tensor(rec, "values"), idx, dim, bool(meta["stepped"]),
                      tensor(rec, "buffers") if "buffers" in rec else None,
                      meta["digest"] if "digest" in meta else None)


def patch_records(patch: Patch) -> dict:
    """patch: a stale replica's catch-up (built once per base round)."""
    rec = {"values": array(patch.values), "indices": coded(patch.indices, patch.dim)}
    if patch.buffers is not None:
        rec["buffers"] = array(patch.buffers)
    meta = {"round": int(patch.round), "base": int(patch.base), "dim": int(patch.dim)}
    if patch.digest is not None:
        meta["digest"] = patch.digest
    return {"patch": ArrayRecord(rec), "patch-meta": ConfigRecord(meta)}


def read_patch(content) -> Patch:
    rec, meta = content["patch"], content["patch-meta"]
    dim = int(meta["dim"])
    return Patch(int(meta["round"]), int(meta["base"]), tensor(rec, "values"),
                 uncoded(rec, "indices", dim), dim,
                 tensor(rec, "buffers") if "buffers" in rec else None,
                 meta["digest"] if "digest" in meta else None)


def replica_records(server, round: int, digest) -> dict:
    """full: the server's model and optimizer state (a resync)."""
    rec = {"params": array(server.params)}
    if server.buffers is not None:
        rec["buffers"] = array(server.buffers)
    if server.opt.buf is not None:
        rec["momentum"] = array(server.opt.buf)
    meta = {"round": int(round)}
    if digest is not None:
        meta["digest"] = digest
    return {"replica": ArrayRecord(rec), "replica-meta": ConfigRecord(meta)}


def read_replica(content, lr, momentum, weight_decay) -> tuple:
    """(Replica, the digest the server sent with it or None)."""
    rec, meta = content["replica"], content["replica-meta"]
    state = {"params": tensor(rec, "params"), "round": int(meta["round"]),
             "buffers": tensor(rec, "buffers") if "buffers" in rec else None,
             "momentum": tensor(rec, "momentum") if "momentum" in rec else None}
    return (Replica.from_state(state, lr, momentum, weight_decay),
            meta["digest"] if "digest" in meta else None)


def model_records(params: torch.Tensor, buffers) -> dict:
    """model: the whole model (broadcast=model)."""
    rec = {"params": array(params)}
    if buffers is not None:
        rec["buffers"] = array(buffers)
    return {"arrays": ArrayRecord(rec)}


def read_model(content) -> tuple:
    """(params, buffers or None) of a broadcast=model message."""
    arrays = content["arrays"]
    return tensor(arrays, "params"), tensor(arrays, "buffers") if "buffers" in arrays else None


def train_content(server_round: int, kind: str, records: dict, feedback: Feedback | None = None,
                  feedback_round: int | None = None) -> RecordDict:
    """A train message: the downlink ``records`` of its ``kind`` and the
    server's word on the worker's last upload (``feedback_round``: which
    upload it is about)."""
    content = RecordDict({"config": ConfigRecord({"server-round": int(server_round),
                                                  "downlink": kind})})
    for key, rec in records.items():
        content[key] = rec
    if feedback is not None:
        meta = {"weight": float(feedback.weight), "rejected": bool(feedback.rejected)}
        if feedback_round is not None:
            meta["round"] = int(feedback_round)
        content["feedback-meta"] = ConfigRecord(meta)
        if feedback.values is not None and kind != "delta":  # delta: read off g
            content["feedback"] = ArrayRecord({"values": array(feedback.values)})
    return content


def read_train(content) -> tuple:
    """(server round, downlink kind) of a train message."""
    config = content["config"]
    return int(config["server-round"]), str(config.get("downlink", "model"))


def read_feedback(content, device="cpu") -> tuple:
    """(Feedback or None, the round of the upload it is about or None).
    Under a delta the Feedback has no values yet: the worker reads them off
    the broadcast g (``Feedback.values`` None and ``rejected`` False)."""
    if "feedback-meta" not in content:
        return None, None
    meta = content["feedback-meta"]
    about = int(meta["round"]) if "round" in meta else None
    if bool(meta["rejected"]):
        return Feedback(None, 0.0, rejected=True), about
    values = tensor(content["feedback"], "values", device) if "feedback" in content else None
    return Feedback(values, float(meta["weight"])), about


# -- worker -> server: the train reply --------------------------------------------------
def reply_content(reply: Reply, replica: Replica | None = None) -> RecordDict:
    """A worker's reply: its upload (indices coded), its claims and, under
    broadcast=gradient, which model it computed on."""
    up = reply.upload
    upload = {"values": array(up.values)}
    if up.indices is not None:
        upload["indices"] = coded(up.indices.cpu(), up.dim)
    if reply.buffers is not None:
        upload["buffers"] = array(reply.buffers)
    metrics = MetricRecord({"num-examples": int(reply.num_examples), "loss": float(reply.loss),
                            "partition-id": int(reply.worker), "sent": int(up.sent),
                            "uplink-bytes": int(raw_bytes(up))})
    content = RecordDict({"upload": ArrayRecord(upload), "metrics": metrics})
    if replica is not None:
        content["replica-meta"] = ConfigRecord({"round": int(replica.round),
                                                "digest": replica.digest()})
    return content


def read_reply(content, dim: int) -> Reply:
    """The Reply a message claims to be; raises (KeyError, ValueError, ...)
    when it is malformed. What it claims is checked later (identity, trust)."""
    metrics = content["metrics"]
    up = content["upload"]
    values = tensor(up, "values")
    indices = uncoded(up, "indices", dim) if "indices" in up else None
    buffers = tensor(up, "buffers") if "buffers" in up else None
    n_ex = metrics["num-examples"]
    reply = Reply(int(metrics["partition-id"]), Upload(values, indices, dim),
                  n_ex if isinstance(n_ex, int) else -1,
                  float(metrics.get("loss", float("nan"))), buffers)
    if "replica-meta" in content:
        meta = content["replica-meta"]
        reply.replica_round = int(meta["round"])
        reply.digest = meta["digest"] if "digest" in meta else None
    return reply


def replace_upload(content, reply: Reply) -> RecordDict:
    """``content`` (a train reply) with its upload and num-examples taken from
    ``reply``, every other record as it was: how a hostile worker or a
    network adversary rewrites a reply (faults.hostile; never an honest path).
    Indices travel coded, as an honest upload's do."""
    up = reply.upload
    upload = {"values": array(up.values)}
    if up.indices is not None:
        upload["indices"] = coded(up.indices.cpu(), up.dim)
    if "buffers" in content["upload"]:
        upload["buffers"] = content["upload"]["buffers"]
    metrics = {k: content["metrics"][k] for k in content["metrics"].keys()}
    metrics["num-examples"] = int(reply.num_examples)
    out = RecordDict({k: content[k] for k in content.keys() if k not in ("metrics", "upload")})
    out["metrics"] = MetricRecord(metrics)
    out["upload"] = ArrayRecord(upload)
    return out


TIMING_PHASES = ("build", "model", "memory", "compute", "save", "encode")
MAX_PHASE_S = 1e6  # a phase claimed longer than this (or NaN) is not plausible


def timing_record(seconds: dict) -> MetricRecord:
    """How long the ClientApp spent on each phase of a train message."""
    return MetricRecord({p: float(seconds[p]) for p in TIMING_PHASES if p in seconds})


def read_timing(content) -> dict | None:
    """A reply's phase times ({phase: seconds}), or None when it has none or
    they are not plausible (a missing or unknown phase, a value that is not
    a number in [0, MAX_PHASE_S]: huge finite values would make the sum
    inf). A client's own word: it is recorded, never counted in anything the
    server decides."""
    if "client-timing" not in content:
        return None
    try:
        rec = content["client-timing"]
        if set(rec.keys()) != set(TIMING_PHASES):
            return None
        out = {p: float(rec[p]) for p in TIMING_PHASES}
    except (KeyError, TypeError, ValueError):
        return None
    return out if all(0 <= v <= MAX_PHASE_S for v in out.values()) else None


def placement_record(ray_node: str) -> ConfigRecord:
    return ConfigRecord({"ray-node-id": str(ray_node)})


def read_placement(content) -> str | None:
    """The Ray node that computed a reply (None outside Ray)."""
    return str(content["placement"]["ray-node-id"]) if "placement" in content else None


# -- queries: identify, checkpoint, restore ----------------------------------------------
def identity_content(partition: int, *, device: str | None = None,
                     replica: Replica | None = None, threads: int | None = None) -> RecordDict:
    """A node's identify answer: its partition, the device it computes on
    (and with how many torch CPU threads) and, when it holds a replica, that
    replica's round and digest (claims the server checks)."""
    content = RecordDict({"metrics": MetricRecord({"partition-id": int(partition)})})
    if device is not None:
        node = {"device": str(device)}
        if threads is not None:
            node["threads"] = int(threads)
        content["node-device"] = ConfigRecord(node)
    if replica is not None:
        content["replica-meta"] = ConfigRecord({"round": int(replica.round),
                                                "digest": replica.digest()})
    return content


def read_identity(content) -> int:
    """The partition a node claims (raises when it claims none)."""
    return int(content["metrics"]["partition-id"])


def read_device(content) -> str | None:
    """The device a node says it computes on (None: it does not say)."""
    if "node-device" not in content:
        return None
    return str(content["node-device"]["device"])


def read_threads(content) -> int | None:
    """The torch CPU threads a node says it computes with (None: it does not say)."""
    if "node-device" not in content or "threads" not in content["node-device"]:
        return None
    return int(content["node-device"]["threads"])


def read_replica_claim(content) -> tuple | None:
    """(round, digest) of the replica an identify answer claims, None when it
    claims none; raises (KeyError, ValueError, TypeError) when malformed."""
    if "replica-meta" not in content:
        return None
    meta = content["replica-meta"]
    digest = meta["digest"]
    if not isinstance(digest, bytes):
        raise TypeError(f"digest must be bytes, got {type(digest).__name__}")
    return int(meta["round"]), digest


def memory_content(worker: int, memory: dict) -> RecordDict:
    """A worker's error-feedback memory ({"state": tensors, "last_round": int})
    as message content (checkpoint and restore)."""
    arrays = {k: array(v) for k, v in memory["state"].items()}
    return RecordDict({"memory": ArrayRecord(arrays), "metrics": MetricRecord(
        {"partition-id": int(worker), "last-round": int(memory["last_round"])})})


def read_memory(content) -> tuple:
    """(worker, {"state": tensors, "last_round": int}): inverse of memory_content."""
    meta = content["metrics"]
    state = {k: torch.from_numpy(a.numpy().copy()) for k, a in content["memory"].items()}
    return int(meta["partition-id"]), {"state": state, "last_round": int(meta["last-round"])}
