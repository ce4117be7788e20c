"""A Flower strategy that aggregates sparse uploads and broadcasts the
global gradient (or, with ``broadcast=model``, the model).

Round t: ``configure_train`` sends every node (under client sampling, #12:
only the nodes of round t's sampled partitions) what the Coordinator's plan
says (regtopk_fl/broadcast.py, protocol/wire.py): the sparse global
gradient of round t-1 with the digest of the server's model; to a node
whose replica is stale or missing (a sampled client that missed rounds, a
node that dropped, a restarted one) a patch of the entries that changed
since its replica's round (from model_0 without a replica), or the full
model and optimizer state where that is smaller or a patch cannot be exact
(a resync); plus the status of its last upload (its weight w_n, or
"rejected"). The feedback values are read off the broadcast g, or travel
explicitly with a patch or a resync. A node that answers ``REPLICA_STALE``
gets the full model next. ``aggregate_train``
decodes the replies (coded indices), and the framework-free
:class:`~regtopk_fl.fedround.Coordinator` rejects a reply computed on another
model than the server's (round and digest), validates the rest (a bad upload
is dropped with a logged reason), scatter-adds g = sum_n w_n g_hat_n without
densifying any upload, and steps the server optimizer. The in-process engine
runs the very same Coordinator.

Checkpoints (``checkpoint.every``) use the evaluate phase of Flower's round
loop, which this strategy does not need for evaluation (that is central):
after a due round every node is asked for its error-feedback memory
(``query.checkpoint``) and the server writes one checkpoint with the model,
optimizer, pending feedback and all memories, or none when a node did not
answer (nodes not identified yet are identified first). A resumed run
starts at the checkpoint's next round: it first asks the
nodes who they are (``query.identify``: partition, and the round and digest
of the replica each holds, which the server checks against its digest
table) and hands each its memory back (``query.restore``); each node is then
patched from its replica's round (from model_0 when it has none, or one
ahead of the checkpoint), or sent the full model where that is smaller.

A fresh run identifies a node (``query.identify``) before its first train
message, not every node before round 1 (#34): without client sampling every
node is needed in round 1 and all are asked then; under sampling only the
nodes of the round's sampled partitions, found through the Simulation
Runtime's node table where there is one (``node_hint``), else in batches of
the round's size. So a start at N = 10,000, m = 10 asks 10 nodes, not
10,000. With the table, the unbound nodes of round t+1's sampled
partitions are asked along with round t's train messages and bound after
its step, so a later round waits for no identify round trip (one that does
not answer then is asked at round t+1's start). Each identify batch logs
one INFO line ("round 3: 10 new nodes patched from model_0"), the per-node
decisions go to DEBUG.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol import wire
from regtopk_fl.checkpoint import crash_point
from regtopk_fl.fedround import Coordinator

from .devices import screen_devices
from .identity import NodeBinding, screen_claims

log = logging.getLogger(__name__)


class SparseAggregation(Strategy):
    """Sparse uploads in, dense model out; every node (or the sampled ones), every round."""

    def __init__(self, coordinator: Coordinator, num_nodes: int,
                 on_round: Callable[[int, dict], None] | None = None,
                 wait_for_nodes_s: float = 600.0, message_ttl_s: float | None = None,
                 first_round: int = 1, checkpointer=None, recorder=None,
                 identity: NodeBinding | None = None, participation=None,
                 expect_device: str | None = None,
                 device_setting: str = "runtime.client_gpus", node_hint=None,
                 last_round: int | None = None):
        self.coord = coordinator
        self.last_round = last_round  # the run's last round: nothing to identify after it
        # no silent CPU (#21): the device every node must compute on, and the
        # setting the refusal names (strategies/devices.py)
        self.expect_device, self.device_setting = expect_device, device_setting
        self._trained = False  # a train message went out from this process
        self.participation = participation  # #12: which partitions take part in round t
        self.first_round = int(first_round)  # Flower counts from 1 again after a resume
        self.checkpointer, self.recorder = checkpointer, recorder
        # a train message expires when the server stops waiting for its reply,
        # so a node that was away (restarted) never works on a stale round
        self.message_ttl_s = message_ttl_s
        self.num_nodes = int(num_nodes)
        self.on_round = on_round
        self.wait_for_nodes_s = wait_for_nodes_s
        # Flower node id -> worker (partition id): bound once, every claim checked (#11)
        self.identity = identity or NodeBinding(num_nodes)
        # node id -> the partition it probably holds (or a callable returning
        # that dict): whom to identify first under sampling (#34); never believed
        self.node_hint = node_hint
        self._ahead: set = set()  # nodes asked who they are with this round's train messages
        self.ray_nodes: dict = {}  # Ray node id -> replies computed there (#12, under Ray)
        self.client_threads: dict = {}  # node -> the torch threads it said it computes with
        self.upload_round: dict = {}  # worker -> round of its last upload the server got
        self._round_info: dict = {}
        self._started = False
        self._restore: dict | None = None  # worker -> memory, to hand back after a resume
        self._checkpoint_round = None
        self._threads_said = None

    @property
    def node_worker(self) -> dict:
        return self.identity.node_partition

    def _t(self, server_round: int) -> int:
        return server_round + self.first_round - 1

    def _query(self, grid: Grid, action: str, contents: dict) -> list:
        """Send ``query.<action>`` to each node (node -> RecordDict), return the replies."""
        msgs = [Message(content=c, dst_node_id=n, message_type=f"{MessageType.QUERY}.{action}",
                        ttl=self.message_ttl_s) for n, c in contents.items()]
        return list(grid.send_and_receive(msgs, timeout=self.message_ttl_s or 3600.0))

    # -- train -----------------------------------------------------------------
    def _nodes(self, grid: Grid) -> list:
        """The connected nodes. Before the first round: wait up to
        ``wait_for_nodes_s`` for all ``num_nodes``; later rounds go on with the
        nodes that are online (a node that died is counted as missing; one that
        comes back is used again) and only wait while none is online. (A
        simulation federation of the wrong size was refused before this:
        strategies/federation.py.) A longer wait is logged every 30 s."""
        deadline = time.monotonic() + self.wait_for_nodes_s
        nodes = sorted(grid.get_node_ids())
        want = 1 if self._started else self.num_nodes
        note = time.monotonic() + 5.0  # quiet when the nodes are there at once
        while len(nodes) < want and time.monotonic() < deadline:
            if time.monotonic() >= note:
                log.info("waiting for %d SuperNode(s) (num_workers=%d): %d connected; "
                         "runtime.wait_for_nodes_s=%g", want, self.num_nodes, len(nodes),
                         self.wait_for_nodes_s)
                note += 30.0
            time.sleep(0.2)
            nodes = sorted(grid.get_node_ids())
        if not self._started and len(nodes) != self.num_nodes:
            log.warning("round 1 starts with %d SuperNodes for num_workers=%d (%s)", len(nodes),
                        self.num_nodes, "a node that holds no partition is refused"
                        if len(nodes) > self.num_nodes else "the absent ones count as missing")
        self._started = True
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = online = self._nodes(grid)
        if self.identity.pins:  # partitions pinned to the nodes' authenticated keys
            self.identity.pin(grid.get_nodes())
        if self._restore is not None:
            self._restore_memories(grid, nodes)
        server_round = self._t(server_round)
        sampling = self.participation is not None and not self.participation.full  # #12
        chosen = set(self.participation.clients(server_round)) if sampling else None
        # which partition each new node holds decides what it is sent: every
        # node before its first train message, the sampled ones only (#34)
        self._identify_needed(grid, nodes, chosen, server_round)
        # only nodes bound to a partition are sent anything: the model never
        # goes to a node the server cannot place (asked again when needed)
        nodes = [n for n in nodes if n in self.node_worker]
        sampled = self.num_nodes
        if sampling:
            nodes, sampled = [n for n in nodes if self.node_worker[n] in chosen], len(chosen)
        workers = [self.node_worker.get(n) for n in nodes]
        plan = self.coord.plan(workers)
        self._round_info = {"nodes": len(nodes), "plan": plan, "sampled": sampled,
                            "sent": dict(zip(nodes, workers))}  # node -> worker (#35)
        server, downlink = self.coord.server, self.coord.downlink
        step = downlink.step
        shared = None  # the delta records, built once and sent to every node
        patches: dict = {}  # base round -> the patch records, built once per base
        msgs = []
        for node, worker, kind, base in zip(nodes, workers, plan.kind_list, plan.base_list):
            if kind == "delta":
                records = shared = shared or wire.step_records(step)
            elif kind == "patch":
                if base not in patches:
                    patches[base] = wire.patch_records(downlink.patch(base, server))
                records = patches[base]
            elif kind == "full":
                records = wire.replica_records(server, self.coord.round,
                                               step.digest if step else None)
            else:
                records = wire.model_records(server.params, server.buffers)
            fb = self.coord.pending.get(worker) if worker is not None else None
            content = wire.train_content(server_round, kind, records, fb,
                                         self.upload_round.get(worker))  # which upload fb is about
            msgs.append(Message(content=content, dst_node_id=node,
                                message_type=MessageType.TRAIN, group_id=str(server_round),
                                ttl=self.message_ttl_s))
        self._trained = self._trained or bool(msgs)
        return msgs + self._identify_ahead(online, server_round + 1)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round = self._t(server_round)
        server = self.coord.server
        replies = list(replies)
        identify = f"{MessageType.QUERY}.identify"
        answers = [m for m in replies if m.metadata.message_type == identify]
        replies = [m for m in replies if m.metadata.message_type != identify]
        decoded, rejected, failed, undecodable, timing = [], {}, 0, 0, []
        for msg in replies:
            if msg.has_error():
                failed += 1
                log.info("round %d: node %s failed: [code %s] %s", server_round,
                         msg.metadata.src_node_id, msg.error.code, msg.error.reason)
                if msg.error.code == wire.REPLICA_STALE:  # it holds no usable replica
                    self.coord.downlink.lost(self.node_worker.get(msg.metadata.src_node_id))
                continue
            try:
                reply = wire.read_reply(msg.content, server.dim)
            except Exception as exc:  # malformed or hostile message: drop, never crash
                log.warning("round %d: dropped an undecodable reply from node %s: %s",
                            server_round, msg.metadata.src_node_id, exc)
                worker = self.node_worker.get(msg.metadata.src_node_id)
                if worker is not None:
                    rejected[worker] = f"undecodable reply: {exc}"
                else:
                    undecodable += 1
                continue
            ray_node = wire.read_placement(msg.content)  # #12: which Ray node computed it
            if ray_node is not None:
                self.ray_nodes[ray_node] = self.ray_nodes.get(ray_node, 0) + 1
            phases = wire.read_timing(msg.content)  # recorded only (client_timing.csv)
            if phases is not None:
                timing.append((self.node_worker.get(msg.metadata.src_node_id), phases))
            decoded.append((msg.metadata.src_node_id, reply.worker, reply))
        good, distrusted, unbound = screen_claims(self.identity, decoded, server_round)
        rejected.update(distrusted)
        undecodable += unbound
        outcome = self.coord.collect(good, rejected)
        for worker in [r.worker for r in good] + list(rejected):
            self.upload_round[worker] = server_round
        nodes = self._round_info.get("nodes", self.num_nodes)
        sampled = self._round_info.get("sampled", self.num_nodes)  # #12: all but sampling
        no_reply = max(0, nodes - len(replies))  # timed out (round_timeout_s)
        if no_reply or nodes < sampled:
            log.info("round %d: %d of %d nodes online, %d replies, %d without reply in time",
                     server_round, nodes, sampled, len(replies), no_reply)
        why = self._missing_why(replies, server_round)
        if why:  # which worker is missing, and why (#35)
            log.info("round %d: missing %s", server_round, "; ".join(
                f"worker {w}: {r}" for w, r in sorted(why.items(), key=lambda x: str(x[0]))))
        info = {"outcome": outcome, "plan": self._round_info.get("plan"),
                "missing": failed + no_reply + max(0, sampled - nodes), "sampled": sampled,
                "replies": len(good) + len(rejected) + undecodable,
                "rejected_extra": undecodable, "client_timing": timing}
        if self.on_round is not None:
            self.on_round(server_round, info)
        if self._ahead:  # after the step: claims checked as round t+1's start would check them
            self._ahead = set()
            self._bind(answers, server_round + 1)
        metrics = MetricRecord({"sent": int(outcome.sent), "uplink-bytes": int(outcome.uplink_raw),
                                "accepted": len(outcome.accepted),
                                "rejected": len(outcome.rejected)})
        # no arrays: Flower's loop would only carry them to the next
        # configure_train, which builds its messages from the Coordinator
        return None, metrics

    # (Under sampling the round's nodes are the online, identified nodes of
    # round t's sampled partitions: the seeded choice of partitions decides, as
    # in-process. A sampled partition without an online node is counted as
    # missing. flwr's ``sample_nodes`` would pick random node ids with the
    # unseeded ``random`` module and wait without a deadline, so it fits
    # neither the parity with in-process nor ``wait_for_nodes_s``.)

    def _identify_needed(self, grid: Grid, nodes: list, chosen: set | None, t: int) -> None:
        """Identify the unbound nodes this round needs (#34). Without sampling
        (``chosen`` None) that is every unbound node, as before. Under
        sampling only the nodes of the sampled partitions: first the nodes
        the directory (``node_hint``: the Simulation Runtime's own node ->
        partition table) names for a sampled partition that no online node
        holds yet; then, while a sampled partition is still unplaced (no
        directory, a node that did not answer, or one that claimed another
        partition), the other unbound nodes in batches of the round's size,
        each asked at most once a round. A node is thus identified before its
        first train message, never later, and a start costs m identify
        queries instead of N. The directory only decides whom to ask first:
        binding, the device check and the replica claim come from the node's
        own answer, as before."""
        unknown = [n for n in nodes if n not in self.node_worker]
        if not unknown:
            return
        if chosen is None:
            self._identify(grid, unknown, t)
            return
        hint = self.node_hint() if callable(self.node_hint) else (self.node_hint or {})
        placed = lambda: {self.node_worker[n] for n in nodes if n in self.node_worker}  # noqa: E731
        need = chosen - placed()
        first = [n for n in unknown if hint.get(n) in need]
        if first:
            self._identify(grid, first, t)
            need -= placed()
        asked = set(first)
        batch = max(1, len(chosen))
        while need:
            rest = [n for n in unknown if n not in asked and n not in self.node_worker]
            if not rest:
                break
            self._identify(grid, rest[:batch], t)
            asked.update(rest[:batch])
            need -= placed()

    def _missing_why(self, replies: list, t: int) -> dict:
        """worker -> why round t has no reply of it: an error reply (its code
        and reason; Flower's own for a message that expired comes from the
        SuperLink, not the node, and is given to a node without a reply), no
        reply within the round's timeout, or no online node holding that
        partition (#35)."""
        sent = self._round_info.get("sent", {})
        why, heard, theirs = {}, set(), []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                text = f"failed [code {msg.error.code}] {msg.error.reason}"
                if node in sent:
                    why[sent[node]] = text
                else:  # the SuperLink's own error (an expired message): whose is not said
                    theirs.append(text)
            heard.add(node)
        for node, worker in sent.items():
            if node not in heard:
                why[worker] = (f"{theirs.pop()} (node {node})" if theirs else
                               f"no reply within the round's timeout (node {node})")
        sampling = self.participation is not None and not self.participation.full
        expected = set(self.participation.clients(t)) if sampling else set(range(self.num_nodes))
        for worker in expected - set(sent.values()):
            why[worker] = "no online node holds it"
        return why

    # -- the evaluate phase: checkpoints (evaluation itself is central) --------
    def configure_evaluate(self, server_round, arrays, config, grid):
        t = self._t(server_round)
        self._checkpoint_round = None
        if self.checkpointer is None or not self.checkpointer.due(t):
            return []
        self._checkpoint_round = t
        nodes = sorted(grid.get_node_ids())
        unknown = [n for n in nodes if n not in self.node_worker]
        if unknown:  # every memory is asked for: its node must be placed first (#34)
            self._identify(grid, unknown, t)
        return [Message(content=RecordDict({}), dst_node_id=n, ttl=self.message_ttl_s,
                        message_type=f"{MessageType.QUERY}.checkpoint") for n in nodes]

    def aggregate_evaluate(self, server_round, replies):
        t = self._t(server_round)
        if self._checkpoint_round == t:
            memories = {}
            for msg in replies:
                if not msg.has_error():
                    try:
                        worker, memory = wire.read_memory(msg.content)
                    except Exception as exc:  # noqa: BLE001 - a hostile reply: no memory
                        log.warning("round %d: unreadable memory from node %s: %s", t,
                                    msg.metadata.src_node_id, exc)
                        continue
                    if self.node_worker.get(msg.metadata.src_node_id) != worker:
                        log.warning("round %d: node %s sent the memory of worker %s, which "
                                    "is not its partition; ignored", t,
                                    msg.metadata.src_node_id, worker)
                        continue
                    memories[worker] = memory
            absent = sorted(set(range(self.num_nodes)) - set(memories))
            if absent:
                log.warning("round %d: no checkpoint: workers %s did not send their memory",
                            t, absent)
            else:
                self.checkpointer.save(t, self.state_dict(memories), self.recorder)
        crash_point(t)
        return None

    def state_dict(self, memories: dict) -> dict:
        return {"coord": self.coord.state_dict(), "upload_round": dict(self.upload_round),
                "memories": memories, "identity": self.identity.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.coord.load_state_dict(state["coord"])
        self.upload_round = {int(k): int(v) for k, v in state["upload_round"].items()}
        # the nodes' replicas may be ahead of the checkpoint, or gone: what
        # each holds is learnt from its identify answer (checked against the
        # digest table); a worker that does not answer is patched from model_0
        self.coord.downlink.current, self.coord.downlink.resync = {}, set()
        self._restore = dict(state["memories"])
        if "identity" in state:
            self.identity.load_state_dict(state["identity"])

    def _identify(self, grid: Grid, nodes: list, t: int | None = None) -> None:
        """Ask these nodes which partition they hold, which device they
        compute on and which model replica they hold (``query.identify``). A
        clean claim on the run's device binds the node to its partition
        (strategies/identity.py); another device stops the run before round 1
        (strategies/devices.py). The replica a bound node says it holds is
        checked against the digest table (broadcast.Downlink.claim): it
        decides what the node is sent."""
        self._bind(self._query(grid, "identify", {n: RecordDict({}) for n in nodes}), t)

    def _identify_ahead(self, online: list, t: int) -> list:
        """``query.identify`` messages for the unbound nodes that the
        directory (``node_hint``) names for round t's sampled partitions,
        sent with round t-1's train messages: their answers come back with
        that round's replies and are bound after its step
        (:meth:`aggregate_train`), so a sampled round waits for no identify
        round trip of its own (#34). Only under sampling with a directory,
        and not after the last round; a node that does not answer in time is
        asked again at round t's start, as without this."""
        sampling = self.participation is not None and not self.participation.full
        if not sampling or not self.node_hint or (
                self.last_round is not None and t > self.last_round):
            return []
        hint = self.node_hint() if callable(self.node_hint) else self.node_hint
        placed = {self.node_worker[n] for n in online if n in self.node_worker}
        need = set(self.participation.clients(t)) - placed
        ahead = [n for n in online if n not in self.node_worker and hint.get(n) in need]
        self._ahead = set(ahead)
        return [Message(content=RecordDict({}), dst_node_id=n,
                        message_type=f"{MessageType.QUERY}.identify", ttl=self.message_ttl_s)
                for n in ahead]

    def _bind(self, answers, t: int | None) -> None:
        """Bind the nodes of these identify answers (see :meth:`_identify`)."""
        claims, devices, replicas = [], {}, {}
        for msg in answers:
            if not msg.has_error():
                node = msg.metadata.src_node_id
                try:
                    claims.append((node, wire.read_identity(msg.content)))
                    devices[node] = wire.read_device(msg.content)
                    self.client_threads[node] = wire.read_threads(msg.content)
                except Exception:  # noqa: BLE001 - an unreadable claim binds nothing
                    continue
                try:
                    replicas[node] = wire.read_replica_claim(msg.content)
                except Exception as exc:  # noqa: BLE001 - believed nothing: as no replica
                    log.warning("node %s: unreadable replica claim: %s", node, exc)
                    replicas[node] = None
        threads = self.threads_in_use()
        if threads != self._threads_said:  # said once, and again when it changes
            log.info("torch CPU threads of the nodes: %s", threads)
            self._threads_said = threads
        claims = screen_devices(claims, devices, self.expect_device, self.device_setting,
                                first_contact=not self._trained)
        outcomes: dict = {}
        for node, why in self.identity.resolve(claims).items():
            if why is not None:
                log.warning("node %s not identified: %s", node, why)
            elif node in replicas and self.identity.partition_of(node) is not None:
                claim = replicas[node]
                worker = self.identity.partition_of(node)
                said = self.coord.downlink.claim(worker, *(claim or (None, None)))
                log.debug("node %s (worker %s): %s", node, worker, said)  # the detail
                outcomes[_outcome(said)] = outcomes.get(_outcome(said), 0) + 1
        if outcomes:  # one line per identify batch (#34), not one per node
            when = "" if t is None else f"round {t}: "
            log.info("%s%s", when, "; ".join(
                f"{k} new node{'s' * (k != 1)} {what}" for what, k in outcomes.items()))

    def threads_in_use(self) -> list:
        """The distinct torch CPU thread counts the nodes said they compute
        with (for summary.json: a client with more threads than its CPU
        share oversubscribes the machine)."""
        return sorted({t for t in self.client_threads.values() if t is not None})

    def _restore_memories(self, grid: Grid, nodes: list) -> None:
        memories, self._restore = self._restore, None
        self.identity.forget_unless_connected(nodes)
        self._identify(grid, nodes, self.first_round)  # a resume asks every node
        contents = {n: wire.memory_content(w, memories[w]) for n, w in self.node_worker.items()
                    if n in nodes and w in memories}
        done = {wire.read_identity(m.content)
                for m in self._query(grid, "restore", contents) if not m.has_error()}
        lost = sorted(set(memories) - done)
        if lost:
            log.warning("round %d: could not restore the memories of workers %s; they "
                        "start with an empty one", self.first_round, lost)

    def summary(self) -> None:
        log.info("SparseAggregation: %d nodes, sparse scatter-add, server SGD", self.num_nodes)


def _outcome(said: str) -> str:
    """Downlink.claim's decision, shortened for the per-batch line:
    "patched from model_0", "patched from their replica", "sent the full
    model", or the decision itself."""
    if "patched from model_0" in said:
        return "patched from model_0"
    if said.endswith("matches the server's digest"):
        return "patched from their replica"
    if said.endswith("the full model"):
        return "sent the full model"
    return said
