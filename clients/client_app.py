"""The Flower ClientApp: one worker. Per train message it brings its model
replica up to date (applies the broadcast global gradient, or sets the
entries of a catch-up patch, and checks the server's digest; or takes the
full model of a resync),
applies the server's feedback on its last upload (read off the broadcast g),
computes its local update on its own partition, runs error feedback + the
configured sparsifier, and replies with a sparse ArrayRecord (coded indices,
values), the round and digest of the model it computed on, and a MetricRecord.
A replica it cannot bring up to date (missing, stale, digest mismatch) is
dropped and the message answered with an error (``REPLICA_STALE``): the
server then sends the full model next round. A patch from round 0 needs no
replica: the worker builds model_0 from the seed, as in round 1. Nothing of such a round touches
the error-feedback memory.

Its error-feedback memory and replica survive across rounds in
``context.state`` or a state file (clients/node_state.py). Every message it
reads or writes is built by protocol/wire.py. Settings come from the run config
(``flwr run``) or, under the Hydra launcher's simulation, from the closure
that :func:`make_client_app` builds.

On a SuperNode (``--node-config``): ``partition-id`` / ``num-partitions`` pick
the worker; ``data-path`` / ``cache-dir`` replace the task's paths on that node
(clients/cache.py); ``state-dir`` keeps the memory and the replica in files
there (clients/node_state.py), so a SuperNode that is killed and restarted
resumes with its residual intact. The app also answers ``query.identify``
(its partition, the device it computes on and the round and digest of the
replica it holds, so that a restarted node or every node of a resumed run is
patched from there), ``query.checkpoint`` (its memory, for the server's
checkpoints) and ``query.restore`` (take this memory back, after the server
resumed a run). Feedback about an upload the memory does
not hold (a fresh node, or an upload the server never received) is ignored
with a log line; in the latter case the lost upload is put back into the
residual, as for a rejected one.
"""
from __future__ import annotations

import logging
import time

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import OmegaConf

from protocol import wire
from regtopk_fl import faults
from regtopk_fl.broadcast import Replica
from regtopk_fl.device import compute_device
from regtopk_fl.fedround import Feedback, worker_round
from regtopk_fl.memory import ErrorFeedbackMemory, restore_rows
from regtopk_fl.ray_cluster import ray_node_id

from . import hostile  # faults.hostile: the reply as a hostile worker sends it (#11)
from . import device_model, state_files
from .cache import match_cpu_share, message_settings, settings_and_build, settings_of
from .node_state import load_memory, load_replica, opt_settings, save_memory, save_replica

log = logging.getLogger(__name__)


class ReplicaError(RuntimeError):
    pass


def seed_replica(task, cfg) -> Replica:
    """model_0, built from the seed as every worker can (no message needed)."""
    return Replica(task.init_params(), task.init_buffers(), *opt_settings(cfg))


def receive_model(content: RecordDict, context: Context, cfg, task):
    """(params, buffers, replica, step) for this round from the server's
    message: ``replica`` and ``step`` are None under broadcast=model, ``step``
    is None for a resync or a patch. Raises ReplicaError when the replica
    cannot be made equal to the server's model."""
    _, kind = wire.read_train(content)
    if kind == "model":
        return (*wire.read_model(content), None, None)
    if kind == "full":
        replica, digest = wire.read_replica(content, *opt_settings(cfg))
        if digest is not None and replica.digest() != digest:
            raise ReplicaError("the resync's model does not match its digest")
        return replica.params, replica.buffers, replica, None
    if kind == "patch":
        patch = wire.read_patch(content)
        replica = load_replica(context, cfg)
        if replica is None or not patch.base <= replica.round <= patch.round:
            if patch.base != 0:
                raise ReplicaError(f"no replica of a round in [{patch.base}, {patch.round}] "
                                   f"to patch ({'none' if replica is None else replica.round})")
            replica = seed_replica(task, cfg)  # a patch from model_0
        why = replica.patch(patch)
        if why is not None:
            raise ReplicaError(why)
        return replica.params, replica.buffers, replica, None
    step = wire.read_step(content)
    replica = load_replica(context, cfg)
    if step.round <= 1 and (replica is None or replica.round not in (step.round - 1, step.round)):
        replica = seed_replica(task, cfg)  # model_0 comes from the seed: any worker can build it
    elif replica is None:
        raise ReplicaError(f"no replica to apply round {step.round}'s gradient to")
    why = replica.apply(step)
    if why is not None:
        raise ReplicaError(why)
    return replica.params, replica.buffers, replica, step


def read_feedback(content: RecordDict, device, step=None, memory=None):
    """The server's word on this worker's last upload, if any: a "rejected"
    notice carries no values. Under broadcast=gradient the values are read off
    the broadcast g on the entries the memory sent (None, logged, when g does
    not cover them: a memory the server's upload record does not match)."""
    fb, _ = wire.read_feedback(content, device)
    if fb is None or fb.rejected or fb.values is not None:
        return fb
    if step is None or memory is None:
        return None
    try:
        values = step.on(memory.prev_local.cpu().to(torch.int64))
    except ValueError as exc:
        log.warning("ignoring feedback: %s", exc)
        return None
    return Feedback(values.to(device), fb.weight)


def usable_feedback(fb, content: RecordDict, memory: ErrorFeedbackMemory, pid: int, t: int):
    """``fb`` if it is about the upload ``memory`` holds, else None (logged).

    The server tags feedback with the round of the upload it refers to. If the
    memory's last upload is a later one, the server never received that upload
    (the node died or timed out before its reply arrived): it goes back into
    the residual, exactly as a rejected upload does. Feedback whose length does
    not match the memory's last upload (a fresh node without saved state) is
    ignored; the node goes on as one without feedback. A message without
    any feedback while the memory holds an upload means the server never
    received this worker's first upload (#35: a reply after its round's
    timeout): it goes back into the residual too."""
    if fb is None:
        last = getattr(memory, "last_round", None)
        if "feedback-meta" not in content and last is not None and last >= 0:
            log.warning("worker %d round %d: no feedback although the last upload was round "
                        "%d, which the server never received; restoring it into the residual",
                        pid, t, last)
            restore_rows(memory, [0])
        return None
    _, fb_round = wire.read_feedback(content)
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


class PhaseClock:
    """Seconds between marks: ``mark(phase)`` ends a phase begun at the last
    mark (or at creation). What the client reports in "client-timing". On
    CUDA each mark waits for the queued work first, so a phase's kernels
    count in that phase, not in the next one that syncs."""

    def __init__(self):
        self.seconds, self._last, self.device = {}, time.perf_counter(), None

    def mark(self, phase: str) -> None:
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def handle_train(msg: Message, context: Context, settings=None) -> Message:
    clock = PhaseClock()  # where a message's time goes (wire.TIMING_PHASES)
    cfg, task, sparsifier, device = settings_and_build(context, settings)
    run = message_settings(cfg)
    clock.mark("build")
    clock.device = device
    pid = int(context.node_config["partition-id"])
    t, _ = wire.read_train(msg.content)
    if faults.drops(run.faults, run.seed, pid, t):
        return Message(Error(code=wire.FAULT_DROPPED, reason=f"injected failure "
                             f"(faults.drop_prob) of worker {pid} in round {t}"), reply_to=msg)
    try:
        params, buffers, replica, step = receive_model(msg.content, context, cfg, task)
    except ReplicaError as exc:
        save_replica(context, None, cfg)
        return Message(Error(code=wire.REPLICA_STALE, reason=f"worker {pid} round {t}: {exc}"),
                       reply_to=msg)
    if torch.device(device).type == "cuda":
        state_files.pin_mapped()  # the replica's mapping: a direct copy to the GPU
        if replica is not None:  # the step's entries only, where this process can
            params = device_model.on_device(context.run_id, replica, step, device)
    params, buffers = params.to(device), None if buffers is None else buffers.to(device)
    clock.mark("model")  # the replica brought to the server's model, on the device
    memory = load_memory(context, task, device, cfg)
    fb = read_feedback(msg.content, device, step, memory)
    fb = usable_feedback(fb, msg.content, memory, pid, t)
    clock.mark("memory")
    reply = worker_round(task, memory, sparsifier, params, buffers, [fb], [pid], t,
                         run.local_steps, run.local_lr, weights=[1.0])[0]
    clock.mark("compute")  # gradient, error feedback, selection
    save_memory(context, memory, last_round=t, cfg=cfg)
    if replica is not None:
        save_replica(context, replica, cfg)
    clock.mark("save")
    if faults.corrupts(run.faults, run.seed, pid, t):  # corrupted in transit
        reply.upload.values = torch.full_like(reply.upload.values, float("nan"))
    content = wire.reply_content(reply, replica)
    clock.mark("encode")
    content["client-timing"] = wire.timing_record(clock.seconds)
    budget = sparsifier.budget(task.dim)  # None: no budget (dense)
    content = hostile.tamper(run.faults, pid, t, content, run.num_workers, task.dim,
                             budget)  # #11, #17
    node = ray_node_id()  # #12: which Ray node ran this client (cluster placement)
    if node is not None:
        content["placement"] = wire.placement_record(node)
    return Message(content, reply_to=msg)


def handle_identify(msg: Message, context: Context, settings=None) -> Message:
    """Which partition this node holds (the server binds it at first contact)
    and the device it computes on (the server stops a run whose clients
    compute elsewhere than it expects: no silent CPU), and the round and
    digest of the model replica it holds, if any. Builds nothing: a client
    that would fail to build its task on a missing GPU says so here. It
    also says how many torch threads it computes with (its Ray CPU share
    under the simulation: clients/cache.py)."""
    cfg = settings_of(context, settings)
    replica = None
    if OmegaConf.select(cfg, "broadcast", default="gradient") == "gradient":
        replica = load_replica(context, cfg)
    return Message(wire.identity_content(int(context.node_config["partition-id"]),
                                         device=compute_device(cfg.device), replica=replica,
                                         threads=match_cpu_share()), reply_to=msg)


def handle_checkpoint(msg: Message, context: Context, settings=None) -> Message:
    """Reply with this worker's memory and the round of the upload it holds."""
    cfg, task, _, device = settings_and_build(context, settings)
    memory = load_memory(context, task, device, cfg)
    last = memory.last_round if memory.last_round is not None else -1
    pid = int(context.node_config["partition-id"])
    return Message(wire.memory_content(pid, {"state": memory.state_dict(), "last_round": last}),
                   reply_to=msg)


def handle_restore(msg: Message, context: Context, settings=None) -> Message:
    """Replace this worker's memory by the one the server checkpointed."""
    cfg, task, _, device = settings_and_build(context, settings)
    pid, saved = wire.read_memory(msg.content)
    if pid != int(context.node_config["partition-id"]):
        return Message(Error(code=wire.WRONG_WORKER, reason=f"memory of worker {pid} sent to "
                             f"partition {context.node_config['partition-id']}"), reply_to=msg)
    memory = ErrorFeedbackMemory(1, task.dim, task.dtype, device)
    memory.load_state_dict(saved["state"])
    save_memory(context, memory, last_round=saved["last_round"], cfg=cfg)
    return Message(wire.identity_content(pid), reply_to=msg)


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
        return handle_identify(msg, context, settings)

    @client.query("restore")
    def restore(msg: Message, context: Context) -> Message:
        return handle_restore(msg, context, settings)

    return client


# `flwr run` / SuperNode entry point (pyproject [tool.flwr.app.components])
app = make_client_app()
