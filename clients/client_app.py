"""The Flower ClientApp: one worker. Per train message it applies the server's
feedback on its last upload, computes its local update on its own partition,
runs error feedback + the configured sparsifier, and replies with a sparse
ArrayRecord (indices, values) and a MetricRecord.

Its error-feedback memory lives in ``context.state`` and so survives across
rounds in simulation and deployment. Settings come from the run config
(``flwr run``) or, under the Hydra launcher's simulation, from the closure
that :func:`make_client_app` builds.

On a SuperNode (``--node-config``): ``partition-id`` / ``num-partitions`` pick
the worker; ``data-path`` / ``cache-dir`` replace the task's paths on that node
(clients/cache.py); ``state-dir`` also keeps the memory in a file there
(written atomically after every round, one file per run and partition), so a
SuperNode that is killed and restarted, and so lost ``context.state``,
resumes with its residual intact. For the server's checkpoints the app also
answers ``query.checkpoint`` (its memory), ``query.identify`` and
``query.restore`` (take this memory back, after the server resumed a run;
strategies/sparse_strategy.py). Feedback about an upload the memory does
not hold (a fresh node, or an upload the server never received) is ignored
with a log line; in the latter case the lost upload is put back into the
residual, as for a rejected one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp

from regtopk_fl import faults
from regtopk_fl.fedround import Feedback, worker_round
from regtopk_fl.memory import ErrorFeedbackMemory, restore_rows
from regtopk_fl.payload import index_itemsize, raw_bytes
from regtopk_fl.ray_cluster import ray_node_id
from regtopk_fl.results import atomic_write

from strategies.sparse_strategy import memory_content, read_memory

from .cache import settings_and_build

MEMORY_KEY = "ef-memory"
META_KEY = "ef-meta"  # {"last-round": round of the upload the memory holds}
FAULT_DROPPED = 900  # error code of an injected failure (faults.drop_prob)
WRONG_WORKER = 901  # a restore message meant for another partition

log = logging.getLogger(__name__)


def _tensor(rec: ArrayRecord, key: str, device) -> torch.Tensor:
    return torch.from_numpy(rec[key].numpy()).to(device)


def state_file(context: Context) -> Path | None:
    """The memory file of this node's partition and run (node config ``state-dir``)."""
    node_config = context.node_config or {}
    state_dir = node_config.get("state-dir")
    if not state_dir:
        return None
    pid = int(node_config["partition-id"])
    return Path(os.path.expanduser(str(state_dir))) / f"run-{context.run_id}-partition-{pid}.pt"


def _load_state_file(path: Path, mem: ErrorFeedbackMemory, device):
    """Memory from the file into ``mem``; returns its last round (None: no file
    or unreadable, ``mem`` untouched)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        probe = ErrorFeedbackMemory(1, mem.dim, mem.eps.dtype, device)
        probe.load_state_dict(saved["memory"])
    except Exception as exc:  # a file of another shape/version: start from context.state
        log.warning("ignoring unreadable memory file %s: %s", path, exc)
        return None
    mem.load_state_dict(probe.state_dict())
    return int(saved["last_round"])


def load_memory(context: Context, task, device) -> ErrorFeedbackMemory:
    """The worker's memory: from ``state-dir`` when that file exists (it is
    written last in every round, so it is never older than context.state),
    else from ``context.state``. ``mem.last_round`` is the round of the upload
    it holds (None when unknown)."""
    mem = ErrorFeedbackMemory(1, task.dim, task.dtype, device)
    mem.last_round = None
    path = state_file(context)
    if path is not None:
        mem.last_round = _load_state_file(path, mem, device)
        if mem.last_round is not None:
            return mem
    if MEMORY_KEY in context.state:
        rec = context.state[MEMORY_KEY]
        mem.load_state_dict({k: _tensor(rec, k, device) for k in rec.keys()})
        if META_KEY in context.state:
            mem.last_round = int(context.state[META_KEY]["last-round"])
    return mem


def save_memory(context: Context, mem: ErrorFeedbackMemory, last_round: int | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in mem.state_dict().items()}
    context.state[MEMORY_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    if last_round is not None:
        context.state[META_KEY] = MetricRecord({"last-round": int(last_round)})
    path = state_file(context)
    if path is not None:
        saved = {"memory": state, "last_round": -1 if last_round is None else int(last_round)}
        atomic_write(path, lambda fh: torch.save(saved, fh), "wb")


def read_feedback(content: RecordDict, device):
    """The server's word on this worker's last upload, if any: a "rejected"
    notice carries no values, only ``feedback-meta``."""
    if "feedback-meta" not in content:
        return None
    meta = content["feedback-meta"]
    if bool(meta["rejected"]):
        return Feedback(None, 0.0, rejected=True)
    return Feedback(_tensor(content["feedback"], "values", device), float(meta["weight"]))


def usable_feedback(fb, content: RecordDict, memory: ErrorFeedbackMemory, pid: int, t: int):
    """``fb`` if it is about the upload ``memory`` holds, else None (logged).

    The server tags feedback with the round of the upload it refers to. If the
    memory's last upload is a later one, the server never received that upload
    (the node died or timed out before its reply arrived): it goes back into
    the residual, exactly as a rejected upload does. Feedback whose length does
    not match the memory's last upload (a fresh node without saved state) is
    ignored; the node goes on as one without feedback."""
    if fb is None:
        return None
    meta = content["feedback-meta"]
    fb_round = int(meta["round"]) if "round" in meta else None
    last = getattr(memory, "last_round", None)
    if fb_round is not None and last is not None and last >= 0 and fb_round != last:
        if last > fb_round:
            log.warning("worker %d round %d: feedback is about round %d but the last upload "
                        "was round %d, which the server never received; restoring it into "
                        "the residual", pid, t, fb_round, last)
            restore_rows(memory, [0])
        else:
            log.warning("worker %d round %d: ignoring feedback about round %d: the memory "
                        "only holds round %d", pid, t, fb_round, last)
        return None
    if not fb.rejected and fb.values.numel() != memory.prev_sent.numel():
        log.warning("worker %d round %d: ignoring feedback of length %d: the memory holds "
                    "no matching upload (%d entries; a fresh or restarted node without "
                    "saved state)", pid, t, fb.values.numel(), memory.prev_sent.numel())
        return None
    return fb


def handle_train(msg: Message, context: Context, settings=None) -> Message:
    cfg, task, sparsifier, device = settings_and_build(context, settings)
    pid = int(context.node_config["partition-id"])
    t = int(msg.content["config"]["server-round"])
    if faults.drops(cfg.faults, cfg.seed, pid, t):
        return Message(Error(code=FAULT_DROPPED, reason=f"injected failure (faults.drop_prob) "
                             f"of worker {pid} in round {t}"), reply_to=msg)
    arrays = msg.content["arrays"]
    params = _tensor(arrays, "params", device)
    buffers = _tensor(arrays, "buffers", device) if "buffers" in arrays else None
    memory = load_memory(context, task, device)
    fb = usable_feedback(read_feedback(msg.content, device), msg.content, memory, pid, t)
    reply = worker_round(task, memory, sparsifier, params, buffers, [fb], [pid], t,
                         int(cfg.local_steps), float(cfg.local_lr), weights=[1.0])[0]
    save_memory(context, memory, last_round=t)
    up = reply.upload
    values = up.values.detach().cpu()
    if faults.corrupts(cfg.faults, cfg.seed, pid, t):
        values = torch.full_like(values, float("nan"))  # corrupted in transit
    upload = {"values": Array(values.numpy())}
    if up.indices is not None:
        idx_dtype = np.int32 if index_itemsize(up.dim) == 4 else np.int64
        upload["indices"] = Array(up.indices.cpu().numpy().astype(idx_dtype))
    if reply.buffers is not None:
        upload["buffers"] = Array(reply.buffers.detach().cpu().numpy())
    metrics = MetricRecord({"num-examples": int(reply.num_examples), "loss": float(reply.loss),
                            "partition-id": pid, "sent": int(up.sent),
                            "uplink-bytes": int(raw_bytes(up))})
    content = RecordDict({"upload": ArrayRecord(upload), "metrics": metrics})
    node = ray_node_id()  # #12: which Ray node ran this client (cluster placement)
    if node is not None:
        content["placement"] = ConfigRecord({"ray-node-id": node})
    return Message(content, reply_to=msg)


def _identity_reply(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


def handle_checkpoint(msg: Message, context: Context, settings=None) -> Message:
    """Reply with this worker's memory and the round of the upload it holds."""
    _, task, _, device = settings_and_build(context, settings)
    memory = load_memory(context, task, device)
    last = memory.last_round if memory.last_round is not None else -1
    pid = int(context.node_config["partition-id"])
    return Message(memory_content(pid, {"state": memory.state_dict(), "last_round": last}),
                   reply_to=msg)


def handle_restore(msg: Message, context: Context, settings=None) -> Message:
    """Replace this worker's memory by the one the server checkpointed."""
    _, task, _, device = settings_and_build(context, settings)
    pid, saved = read_memory(msg.content)
    if pid != int(context.node_config["partition-id"]):
        return Message(Error(code=WRONG_WORKER, reason=f"memory of worker {pid} sent to "
                             f"partition {context.node_config['partition-id']}"), reply_to=msg)
    memory = ErrorFeedbackMemory(1, task.dim, task.dtype, device)
    memory.load_state_dict(saved["state"])
    save_memory(context, memory, last_round=saved["last_round"])
    return _identity_reply(msg, context)


def make_client_app(settings=None) -> ClientApp:
    """A ClientApp; ``settings`` (a plain dict of the resolved config) is used
    when the run config is empty, as under ``run_simulation``."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, settings)

    @client.query("checkpoint")
    def checkpoint(msg: Message, context: Context) -> Message:
        return handle_checkpoint(msg, context, settings)

    @client.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        return _identity_reply(msg, context)

    @client.query("restore")
    def restore(msg: Message, context: Context) -> Message:
        return handle_restore(msg, context, settings)

    return client


# `flwr run` / SuperNode entry point (pyproject [tool.flwr.app.components])
app = make_client_app()
