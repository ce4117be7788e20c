"""The Flower ClientApp: one worker. Per train message it brings its model
replica up to date (applies the broadcast global gradient and checks the
server's digest, or takes the full model of a resync; strategies/wire.py),
applies the server's feedback on its last upload (read off the broadcast g),
computes its local update on its own partition, runs error feedback + the
configured sparsifier, and replies with a sparse ArrayRecord (coded indices,
values), the round and digest of the model it computed on, and a MetricRecord.
A replica it cannot bring up to date (missing, stale, digest mismatch) is
dropped and the message answered with an error (``REPLICA_STALE``): the
server then sends the full model next round. Nothing of such a round touches
the error-feedback memory.

Its error-feedback memory lives in ``context.state`` and so survives across
rounds in simulation and deployment. Settings come from the run config
(``flwr run``) or, under the Hydra launcher's simulation, from the closure
that :func:`make_client_app` builds.

On a SuperNode (``--node-config``): ``partition-id`` / ``num-partitions`` pick
the worker; ``data-path`` / ``cache-dir`` replace the task's paths on that node
(clients/cache.py); ``state-dir`` also keeps the memory in a file there
(written atomically after every round, one file per run and partition), so a
SuperNode that is killed and restarted, and so lost ``context.state``,
resumes with its residual intact; its model replica is kept there too. For
the server's checkpoints the app also answers ``query.checkpoint`` (its memory), ``query.identify`` and
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

import torch
from omegaconf import OmegaConf
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp

from regtopk_fl import faults
from regtopk_fl.broadcast import Replica
from regtopk_fl.fedround import Feedback, worker_round
from regtopk_fl.memory import ErrorFeedbackMemory, restore_rows
from regtopk_fl.payload import raw_bytes
from regtopk_fl.ray_cluster import ray_node_id
from regtopk_fl.results import atomic_write

from strategies import wire

from . import state_files
from strategies.sparse_strategy import memory_content, read_memory

from .cache import settings_and_build
from . import hostile  # faults.hostile: the reply as a hostile worker sends it (#11)

MEMORY_KEY = "ef-memory"
META_KEY = "ef-meta"  # {"last-round": round of the upload the memory holds}
REPLICA_KEY = "replica"  # the model replica (broadcast=gradient)
REPLICA_META_KEY = "replica-meta"  # {"round": the model round it holds}
FAULT_DROPPED = 900  # error code of an injected failure (faults.drop_prob)
WRONG_WORKER = 901  # a restore message meant for another partition
REPLICA_STALE = 902  # the replica could not be brought to the server's model

log = logging.getLogger(__name__)


def state_file(context: Context, what: str = "", cfg=None) -> Path | None:
    """The memory (or ``what="-replica"``) file of this node's partition and
    run: node config ``state-dir`` on a SuperNode, else the simulation's
    ``runtime.state_dir`` (strategies/server_app.py sets it). With a file,
    the J-sized tensors live only there and ``context.state`` keeps the
    round tags: the state then never travels with every message (Flower
    ships a node's Context to and from its ClientApp each time)."""
    node_config = context.node_config or {}
    state_dir = node_config.get("state-dir") or (
        None if cfg is None else OmegaConf.select(cfg, "runtime.state_dir", default=None))
    if not state_dir or state_dir == "auto":
        return None
    pid = int(node_config["partition-id"])
    return (Path(os.path.expanduser(str(state_dir)))
            / f"run-{context.run_id}-partition-{pid}{what}.pt")


def _inplace(context: Context, cfg) -> bool:
    """The simulation's scratch state dir (clients/state_files.py), not a
    SuperNode's ``state-dir`` (which keeps atomic whole-file writes)."""
    return (cfg is not None and not (context.node_config or {}).get("state-dir")
            and bool(OmegaConf.select(cfg, "runtime.state_inplace", default=False)))


def _opt_settings(cfg) -> tuple:
    return float(cfg.lr), float(cfg.momentum), float(cfg.weight_decay)


def load_replica(context: Context, cfg) -> Replica | None:
    """The model replica: from the state file when there is one, else
    ``context.state``; None when there is none."""
    path = state_file(context, "-replica", cfg)
    if path is not None and _inplace(context, cfg):
        state = state_files.load(path)
        return None if state is None else Replica.from_state(state, *_opt_settings(cfg),
                                                             copy=False)
    if path is not None and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return Replica.from_state(state, *_opt_settings(cfg), copy=False)
        except Exception as exc:  # unreadable: the server will resync us
            log.warning("ignoring unreadable replica file %s: %s", path, exc)
            return None
    if REPLICA_KEY not in context.state:
        return None
    rec = context.state[REPLICA_KEY]
    state = {k: wire.tensor(rec, k) for k in rec.keys()}
    state["round"] = int(context.state[REPLICA_META_KEY]["round"])
    return Replica.from_state(state, *_opt_settings(cfg))


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


class ReplicaError(RuntimeError):
    pass


def receive_model(content: RecordDict, context: Context, cfg, task):
    """(params, buffers, replica, step) for this round from the server's
    message: ``replica`` and ``step`` are None under broadcast=model, ``step``
    is None for a resync. Raises ReplicaError when the replica cannot be made
    equal to the server's model."""
    kind = str(content["config"].get("downlink", "model"))
    if kind == "model":
        arrays = content["arrays"]
        return (wire.tensor(arrays, "params"),
                wire.tensor(arrays, "buffers") if "buffers" in arrays else None, None, None)
    if kind == "full":
        replica, digest = wire.read_replica(content, *_opt_settings(cfg))
        if digest is not None and replica.digest() != digest:
            raise ReplicaError("the resync's model does not match its digest")
        return replica.params, replica.buffers, replica, None
    step = wire.read_step(content)
    replica = load_replica(context, cfg)
    if replica is None:  # model_0 comes from the seed: any worker can build it
        if step.round > 1:
            raise ReplicaError(f"no replica to apply round {step.round}'s gradient to")
        buffers = task.init_buffers()
        replica = Replica(task.init_params(), buffers, *_opt_settings(cfg))
    why = replica.apply(step)
    if why is not None:
        raise ReplicaError(why)
    return replica.params, replica.buffers, replica, step


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
    if path is not None and _inplace(context, cfg) and device == "cpu":
        saved = state_files.load(path)
        if saved is not None and saved["eps"].dtype == task.dtype:
            last = saved.pop("last_round")
            eps = saved.pop("eps").view(1, task.dim)  # the shared mapping itself
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
    state = {k: v.detach().cpu() for k, v in mem.state_dict(copy=False).items()}
    if last_round is not None:
        context.state[META_KEY] = MetricRecord({"last-round": int(last_round)})
    path = state_file(context, cfg=cfg)
    if path is not None and _inplace(context, cfg) and mem.eps.device.type == "cpu":
        state_files.save(path, state,  # eps: written only if it is not the mapping already
                         {"last_round": -1 if last_round is None else int(last_round)})
        if MEMORY_KEY in context.state:
            del context.state[MEMORY_KEY]
        return
    if path is not None:
        saved = {"memory": state, "last_round": -1 if last_round is None else int(last_round)}
        atomic_write(path, lambda fh: torch.save(saved, fh), "wb")
        if MEMORY_KEY in context.state:
            del context.state[MEMORY_KEY]
    else:
        context.state[MEMORY_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})


def read_feedback(content: RecordDict, device, step=None, memory=None):
    """The server's word on this worker's last upload, if any: a "rejected"
    notice carries no values, only ``feedback-meta``. Under broadcast=gradient
    the values are read off the broadcast g on the entries the memory sent
    (None, logged, when g does not cover them: a memory the server's upload
    record does not match)."""
    if "feedback-meta" not in content:
        return None
    meta = content["feedback-meta"]
    if bool(meta["rejected"]):
        return Feedback(None, 0.0, rejected=True)
    if "feedback" in content:
        return Feedback(wire.tensor(content["feedback"], "values", device), float(meta["weight"]))
    if step is None or memory is None:
        return None
    try:
        values = step.on(memory.prev_local.cpu().to(torch.int64))
    except ValueError as exc:
        log.warning("ignoring feedback: %s", exc)
        return None
    return Feedback(values.to(device), float(meta["weight"]))


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
    try:
        params, buffers, replica, step = receive_model(msg.content, context, cfg, task)
    except ReplicaError as exc:
        save_replica(context, None, cfg)
        return Message(Error(code=REPLICA_STALE, reason=f"worker {pid} round {t}: {exc}"),
                       reply_to=msg)
    memory = load_memory(context, task, device, cfg)
    fb = read_feedback(msg.content, device, step, memory)
    fb = usable_feedback(fb, msg.content, memory, pid, t)
    reply = worker_round(task, memory, sparsifier, params.to(device),
                         None if buffers is None else buffers.to(device), [fb], [pid], t,
                         int(cfg.local_steps), float(cfg.local_lr), weights=[1.0])[0]
    save_memory(context, memory, last_round=t, cfg=cfg)
    if replica is not None:
        save_replica(context, replica, cfg)
    up = reply.upload
    values = up.values.detach().cpu()
    if faults.corrupts(cfg.faults, cfg.seed, pid, t):
        values = torch.full_like(values, float("nan"))  # corrupted in transit
    upload = {"values": Array(values.numpy())}
    if up.indices is not None:
        upload["indices"] = wire.coded(up.indices.cpu(), up.dim)
    if reply.buffers is not None:
        upload["buffers"] = Array(reply.buffers.detach().cpu().numpy())
    metrics = MetricRecord({"num-examples": int(reply.num_examples), "loss": float(reply.loss),
                            "partition-id": pid, "sent": int(up.sent),
                            "uplink-bytes": int(raw_bytes(up))})
    content = RecordDict({"upload": ArrayRecord(upload), "metrics": metrics})
    if replica is not None:  # which model this upload was computed on
        content["replica-meta"] = ConfigRecord({"round": int(replica.round),
                                                "digest": replica.digest()})
    content = hostile.tamper(cfg.faults, pid, t, content, int(cfg.num_workers), task.dim)  # #11
    node = ray_node_id()  # #12: which Ray node ran this client (cluster placement)
    if node is not None:
        content["placement"] = ConfigRecord({"ray-node-id": node})
    return Message(content, reply_to=msg)


def _identity_reply(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


def handle_checkpoint(msg: Message, context: Context, settings=None) -> Message:
    """Reply with this worker's memory and the round of the upload it holds."""
    cfg, task, _, device = settings_and_build(context, settings)
    memory = load_memory(context, task, device, cfg)
    last = memory.last_round if memory.last_round is not None else -1
    pid = int(context.node_config["partition-id"])
    return Message(memory_content(pid, {"state": memory.state_dict(), "last_round": last}),
                   reply_to=msg)


def handle_restore(msg: Message, context: Context, settings=None) -> Message:
    """Replace this worker's memory by the one the server checkpointed."""
    cfg, task, _, device = settings_and_build(context, settings)
    pid, saved = read_memory(msg.content)
    if pid != int(context.node_config["partition-id"]):
        return Message(Error(code=WRONG_WORKER, reason=f"memory of worker {pid} sent to "
                             f"partition {context.node_config['partition-id']}"), reply_to=msg)
    memory = ErrorFeedbackMemory(1, task.dim, task.dtype, device)
    memory.load_state_dict(saved["state"])
    save_memory(context, memory, last_round=saved["last_round"], cfg=cfg)
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
