"""Where a node keeps its state between messages: the error-feedback memory
and the model replica of its partition.

Three places, by where the ClientApp runs:

* a SuperNode's ``state-dir`` (node config): atomic whole-file writes, one
  file per run and partition, so a SuperNode that is killed and restarted,
  and so lost ``context.state``, resumes with its residual and replica;
* the launcher's simulation (``runtime.state_dir`` with
  ``runtime.state_inplace``): raw files on /dev/shm mapped shared and updated
  where they lie (clients/state_files.py);
* otherwise ``context.state`` (Flower ships it with every message).

With a file, the J-sized tensors live only there and ``context.state`` keeps
the round tags.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord

from protocol import wire
from regtopk_fl.broadcast import Replica
from regtopk_fl.memory import ErrorFeedbackMemory
from regtopk_fl.results import atomic_write

from . import state_files
from .cache import message_settings

MEMORY_KEY = "ef-memory"
META_KEY = "ef-meta"  # {"last-round": round of the upload the memory holds}
REPLICA_KEY = "replica"  # the model replica (broadcast=gradient)
REPLICA_META_KEY = "replica-meta"  # {"round": the model round it holds}

log = logging.getLogger(__name__)


def state_file(context: Context, what: str = "", cfg=None) -> Path | None:
    """The memory (or ``what="-replica"``) file of this node's partition and
    run: node config ``state-dir`` on a SuperNode, else the simulation's
    ``runtime.state_dir`` (simulation/ sets it). With a file,
    the J-sized tensors live only there and ``context.state`` keeps the
    round tags: the state then never travels with every message (Flower
    ships a node's Context to and from its ClientApp each time)."""
    node_config = context.node_config or {}
    state_dir = node_config.get("state-dir") or (
        None if cfg is None else message_settings(cfg).state_dir)
    if not state_dir or state_dir == "auto":
        return None
    pid = int(node_config["partition-id"])
    return (Path(os.path.expanduser(str(state_dir)))
            / f"run-{context.run_id}-partition-{pid}{what}.pt")


def _inplace(context: Context, cfg) -> bool:
    """The simulation's scratch state dir (clients/state_files.py), not a
    SuperNode's ``state-dir`` (which keeps atomic whole-file writes)."""
    return (cfg is not None and not (context.node_config or {}).get("state-dir")
            and message_settings(cfg).state_inplace)


def opt_settings(cfg) -> tuple:
    return message_settings(cfg).opt


def load_replica(context: Context, cfg) -> Replica | None:
    """The model replica: from the state file when there is one, else
    ``context.state``; None when there is none."""
    path = state_file(context, "-replica", cfg)
    if path is not None and _inplace(context, cfg):
        state = state_files.load(path)
        return None if state is None else Replica.from_state(state, *opt_settings(cfg),
                                                             copy=False)
    if path is not None and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return Replica.from_state(state, *opt_settings(cfg), copy=False)
        except Exception as exc:  # unreadable: the server will resync us
            log.warning("ignoring unreadable replica file %s: %s", path, exc)
            return None
    if REPLICA_KEY not in context.state:
        return None
    rec = context.state[REPLICA_KEY]
    state = {k: wire.tensor(rec, k) for k in rec.keys()}
    state["round"] = int(context.state[REPLICA_META_KEY]["round"])
    return Replica.from_state(state, *opt_settings(cfg))


def save_replica(context: Context, replica: Replica | None, cfg=None) -> None:
    """Keep (or, with None, forget) the replica: in the state file when there
    is one, else in context.state."""
    path = state_file(context, "-replica", cfg)
    if replica is None:
        for key in (REPLICA_KEY, REPLICA_META_KEY):
            if key in context.state:
                del context.state[key]
        if path is not None and _inplace(context, cfg):
            state_files.remove(path)
        elif path is not None and path.exists():
            path.unlink()
        return
    context.state[REPLICA_META_KEY] = MetricRecord({"round": int(replica.round)})
    if path is not None and _inplace(context, cfg):  # params/momentum updated where they lie
        state_files.save(path, {"params": replica.params, "momentum": replica.opt.buf,
                                "buffers": replica.buffers}, {"round": int(replica.round)})
        return
    state = replica.state_dict()
    if path is not None:
        atomic_write(path, lambda fh: torch.save(state, fh), "wb")
        if REPLICA_KEY in context.state:
            del context.state[REPLICA_KEY]
    else:
        context.state[REPLICA_KEY] = ArrayRecord({k: wire.array(v) for k, v in state.items()
                                                  if isinstance(v, torch.Tensor)})


def _load_state_file(path: Path, mem: ErrorFeedbackMemory, device):
    """Memory from the file into ``mem``; returns its last round (None: no file
    or unreadable, ``mem`` untouched)."""
    if not path.exists():
        return None
    try:
        # mmap: pages are read when touched (and copied on write), no bulk read
        saved = torch.load(path, map_location=device, weights_only=True, mmap=True)
        state = saved["memory"]
        if tuple(state["eps"].shape) not in ((1, mem.dim), (mem.dim,)):
            raise ValueError(f"eps of shape {tuple(state['eps'].shape)}, J={mem.dim}")
        mem.load_state_dict(state, copy=False)  # adopts what was just read
    except Exception as exc:  # a file of another shape/version: start from context.state
        log.warning("ignoring unreadable memory file %s: %s", path, exc)
        return None
    return int(saved["last_round"])


def load_memory(context: Context, task, device, cfg=None) -> ErrorFeedbackMemory:
    """The worker's memory: from ``state-dir`` when that file exists (it is
    written last in every round, so it is never older than context.state),
    else from ``context.state``. ``mem.last_round`` is the round of the upload
    it holds (None when unknown)."""
    path = state_file(context, cfg=cfg)
    if path is not None and _inplace(context, cfg):
        saved = state_files.load(path)
        if saved is not None and saved["eps"].dtype == task.dtype:
            last = saved.pop("last_round")
            eps = saved.pop("eps").view(1, task.dim)  # the shared mapping itself
            if str(device) != "cpu":  # a GPU client: a copy there, written back by save_memory
                state_files.pin_mapped()  # direct copies from and into the mapping
                eps = eps.to(device)
                saved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in saved.items()}
            mem = ErrorFeedbackMemory(1, task.dim, task.dtype, device, eps=eps)
            mem.load_state_dict(saved, copy=False)
            mem.last_round = None if last < 0 else int(last)
            return mem
    mem = ErrorFeedbackMemory(1, task.dim, task.dtype, device)
    mem.last_round = None
    if path is not None:
        mem.last_round = _load_state_file(path, mem, device)
        if mem.last_round is not None:
            return mem
        mem = ErrorFeedbackMemory(1, task.dim, task.dtype, device)  # nothing half-loaded
        mem.last_round = None
    if MEMORY_KEY in context.state:
        rec = context.state[MEMORY_KEY]
        mem.load_state_dict({k: wire.tensor(rec, k, device) for k in rec.keys()})
        if META_KEY in context.state:
            mem.last_round = int(context.state[META_KEY]["last-round"])
    return mem


def save_memory(context: Context, mem: ErrorFeedbackMemory, last_round: int | None = None,
                cfg=None) -> None:
    """The memory into the state file when there is one (context.state keeps
    the round tag), else into context.state."""
    if last_round is not None:
        context.state[META_KEY] = MetricRecord({"last-round": int(last_round)})
    path = state_file(context, cfg=cfg)
    if path is not None and _inplace(context, cfg):
        # eps: written only if it is not the mapping already (a GPU client's
        # is copied into it, device to host, without a second host copy)
        state_files.save(path, {k: v.detach() for k, v in mem.state_dict(copy=False, lazy=True).items()},
                         {"last_round": -1 if last_round is None else int(last_round)})
        if MEMORY_KEY in context.state:
            del context.state[MEMORY_KEY]
        return
    state = {k: v.detach().cpu() for k, v in mem.state_dict(copy=False, lazy=True).items()}
    if path is not None:
        saved = {"memory": state, "last_round": -1 if last_round is None else int(last_round)}
        atomic_write(path, lambda fh: torch.save(saved, fh), "wb")
        if MEMORY_KEY in context.state:
            del context.state[MEMORY_KEY]
    else:
        context.state[MEMORY_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
