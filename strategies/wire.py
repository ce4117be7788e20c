"""How the downlink and the uploads travel in Flower messages.

Indices always travel coded (regtopk_fl/payload.py: sorted-delta varints or a
bitmap, whichever is smaller), as a uint8 array of exactly the counted bytes,
never as int32 arrays. Values and dense tensors travel in the model dtype.

Server -> worker, content["config"]["downlink"] names the kind:
  "delta"  "step" {values, indices (coded; absent = dense g), buffers?} and
           "step-meta" {round, stepped, digest, dim}: the last round's g
  "full"   "replica" {params, buffers?, momentum?} and "replica-meta"
           {round, digest}: the whole model and optimizer state (a resync)
  "model"  "arrays" {params, buffers?}: broadcast=model
Worker -> server: "upload" {values, indices (coded; absent = dense),
buffers?}, "metrics" and, under broadcast=gradient, "replica-meta"
{round, digest} of the model the upload was computed on.
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from regtopk_fl.broadcast import GlobalStep, Replica
from regtopk_fl.payload import decode_indices, encode_indices


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


# -- delta: the last round's global step ------------------------------------------
def step_records(step: GlobalStep) -> dict:
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


# -- full: a resync -----------------------------------------------------------------
def replica_records(server, round: int, digest) -> dict:
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


def model_record(params: torch.Tensor, buffers) -> ArrayRecord:
    rec = {"params": array(params)}
    if buffers is not None:
        rec["buffers"] = array(buffers)
    return ArrayRecord(rec)
