"""The Flower ClientApp: one worker. Per train message it applies the server's
feedback on its last upload, computes its local update on its own partition,
runs error feedback + the configured sparsifier, and replies with a sparse
ArrayRecord (indices, values) and a MetricRecord.

Its error-feedback memory lives in ``context.state`` and so survives across
rounds in simulation and deployment. Settings come from the run config
(``flwr run``) or, under the Hydra launcher's simulation, from the closure
that :func:`make_client_app` builds.
"""
from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from regtopk_fl import faults
from regtopk_fl.fedround import Feedback, worker_round
from regtopk_fl.memory import ErrorFeedbackMemory
from regtopk_fl.payload import index_itemsize, raw_bytes

from .cache import settings_and_build

MEMORY_KEY = "ef-memory"
FAULT_DROPPED = 900  # error code of an injected failure (faults.drop_prob)


def _tensor(rec: ArrayRecord, key: str, device) -> torch.Tensor:
    return torch.from_numpy(rec[key].numpy()).to(device)


def load_memory(context: Context, task, device) -> ErrorFeedbackMemory:
    mem = ErrorFeedbackMemory(1, task.dim, task.dtype, device)
    if MEMORY_KEY in context.state:
        rec = context.state[MEMORY_KEY]
        mem.load_state_dict({k: _tensor(rec, k, device) for k in rec.keys()})
    return mem


def save_memory(context: Context, mem: ErrorFeedbackMemory) -> None:
    context.state[MEMORY_KEY] = ArrayRecord(
        {k: Array(v.detach().cpu().numpy()) for k, v in mem.state_dict().items()})


def read_feedback(content: RecordDict, device):
    if "feedback-meta" not in content:
        return None
    meta = content["feedback-meta"]
    if bool(meta["rejected"]):
        return Feedback(None, 0.0, rejected=True)
    return Feedback(_tensor(content["feedback"], "values", device), float(meta["weight"]))


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
    reply = worker_round(task, memory, sparsifier, params, buffers,
                         [read_feedback(msg.content, device)], [pid], t,
                         int(cfg.local_steps), float(cfg.local_lr), weights=[1.0])[0]
    save_memory(context, memory)
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
    return Message(RecordDict({"upload": ArrayRecord(upload), "metrics": metrics}), reply_to=msg)


def make_client_app(settings=None) -> ClientApp:
    """A ClientApp; ``settings`` (a plain dict of the resolved config) is used
    when the run config is empty, as under ``run_simulation``."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, settings)

    return client


# `flwr run` / SuperNode entry point (pyproject [tool.flwr.app.components])
app = make_client_app()
